"""Distributed data parallel: 2 CPU processes (gloo, torchrun's environment variables) give the same result as one
process on the full member minibatches (float64), on both execution paths, BatchNorm included: its statistics are
synchronised per member across ranks (the single-process protocol). Single-process tests check the synchronised
batch normalisation against F.batch_norm slice by slice on a one-rank group, and the BatchNorm conversions."""
import copy
import datetime
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from shared import BatchNorm, Head, LatePhase, LatePhaseError
from shared.distributed import SyncedBatchNorm, batch_norm_over_ranks, plain_batchnorm, sync_batchnorm
from shared.modules import LateBatchNorm, set_member

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = dict(rtol=1e-10, atol=1e-12)

# Built the same way by the workers and by the single-process reference.
SETUP = textwrap.dedent("""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from shared import BatchNorm, Head, LatePhase, Rank1

    K, B, STEPS = 2, 4, 3      # late phase: K member minibatches of B per outer step
    B_PRE, PRE_STEPS = 8, 2    # plain SGD before the release

    def build(path):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        return LatePhase(model, K, [Head(), Rank1("0", "2")], sigma0=0.2, gamma_theta=0.5, path=path,
                         theta_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
                         phi_optimizer=lambda p: torch.optim.Adam(p, lr=0.01))

    def batch(step):
        g = torch.Generator().manual_seed(100 + step)
        return (torch.randn(K * B, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (K * B,), generator=g))

    def conv_net():
        # BatchNorm2d (momentum 0.1), BatchNorm2d (cumulative average), BatchNorm1d; modules "1", "4", "9"
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6),
                             nn.Linear(6, 3)).double()

    def images(step, n):
        g = torch.Generator().manual_seed(200 + step)
        return (2 * torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64) + 1,
                torch.randint(0, 3, (n,), generator=g))

    def pretrain(model, part=lambda t: t, reduce=lambda model: None):
        # plain SGD on minibatches of B_PRE (part: this rank's share; reduce: the gradient average over ranks)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        model.train()
        for step in range(PRE_STEPS):
            x, y = images(step, B_PRE)
            opt.zero_grad()
            F.cross_entropy(model(part(x)), part(y)).backward()
            reduce(model)
            opt.step()
        return opt

    def release(model, opt, path):
        # late-phase BatchNorm "1" and "9" and head; BatchNorm "4" (cumulative average) stays shared
        return LatePhase(model, K, [BatchNorm("1", "9"), Head()], sigma0=0.2, gamma_theta=0.5, path=path,
                         inherit_optimizer_state=opt)

    def late_batch(step):
        return images(50 + step, K * B)
""")

WORKER = SETUP + textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from shared.distributed import (SyncedBatchNorm, allreduce_grads, init_from_env, shard, sync_batchnorm)
    from shared.modules import LateBatchNorm

    torch.set_num_threads(1)
    assert init_from_env("gloo", timeout=60)
    out = {}
    for path in ("vectorized", "sequential"):
        lp = build(path)
        assert lp._distributed and (lp._ddp is not None) == (path == "vectorized")
        for step in range(STEPS):
            x, y = batch(step)
            lp.step(shard(x, K), shard(y, K), F.cross_entropy)
        out["linear", path] = lp.model.state_dict()

        model = sync_batchnorm(conv_net())
        assert sum(isinstance(m, SyncedBatchNorm) for m in model.modules()) == 3
        opt = pretrain(model, part=lambda t: shard(t, 1), reduce=lambda m: allreduce_grads(m.parameters()))
        out["pretrained", path] = {k: v.clone() for k, v in model.state_dict().items()}
        lp = release(model, opt, path)  # the SyncedBatchNorm layers become nn.BatchNorm again
        assert not any(isinstance(m, SyncedBatchNorm) for m in lp.model.modules())
        for step in range(STEPS):
            x, y = late_batch(step)
            lp.step(shard(x, K), shard(y, K), F.cross_entropy)
        assert not any(m.sync for m in lp.model.modules() if isinstance(m, LateBatchNorm))  # only inside steps
        out["late", path] = lp.model.state_dict()
    torch.save(out, sys.argv[1] + f".{dist.get_rank()}")
    dist.destroy_process_group()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script, out, world: int = 2, timeout: float = 150.0) -> None:
    """Run ``script`` in ``world`` CPU processes with torchrun's environment; stop them all as soon as one fails."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = open(f"{out}.log{rank}", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), str(out)], cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        text = log.read()
        log.close()
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{text[-4000:]}"


def assert_states_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m, k=k: f"{what}, {k}: {m}")


@pytest.mark.kernels
def test_two_processes_equal_one(tmp_path):
    """Head + rank-1 factors on an MLP; and a conv net with BatchNorm: plain SGD with sync_batchnorm, then the release
    (late-phase BatchNorm and head, one shared BatchNorm, inherited momentum) -- on both paths, every weight and every
    BatchNorm buffer (running statistics, num_batches_tracked) as in one process on the full minibatches."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_ranks(script, tmp_path / "out")
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]

    ns = {}
    exec(SETUP, ns)
    for path in ("vectorized", "sequential"):
        lp = ns["build"](path)
        for step in range(ns["STEPS"]):
            lp.step(*ns["batch"](step), F.cross_entropy)
        want = {("linear", path): lp.model.state_dict()}
        model = ns["conv_net"]()
        opt = ns["pretrain"](model)
        want["pretrained", path] = {k: v.clone() for k, v in model.state_dict().items()}
        lp = ns["release"](model, opt, path)
        for step in range(ns["STEPS"]):
            lp.step(*ns["late_batch"](step), F.cross_entropy)
        want["late", path] = lp.model.state_dict()
        for key, state in want.items():
            for rank, got in enumerate(results):
                assert_states_equal(got[key], state, f"{key[0]} ({path}), rank {rank}")


