"""Changes that an interruption or a full disk must not leave half made: a file written whole, a
finished folder swapped for the earlier one, a dataset's lists replaced together."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends, then arrive as usual: for the few renames that
    swap a finished result for the earlier one, which an interruption between them would leave
    half made. Python runs signal handlers in the main thread only, so elsewhere there is nothing
    to defer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if caught:
            signal.raise_signal(caught[0])


def swap_in(new: Path, path: Path) -> None:
    """Folder ``new`` becomes ``path``, the earlier one deleted once it is replaced: the two renames
    with Ctrl-C and SIGTERM held off, the earlier one put back if the second fails."""
    old = new.with_name(new.name + ".old")
    swapped = False
    try:
        with deferred_signals():
            if path.exists():
                path.rename(old)
            try:
                os.replace(new, path)
            except OSError:
                if old.exists():
                    old.rename(path)
                raise
            swapped = True
    finally:  # also when a held-off signal arrives as the block ends
        if swapped:
            shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + os.replace, so readers never see half a
    file. The temp file is opened normally (not mkstemp) so it gets the usual umask permissions;
    its name is short, so any name that fits fits with it. A failure names ``path``, or the file
    that stands where one of its folders must be."""
    tmp = path.with_name(f".{uuid.uuid4().hex[:16]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk's error names no file
        with contextlib.suppress(OSError):  # the temp file's own error (no folder for it) would hide this one
            tmp.unlink(missing_ok=True)
        blocker = next((p for p in path.parents if os.path.lexists(p) and not p.is_dir()), None)
        if blocker is not None:  # mkdir's error names the folder it could not make, not why
            raise NotADirectoryError(errno.ENOTDIR, f"a file, not a folder, so {path} cannot be saved",
                                     str(blocker)) from None
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
