"""Collapse to one plain network (phi_bar), ensembles, per-member BatchNorm re-estimation and SWA."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

import shared
from shared.modules import late_modules
from shared import SWA, BatchNorm, Head, LatePhase, LatePhaseError, Rank1
from shared.modules import LateModule

TOL = dict(rtol=1e-10, atol=1e-12)
K, B = 3, 4


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double()


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(K * B, 2, 6, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (K * B,), generator=g)) for _ in range(n)]


def trained(families, steps=3, **kw):
    kw = {"theta_optimizer": shared.sgd(), "phi_optimizer": shared.sgd(), **kw}
    lp = LatePhase(convnet(), K, families, sigma0=0.3, generator=torch.Generator().manual_seed(0), **kw)
    for x, y in batches(steps):
        lp.step(x, y, F.cross_entropy)
    return lp


def test_collapse_is_the_original_architecture_with_mean_weights():
    lp = trained([BatchNorm(), Head(), Rank1("3")])
    before = copy.deepcopy(lp.model.state_dict())
    plain = lp.collapse()
    assert [type(m) for m in plain.modules()] == [type(m) for m in convnet().modules()]
    assert not any(isinstance(m, LateModule) for m in plain.modules())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in convnet().parameters())
    m = lp.model
    torch.testing.assert_close(plain[1].weight, torch.stack(list(m[1].weight)).mean(0).detach(), **TOL)
    torch.testing.assert_close(plain[8].bias, torch.stack(list(m[8].bias)).mean(0).detach(), **TOL)
    torch.testing.assert_close(plain[1].running_var, m[1].running_var.mean(0), **TOL)
    r, s = torch.stack(list(m[3].r)).mean(0), torch.stack(list(m[3].s)).mean(0)
    torch.testing.assert_close(plain[3].weight, (m[3].base.weight * r[:, None, None, None] * s[None, :, None, None])
                               .detach(), **TOL)
    for k, v in lp.model.state_dict().items():  # the late-phase model is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_collapse_reestimates_batchnorm_from_data():
    lp = trained([BatchNorm(), Head()])
    loader = [x for x, _ in batches(2, seed=5)]
    plain = lp.collapse(loader)
    reference = lp.collapse()
    update_bn(loader, reference)
    for a, b in zip(plain.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, **TOL)
    assert not torch.allclose(plain[1].running_mean, lp.collapse()[1].running_mean)
    with pytest.raises(LatePhaseError, match="the BatchNorm rule is the loader"):
        lp.collapse("data")
    with pytest.raises(LatePhaseError, match="members"):
        lp.collapse(members=[K])


def test_ensemble_members_are_the_member_networks():
    lp = trained([BatchNorm(), Head()])
    x = batches(1, seed=9)[0][0][:5]
    lp.model.train()
    logits = lp.ensemble_logits(x)
    assert logits.shape == (K, 5, 3)
    assert lp.model.training and all(m.member is None for _, m in late_modules(lp.model))
    for k in range(K):
        member = lp.member_model(k).eval()
        torch.testing.assert_close(logits[k], member(x), **TOL)
    torch.testing.assert_close(lp.ensemble_probs(x), torch.softmax(logits, -1).mean(0), **TOL)
    assert not torch.allclose(logits[0], logits[1])


def test_update_bn_of_members_equals_torch_update_bn_per_member():
    lp = trained([BatchNorm(), Head()])
    loader = [(x, y) for x, y in batches(2, seed=3)]
    expected = []
    for k in range(K):
        member = lp.member_model(k)
        update_bn(loader, member)
        expected.append(member)
    shared.update_bn(loader, lp.model)
    for k in range(K):
        got = lp.member_model(k)
        for (n, a), (_, b) in zip(got.named_buffers(), expected[k].named_buffers()):
            torch.testing.assert_close(a, b, **TOL)
    assert late_modules(lp.model)[0][1].momentum == 0.1


def test_swa_averages_theta_and_every_member_with_constant_lr():
    lp = trained([BatchNorm(), Head()], steps=1)
    swa = SWA(lp, swa_lr=0.05, swa_lr_phi=0.02)
    assert lp.theta_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert all(o.param_groups[0]["lr"] == pytest.approx(0.02) for o in lp.phi_optimizers)
    snapshots = []
    for epoch, (x, y) in enumerate(batches(3, seed=7)):
        lp.step(x, y, F.cross_entropy)
        swa.update()
        swa.step_schedulers()
        snapshots.append({n: p.detach().clone() for n, p in lp.model.named_parameters()})
    assert swa.n_averaged == 3
    assert lp.theta_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    for n, p in swa.model.named_parameters():
        torch.testing.assert_close(p, sum(s[n] for s in snapshots) / 3, **TOL)
    loader = [x for x, _ in batches(2, seed=8)]
    model = swa.finalize(loader)
    reference = copy.deepcopy(model)
    shared.update_bn(loader, reference)
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, **TOL)
    assert not torch.allclose(model[4].running_mean[0], model[4].running_mean[1])
    plain = shared.collapse(model, loader)
    assert type(plain[1]) is nn.BatchNorm2d and shared.ensemble_probs(model, loader[0]).shape == (K * B, 3)
    state = swa.state_dict()
    other = SWA(lp, swa_lr=0.05)
    other.load_state_dict(state)
    assert other.n_averaged == 3
    with pytest.raises(LatePhaseError, match="update"):
        SWA(lp, swa_lr=0.05).finalize(loader)


def test_swa_and_update_bn_of_a_plain_model_are_torchs():
    """A plain model: SWA averages its weights (and BatchNorm statistics); update_bn equals torch's, also when
    limited to the first batches."""
    torch.manual_seed(0)
    model = convnet()
    swa = SWA(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = []
    for x, y in batches(3, seed=3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        swa.update()
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n, p in swa.model.named_parameters():
        torch.testing.assert_close(p, sum(s[n] for s in snapshots) / 3, **TOL)
    loader = [x for x, _ in batches(3, seed=8)]
    ours, theirs = copy.deepcopy(swa.model), copy.deepcopy(swa.model)
    shared.update_bn(loader, ours, limit=2)
    update_bn(loader[:2], theirs)
    for a, b in zip(ours.buffers(), theirs.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert swa.schedulers == []
