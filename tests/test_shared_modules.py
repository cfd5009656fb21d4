"""Member-aware modules: one stacked forward/backward equals K member forwards/backwards (float64), and member k equals
the plain layer of the original class built from member k's tensors."""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import LatePhaseError
from tolerances import rounding_tol
from shared.modules import (LateBatchNorm, LateCustom, LateHyper, LateLinear, LateRank1 as Rank1, set_member,
                            template_bank)

TOL = dict(rtol=1e-10, atol=1e-12)
pytestmark = pytest.mark.kernels  # every test here compares two code paths


def perturb(module, scale=0.3, seed=0):
    """Make the members differ (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def stacked_vs_members(module, x, K):
    """Run ``module`` once stacked and once as K member passes on copies; return both outputs, input gradients,
    parameter gradients and buffers."""
    module.zero_grad(set_to_none=True)
    a, b = module, copy.deepcopy(module)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    set_member(a, None)
    ya = a(xa)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(1), dtype=ya.dtype)
    (ya * g).sum().backward()
    B = x.shape[0] // K
    outs = []
    for k in range(K):
        set_member(b, k)
        outs.append(b(xb[k * B:(k + 1) * B]))
    yb = torch.cat(outs)
    (yb * g).sum().backward()
    torch.testing.assert_close(ya, yb, **TOL)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert (pa.grad is None) == (pb.grad is None), n
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, **TOL)
    for (n, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(ba, bb, **TOL)
    return ya


BN_CASES = {  # kind, input shape after the batch and channel dims
    "1d-flat": (nn.BatchNorm1d, ()),
    "1d-seq": (nn.BatchNorm1d, (5,)),
    "2d": (nn.BatchNorm2d, (3, 4)),
    "3d": (nn.BatchNorm3d, (2, 3, 2)),
}


@settings(max_examples=30)
@given(case=st.sampled_from(sorted(BN_CASES)), K=st.integers(1, 3), B=st.integers(2, 4), C=st.integers(1, 3),
       momentum=st.sampled_from([0.1, 0.7, None]), affine=st.booleans(), track=st.booleans(), late=st.booleans(),
       training=st.booleans(), channels_last=st.booleans(), seed=st.integers(0, 10))
def test_batchnorm_stacked_equals_member_passes(case, K, B, C, momentum, affine, track, late, training,
                                                channels_last, seed):
    kind, tail = BN_CASES[case]
    torch.manual_seed(seed)
    bn = kind(C, momentum=momentum, affine=affine, track_running_stats=track).double()
    if track:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(3)
    m = LateBatchNorm(bn, K, late=late)
    if late:
        perturb(m, seed=seed)
    m.train(training)
    x = 3 * torch.randn(K * B, C, *tail, dtype=torch.float64) + 2
    if channels_last and case == "2d":
        x = x.to(memory_format=torch.channels_last)
    y = stacked_vs_members(m, x, K)
    if channels_last and case == "2d":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_member_k_is_nn_batchnorm(momentum):
    """Member mode follows nn.BatchNorm2d exactly (output and updated running statistics)."""
    K, B = 3, 4
    bn = nn.BatchNorm2d(3, momentum=momentum).double()
    m = LateBatchNorm(bn, K)
    perturb(m)
    x = torch.randn(K * B, 3, 5, 5, dtype=torch.float64)
    plains = [m.to_plain([k]) for k in range(K)]
    set_member(m, None)
    y = m(x)
    for k, plain in enumerate(plains):
        plain.train()
        torch.testing.assert_close(plain(x[k * B:(k + 1) * B]), y[k * B:(k + 1) * B], **TOL)
        torch.testing.assert_close(plain.running_mean, m.running_mean[k], **TOL)
        torch.testing.assert_close(plain.running_var, m.running_var[k], **TOL)
        assert int(plain.num_batches_tracked) == int(m.num_batches_tracked[k])


def test_batchnorm_low_precision_keeps_dtype_and_layout():
    bn = nn.BatchNorm2d(4)
    m = LateBatchNorm(bn, 2)
    x = (torch.randn(6, 4, 5, 5) * 2 + 1).to(memory_format=torch.channels_last)
    set_member(m, None)
    y32 = m(x.clone())
    xb = x.to(torch.bfloat16).requires_grad_()
    yb = m(xb)
    assert yb.dtype == torch.bfloat16 and yb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yb.float(), y32, atol=0.05, rtol=0.05)
    yb.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16


def test_batchnorm_needs_two_values_per_channel():
    m = LateBatchNorm(nn.BatchNorm1d(3), 2)
    with pytest.raises(LatePhaseError, match="more than 1 value"):
        m(torch.randn(2, 3))


@pytest.mark.parametrize("layer", ["linear", "linear-seq", "conv1d", "conv2d", "conv2d-cl", "conv3d"])
@pytest.mark.parametrize("bias", [True, False])
def test_rank1_stacked_equals_members_and_folds(layer, bias):
    K, B = 3, 2
    torch.manual_seed(0)
    base, shape = {
        "linear": (nn.Linear(4, 3, bias=bias), (4,)),
        "linear-seq": (nn.Linear(4, 3, bias=bias), (5, 4)),
        "conv1d": (nn.Conv1d(2, 3, 3, padding=1, bias=bias), (2, 6)),
        "conv2d": (nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias), (2, 6, 5)),
        "conv2d-cl": (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=bias), (2, 6, 5)),
        "conv3d": (nn.Conv3d(2, 3, 2, bias=bias), (2, 3, 3, 3)),
    }[layer]
    m = Rank1(base.double(), K)
    perturb(m)
    x = torch.randn(K * B, *shape, dtype=torch.float64)
    if layer == "conv2d-cl":
        x = x.to(memory_format=torch.channels_last)
    y = stacked_vs_members(m, x, K)
    for k in range(K):  # W_k = W o (r_k s_k^T) folded into the original class
        plain = m.to_plain([k])
        assert type(plain) is type(base)
        torch.testing.assert_close(plain(x[k * B:(k + 1) * B]), y[k * B:(k + 1) * B].detach(), **TOL)


def test_rank1_starts_as_identity_and_rejects_groups():
    conv = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(LatePhaseError, match="groups=1"):
        Rank1(conv, 2)
    lin = nn.Linear(3, 2)
    m = Rank1(lin, 2)
    x = torch.randn(4, 3)
    torch.testing.assert_close(m(x), lin(x))
    assert m.base.weight is lin.weight


HYPER_LAYERS = {  # layer, input shape after the batch dim
    "linear": (lambda b: nn.Linear(4, 3, bias=b), (4,)),
    "linear-seq": (lambda b: nn.Linear(4, 3, bias=b), (5, 4)),
    "conv1d": (lambda b: nn.Conv1d(2, 3, 3, padding=1, bias=b), (2, 6)),
    "conv2d": (lambda b: nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=b), (2, 6, 5)),
    "conv2d-cl": (lambda b: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=b), (2, 6, 5)),
    "conv2d-groups": (lambda b: nn.Conv2d(4, 6, 3, padding="same", dilation=2, groups=2, bias=b), (4, 5, 5)),
    "conv3d": (lambda b: nn.Conv3d(2, 3, 2, bias=b), (2, 3, 3, 3)),
}


@pytest.mark.parametrize("layer", sorted(HYPER_LAYERS))
@pytest.mark.parametrize("bias", [True, False])
def test_hyper_stacked_equals_members_and_folds(layer, bias):
    """W_k = sum_j T_j c_kj: one stacked forward/backward (one grouped convolution or batched matmul) equals K member
    passes, and member k folded into the original class (W_k) computes member k."""
    K, B = 3, 2
    torch.manual_seed(0)
    make, shape = HYPER_LAYERS[layer]
    base = make(bias).double()
    m = LateHyper(base, K, template_bank([base.weight], 4), 0)
    perturb(m)
    x = torch.randn(K * B, *shape, dtype=torch.float64)
    if layer == "conv2d-cl":
        x = x.to(memory_format=torch.channels_last)
    y = stacked_vs_members(m, x, K)
    if layer == "conv2d-cl":
        assert y.is_contiguous(memory_format=torch.channels_last)
    for k in range(K):
        plain = m.to_plain([k])
        assert type(plain) is type(base) and "weight" in dict(plain.named_parameters())
        torch.testing.assert_close(plain(x[k * B:(k + 1) * B]), y[k * B:(k + 1) * B].detach(), **TOL)


def test_hyper_starts_as_the_layer_and_keeps_the_bias():
    lin = nn.Linear(3, 2)
    w, b = lin.weight.detach().clone(), lin.bias
    T = template_bank([lin.weight], 5, torch.Generator().manual_seed(0))
    m = LateHyper(lin, 2, T, 0)
    assert m.T is T and m.base.bias is b and "weight" not in dict(m.base.named_parameters())
    assert torch.equal(T[0].detach(), w) and all(torch.equal(c.detach(), torch.eye(5)[0]) for c in m.c)
    x = torch.randn(4, 3)
    # A batched matmul (the hypernetwork layer) against a plain one: other BLAS kernels on some CPUs (one ulp apart
    # on AVX-512 MKL), so the float32 rounding bound of a dot product of 3 terms plus the bias.
    scale = float(x.abs().max() * w.abs().max() + b.detach().abs().max())
    torch.testing.assert_close(m(x), x @ w.T + b, **rounding_tol(n=4, scale=scale))
    with pytest.raises(LatePhaseError, match="does not fit"):
        LateHyper(nn.Linear(2, 2), 2, T, 0)
    with pytest.raises(LatePhaseError, match="nn.Linear and nn.Conv1d/2d/3d"):
        LateHyper(nn.Embedding(3, 2), 2, T, 0)
    with pytest.raises(LatePhaseError, match="J >= 2"):
        template_bank([torch.zeros(2, 3), torch.zeros(2, 3)], 1)


@pytest.mark.parametrize("bias", [True, False])
def test_head_stacked_equals_members(bias):
    K, B = 4, 3
    m = LateLinear(nn.Linear(5, 3, bias=bias).double(), K)
    perturb(m)
    stacked_vs_members(m, torch.randn(K * B, 5, dtype=torch.float64), K)
    stacked_vs_members(m, torch.randn(K * B, 2, 5, dtype=torch.float64), K)


class TwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x, shift=0.0):
        y = self.lin(x) * self.scale + shift
        return torch.tanh(y)


def test_custom_stacked_equals_members_and_keeps_theta():
    K, B = 3, 2
    inner = TwoOut().double()
    w = inner.lin.weight
    m = LateCustom(inner, ["scale", "lin.bias"], K)
    assert m.inner.lin.weight is w
    assert [n for n, _ in m.named_parameters()][0] == "inner.lin.weight"
    perturb(m)
    stacked_vs_members(m, torch.randn(K * B, 3, dtype=torch.float64), K)
    plain = m.to_plain([1])
    set_member(m, 1)
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(plain(x), m(x))


def test_custom_refuses_buffers():
    with pytest.raises(LatePhaseError, match="BatchNorm family"):
        LateCustom(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), ["0.weight"], 2)


def test_stacked_batch_must_split():
    m = LateLinear(nn.Linear(2, 2), 3)
    with pytest.raises(LatePhaseError, match="K=3"):
        m(torch.randn(4, 2))


@pytest.mark.parametrize("case", ["late-2d", "late-2d-channels-last", "shared-1d", "late-no-affine", "bf16"])
def test_traced_stacked_batchnorm_equals_the_eager_kernels(case):
    """The form torch.compile traces (shared.modules._traced_slices: tensor operations on the (K, B, C, rest) view)
    equals the eager per-slice kernels (_SliceBatchNorm): outputs, input and parameter gradients, running
    statistics. Different code paths, so within the rounding bound of the statistics' sums (B * rest values)."""
    from shared.modules import _SliceBatchNorm, _traced_slices
    K, B, C = 3, 4, 5
    torch.manual_seed(0)
    shape = (K * B, C) if case == "shared-1d" else (K * B, C, 3, 4)
    dtype = torch.float32 if case == "bf16" else torch.float64
    x = 2 * torch.randn(shape, dtype=dtype) + 1
    if case == "late-2d-channels-last":
        x = x.to(memory_format=torch.channels_last)
    if case == "bf16":
        x = x.bfloat16()
    affine = case != "late-no-affine"
    w = torch.randn(K, C, dtype=dtype) if affine else None
    b = torch.randn(K, C, dtype=dtype) if affine else None
    if case == "shared-1d":  # one set of running statistics receives the K updates in turn
        rm, rv = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5
        stats = lambda rm, rv: [(rm, rv, 0.1)] * K  # noqa: E731
    else:
        rm, rv = torch.randn(K, C, dtype=dtype), torch.rand(K, C, dtype=dtype) + 0.5
        stats = lambda rm, rv: [(rm[k], rv[k], 0.3) for k in range(K)]  # noqa: E731
    outs = []
    for f in (_SliceBatchNorm.apply, _traced_slices):
        xi = x.clone().requires_grad_()
        wi, bi = (None, None) if w is None else (w.clone().requires_grad_(), b.clone().requires_grad_())
        rmi, rvi = rm.clone(), rv.clone()
        y = f(xi, wi, bi, K, 1e-5, stats(rmi, rvi))
        (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append([y, xi.grad, rmi, rvi] + ([] if w is None else [wi.grad, bi.grad]))
    n = B * (x[0].numel() // C)
    # bf16: both compute in float32 and round the result to bf16 once, so they differ by that rounding
    tol = rounding_tol(2, "bfloat16") if case == "bf16" else rounding_tol(n, dtype, scale=10.0)
    for a, c in zip(*outs):
        torch.testing.assert_close(c, a, **tol)
