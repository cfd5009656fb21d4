"""One registry of the --phi families (deep.families): the config's names and rules, the trainer's release and the
preflight's sizes all come from it, and the preflight counts the real surgery (exact for every family)."""
import copy

import pytest
import torch
import torch.nn as nn

import shared
from deep import families
from deep.config import FAMILIES, ConfigError, get_config
from deep.models import wrn
from deep.trainer import late_phase_sizes


def test_config_names_and_rules_are_the_registry():
    assert FAMILIES == tuple(families.REGISTRY)
    for name, entry in families.REGISTRY.items():
        cfg = get_config("fmnist_cpu_bn", phi=(name,), rank1_layers=("*",) if entry.needs_rank1_layers else ())
        built = families.build(cfg)
        assert built and all(isinstance(f, shared.Family) for f in built)
    for phi, layers, msg in [(("bn", "nothing"), (), "must be among"), (("all", "bn"), (), "combines with no other"),
                             (("hyper", "head"), (), "combines with bn only"), (("rank1",), (), "needs --rank1-layers"),
                             (("head",), ("conv",), "apply to the phi family rank1")]:
        with pytest.raises(ConfigError, match=msg):
            get_config("fmnist_cpu_bn", phi=phi, rank1_layers=layers)


@pytest.mark.parametrize("phi", [("bn", "head"), ("hyper", "bn"), ("rank1",), ("all",)])
def test_preflight_sizes_are_those_of_the_real_release(phi):
    """The preflight used to count a hypernetwork family as rank-1 factors; it now counts the surgery itself, on a
    meta-device copy, and gets what the real release allocates."""
    cfg = get_config("fmnist_cpu_bn", phi=phi, K=3, rank1_layers=("*",) if "rank1" in phi else ())
    torch.manual_seed(0)
    model = wrn(10, 1, 10)
    state = torch.random.get_rng_state()
    per_member, buffers, growth = late_phase_sizes(model, families.build(cfg), cfg.K)
    assert torch.equal(torch.random.get_rng_state(), state)  # the preflight draws nothing from the run's generator
    real = copy.deepcopy(model)
    lp = shared.LatePhase(real, cfg.K, families.build(cfg), theta_optimizer=shared.sgd(), phi_optimizer=shared.sgd())
    assert per_member == sum(p.numel() for p in lp.phi_params[0]) > 0
    assert growth == sum(p.numel() for p in real.parameters()) - sum(p.numel() for p in model.parameters())
    late_bns = [m for m in real.modules() if isinstance(m, shared.modules.LateBatchNorm) and m.late]
    assert buffers == sum(b.numel() for m in late_bns for b in m.buffers(recurse=False)) // cfg.K
    if phi == ("hyper", "bn"):  # coefficients, not rank-1 factors (one per output and input feature of every layer)
        rank1 = sum(sum(m.weight.shape[:2]) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        assert per_member != rank1 and growth > (cfg.K - 1) * per_member


def test_presets_release_as_the_reference():
    """CIFAR (and its Fashion-MNIST twin) and ImageNet presets start the members at zero momentum; the ImageNet presets
    put gamma_theta = 1/K on theta's learning rate (so on its weight decay too); the release passes both on."""
    from types import SimpleNamespace

    from deep.config import PRESETS
    from deep.trainer import Trainer
    for name, cfg in PRESETS.items():
        if name.startswith(("cifar", "imagenet", "fmnist_bn")):
            assert cfg.phi_momentum == "zero", name
        assert cfg.gamma_theta_scales == ("lr" if name.startswith("imagenet") else "gradient"), name
    for field, bad in (("phi_momentum", "fresh"), ("gamma_theta_scales", "weights")):
        with pytest.raises(ConfigError, match=f"{field} must be"):
            get_config("cifar10_bn", **{field: bad})
    cfg = get_config("imagenet_resnet50", K=2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    model(torch.randn(2, 3, 3, 3)).sum().backward()
    opt.step()
    run = SimpleNamespace(cfg=cfg, model=model, fams=families.build(cfg), steps=1, opt=opt, seed=0, amp=None)
    Trainer.release(run)
    assert run.lp.phi_momentum == "zero" and all(not o.state for o in run.lp.phi_optimizers)
    assert run.lp.theta_optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr / 2)
