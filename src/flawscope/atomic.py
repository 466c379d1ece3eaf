"""Changes that an interruption, a full disk or a second run must not leave half made: a file
written whole, a finished folder swapped for the earlier one, a dataset's lists replaced together,
one training at a time in an output folder."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flawscope.errors import FlawscopeError


LOCK_FILE = ".flawscope.lock"


@contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Only one run at a time writes into ``folder``: two trainings there interleaved their logs,
    and the first one's done flag stood for the second's model until that replaced it. An
    advisory lock (``flock``), let go when the process ends however it ends; not taken where
    there is no ``fcntl`` (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            raise FlawscopeError(f"{folder}: another flawscope run is writing there"
                                 f"{f' (process {holder})' if holder.isdigit() else ''}; wait for it to end or "
                                 "choose another Global.output") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


def staging_path(final: Path) -> Path:
    """A hidden sibling of ``final`` to write into before it becomes ``final``, named after this
    process (``.<name>.<pid>.<8 hex digits>.tmp``, ``.old`` added while swapping). Leftovers of
    runs killed before they could clean up (kill -9, a power cut) are removed first, those of runs
    still going kept, and nothing not named so (nor the pid-less names of earlier versions)."""
    ours = re.compile(rf"\.{re.escape(final.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp(\.old)?")
    for leftover in final.parent.glob(f".{glob.escape(final.name)}.*.tmp*"):
        named = ours.fullmatch(leftover.name)
        if named and not process_running(named[1], leftover):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    return final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def process_running(pid: str, made: Path) -> bool:
    """Whether the process ``pid`` that made the staging ``made`` may still be writing it: this
    one, or one that still runs. Where ``os.kill(pid, 0)`` would end the process instead (Windows),
    a staging touched in the last hour."""
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    if os.name != "posix":
        return time.time() - made.stat().st_mtime < 3600
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
