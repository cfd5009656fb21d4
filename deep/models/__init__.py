"""Network architectures for the deep benchmarks."""
from .wrn import WRN, WRNConfig, wrn

__all__ = ["WRN", "WRNConfig", "wrn"]
