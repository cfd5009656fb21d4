"""GPU code paths (skipped without CUDA): exact path equality on the GPU, bf16 autocast with channels_last, CUDA RNG
states in checkpoints, the deferred NaN check."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared import BatchNorm, Head, LatePhase, LatePhaseError, Rank1

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
    lp = LatePhase(model, K, [BatchNorm(), Head(), Rank1("3")], sigma0=0.2, check_finite_every=1)
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
    lp = LatePhase(model, K, [BatchNorm(), Head()], autocast=torch.bfloat16)
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
    lp = LatePhase(convnet(torch.float32), K, [BatchNorm()])
    torch.cuda.manual_seed_all(3)
    state = lp.state_dict()
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()
    expected = torch.randn(4, device="cuda")
    torch.cuda.manual_seed_all(4)
    lp.load_state_dict(state)
    torch.testing.assert_close(torch.randn(4, device="cuda"), expected, rtol=0, atol=0)


def test_cuda_nan_check_is_deferred():
    lp = LatePhase(convnet(torch.float32), K, [BatchNorm()])
    assert lp._guard.every == 50  # the default on accelerators: a deferred check
    x, y = batch(torch.float32)
    x[0] = float("nan")
    lp.step(x, y, F.cross_entropy)
    with pytest.raises(LatePhaseError, match="outer step 0"):
        lp.check_finite()
