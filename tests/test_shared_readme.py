"""The README's examples run as written: the release continues with the user's optimizer, and averaged weights and
the ensemble are compared under one BatchNorm rule."""
import os
import re

import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_example_runs():
    pytest.importorskip("torchvision")
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Late-phase weights for your PyTorch model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 8  # one import line, the user's model, optimizer and loader, 4 lines of late-phase use
    torch.manual_seed(0)
    train_set = torch.utils.data.TensorDataset(torch.randn(10 * 128 + 50, 3, 8, 8),
                                               torch.randint(0, 10, (10 * 128 + 50,)))
    ns = {"train_set": train_set}
    exec(code, ns)
    final = ns["final"]
    assert type(final).__name__ == "ResNet" and ns["lp"].outer_step == 1 and not final.training
    assert final(train_set[:2][0]).shape == (2, 10)
    lp, opt = ns["lp"], ns["opt"]
    assert all(type(o) is type(opt) and o.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.01
               and o.param_groups[0]["momentum"] == 0.9 for o in lp.optimizers)  # the user's optimizer, not lr 0.1


def test_readme_fair_comparison_runs():
    """The two lines comparing averaged weights and ensemble: with K = 1 both give the same probabilities."""
    torchvision = pytest.importorskip("torchvision")
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Late-phase weights for your PyTorch model", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    assert len([line for line in code.splitlines() if line.strip()]) == 2
    import shared
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    lp = shared.LatePhase(model, K=1, families=[shared.BatchNorm()], inherit_optimizer_state=opt)
    x = torch.randn(4, 3, 16, 16)
    loader = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    ns = {"lp": lp, "x": x, "loader": loader}
    exec(code, ns)
    torch.testing.assert_close(ns["probs"], ns["ens"], rtol=1e-4, atol=1e-5)