# ----------------------------------------------------------------------------- one process, one-rank group

@pytest.fixture
def one_rank(tmp_path):
    """A one-rank gloo process group (the collectives run, as under torchrun, but over one rank)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


SHAPES = {"1d-flat": (), "1d-seq": (5,), "2d": (3, 4), "2d-cl": (3, 4), "3d": (2, 3, 2)}


@pytest.mark.kernels
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("momentum,shared", [(0.3, False), (None, True)])
def test_batch_norm_over_ranks_equals_batch_norm_per_slice(one_rank, shape, momentum, shared):
    """On one rank: slice k of the output, the gradients of x, gamma and beta, and the running statistics are those
    of F.batch_norm on slice k (shared: one set of running statistics updated by the slices in order)."""
    K, b, C = 3, 4, 5
    torch.manual_seed(0)
    x = 3 * torch.randn(K * b, C, *SHAPES[shape], dtype=torch.float64) + 2
    if shape == "2d-cl":
        x = x.to(memory_format=torch.channels_last)
    w = torch.rand(K, C, dtype=torch.float64).add(0.5).requires_grad_()
    beta = torch.randn(K, C, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(K, C, dtype=torch.float64), torch.rand(K, C, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    m = [0.3] * K if momentum else [1 / (4 + k) for k in range(K)]  # cumulative average after 3 earlier batches
    pick = (lambda t, k: t[0] if shared else t[k])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = batch_norm_over_ranks(xa, w, beta, K, 1e-5, [(pick(rm, k), pick(rv, k), m[k]) for k in range(K)])
    yb = torch.cat([F.batch_norm(xb[k * b:(k + 1) * b], pick(rm2, k), pick(rv2, k), w[k], beta[k], True, m[k], 1e-5)
                    for k in range(K)])
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ga = torch.autograd.grad((ya * g).sum(), (xa, w, beta))
    gb = torch.autograd.grad((yb * g).sum(), (xb, w, beta))
    torch.testing.assert_close(ya, yb, **TOL)
    for a, b_ in zip(ga, gb):
        torch.testing.assert_close(a, b_, **TOL)
    torch.testing.assert_close(rm, rm2, **TOL)
    torch.testing.assert_close(rv, rv2, **TOL)
    if shape == "2d-cl":
        assert ya.is_contiguous(memory_format=torch.channels_last)
        assert ga[0].is_contiguous(memory_format=torch.channels_last)


def test_batch_norm_over_ranks_low_precision_and_checks(one_rank):
    """bf16 channels_last input: bf16 channels_last output close to the float32 result, bf16 input gradient; no
    affine parameters; fewer than 2 values per channel are refused."""
    x = (torch.randn(6, 4, 5, 5) * 2 + 1).to(memory_format=torch.channels_last)
    want = torch.cat([F.batch_norm(x[k * 3:(k + 1) * 3], None, None, training=True) for k in range(2)])
    xb = x.to(torch.bfloat16).requires_grad_()
    y = batch_norm_over_ranks(xb, None, None, 2)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), want, atol=0.05, rtol=0.05)
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and xb.grad.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(LatePhaseError, match="more than 1 value"):
        batch_norm_over_ranks(torch.randn(2, 3), None, None, 2)
    with pytest.raises(LatePhaseError, match="K=3"):
        batch_norm_over_ranks(torch.randn(4, 3), None, None, 3)


@pytest.mark.kernels
@pytest.mark.parametrize("late", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_synced_late_batchnorm_equals_unsynced_on_one_rank(one_rank, late, momentum):
    """LateBatchNorm with ``sync`` (as LatePhase sets it under torch.distributed) computes, on one rank, what the
    single-process kernels compute: stacked and member mode, outputs, gradients and buffers."""
    K, B = 3, 4
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=momentum).double()
    bn.running_mean.normal_()
    bn.num_batches_tracked.fill_(2)
    a = LateBatchNorm(bn, K, late=late)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.3 * torch.randn_like(p))
    b = copy.deepcopy(a)
    b.sync = True
    x = torch.randn(K * B, 3, 4, 4, dtype=torch.float64)
    g = torch.randn(x.shape, dtype=torch.float64)
    for member in (None, 1):
        xs = x if member is None else x[:B]
        outs = []
        for m in (a, b):
            set_member(m, member)
            xi = xs.clone().requires_grad_()
            y = m(xi)
            (y * g[:len(xs)]).sum().backward()
            outs.append((y, xi.grad))
        for u, v in zip(*outs):
            torch.testing.assert_close(u, v, **TOL)
        for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, **TOL, msg=n)
        for (n, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
            torch.testing.assert_close(ba, bb, **TOL, msg=n)


# ----------------------------------------------------------------------------- conversions

def small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5),
                        nn.BatchNorm1d(5, momentum=None, affine=False), nn.Linear(5, 2),
                        nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)))
    return net.double()


def test_sync_batchnorm_round_trip_is_exact():
    """sync_batchnorm / plain_batchnorm swap the layer classes around the same Parameter and buffer objects; in one
    process the synced layers are nn.BatchNorm bit for bit (training and eval); the round trip restores the exact
    classes and state."""
    ref, net = small_net(), small_net()
    params = {k: id(v) for k, v in net.named_parameters()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net = sync_batchnorm(net)
    kinds = [type(m) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [SyncedBatchNorm] * 3
    assert len(BatchNorm().select(net)) == 3  # the family sees them as BatchNorm layers (e.g. for optimizer groups)
    assert {k: id(v) for k, v in net.named_parameters()} == params  # the same Parameters: optimizers keep working
    assert_states_equal(net.state_dict(), before, "converted")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    for model, o in ((net, opt), (ref, ref_opt)):
        for _ in range(2):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    for k, v in ref.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    net.eval(), ref.eval()
    assert torch.equal(net(x), ref(x))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    back = plain_batchnorm(net)
    assert back is net
    assert [type(m) for m in back.modules()] == [type(m) for m in ref.modules()]
    assert {k: id(v) for k, v in back.named_parameters()} == params and not back.training
    for k, v in state.items():
        assert torch.equal(back.state_dict()[k], v), k
    assert type(plain_batchnorm(sync_batchnorm(nn.BatchNorm3d(2)))) is nn.BatchNorm3d
    with pytest.raises(LatePhaseError, match="BatchNorm1d/2d/3d"):
        SyncedBatchNorm(nn.SyncBatchNorm(2))


def test_latephase_releases_a_synced_model():
    """LatePhase converts SyncedBatchNorm layers back itself: the release of a synced model equals that of the plain
    model (one process, bit for bit), with the pre-release optimizer state inherited."""
    states = []
    for convert in (False, True):
        net = small_net()[:7]
        if convert:
            net = sync_batchnorm(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 2, (8,))
        F.cross_entropy(net(x), y).backward()
        opt.step()
        lp = LatePhase(net, 2, [BatchNorm(), Head()], sigma0=0.1, generator=torch.Generator().manual_seed(0),
                       inherit_optimizer_state=opt)
        assert not any(isinstance(m, SyncedBatchNorm) for m in lp.model.modules())
        assert not lp._synced_bns
        lp.step(x, y, F.cross_entropy)
        states.append(lp.model.state_dict())
    for k, v in states[0].items():
        assert torch.equal(states[1][k], v), k


def test_shard_takes_each_members_rows_and_keeps_the_memory_format():
    from shared.distributed import shard
    x = torch.arange(2 * 4 * 3 * 2 * 2.).reshape(8, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    parts = [shard(x, 2, rank=r, world=2) for r in range(2)]
    assert torch.equal(parts[0], x[[0, 1, 4, 5]]) and torch.equal(parts[1], x[[2, 3, 6, 7]])
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in parts)
    assert shard(torch.arange(8.), 2, rank=1, world=2).tolist() == [2.0, 3.0, 6.0, 7.0]
