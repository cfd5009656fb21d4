"""The data layer's error type (:class:`deep.errors.DataError`, a :class:`deep.errors.DeepError`)."""
from ..errors import DataError

__all__ = ["DataError"]
