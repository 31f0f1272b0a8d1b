"""ferkit's own errors: what the `ferkit` command reports in one line, and the exit status each one means.

Every error ferkit raises on purpose is a `FerkitError`; `ferkit.cli.main` prints its message on one line
and exits with its `exit_code`. Anything else that escapes a command (a ValueError from inside torch or
numpy, a KeyError, ...) is a bug in ferkit, whatever its type: exit status 70, and `--debug` shows where.

- `UsageError` (exit 2): the command or call asks for something impossible: an unknown name, an option
  out of range, options that do not go together, a device this machine lacks, a path ferkit will not write.
- `InputError` (exit 2): a file or value ferkit was given cannot be used: data, weights, images, videos,
  a checkpoint.
- `RunError` (exit 1): the inputs were fine but the work failed its own check (an export whose outputs
  differ from PyTorch's).

`UsageError` and `InputError` are also ValueErrors, as ferkit's errors were before they had a base class,
so `except ValueError` in code that calls ferkit keeps catching them.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
"""Bad usage or bad input (also an OSError: a file that cannot be read or written)."""


class FerkitError(Exception):
    """An error ferkit raises on purpose, with a message for the user and the exit status it means."""

    exit_code: ClassVar[int] = EXIT_RUN_FAILED


class UsageError(FerkitError, ValueError):
    """A call or command line that asks for something impossible: the caller must change it."""

    exit_code = EXIT_USAGE


class InputError(FerkitError, ValueError):
    """A file or value that ferkit was given and cannot use: data, weights, images, videos, checkpoints."""

    exit_code = EXIT_USAGE


class RunError(FerkitError):
    """Work that ran on good inputs and failed its own check."""

    exit_code = EXIT_RUN_FAILED
