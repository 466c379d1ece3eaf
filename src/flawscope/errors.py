"""The one exception type a user can cause, and the checks that raise it before any work is done;
``Terminated`` (SIGTERM, raised as Ctrl-C is) and the one-line forms of other errors' messages."""

import os
from pathlib import Path


class FlawscopeError(Exception):
    """A problem with the user's input (path, image, config, model directory).

    The message names the file or key and the problem on one line; the CLI prints it as
    ``error: <message>`` and exits with status 2, without a traceback.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM (what systemd, docker and kill send), raised where Ctrl-C would be: the same
    clean-up runs, so a stopped run leaves no half-written model or dataset list either."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): the part of a
    library's multi-line error that fits into a one-line ``FlawscopeError``. OpenVINO's errors
    open with ``Exception from <source file>`` lines that say where, not what: those are skipped."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if not line.startswith("Exception from")]
    return (telling or lines or [type(exc).__name__])[0]


def printable(text: str) -> str:
    """``text`` as a terminal, a font or a UTF-8 file can take it: a file name's bytes that are not
    UTF-8 (which Python keeps as lone surrogates) as backslash escapes, not an encoding error."""
    return text.encode(errors="backslashreplace").decode()


_BREAKS = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def one_line(text: str) -> str:
    """``printable`` ``text`` with its line breaks and tabs escaped (``\\n``), as an ``error:`` line
    or a tab-separated field must be: a file name may hold them."""
    return printable(text).translate(_BREAKS)


def check_output_dir(path: Path, what: str) -> None:
    """Refuse an output folder that cannot be written (a file, under a file, no write permission)
    before anything runs, rather than with a traceback after the work. Nothing is created here."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is" if existing == path else f"would be under {existing}, which is"
        raise FlawscopeError(f"{what}: {path} {where} a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FlawscopeError(f"{what}: {existing}: no permission to write there")
