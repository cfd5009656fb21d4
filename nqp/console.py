"""The command line's stdout, shared by ``python -m nqp`` and ``python -m deep`` (standard library only, so that nqp
stays free of torch and deep can import it).

    stdout, sys.stdout = sys.stdout, Stdout(sys.stdout)
    try:
        ...                                   # the command prints its output
    except BrokenPipeError:                   # the reader went away (``| head``): nothing left to say
        silence_stdout()
    except StdoutError as e:                  # a full disk behind ``> file``: one line, exit 2
        ...
    finally:
        sys.stdout = stdout
"""
from __future__ import annotations

import os
import sys


class StdoutError(Exception):
    """Writing the command's output to stdout failed (a full disk behind a redirection, a closed stream)."""


class Stdout:
    """sys.stdout while a command runs: a failed write or flush is a :class:`StdoutError` (a closed pipe stays a
    BrokenPipeError), so that it is not mistaken for a failure of a file the user named."""

    def __init__(self, stream):
        self._stream = stream

    def _call(self, name, *args):
        try:
            return getattr(self._stream, name)(*args)
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as e:  # ValueError: a write to a closed stream
            raise StdoutError(getattr(e, "strerror", None) or str(e)) from None

    def write(self, text):
        return self._call("write", text)

    def flush(self):
        return self._call("flush")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not complain about a closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
    except (OSError, ValueError, AttributeError):
        pass
