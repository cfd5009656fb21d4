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
    assert len(lines) <= 6  # one import line + at most 5 lines of late-phase use
    torch.manual_seed(0)
    loader = [(torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,))) for _ in range(2)]
    ns = {"loader": loader}
    exec(code, ns)
    final = ns["final"]
    assert type(final).__name__ == "ResNet" and ns["lp"].outer_step == 2
    assert final(loader[0][0][:2]).shape == (2, 10)
