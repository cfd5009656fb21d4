"""Algorithm 1: the vectorized path equals the sequential path (float64), both equal a literal implementation on plain
member networks, release at T0, optimizers, and clear errors for bad use."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shared
from shared import BatchNorm, Custom, Head, Hypernetwork, LatePhase, LatePhaseError, Rank1

SGD = dict(theta_optimizer=shared.sgd(), phi_optimizer=shared.sgd())  # the paper's SGD (LatePhase never guesses one)

TOL = dict(rtol=1e-9, atol=1e-11)
K, B = 3, 4


def convnet(classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(5, momentum=None),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, classes)).double()


def mlp(classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, classes)).double()


class CharLSTM(nn.Module):
    def __init__(self, vocab=7, hidden=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, 5)
        self.lstm = nn.LSTM(5, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.fc(self.lstm(self.emb(x))[0])


def seq_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def tiny_wrn():
    from deep.models import wrn
    torch.manual_seed(0)
    return wrn(10, 1, num_classes=3, in_channels=2).double()


CASES = {  # name: (model builder, families, input maker, loss)
    "bn": (convnet, lambda: [BatchNorm()], "image"),
    "head": (convnet, lambda: [Head()], "image"),
    "bn+head": (convnet, lambda: [BatchNorm(), Head()], "image"),
    "rank1": (convnet, lambda: [Rank1()], "image"),
    "rank1+bn": (convnet, lambda: [Rank1("0", "3"), BatchNorm()], "image"),
    "custom-type": (convnet, lambda: [Custom(types=nn.Conv2d)], "image"),
    "custom-names": (mlp, lambda: [Custom(names=["2.*"])], "vector"),
    "head+rank1-mlp": (mlp, lambda: [Head(), Rank1("0", "2")], "vector"),
    "lstm-head": (CharLSTM, lambda: [Head()], "tokens"),
    "wrn-bn+head": (tiny_wrn, lambda: [BatchNorm(), Head()], "image"),
    "hyper": (convnet, lambda: [Hypernetwork(templates=3)], "image"),
    "hyper+bn+head": (convnet, lambda: [Hypernetwork(exclude="8", templates=2), BatchNorm(), Head()], "image"),
    "hyper-mlp-own-banks": (mlp, lambda: [Hypernetwork(templates=3, share=False)], "vector"),
    "wrn-hyper-shared-banks+bn": (tiny_wrn, lambda: [Hypernetwork(templates=3), BatchNorm()], "image"),
}


def data(kind, seed=0, n=K * B):
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        return torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    if kind == "vector":
        return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 7, (n, 5), generator=g)
    return x, torch.randint(0, 7, (n, 5), generator=g)


def build(case, optimizer, **kw):
    make, fams, kind = CASES[case]
    model = make() if case != "lstm-head" else _lstm()
    lp = LatePhase(model, K, fams(), sigma0=0.2, gamma_theta=0.7, theta_optimizer=optimizer,
                   phi_optimizer=optimizer, generator=torch.Generator().manual_seed(1), **kw)
    return lp, kind


def _lstm():
    torch.manual_seed(0)
    return CharLSTM().double()


OPTIMIZERS = {
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    # Adam divides by sqrt(v) + eps: gradients that are zero in exact arithmetic (e.g. a scale followed by BatchNorm)
    # carry rounding noise of 1e-17 that default eps = 1e-8 would amplify to 1e-11; eps = 1e-6 keeps it below 1e-13.
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-6, weight_decay=1e-3),
}


def assert_same_state(a: LatePhase, b: LatePhase):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], **TOL, msg=lambda m: f"{k}: {m}")
    for oa, ob in zip(a.optimizers, b.optimizers):
        da, db = oa.state_dict()["state"], ob.state_dict()["state"]
        assert da.keys() == db.keys()
        for i in da:
            for key in da[i]:
                torch.testing.assert_close(torch.as_tensor(da[i][key]), torch.as_tensor(db[i][key]), **TOL)


@pytest.mark.kernels
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_vectorized_outer_step_equals_sequential(case, opt):
    lp, kind = build(case, OPTIMIZERS[opt])
    assert lp.path == "vectorized"
    lp.step(*data(kind, seed=1), seq_loss if kind == "tokens" else F.cross_entropy)  # non-trivial optimizer states
    seq = copy.deepcopy(lp)
    x, y = data(kind, seed=2)
    loss_fn = seq_loss if kind == "tokens" else F.cross_entropy
    lv = lp.step(x, y, loss_fn, path="vectorized")
    ls = seq.step(x, y, loss_fn, path="sequential")
    torch.testing.assert_close(lv, ls, **TOL)
    assert_same_state(lp, seq)
    assert lp.outer_step == seq.outer_step == 2


@pytest.mark.parametrize("path", ["vectorized", "sequential"])
@pytest.mark.parametrize("families", ["bn+head", "custom-names"])
def test_outer_step_is_literal_algorithm_1(path, families):
    """theta <- theta - lr gamma_theta sum_k grad_theta L(M_k; theta, phi_k), phi_k <- phi_k - lr grad_phi_k L(M_k),
    computed independently with K plain member networks and autograd."""
    lr_t, lr_p, gamma = 0.3, 0.2, 0.7
    make, fams, kind = CASES[families]
    lp = LatePhase(make(), K, fams(), sigma0=0.3, gamma_theta=gamma, path=path,
                   theta_optimizer=lambda p: torch.optim.SGD(p, lr=lr_t),
                   phi_optimizer=lambda p: torch.optim.SGD(p, lr=lr_p))
    x, y = data(kind)
    members = [lp.member_model(k) for k in range(K)]
    phi_names = {"bn+head": {"1.weight", "1.bias", "4.weight", "4.bias", "8.weight", "8.bias"},
                 "custom-names": {"2.weight", "2.bias"}}[families]
    grads = []
    for k, m in enumerate(members):
        m.train()
        loss = F.cross_entropy(m(x[k * B:(k + 1) * B]), y[k * B:(k + 1) * B])
        names, params = zip(*m.named_parameters())
        grads.append(dict(zip(names, torch.autograd.grad(loss, params))))
    lp.step(x, y, F.cross_entropy)
    for k, m in enumerate(members):
        after = dict(lp.member_model(k).named_parameters())
        for n, p in m.named_parameters():
            if n in phi_names:
                expected = p - lr_p * grads[k][n]
            else:
                expected = p - lr_t * gamma * sum(g[n] for g in grads)
            torch.testing.assert_close(after[n], expected, **TOL)
        plain_bufs = dict(lp.member_model(k).named_buffers())
        for n, buf in m.named_buffers():  # member k's BatchNorm statistics: from its own minibatch
            torch.testing.assert_close(plain_bufs[n].double(), buf.double(), **TOL)


def test_only_the_active_member_steps():
    lp, kind = build("bn+head", OPTIMIZERS["adam"])
    for path in ("vectorized", "sequential"):
        lp.step(*data(kind), F.cross_entropy, path=path)
    for k, opt in enumerate(lp.phi_optimizers):
        assert {int(s["step"]) for s in opt.state.values()} == {2}
        assert set(opt.state) == set(lp.phi_params[k])
    assert {int(s["step"]) for s in lp.theta_optimizer.state.values()} == {2}


def test_release_copies_weights_and_statistics():
    model = convnet()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].weight.normal_()
    conv_w, bn_w, bn_rm = model[0].weight, model[1].weight.detach().clone(), model[1].running_mean.clone()
    lp = LatePhase(model, K, [BatchNorm(), Head()], **SGD)
    assert lp.model is model and model[0].weight is conv_w
    assert any(p is conv_w for p in lp.theta_params)
    for k in range(K):
        torch.testing.assert_close(model[1].weight[k].detach(), bn_w, rtol=0, atol=0)
        torch.testing.assert_close(model[1].running_mean[k], bn_rm, rtol=0, atol=0)
    assert all(p is not bn_w for ps in lp.phi_params for p in ps)
    assert len({id(p) for ps in lp.phi_params for p in ps}) == K * len(lp.phi_params[0])


def test_release_noise_is_relative_per_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40))
    with torch.no_grad():
        model[0].weight.mul_(7.0)
    w = model[0].weight.detach().clone()
    rms = w.pow(2).mean().sqrt()
    LatePhase(model, 4, [Head()], sigma0=0.05, generator=torch.Generator().manual_seed(0), **SGD)
    devs = torch.stack([(p.detach() - w) / rms for p in model[0].weight])
    assert abs(devs.std().item() - 0.05) < 0.05 * 0.05  # 8000 draws: relative s.e. ~ 0.8 %
    assert not torch.allclose(devs[0], devs[1])


def test_inherit_optimizer_state_from_before_T0():
    model = convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for s in range(2):
        x, y = data("image", seed=s)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    head_w, conv_w = model[8].weight, model[0].weight
    lp = LatePhase(model, K, [Head()], inherit_optimizer_state=opt, T0=8,
                   theta_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                   phi_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    mine = lp.theta_optimizer.state[conv_w]["momentum_buffer"]
    torch.testing.assert_close(mine, opt.state[conv_w]["momentum_buffer"], rtol=0, atol=0)
    assert mine is not opt.state[conv_w]["momentum_buffer"]
    for k in range(K):
        st = lp.phi_optimizers[k].state[model[8].weight[k]]["momentum_buffer"]
        torch.testing.assert_close(st, opt.state[head_w]["momentum_buffer"], rtol=0, atol=0)
    assert lp.t == 8
    lp.step(*data("image"), F.cross_entropy)
    assert (lp.outer_step, lp.t) == (1, 8 + K)
    with pytest.raises(LatePhaseError, match="same optimizer class"):
        LatePhase(convnet(), K, [Head()], inherit_optimizer_state=torch.optim.Adam(convnet().parameters()),
                  theta_optimizer=shared.sgd())


def test_list_of_member_minibatches_equals_stacked():
    lp, kind = build("bn+head", OPTIMIZERS["sgd-nesterov"])
    other = copy.deepcopy(lp)
    x, y = data(kind)
    lp.step(x, y, F.cross_entropy)
    other.step(list(x.split(B)), list(y.split(B)), F.cross_entropy)
    assert_same_state(lp, other)


def test_schedulers_and_optimizer_lists():
    lp = LatePhase(convnet(), K, [BatchNorm()],
                   theta_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5),
                   phi_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.1), **SGD)
    assert len(lp.optimizers) == K + 1 and len(lp.schedulers) == K + 1
    lp.step(*data("image"), F.cross_entropy)
    lp.step_schedulers()
    assert lp.theta_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert all(o.param_groups[0]["lr"] == pytest.approx(0.01) for o in lp.phi_optimizers)


def test_rank1_without_ensembling_K1():
    lp = LatePhase(mlp(), 1, [Rank1()], **SGD)
    x, y = data("vector")
    with shared.member_mode(lp.model, 0):
        before = lp.model(x).detach()
    torch.testing.assert_close(before, mlp()(x))
    lp.step(x, y, F.cross_entropy)
    assert lp.collapse().__class__ is nn.Sequential


def test_torchvision_resnet_batchnorm():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    lp = LatePhase(model, 2, [BatchNorm()], **SGD)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    loss = lp.step(x, y, F.cross_entropy)
    assert torch.isfinite(loss)
    plain = lp.collapse([(x, y)])
    assert type(plain) is torchvision.models.ResNet and type(plain.bn1) is nn.BatchNorm2d
    assert sum(p.numel() for p in plain.parameters()) == sum(
        p.numel() for p in torchvision.models.resnet18(num_classes=4).parameters())


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_bad_K(bad):
    with pytest.raises(LatePhaseError, match="K must be an integer"):
        LatePhase(convnet(), bad, **SGD)


def test_no_late_phase_parameters():
    with pytest.raises(LatePhaseError, match="no module"):
        LatePhase(mlp(), K, [BatchNorm()], **SGD)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, affine=False))
    with pytest.raises(LatePhaseError, match="no late-phase parameters"):
        LatePhase(model, K, [BatchNorm()], **SGD)
    with pytest.raises(LatePhaseError, match="selected no parameter"):
        LatePhase(mlp(), K, [Custom(names="nothing.*")], **SGD)
    with pytest.raises(LatePhaseError, match="selected by both"):
        LatePhase(mlp(), K, [Head(), Rank1()], **SGD)
    with pytest.raises(LatePhaseError, match="families"):
        LatePhase(mlp(), K, [], **SGD)


def test_bad_batches():
    lp, kind = build("bn+head", OPTIMIZERS["sgd-nesterov"])
    x, y = data(kind, n=K * B + 1)
    with pytest.raises(LatePhaseError, match="does not split into K=3"):
        lp.step(x, y, F.cross_entropy)
    x, y = data(kind)
    with pytest.raises(LatePhaseError, match="must match"):
        lp.step(x, y[:-K], F.cross_entropy)
    with pytest.raises(LatePhaseError, match="mismatched shapes"):
        lp.step([x[:4], x[4:8], x[8:11]], [y[:4], y[4:8], y[8:11]], F.cross_entropy)
    with pytest.raises(LatePhaseError, match="scalar"):
        lp.step(x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"))
    assert lp.outer_step == 0


@pytest.mark.parametrize("path", ["vectorized", "sequential"])
def test_nan_loss_stops_with_the_step(path):
    lp, kind = build("bn+head", OPTIMIZERS["sgd-nesterov"], path=path)
    x, y = data(kind)
    lp.step(x, y, F.cross_entropy)
    before = copy.deepcopy(lp.model.state_dict())
    x[5, 0, 0, 0] = float("nan")
    with pytest.raises(LatePhaseError, match=r"non-finite loss at outer step 1 \(minibatches t=3\.\.5\)"):
        lp.step(x, y, F.cross_entropy)
    after = lp.model.state_dict()
    for k in before:
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)


def test_nan_loss_deferred_check_names_the_step():
    lp, kind = build("head", OPTIMIZERS["sgd-nesterov"], check_finite_every=3)
    x, y = data(kind)
    lp.step(x, y, F.cross_entropy)
    x[0, 0, 0, 0] = float("inf")
    lp.step(x, y, F.cross_entropy)
    with pytest.raises(LatePhaseError, match="non-finite loss at outer step 1 .*detected at step 3"):
        lp.step(x, y, F.cross_entropy)


def test_bad_construction_arguments():
    with pytest.raises(LatePhaseError, match="gamma_theta"):
        LatePhase(convnet(), K, gamma_theta=-1.0, **SGD)
    with pytest.raises(LatePhaseError, match="sigma0"):
        LatePhase(convnet(), K, sigma0=float("nan"), **SGD)
    with pytest.raises(LatePhaseError, match="path"):
        LatePhase(convnet(), K, path="fast", **SGD)
    with pytest.raises(LatePhaseError, match="torch.optim.Optimizer"):
        LatePhase(convnet(), K, theta_optimizer=lambda p: None, phi_optimizer=shared.sgd())
    with pytest.raises(LatePhaseError, match="exactly the parameters"):
        LatePhase(convnet(), K, phi_optimizer=lambda p: torch.optim.SGD(convnet().parameters(), lr=0.1),
                  theta_optimizer=shared.sgd())
    with pytest.raises(LatePhaseError, match="model itself"):
        LatePhase(nn.Linear(3, 2), K, [Head()], **SGD)
    lp = LatePhase(convnet(), K, **SGD)
    with pytest.raises(LatePhaseError, match="already has late-phase"):
        LatePhase(lp.model, K, **SGD)


def test_batch_coupling_layer_forces_sequential():
    model = nn.Sequential(nn.Linear(4, 4), nn.SyncBatchNorm(4), nn.Linear(4, 2))
    lp = LatePhase(model, 2, [Head()], **SGD)
    assert lp.path == "sequential"
    with pytest.raises(LatePhaseError, match="SyncBatchNorm"):
        LatePhase(nn.Sequential(nn.Linear(4, 4), nn.SyncBatchNorm(4), nn.Linear(4, 2)), 2, [Head()],
                  path="vectorized", **SGD)
    with pytest.raises(LatePhaseError, match="SyncBatchNorm"):
        LatePhase(nn.Sequential(nn.Linear(4, 4), nn.SyncBatchNorm(4), nn.Linear(4, 2)), 2, [BatchNorm()], **SGD)


def test_sgd_factory_defaults_are_the_reference_settings():
    opt = shared.sgd()([nn.Parameter(torch.zeros(1))])
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.1, 0.9, True, 5e-4)


@pytest.mark.kernels
def test_bf16_autocast_step_on_cpu():
    """The autocast option (bf16 forward passes, full-precision updates): both paths agree to bf16 accuracy and the
    rank-1, head and BatchNorm layers keep the activations in bf16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    lp = LatePhase(model, K, [BatchNorm(), Head(), Rank1("3")], sigma0=0.1, autocast=torch.bfloat16, **SGD)
    seq = copy.deepcopy(lp)
    x, y = data("image")
    x = x.float().to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16), shared.member_mode(lp.model, None):
        assert lp.model(x).dtype == torch.bfloat16
    lv = lp.step(x, y, F.cross_entropy, path="vectorized")
    ls = seq.step(x, y, F.cross_entropy, path="sequential")
    assert abs(lv.item() - ls.item()) < 2e-2
    assert all(p.dtype == torch.float32 for p in lp.model.parameters())
    for p, q in zip(lp.model.parameters(), seq.model.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3)
    with pytest.raises(LatePhaseError, match="autocast"):
        LatePhase(convnet(), K, autocast="bf16", **SGD)
