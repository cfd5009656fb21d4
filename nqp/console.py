"""The command line's plumbing shared by ``python -m nqp`` and ``python -m deep``: its argument parser, its one-line
errors and its stdout (standard library only, so that nqp stays free of torch and deep can import it).

A user's mistake is one line on stderr and exit status 2 (:func:`fail`, :class:`Parser`); the command's output goes
through :class:`Stdout`:

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

import argparse
import os
import re
import sys


def fail(msg: str) -> int:
    """Print ``error: msg`` on stderr; the exit status of a user's mistake (2)."""
    print(f"error: {msg}", file=sys.stderr)
    return 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and no prefix matching (``--gam`` is an error, not ``--gamma-theta``);
    a flag written with underscores is answered with its dashed spelling."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        underscored = re.search(r"--\w*_[\w-]*", message) if "unrecognized arguments" in message else None
        if underscored:
            message += f" (flags are spelled with dashes, e.g. {underscored.group(0).replace('_', '-')})"
        raise SystemExit(fail(f"{message} (see {self.prog} --help)"))


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
