"""User errors and the one error boundary every command runs inside.

``UserError`` is a mistake in what the user gave (a config value, a path, a corrupt input file):
its message is one line that names the file or key and says what to do. ``boundary`` turns it
(and the other user errors below) into ``PROG: error: MESSAGE`` and exit code 2, Ctrl-C into exit
code 130 with the resume hint, and anything else into its traceback plus a line saying it is a bug.

User errors are: ``UserError`` and ``RunStopped``; a diverged training loss; the ``ValueError`` subclasses the modules define for bad input
(``DatasetError``, ``PretrainedError``, ``HubError``, ``StorageError``, ...) and any ``ValueError``
raised by this package's own code (a check on the user's input); the ``OSError`` kinds that are
about a path the user named (``USER_OS_ERRORS``). A ``ValueError`` raised inside a third-party
library (jax, numpy, ...) and every other exception are bugs.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import traceback
from typing import Any, Iterator

__all__ = ["UserError", "RunStopped", "USER_OS_ERRORS", "EXIT_USER", "EXIT_INTERRUPTED", "is_user_error", "one_line",
           "boundary", "check_output_dir", "check_number"]

EXIT_USER = 2          # as argparse's own usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
USER_OS_ERRORS = (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError, FileNotFoundError)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class UserError(ValueError):
    """Bad user input (config value, path, corrupt file): a one-line message naming the file or key."""


class RunStopped(RuntimeError):
    """A run stopped by something outside it (a peer process died, the job was cut short): what is
    finished is kept, and the one-line message says how to go on. Reported like a user error."""


def _raised_here(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc``'s traceback is this package's code (its own check)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (UserError, RunStopped)) or isinstance(exc, USER_OS_ERRORS):
        return True
    if isinstance(exc, ValueError):  # the package's own input checks raise ValueError (or a subclass)
        return type(exc) is not ValueError or _raised_here(exc)
    if isinstance(exc, FloatingPointError):  # training_state.check_finite: a diverged loss (lower the lr)
        return _raised_here(exc)
    return False


def one_line(exc: BaseException) -> str:
    """The user-facing line of ``exc``: an OSError about a path names the path and what to do."""
    if isinstance(exc, OSError) and getattr(exc, "filename", None) is not None:
        path = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        why = exc.strerror or type(exc).__name__
        todo = {FileExistsError: "choose another path or remove it",
                NotADirectoryError: "a part of the path is a file, not a folder; choose another path",
                IsADirectoryError: "expected a file, found a folder",
                PermissionError: "no permission; choose a path you can write to, or fix its permissions",
                FileNotFoundError: "check the path"}.get(type(exc), "")
        return f"{path}: {why}" + (f" ({todo})" if todo else "")
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


@contextlib.contextmanager
def boundary(prog: str, *, interrupted_hint: str = "rerun the same command to resume") -> Iterator[None]:
    """Run a command: user errors exit 2 with ``PROG: error: ...``, Ctrl-C exits 130 with
    ``interrupted_hint``, a bug shows its traceback and says so (exit 1)."""
    try:
        yield
    except KeyboardInterrupt:
        _exit(EXIT_INTERRUPTED, f"{prog}: interrupted; {interrupted_hint}")
    except Exception as e:  # noqa: BLE001 - this is the boundary: decide user error or bug
        if is_user_error(e):
            _exit(EXIT_USER, f"{prog}: error: {one_line(e)}")
        traceback.print_exc()
        _exit(1, f"{prog}: internal error ({type(e).__name__}): this is a bug, please report it with the "
                 "traceback above and the command line")


def _exit(code: int, message: str) -> None:
    """Print ``message`` to stderr and exit with ``code``; the SystemExit also carries the message
    (``str(exc)``) for callers of ``cli.main`` that catch it."""
    print(message, file=sys.stderr)
    exc = SystemExit(message)
    exc.code = code  # what the interpreter exits with (an int: it prints nothing more)
    raise exc from None


def check_output_dir(path: str, what: str = "--out") -> str:
    """A folder a command may write to, checked before any work: not an existing file, not below a
    file, writable (itself if it exists, else the nearest existing folder above it); gs:// is
    checked by ``storage.check`` (other schemes refused). Creates nothing; returns ``path``."""
    from datasetdm_jax import storage

    try:
        path = storage.check(path)
    except ValueError as e:
        raise UserError(f"{what} {e}") from None
    if storage.is_remote(path):
        return path
    if not path:
        raise UserError(f"{what} is empty; name a folder")
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise UserError(f"{what} {path} is a file, not a folder; choose a folder (a new or an empty one)")
    probe = full
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UserError(f"{what} {path}: {probe} is a file, so no folder can be made below it; choose another path")
    if not _writable(probe):
        where = "" if probe == full else f" ({probe}, where it would be made)"
        raise UserError(f"{what} {path}: no permission to write{where}; choose a folder you can write to")
    return path


def _writable(folder: str) -> bool:
    """``folder`` takes new files (tried, not guessed from mode bits: root, ACLs and read-only mounts)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".datasetdm-write-check-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.remove(name)
    return True


def check_number(key: str, value: Any, *, integer: bool = False, low: float | None = None,
                 high: float | None = None) -> float | int:
    """``value`` as a finite number (an int when ``integer``) within [low, high]; a one-line
    ``UserError`` naming ``key`` otherwise."""
    if low is not None and high is not None:
        rng = f" in [{low:g}, {high:g}]"
    else:
        rng = f" >= {low:g}" if low is not None else f" <= {high:g}" if high is not None else ""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise UserError(f"{key}={value!r}: expected {kind}{rng}")
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise UserError(f"{key}={value!r}: expected {kind}{rng}")
    return int(value) if integer else float(value)
