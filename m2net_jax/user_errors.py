"""User-facing errors end a job with a sentence saying what to do, not with a traceback.

A job that stops because of something its user fixes (a config value, a workdir another job
holds, a full, read-only or forbidden disk) prints one short message to stderr and exits with
status 2. Any other exception is a bug or an environment failure whose traceback is the
information, and passes through untouched.

Raise `UserError` (or a subclass: `validation.ConfigError`, `workdir_lock.WorkdirLockedError`)
where the message can name the fix; wrap an entry point with `reporting_user_errors`:

  app.run(user_errors.reporting_user_errors(main))
"""

import errno
import functools
import sys
from collections.abc import Callable
from typing import Any

# Exit status of a job stopped by a user-facing error (argparse and absl usage errors also use 2).
EXIT_STATUS = 2

_FREE_SPACE = (
    "free space there, or move --workdir (or --config.data.data_dir) to another disk, then rerun "
    "the same command: training resumes from its newest complete checkpoint"
)
# errno → (what happened to {path}, what to do). A full disk is the one a rerun recovers from.
_OS_ERRORS = {
    errno.ENOSPC: ("The disk holding {path} is full", _FREE_SPACE),
    errno.EDQUOT: ("The disk quota for {path} is used up", _FREE_SPACE),
    errno.EROFS: (
        "{path} is on a read-only file system",
        "point --workdir (or --config.data.data_dir) at a writable directory",
    ),
    errno.EACCES: (
        "Permission denied for {path}",
        "make it writable for this user, or point --workdir (or --config.data.data_dir) at a "
        "directory you own",
    ),
}
# How far `user_message` follows an exception's cause: libraries (Orbax, grain) re-raise an
# OSError wrapped in their own exception types.
_MAX_CHAIN = 8


class UserError(Exception):
    """An error its user fixes with a command, a flag or a file; its message says how."""


def os_error_message(exc: OSError) -> str | None:
    """One line for a full, read-only or forbidden disk (ENOSPC, EDQUOT, EROFS, EACCES), else
    None."""
    if exc.errno not in _OS_ERRORS:
        return None
    what, fix = _OS_ERRORS[exc.errno]
    path = exc.filename if exc.filename is not None else exc.filename2
    return f"{what.format(path='a file of this job' if path is None else path)}: {fix}."


def user_message(exc: BaseException) -> str | None:
    """The message to print instead of a traceback, or None for an internal error.

    A `UserError` prints its own message; a full, read-only or forbidden disk prints what to do.
    Both are recognised anywhere in the exception's chain of causes (`__cause__`, or
    `__context__` when not suppressed), because libraries (grain's worker processes, Orbax)
    wrap the error they met.
    """
    seen = 0
    while exc is not None and seen < _MAX_CHAIN:
        if isinstance(exc, UserError):
            return str(exc)
        if isinstance(exc, OSError) and (message := os_error_message(exc)) is not None:
            return message
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        seen += 1
    return None


def run_reporting_user_errors(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Calls ``fn(*args, **kwargs)``; a user-facing error prints its message and exits with 2.

    Raises:
      SystemExit: status `EXIT_STATUS`, after writing ``Error: <message>`` to stderr.
      Exception: any other exception, re-raised unchanged (its traceback is kept).
    """
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise
        print(f"Error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STATUS) from None


def reporting_user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator form of `run_reporting_user_errors`, e.g. for absl's ``main(argv)``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return run_reporting_user_errors(fn, *args, **kwargs)

    return wrapper


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an override of a key the config lacks reported in one line.

    ml_collections rejects ``--config.data.datset=x`` with a KeyError while absl parses the
    flags, before ``main`` runs (so `reporting_user_errors` cannot see it), and its "did you
    mean" ends a long traceback. Pass this as ``app.run(..., flags_parser=parse_flags)``.

    Raises:
      SystemExit: status `EXIT_STATUS`, after writing ``Error: <flag>: ...`` to stderr.
    """
    from absl import app

    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as error:
        text = error
        while isinstance(text, BaseException):  # AttributeError(KeyError(message))
            text = text.args[0] if text.args else ""
        text = str(text)
        key, _, hint = text.partition("\n")
        key = key.strip("'\"")
        named = [
            arg
            for arg in argv[1:]
            if arg.lstrip("-").startswith("config.") and key in arg.split("=")[0].split(".")
        ]
        if not key or not named:
            raise
        hint = f" {hint.strip()}" if hint.strip() else ""
        print(f"Error: {named[0]}: the config has no key {key!r}.{hint}", file=sys.stderr)
        raise SystemExit(EXIT_STATUS) from None
