"""Hypernetwork late-phase weights W_k = sum_j T_j c_kj: template banks as in the reference, an exact release,
Algorithm 1 computed by hand, the collapse to the original layers with the mean weights, optimizer inheritance and errors.
(Vectorized = sequential: the hyper cases of test_shared_core.CASES.)"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shared
from shared import BatchNorm, Head, Hypernetwork, LatePhase, LatePhaseError
from shared.modules import LateHyper, late_modules
from test_shared_core import B, K, SGD, TOL, convnet, data, mlp, tiny_wrn
from tolerances import rounding_tol


def hyper_layers(model):
    return {n: m for n, m in late_modules(model) if isinstance(m, LateHyper)}


def test_template_banks_follow_the_reference_layout():
    """Layers of one weight shape share one bank (the reference's TemplateBankRegistry); J = max(templates, n) with
    T_i = W_i and kaiming-normal new templates; every member's coefficients start at e_i."""
    model = tiny_wrn()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    LatePhase(model, K, [Hypernetwork(templates=3), BatchNorm()], **SGD)
    layers = hyper_layers(model)
    assert len(layers) == 10
    shared_bank = layers["blocks.0.conv1"].T
    assert layers["blocks.0.conv2"].T is shared_bank and shared_bank.shape == (3, 16, 16, 3, 3)
    assert len({id(m.T) for m in layers.values()}) == 9
    for name, m in layers.items():
        assert torch.equal(m.T[m.index].detach(), weights[name])
        assert all(torch.equal(c.detach(), torch.eye(m.J, dtype=c.dtype)[m.index]) for c in m.c)
    assert (layers["blocks.0.conv1"].index, layers["blocks.0.conv2"].index) == (0, 1)
    own = LatePhase(tiny_wrn(), K, [Hypernetwork(templates=3, share=False)], **SGD)
    assert len({id(m.T) for m in hyper_layers(own.model).values()}) == 10

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(400, 100))
    LatePhase(lin, 2, [Hypernetwork()], **SGD)
    T = lin[0].T.detach()
    assert T.shape == (10, 100, 400)
    assert abs(T[1:].std().item() / (2 / 400) ** 0.5 - 1) < 0.01  # 360000 draws: relative s.e. ~ 0.1 %


@pytest.mark.kernels
@pytest.mark.parametrize("families", ["hyper", "hyper+bn+head"])
def test_release_reproduces_the_trained_network(families):
    model = convnet()
    with torch.no_grad():
        model[1].running_mean.normal_()
    plain = copy.deepcopy(model)
    fams = {"hyper": [Hypernetwork()], "hyper+bn+head": [Hypernetwork(exclude="8"), BatchNorm(), Head()]}[families]
    lp = LatePhase(model, K, fams, **SGD)
    x, _ = data("image")
    torch.testing.assert_close(lp.ensemble_logits(x[:B]), plain.eval()(x[:B]).expand(K, -1, -1), **TOL)
    for train in (False, True):  # eval first: the training passes below move the running statistics
        plain.train(train), lp.model.train(train)
        with torch.no_grad():
            for k in range(K):
                xk = x[k * B:(k + 1) * B]
                with shared.member_mode(lp.model, k):
                    # W_k = sum_j T_j c_kj is exactly W at the release (c_k = e_i, asserted above), but the layer
                    # is another code path (the composed weight's layout may pick another kernel): up to the
                    # float64 rounding of the network's sums (36 terms per conv output, 4 layers in a row)
                    torch.testing.assert_close(lp.model(xk), plain(xk), **rounding_tol(36, "float64", 10.0, 4))
            with shared.member_mode(lp.model, None):
                stacked = lp.model(x)
            torch.testing.assert_close(stacked, torch.cat([plain(x[k * B:(k + 1) * B]) for k in range(K)]), **TOL)


@pytest.mark.parametrize("path", ["vectorized", "sequential"])
def test_outer_step_is_literal_algorithm_1(path):
    """theta = (T, b) <- theta - lr gamma sum_k grad_theta L(M_k), c_k <- c_k - lr grad_c_k L(M_k), with the member
    networks written out by hand: f_k(x) = W_k3 tanh(W_k2 tanh(W_k1 x + b1) + b2) + b3, W_kl = sum_j T_lj c_klj."""
    lr_t, lr_p, gamma = 0.3, 0.2, 0.7
    lp = LatePhase(mlp(), K, [Hypernetwork(templates=3, share=False)], sigma0=0.3, gamma_theta=gamma, path=path,
                   theta_optimizer=lambda p: torch.optim.SGD(p, lr=lr_t),
                   phi_optimizer=lambda p: torch.optim.SGD(p, lr=lr_p))
    layers = [lp.model[i] for i in (0, 2, 4)]
    T = [m.T.detach().clone().requires_grad_() for m in layers]
    b = [m.base.bias.detach().clone().requires_grad_() for m in layers]
    c = [[m.c[k].detach().clone().requires_grad_() for m in layers] for k in range(K)]
    x, y = data("vector")
    grads = []
    for k in range(K):
        h = x[k * B:(k + 1) * B]
        for i in range(3):
            W = sum(T[i][j] * c[k][i][j] for j in range(3))
            h = h @ W.T + b[i]
            h = torch.tanh(h) if i < 2 else h
        grads.append(torch.autograd.grad(F.cross_entropy(h, y[k * B:(k + 1) * B]), T + b + c[k]))
    lp.step(x, y, F.cross_entropy)
    for i, m in enumerate(layers):
        torch.testing.assert_close(m.T, T[i] - lr_t * gamma * sum(g[i] for g in grads), **TOL)
        torch.testing.assert_close(m.base.bias, b[i] - lr_t * gamma * sum(g[3 + i] for g in grads), **TOL)
        for k in range(K):
            torch.testing.assert_close(m.c[k], c[k][i] - lr_p * grads[k][6 + i], **TOL)


