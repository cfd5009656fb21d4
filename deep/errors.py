"""The user-error classes of the deep benchmarks: every mistake a user can fix is a :class:`DeepError` whose message
is one line naming the problem and the fix; the command line prints it as ``error: ...`` and exits with status 2."""


class DeepError(ValueError):
    """A run cannot start, resume or finish because of something the user can change (one actionable line)."""


class ConfigError(DeepError):
    """A configuration value, name or flag is invalid."""


class DataError(DeepError):
    """A dataset is missing or corrupt, or was asked for with bad arguments.

    The message is one line that names the dataset, the files or folder involved, and what to do about it.
    """
