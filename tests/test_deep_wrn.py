import pytest
import torch

from deep.models import WRNConfig, wrn


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_wrn_28_10_has_36_48_million_parameters():
    with torch.device("meta"):
        m = wrn(28, 10, num_classes=10)
    assert round(n_params(m) / 1e6, 2) == 36.48


def test_wrn_structure_and_forward():
    m = wrn(16, 2, num_classes=7, in_channels=1)
    assert len(m.blocks) == 3 * 2
    assert m.conv.in_channels == 1 and m.fc.out_features == 7 and m.fc.in_features == 128
    assert [b.shortcut is not None for b in m.blocks] == [True, False, True, False, True, False]
    assert not any(isinstance(x, torch.nn.Dropout) for x in m.modules())
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_wrn_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n"):
        WRNConfig(depth=27)