def test_collapse_is_the_original_network_with_the_mean_weights():
    """collapse: every layer of the original class, W_bar = (1/K) sum_k sum_j T_j c_kj (written out here), BatchNorm and
    head the members' means; the outputs equal a plain network built by hand."""
    original = tiny_wrn()
    lp = LatePhase(copy.deepcopy(original), K, [Hypernetwork(exclude="fc", templates=3), BatchNorm(), Head()],
                   sigma0=0.3, generator=torch.Generator().manual_seed(0), **SGD)
    for s in range(2):
        lp.step(*data("image", seed=s), F.cross_entropy)
    final = lp.collapse()
    by_hand = copy.deepcopy(original)
    with torch.no_grad():
        for name, m in late_modules(lp.model):
            target = by_hand.get_submodule(name)
            if isinstance(m, LateHyper):
                target.weight.copy_(sum(sum(m.T[j] * m.c[k][j] for j in range(m.J)) for k in range(K)) / K)
                if m.base.bias is not None:
                    target.bias.copy_(m.base.bias)
                continue
            for p in ("weight", "bias"):
                getattr(target, p).copy_(sum(getattr(m, p)[k] for k in range(K)) / K)
            if hasattr(target, "running_mean"):
                target.running_mean.copy_(m.running_mean.mean(0))
                target.running_var.copy_(m.running_var.mean(0))
    assert [type(a) for a in final.modules()] == [type(a) for a in original.modules()]
    assert sum(p.numel() for p in final.parameters()) == sum(p.numel() for p in original.parameters())
    x, _ = data("image", seed=5)
    torch.testing.assert_close(final(x), by_hand.eval()(x), **TOL)
    for k in range(K):  # member k alone folds to member k's network
        with torch.no_grad(), shared.member_mode(lp.model, k):
            lp.model.eval()
            torch.testing.assert_close(lp.member_model(k)(x), lp.model(x), **TOL)


def test_banks_join_the_weight_group_and_checkpoints_round_trip():
    def release():
        model = convnet()
        conv = [p for n, p in model.named_parameters() if n in ("0.weight", "3.weight")]
        rest = [p for n, p in model.named_parameters() if n not in ("0.weight", "3.weight")]
        opt = torch.optim.SGD([{"params": conv, "lr": 0.05, "weight_decay": 1e-3}, {"params": rest}], lr=0.1,
                              momentum=0.9)
        F.cross_entropy(model(data("image")[0]), data("image")[1]).backward()
        opt.step()
        return LatePhase(model, K, [Hypernetwork("0", "3", templates=2), BatchNorm()], inherit_optimizer_state=opt)

    lp = release()
    banks = [lp.model[0].T, lp.model[3].T]
    group_of = {id(p): g for g in lp.theta_optimizer.param_groups for p in g["params"]}
    assert all((group_of[id(T)]["lr"], group_of[id(T)]["weight_decay"]) == (0.05, 1e-3) for T in banks)
    assert all(T not in o.state for T in banks for o in lp.optimizers)  # new tensors: no state to inherit
    assert lp.phi_optimizers[0].param_groups[0]["lr"] == 0.05  # coefficients: the group of the layer's weight
    lp.step(*data("image"), F.cross_entropy)
    again = release()
    again.load_state_dict(copy.deepcopy(lp.state_dict()))
    x, y = data("image", seed=3)
    torch.testing.assert_close(lp.step(x, y, F.cross_entropy), again.step(x, y, F.cross_entropy), rtol=0, atol=0)
    assert all(torch.equal(p, q) for p, q in zip(lp.model.parameters(), again.model.parameters()))


def test_clear_errors():
    with pytest.raises(LatePhaseError, match="selected no module"):
        LatePhase(convnet(), K, [Hypernetwork("nothing")], **SGD)
    with pytest.raises(LatePhaseError, match="number J >= 1 of templates"):
        Hypernetwork(templates=0)
    with pytest.raises(LatePhaseError, match="selected by both"):
        LatePhase(convnet(), K, [Hypernetwork(), Head()], **SGD)
