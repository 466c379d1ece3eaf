"""Logging set-up shared by the CLI and the modes."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flawscope.errors import Terminated, one_line

log = logging.getLogger("flawscope")


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (it is replaced under test runners and notebooks)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _OneLine(logging.Formatter):
    """A record is one line: a file name's tab or line break is escaped (``errors.one_line``), as
    a name that is not UTF-8 is, which the log file could not take."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return one_line(super().formatMessage(record))


def setup_console(level: int = logging.INFO) -> None:
    """Log lines to stderr as ``[flawscope] message``, once."""
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(_OneLine("[flawscope] %(message)s"))
        log.addHandler(handler)
    log.setLevel(level)


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy the log to ``path`` for the duration of one mode. The file is appended to across runs:
    each run's part opens with a line giving its command, so that one run can be told from the next."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_OneLine("%(asctime)s %(levelname)s %(message)s"))
    old_level = log.level
    log.setLevel(min(log.getEffectiveLevel(), logging.INFO))  # the file gets INFO even when the console is quiet
    log.addHandler(handler)
    command = " ".join(shlex.quote(arg) for arg in [Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?"
    started = log.makeRecord(log.name, logging.INFO, __file__, 0, "---- run started (pid %d): %s",
                             (os.getpid(), command), None)
    handler.handle(started)  # the file only: the console shows the command already
    try:
        yield
    except BaseException as exc:  # the console says why the run stopped once the mode is left: the file too
        reason = ("terminated" if isinstance(exc, Terminated) else "interrupted" if isinstance(exc, KeyboardInterrupt)
                  else f"error: {one_line(str(exc)) or type(exc).__name__}")
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "---- run stopped: %s", (reason,), None))
        raise
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        handler.close()
