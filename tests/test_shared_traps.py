"""The traps of custom training loops, each fixed or refused: optimizer inheritance carries the hyperparameters,
collapse gives an eval-mode model, structured outputs, time-major activations, the mode after a step, gamma_theta = 0,
one gradient-clipping rule, and stacked batches from a plain loader."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shared
from shared import BatchNorm, Head, LatePhase, LatePhaseError, Rank1
from shared.modules import late_modules

SGD = dict(theta_optimizer=shared.sgd(), phi_optimizer=shared.sgd())  # the paper's SGD (LatePhase never guesses one)

K, B = 3, 4


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()


def images(n=K * B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def pretrain(model, opt, steps=2):
    for s in range(steps):
        x, y = images(seed=10 + s)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# ----------------------------------------------------------------------------- optimizer inheritance

def test_inheritance_carries_every_group_hyperparameter_and_the_schedule():
    """An optimizer annealed to lr 0.01 with weight decay 0 continues exactly so (no factory given): class, lr,
    weight decay, momentum, Nesterov and a scheduler's initial_lr, per group; rank-1 factors take their layer's group."""
    model = convnet()
    head = [model[5].weight, model[5].bias]
    rest = [p for p in model.parameters() if all(p is not h for h in head)]
    opt = torch.optim.SGD([{"params": rest, "weight_decay": 0.0}, {"params": head, "weight_decay": 3e-3}],
                          lr=0.1, momentum=0.8, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.1 ** e)
    pretrain(model, opt)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    conv = model[0].weight
    lp = LatePhase(model, K, [Head(), Rank1("0")], inherit_optimizer_state=opt,
                   theta_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.1 ** (e + 1)))
    theta_group = next(g for g in lp.theta_optimizer.param_groups if any(p is conv for p in g["params"]))
    assert type(lp.theta_optimizer) is torch.optim.SGD
    assert (theta_group["lr"], theta_group["weight_decay"], theta_group["momentum"], theta_group["nesterov"],
            theta_group["initial_lr"]) == (pytest.approx(0.01), 0.0, 0.8, True, 0.1)
    for k, o in enumerate(lp.phi_optimizers):
        by_param = {id(p): g for g in o.param_groups for p in g["params"]}
        w_k, r_k = model[5].weight[k], model[0].r[k]
        assert by_param[id(w_k)]["weight_decay"] == 3e-3 and by_param[id(w_k)]["lr"] == pytest.approx(0.01)
        assert by_param[id(r_k)]["weight_decay"] == 0.0 and by_param[id(r_k)]["momentum"] == 0.8  # conv's group
        torch.testing.assert_close(o.state[w_k]["momentum_buffer"], opt.state[head[0]]["momentum_buffer"])
        assert r_k not in o.state  # a new tensor: no pre-T0 state
    torch.testing.assert_close(lp.theta_optimizer.state[conv]["momentum_buffer"], opt.state[conv]["momentum_buffer"])


def test_factories_given_set_the_hyperparameters_and_only_the_state_is_carried():
    model = convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0)
    pretrain(model, opt)
    conv = model[0].weight
    lp = LatePhase(model, K, [Head()], inherit_optimizer_state=opt, theta_optimizer=shared.sgd(lr=0.1),
                   phi_optimizer=shared.sgd(lr=0.2, weight_decay=1e-3))
    assert lp.theta_optimizer.param_groups[0]["lr"] == 0.1
    assert lp.phi_optimizers[0].param_groups[0]["weight_decay"] == 1e-3
    torch.testing.assert_close(lp.theta_optimizer.state[conv]["momentum_buffer"], opt.state[conv]["momentum_buffer"])


def test_inherited_run_equals_the_hand_built_one():
    """No factory + inheritance = factories with the old hyperparameters + inheritance, step for step."""
    base = convnet()
    opt = torch.optim.SGD(base.parameters(), lr=0.03, momentum=0.7, weight_decay=2e-4)
    pretrain(base, opt)
    a_model, b_model = copy.deepcopy(base), copy.deepcopy(base)
    a_opt = torch.optim.SGD(a_model.parameters(), lr=0.03, momentum=0.7, weight_decay=2e-4)
    a_opt.load_state_dict(opt.state_dict())
    b_opt = torch.optim.SGD(b_model.parameters(), lr=0.03, momentum=0.7, weight_decay=2e-4)
    b_opt.load_state_dict(opt.state_dict())
    a = LatePhase(a_model, K, [BatchNorm(), Head()], inherit_optimizer_state=a_opt)
    f = lambda p: torch.optim.SGD(p, lr=0.03, momentum=0.7, weight_decay=2e-4)  # noqa: E731
    b = LatePhase(b_model, K, [BatchNorm(), Head()], inherit_optimizer_state=b_opt, theta_optimizer=f,
                  phi_optimizer=f)
    for s in range(2):
        a.step(*images(seed=s), F.cross_entropy)
        b.step(*images(seed=s), F.cross_entropy)
    for (n, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


# ----------------------------------------------------------------------------- end-of-training models

def test_collapse_and_member_model_are_ready_to_evaluate():
    lp = LatePhase(convnet(), K, [BatchNorm(), Head()], **SGD)
    lp.step(*images(), F.cross_entropy)
    assert lp.model.training
    x, _ = images(n=5)
    for plain in (lp.collapse([images()[0]]), lp.collapse(), lp.member_model(1)):
        assert not plain.training
        assert plain(x).shape == (5, 3)  # any batch size: one ordinary network
    assert lp.model.training  # the late-phase model itself is unchanged


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return {"logits": self.fc(h), "features": h, "scale": torch.ones(())}


def test_structured_outputs_in_steps_and_ensembles():
    torch.manual_seed(0)
    lp = LatePhase(DictNet().double(), K, [Head("fc")], **SGD)
    seq = copy.deepcopy(lp)
    x, y = torch.randn(K * B, 4, dtype=torch.float64), torch.randint(0, 3, (K * B,))
    loss = lambda o, t: F.cross_entropy(o["logits"], t) + 0.1 * o["features"].pow(2).mean() * o["scale"]  # noqa
    torch.testing.assert_close(lp.step(x, y, loss), seq.step(x, y, loss, path="sequential"))
    out = lp.ensemble_logits(x[:5])
    assert out["logits"].shape == (K, 5, 3) and out["features"].shape == (K, 5, 5) and out["scale"].shape == ()
    for k in range(K):
        torch.testing.assert_close(out["logits"][k], lp.member_model(k)(x[:5])["logits"])
    probs = lp.ensemble_probs(x[:5], output=lambda o: o["logits"])
    torch.testing.assert_close(probs, torch.softmax(out["logits"], -1).mean(0))
    with pytest.raises(LatePhaseError, match=r"output=lambda o: o\['logits'\]"):
        lp.ensemble_probs(x[:5])


# ----------------------------------------------------------------------------- the stacked batch in dim 0

class TimeMajor(nn.Module):
    """Batch-first input (N, T); the LSTM and the late head run time-major (T, N, H)."""

    def __init__(self):
        super().__init__()
        self.emb, self.lstm, self.fc = nn.Embedding(7, 4), nn.LSTM(4, 5), nn.Linear(5, 7)

    def forward(self, x):
        h, _ = self.lstm(self.emb(x).transpose(0, 1))
        return self.fc(h).transpose(0, 1)


def test_time_major_activations_are_refused_on_the_vectorized_path():
    torch.manual_seed(0)
    x, y = torch.randint(0, 7, (K * B, 6)), torch.randint(0, 7, (K * B, 6))
    loss = lambda o, t: F.cross_entropy(o.reshape(-1, 7), t.reshape(-1))  # noqa: E731
    lp = LatePhase(TimeMajor().double(), K, [Head("fc")], **SGD)
    with pytest.raises(LatePhaseError, match=r"dim 0 of its input has 6 entries but the stacked batch has 12.*"
                                             r"batch_first=True.*path='sequential'"):
        lp.step(x, y, loss)
    assert lp.outer_step == 0
    lp.step(x, y, loss, path="sequential")  # member by member it is exact
    assert lp.outer_step == 1


def test_batch_major_flattening_before_the_head_is_exact():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(7, 4), nn.Linear(4, 7)

        def forward(self, x):
            return self.fc(self.emb(x).reshape(-1, 4)).reshape(x.shape[0], x.shape[1], 7)

    torch.manual_seed(0)
    lp = LatePhase(Flat().double(), K, [Head("fc")], sigma0=0.1, **SGD)
    seq = copy.deepcopy(lp)
    x, y = torch.randint(0, 7, (K * B, 6)), torch.randint(0, 7, (K * B, 6))
    loss = lambda o, t: F.cross_entropy(o.reshape(-1, 7), t.reshape(-1))  # noqa: E731
    torch.testing.assert_close(lp.step(x, y, loss), seq.step(x, y, loss, path="sequential"))


def test_outputs_must_be_batch_first():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).T

    lp = LatePhase(nn.Sequential(Transposed()), K, [Head("0.fc")], **SGD)
    with pytest.raises(LatePhaseError, match="batch-first outputs"):
        lp.step(torch.randn(K * B, 4), torch.randint(0, 3, (K * B,)), lambda o, t: o.mean())


@pytest.mark.parametrize("path", ["vectorized", "sequential"])
def test_the_model_is_in_stacked_mode_after_every_step(path):
    lp = LatePhase(convnet(), K, [BatchNorm(), Head()], path=path, **SGD)
    lp.step(*images(), F.cross_entropy)
    assert all(m.member is None for _, m in late_modules(lp.model))
    with shared.member_mode(lp.model, 2):
        assert all(m.member == 2 for _, m in late_modules(lp.model))
    assert all(m.member is None for _, m in late_modules(lp.model))
    with pytest.raises(LatePhaseError, match="member must be in 0..2"):
        with shared.member_mode(lp.model, 3):
            pass


# ----------------------------------------------------------------------------- gamma_theta = 0

def test_gamma_theta_zero_freezes_theta_even_with_weight_decay():
    model = convnet()
    adam = lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1)  # noqa: E731
    lp = LatePhase(model, K, [BatchNorm(), Head()], gamma_theta=0.0, theta_optimizer=adam, phi_optimizer=adam)
    theta0 = [p.detach().clone() for p in lp.theta_params]
    phi0 = [p.detach().clone() for p in lp.phi_params[0]]
    for s in range(10):
        lp.step(*images(seed=s), F.cross_entropy)
    for p, p0 in zip(lp.theta_params, theta0):
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=0)
    assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(lp.phi_params[0], phi0))


# ----------------------------------------------------------------------------- clipping

def test_clip_grad_norm_is_the_mean_members_gradient_norm():
    """K = 1: torch's clip over all parameters. Identical members on identical minibatches: the plain model's clip.
    In general N^2 = |theta.grad / K|^2 + (1/K) sum_k |phi_k.grad|^2, and every gradient is scaled alike."""
    x, y = images(n=B)
    plain = convnet()
    F.cross_entropy(plain(x), y).backward()
    plain_norm = nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
    plain_grads = [p.grad.clone() for p in plain.parameters()]

    lp1 = LatePhase(convnet(), 1, [BatchNorm(), Head()], **SGD)
    lp1.forward_backward(x, y, F.cross_entropy)
    torch.testing.assert_close(lp1.clip_grad_norm_(0.05), plain_norm.double())
    lp1.update()

    lpK = LatePhase(convnet(), K, [BatchNorm(), Head()], **SGD)
    lpK.forward_backward(torch.cat([x] * K), torch.cat([y] * K), F.cross_entropy)
    torch.testing.assert_close(lpK.clip_grad_norm_(0.05), plain_norm.double())
    mine = dict(lpK.model.named_parameters())
    for (n, _), g in zip(plain.named_parameters(), plain_grads):  # theta: the members' mean; phi: member 0's
        torch.testing.assert_close(mine[n].grad / K if n in mine else mine[n + ".0"].grad, g)

    lp = LatePhase(convnet(), K, [BatchNorm(), Head()], sigma0=0.3, **SGD)
    lp.forward_backward(*images(), F.cross_entropy)
    theta = torch.cat([p.grad.reshape(-1) for p in lp.theta_params])
    phis = [torch.cat([p.grad.reshape(-1) for p in ps]) for ps in lp.phi_params]
    expected = ((theta / K).pow(2).sum() + sum(g.pow(2).sum() for g in phis) / K).sqrt()
    before = [p.grad.clone() for p in lp.model.parameters()]
    torch.testing.assert_close(lp.clip_grad_norm_(1e-3), expected)
    ratios = {round(float((p.grad / g).flatten()[0]), 12) for p, g in zip(lp.model.parameters(), before)
              if g.abs().min() > 0}
    assert ratios == {round(1e-3 / (float(expected) + 1e-6), 12)}


# ----------------------------------------------------------------------------- stacked batches from a loader

def test_stack_batches_groups_K_minibatches():
    data = torch.utils.data.TensorDataset(torch.arange(22.0).reshape(11, 2), torch.arange(11))
    loader = torch.utils.data.DataLoader(data, batch_size=2)  # 5 full batches and one of 1
    groups = list(shared.stack_batches(loader, K=2))
    assert len(groups) == 2  # batches (0, 1), (2, 3); (4, short 5) has unequal members and is left out
    torch.testing.assert_close(groups[1][1], torch.arange(4, 8))
    assert list(shared.stack_batches(loader, K=7)) == []
    dicts = [{"x": torch.zeros(2, 3), "y": torch.ones(2)} for _ in range(4)]
    (one, two) = shared.stack_batches(dicts, K=2)
    assert one["x"].shape == (4, 3) and two["y"].shape == (4,)
    with pytest.raises(LatePhaseError, match="K must be an integer"):
        next(shared.stack_batches(loader, K=0))


# ----------------------------------------------------------------------------- the family contract

def test_a_family_is_a_select_method():
    """The docs' LayerNorm family: vectorized = sequential, and the collapse is an nn.LayerNorm with mean phi."""
    ns = {}
    exec(_doc_family(), ns)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    lp = LatePhase(model, K, [ns["LayerNorm"](), Head()], sigma0=0.2, generator=torch.Generator().manual_seed(0), **SGD)
    seq = copy.deepcopy(lp)
    x, y = torch.randn(K * B, 4, dtype=torch.float64), torch.randint(0, 3, (K * B,))
    for s in range(2):
        torch.testing.assert_close(lp.step(x, y, F.cross_entropy), seq.step(x, y, F.cross_entropy, path="sequential"))
    for p, q in zip(lp.model.parameters(), seq.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    plain = lp.collapse()
    assert type(plain[1]) is nn.LayerNorm
    members = late_modules(lp.model)[0][1].phi_lists()
    torch.testing.assert_close(plain[1].weight, torch.stack(list(dict(members)["weight"])).mean(0))


def _doc_family() -> str:
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "extending.md")).read()
    code = re.search(r"```python\n(class LayerNorm.*?)```", text, re.S).group(1)
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 10
    return "import torch.nn as nn\nimport shared\n" + code
