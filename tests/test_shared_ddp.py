"""Distributed data parallel: 2 CPU processes (gloo, torchrun's environment variables) give the same result as one
process on the full member minibatches, on both execution paths (float64; families without batch statistics, since
BatchNorm statistics are per rank as in standard DDP)."""
import os
import socket
import subprocess
import sys
import textwrap

import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETUP = textwrap.dedent("""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from shared import Head, LatePhase, Rank1

    K, B, STEPS = 2, 4, 3

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
""")

WORKER = SETUP + textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from shared.distributed import init_from_env, shard

    torch.set_num_threads(1)
    assert init_from_env()
    out = {}
    for path in ("vectorized", "sequential"):
        lp = build(path)
        assert lp._distributed and (lp._ddp is not None) == (path == "vectorized")
        for step in range(STEPS):
            x, y = batch(step)
            lp.step(shard(x, K), shard(y, K), F.cross_entropy)
        out[path] = lp.model.state_dict()
    torch.save(out, sys.argv[1] + f".{dist.get_rank()}")
    dist.destroy_process_group()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "out")], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out

    ns = {}
    exec(SETUP, ns)
    for path in ("vectorized", "sequential"):
        lp = ns["build"](path)
        for step in range(ns["STEPS"]):
            lp.step(*ns["batch"](step), ns["F"].cross_entropy)
        single = lp.model.state_dict()
        for rank in range(2):
            got = torch.load(tmp_path / f"out.{rank}")[path]
            assert got.keys() == single.keys()
            for k in single:
                torch.testing.assert_close(got[k], single[k], rtol=1e-10, atol=1e-12)
