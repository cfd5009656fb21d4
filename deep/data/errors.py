"""The data layer's single error type."""


class DataError(ValueError):
    """A dataset is missing or corrupt, or was asked for with bad arguments.

    The message is one line that names the dataset, the files or folder involved, and what to do about it.
    """
