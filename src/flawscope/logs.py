"""Logging set-up shared by the CLI and the modes."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("flawscope")


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (it is replaced under test runners and notebooks)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_console(level: int = logging.INFO) -> None:
    """Log lines to stderr as ``[flawscope] message``, once."""
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("[flawscope] %(message)s"))
        log.addHandler(handler)
    log.setLevel(level)


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy the log to ``path`` for the duration of one mode. The file is appended to across runs:
    each run's part opens with a line giving its command, so that one run can be told from the next."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    old_level = log.level
    log.setLevel(min(log.getEffectiveLevel(), logging.INFO))  # the file gets INFO even when the console is quiet
    log.addHandler(handler)
    command = " ".join(shlex.quote(arg) for arg in [Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?"
    started = log.makeRecord(log.name, logging.INFO, __file__, 0, "---- run started (pid %d): %s",
                             (os.getpid(), command), None)
    handler.handle(started)  # the file only: the console shows the command already
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        handler.close()
