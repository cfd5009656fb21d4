"""A user's own model and training loop meet no silent trap: the release continues with the user's optimizer (or
refuses to guess one), averaged weights, ensemble and members share one BatchNorm rule, the model refuses a plain
forward once it holds K members, forward_backward accumulates like loss.backward(), and the release follows the
reference where asked (members at zero momentum; gamma_theta on theta's learning rate)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shared
from shared import BatchNorm, Head, LatePhase, LatePhaseError, Rank1

K, B = 3, 4
TOL = dict(rtol=1e-10, atol=1e-12)


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def images(n=K * B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def vectors(n=K * B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def pretrained(make, data, opt_fn, steps=3):
    model = make()
    opt = opt_fn(model.parameters())
    for s in range(steps):
        x, y = data(seed=20 + s)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


# ----------------------------------------------------------------------------- 1. the optimizer is never guessed

def test_without_an_optimizer_the_release_says_to_pass_one():
    for kw in ({}, {"theta_optimizer": shared.sgd()}, {"phi_optimizer": shared.sgd()}):
        with pytest.raises(LatePhaseError, match="inherit_optimizer_state=opt .* or both theta_optimizer= and "
                                                 "phi_optimizer=") as e:
            LatePhase(convnet(), K, [BatchNorm()], **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(LatePhaseError, match="must be the torch.optim.Optimizer"):
        LatePhase(convnet(), K, inherit_optimizer_state=shared.sgd())


def test_an_adam_user_continues_with_adam_at_their_learning_rate():
    """The trap: the release used to switch every tensor to SGD at lr 0.1. Inheriting the Adam the model was trained
    with, theta and every member continue with Adam, its lr, betas and its moments."""
    model, opt = pretrained(convnet, images, lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.95)))
    conv = model[0].weight
    moments = opt.state[conv]["exp_avg"].clone()
    lp = LatePhase(model, K, [BatchNorm(), Head()], inherit_optimizer_state=opt)
    for o in lp.optimizers:
        assert type(o) is torch.optim.Adam
        assert all(g["lr"] == 3e-3 and g["betas"] == (0.8, 0.95) for g in o.param_groups)
    torch.testing.assert_close(lp.theta_optimizer.state[conv]["exp_avg"], moments, rtol=0, atol=0)
    x, y = images(seed=5)
    lp.step(x, y, F.cross_entropy)
    assert int(lp.phi_optimizers[0].state[model[5].weight[0]]["step"]) == 4  # 3 inherited + this one


def test_the_papers_sgd_is_a_named_factory():
    lp = LatePhase(convnet(), K, [BatchNorm()], theta_optimizer=shared.sgd(), phi_optimizer=shared.sgd(lr=0.05))
    g = lp.theta_optimizer.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.1, 0.9, True, 5e-4)
    assert lp.phi_optimizers[0].param_groups[0]["lr"] == 0.05


# ----------------------------------------------------------------------------- 2. one BatchNorm rule

def trained(K=K, steps=2):
    lp = LatePhase(convnet(), K, [BatchNorm(), Head()], theta_optimizer=shared.sgd(), phi_optimizer=shared.sgd(),
                   sigma0=0.3, generator=torch.Generator().manual_seed(0))
    for s in range(steps):
        x, y = images(K * B, seed=s)
        lp.step(x, y, F.cross_entropy)
    return lp


def test_with_one_member_the_default_ensemble_is_the_default_collapsed_model():
    """The trap: collapse re-estimated BatchNorm from data while the ensemble used stored statistics, so averaged vs
    ensemble compared BatchNorm rules. Now the defaults agree (K = 1: the same network), and so do the
    re-estimated ones, given the same loader through the same argument."""
    lp = trained(K=1)
    x = images(7, seed=9)[0]
    loader = [images(8, seed=10 + i)[0] for i in range(2)]
    for kw in ({}, {"loader": loader}):
        collapsed = lp.collapse(**kw)(x).softmax(-1)
        torch.testing.assert_close(lp.ensemble_probs(x, **kw), collapsed, **TOL)
        torch.testing.assert_close(lp.member_model(0, **kw)(x).softmax(-1), collapsed, **TOL)
    assert not torch.allclose(lp.collapse()(x), lp.collapse(loader)(x))


def test_ensemble_members_and_collapse_share_the_rule_with_K_members():
    lp = trained()
    x = images(5, seed=9)[0]
    loader = [images(8, seed=10 + i)[0] for i in range(2)]
    for kw in ({}, {"loader": loader}):
        logits = lp.ensemble_logits(x, **kw)
        for k in range(K):
            torch.testing.assert_close(logits[k], lp.member_model(k, **kw)(x), **TOL)
        one = lp.collapse(members=[1], **kw)(x)
        torch.testing.assert_close(one, logits[1], **TOL)
    again = copy.deepcopy(lp.model)
    shared.update_bn(loader, again)  # the re-estimation ran on a copy: lp.model's statistics are untouched
    assert not torch.allclose(lp.ensemble_logits(x), shared.ensemble_logits(again, x))


# ----------------------------------------------------------------------------- 3. no silent member slicing

def test_a_plain_forward_after_the_release_is_refused_in_one_line():
    """The trap: the model the user holds, put in eval mode and given a batch that K divides, returned K members'
    outputs on slices of the batch."""
    model = convnet()
    lp = LatePhase(model, K, [BatchNorm(), Head()], theta_optimizer=shared.sgd(), phi_optimizer=shared.sgd())
    x, y = images()
    for train in (False, True):
        model.train(train)
        with pytest.raises(LatePhaseError, match="collapse.*ensemble_probs.*member_mode") as e:
            model(x)
        assert "\n" not in str(e.value)
    lp.step(x, y, F.cross_entropy)
    lp.step(x, y, F.cross_entropy, path="sequential")
    model.eval()
    with pytest.raises(LatePhaseError, match="collapse"):
        model(x)  # still refused after steps
    with shared.member_mode(model, 1):
        torch.testing.assert_close(model(x[:B]), lp.member_model(1)(x[:B]), **TOL)
    with shared.member_mode(model, None):
        assert model(x).shape == (K * B, 3)
    assert lp.collapse()(x).shape == (K * B, 3) and lp.ensemble_probs(x).shape == (K * B, 3)


# ----------------------------------------------------------------------------- 4. accumulation as in nanoGPT

def test_forward_backward_adds_to_grad_and_update_clears_it():
    """Two micro-batches with the loss halved, then one update, equal one step on the whole minibatches (no
    BatchNorm: per-sample losses do not interact); update leaves no gradient behind."""
    fams = [Head(), Rank1("0")]
    one = LatePhase(mlp(), K, fams, theta_optimizer=shared.sgd(), phi_optimizer=shared.sgd(), sigma0=0.2,
                    generator=torch.Generator().manual_seed(1))
    two = copy.deepcopy(one)
    x, y = vectors(K * 2 * B, seed=3)
    xs, ys = x.reshape(K, 2, B, 6), y.reshape(K, 2, B)
    whole = one.forward_backward(x, y, F.cross_entropy)
    one.update()
    total = 0
    for i in range(2):
        xi, yi = xs[:, i].reshape(K * B, 6), ys[:, i].reshape(K * B)
        total = total + two.forward_backward(xi, yi, lambda out, t: F.cross_entropy(out, t) / 2)
    grads = {n: p.grad.clone() for n, p in two.model.named_parameters() if p.grad is not None}
    assert grads
    two.update()
    torch.testing.assert_close(total, whole, **TOL)
    for a, b in zip(one.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(a, b, **TOL)
    assert all(p.grad is None for p in two.model.parameters())


def test_the_release_starts_without_the_pre_release_gradients():
    model, opt = pretrained(mlp, vectors, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    x, y = vectors(seed=30)
    F.cross_entropy(model(x[:B]), y[:B]).backward()  # a gradient left over from the user's loop
    lp = LatePhase(model, K, [Head()], inherit_optimizer_state=opt)
    assert all(p.grad is None for p in model.parameters())
    lp.forward_backward(x, y, F.cross_entropy)
    ref = copy.deepcopy(lp)
    ref.model.zero_grad(set_to_none=True)
    ref.forward_backward(x, y, F.cross_entropy)
    for a, b in zip(lp.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL)


# ----------------------------------------------------------------------------- 5. the reference's release

def test_phi_momentum_zero_starts_the_members_empty_and_theta_keeps_its_state():
    model, opt = pretrained(convnet, images, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    conv, head = model[0].weight, model[5].weight
    buf = opt.state[head]["momentum_buffer"].clone()
    model2, opt2 = copy.deepcopy((model, opt))
    inherit = LatePhase(model2, K, [BatchNorm(), Head()], inherit_optimizer_state=opt2)
    zero = LatePhase(model, K, [BatchNorm(), Head()], inherit_optimizer_state=opt, phi_momentum="zero")
    assert all(not o.state for o in zero.phi_optimizers)
    assert zero.theta_optimizer.state[conv]["momentum_buffer"] is not None
    torch.testing.assert_close(inherit.phi_optimizers[2].state[inherit.model[5].weight[2]]["momentum_buffer"], buf)
    # SGD's first step from an empty state sets the buffer to the gradient: the members' first step is lr * grad
    before = [p.detach().clone() for p in zero.phi_params[0]]
    x, y = images(seed=7)
    zero.forward_backward(x, y, F.cross_entropy)
    grads = [p.grad.clone() for p in zero.phi_params[0]]
    zero.update()
    for p, p0, g in zip(zero.phi_params[0], before, grads):
        wd = zero.phi_optimizers[0].param_groups[0]["weight_decay"]
        torch.testing.assert_close(p.detach(), p0 - 0.1 * (g + wd * p0), **TOL)
    with pytest.raises(LatePhaseError, match="phi_momentum must be one of"):
        LatePhase(convnet(), K, inherit_optimizer_state=opt, phi_momentum="fresh")


@pytest.mark.parametrize("scales", ["gradient", "lr"])
def test_gamma_theta_on_the_learning_rate_shrinks_weight_decay_too(scales):
    """theta <- theta - lr (gamma g + wd theta) (gradient) or theta - gamma lr (g + wd theta) (lr, the reference
    ImageNet script), for plain SGD with weight decay; a scheduler keeps the scaled rate."""
    lr, wd, gamma = 0.1, 0.05, 1 / K
    sgd = lambda p: torch.optim.SGD(p, lr=lr, weight_decay=wd)  # noqa: E731
    lp = LatePhase(convnet(), K, [BatchNorm(), Head()], theta_optimizer=sgd, phi_optimizer=sgd, gamma_theta=gamma,
                   gamma_theta_scales=scales,
                   theta_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0))
    conv = lp.model[0].weight
    c0 = conv.detach().clone()
    x, y = images(seed=8)
    lp.forward_backward(x, y, F.cross_entropy)
    g = conv.grad.clone()
    lp.update()
    lp.step_schedulers()
    expected = c0 - lr * (gamma * g + wd * c0) if scales == "gradient" else c0 - gamma * lr * (g + wd * c0)
    torch.testing.assert_close(conv.detach(), expected, **TOL)
    assert lp.theta_optimizer.param_groups[0]["lr"] == pytest.approx(lr * (gamma if scales == "lr" else 1))
    with pytest.raises(LatePhaseError, match="gamma_theta_scales must be one of"):
        LatePhase(convnet(), K, theta_optimizer=sgd, phi_optimizer=sgd, gamma_theta_scales="weights")
