"""GPU code paths (skipped without CUDA): exact path equality on the GPU, bf16 autocast with channels_last, CUDA RNG
states in checkpoints, the deferred NaN check, the synchronised BatchNorm on NCCL."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shared
from shared import BatchNorm, Head, LatePhase, LatePhaseError, Rank1

SGD = dict(theta_optimizer=shared.sgd(), phi_optimizer=shared.sgd())  # the paper's SGD (LatePhase never guesses one)

pytestmark = pytest.mark.cuda
K, B = 3, 4


def convnet(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8, momentum=None),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).to("cuda", dtype)


def batch(dtype, channels_last=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(K * B, 3, 8, 8, generator=g, dtype=dtype).cuda()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, torch.randint(0, 5, (K * B,), generator=g).cuda()


@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_vectorized_equals_sequential_float64(channels_last):
    model = convnet(torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    lp = LatePhase(model, K, [BatchNorm(), Head(), Rank1("3")], sigma0=0.2, check_finite_every=1, **SGD)
    lp.step(*batch(torch.float64, channels_last), F.cross_entropy)
    seq = copy.deepcopy(lp)
    x, y = batch(torch.float64, channels_last)
    lp.step(x, y, F.cross_entropy, path="vectorized")
    seq.step(x, y, F.cross_entropy, path="sequential")
    a, b = lp.model.state_dict(), seq.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-11)


def test_cuda_bf16_autocast_channels_last():
    from deep.models import wrn
    torch.manual_seed(0)
    model = wrn(10, 2, num_classes=5).cuda().to(memory_format=torch.channels_last)
    lp = LatePhase(model, K, [BatchNorm(), Head()], autocast=torch.bfloat16, **SGD)
    seq = copy.deepcopy(lp)
    x, y = batch(torch.float32, channels_last=True)
    lv = lp.step(x, y, F.cross_entropy, path="vectorized")
    ls = seq.step(x, y, F.cross_entropy, path="sequential")
    assert torch.isfinite(lv) and abs(lv.item() - ls.item()) < 2e-2 * max(1.0, abs(ls.item()))
    for (n, p), (_, q) in zip(lp.model.named_parameters(), seq.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3)
    probs = lp.ensemble_probs(x[:B])
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, device="cuda"))


def test_cuda_rng_state_roundtrip():
    lp = LatePhase(convnet(torch.float32), K, [BatchNorm()], **SGD)
    torch.cuda.manual_seed_all(3)
    state = lp.state_dict()
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()
    expected = torch.randn(4, device="cuda")
    torch.cuda.manual_seed_all(4)
    lp.load_state_dict(state)
    torch.testing.assert_close(torch.randn(4, device="cuda"), expected, rtol=0, atol=0)


def test_cuda_nan_check_is_deferred():
    lp = LatePhase(convnet(torch.float32), K, [BatchNorm()], **SGD)
    assert lp._guard.every == 50  # the default on accelerators: a deferred check
    x, y = batch(torch.float32)
    x[0] = float("nan")
    lp.step(x, y, F.cross_entropy)
    with pytest.raises(LatePhaseError, match="outer step 0"):
        lp.check_finite()


@pytest.fixture
def nccl_one_rank(tmp_path):
    """A one-rank NCCL process group: the synchronised BatchNorm's collectives run on the GPU, over one rank."""
    import datetime
    import torch.distributed as dist
    if not dist.is_nccl_available() or dist.is_initialized():
        pytest.skip("needs NCCL and no process group in this process")
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_batch_norm_over_ranks(nccl_one_rank, channels_last):
    """On the GPU (NCCL, one rank): float64 equals F.batch_norm slice by slice (output, gradients, running
    statistics); bf16 keeps its dtype and memory format and stays close to float32."""
    from shared.distributed import batch_norm_over_ranks
    torch.manual_seed(0)
    x = (3 * torch.randn(K * B, 4, 5, 5, dtype=torch.float64) + 2).cuda()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (torch.rand(K, 4, dtype=torch.float64) + 0.5).cuda().requires_grad_()
    beta = torch.randn(K, 4, dtype=torch.float64).cuda().requires_grad_()
    rm, rv = torch.zeros(K, 4, dtype=torch.float64).cuda(), torch.ones(K, 4, dtype=torch.float64).cuda()
    rm2, rv2 = rm.clone(), rv.clone()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = batch_norm_over_ranks(xa, w, beta, K, 1e-5, [(rm[k], rv[k], 0.1) for k in range(K)])
    yb = torch.cat([F.batch_norm(xb[k * B:(k + 1) * B], rm2[k], rv2[k], w[k], beta[k], True, 0.1, 1e-5)
                    for k in range(K)])
    g = torch.randn_like(ya)
    ga = torch.autograd.grad((ya * g).sum(), (xa, w, beta))
    gb = torch.autograd.grad((yb * g).sum(), (xb, w, beta))
    for u, v in [(ya, yb), *zip(ga, gb), (rm, rm2), (rv, rv2)]:
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-11)
    assert ya.is_contiguous(memory_format=torch.channels_last) == channels_last
    xh = x.float().to(torch.bfloat16).requires_grad_()
    yh = batch_norm_over_ranks(xh, w.detach().float(), beta.detach().float(), K)
    assert yh.dtype == torch.bfloat16 and yh.is_contiguous(memory_format=torch.channels_last) == channels_last
    want = torch.cat([F.batch_norm(xh.detach().float()[k * B:(k + 1) * B], None, None, w[k].detach().float(),
                                   beta[k].detach().float(), True) for k in range(K)])
    torch.testing.assert_close(yh.float(), want, atol=0.05, rtol=0.05)
    yh.float().sum().backward()
    assert xh.grad.dtype == torch.bfloat16 and torch.isfinite(xh.grad.float()).all()
