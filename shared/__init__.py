"""Late-phase weights for any PyTorch model (von Oswald, Kobayashi, Sacramento et al., ICLR 2021)."""
from .errors import LatePhaseError

__all__ = ["LatePhaseError"]
