"""The README's 5-line example runs as written."""
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
    assert len(lines) <= 7  # one import line, the user's loader, at most 5 lines of late-phase use
    torch.manual_seed(0)
    train_set = torch.utils.data.TensorDataset(torch.randn(10 * 128 + 50, 3, 8, 8),
                                               torch.randint(0, 10, (10 * 128 + 50,)))
    ns = {"train_set": train_set}
    exec(code, ns)
    final = ns["final"]
    assert type(final).__name__ == "ResNet" and ns["lp"].outer_step == 1 and not final.training
    assert final(train_set[:2][0]).shape == (2, 10)
