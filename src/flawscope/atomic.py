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
from flawscope.logs import log


LOCK_FILE = ".flawscope.lock"


@contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Only one run at a time writes into ``folder``: two trainings there interleaved their logs,
    and the first one's done flag stood for the second's model until that replaced it. An
    advisory lock (``flock``), let go when the process ends however it ends. Where there is none
    (Windows; a file system mounted without locks) the run goes on unguarded, with a warning there."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another account's lock file, in a folder both may write: flock needs no write
        fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise FlawscopeError(f"{folder}: another flawscope run is writing there"
                                 f"{f' (process {holder})' if holder.isdigit() else ''}; wait for it to end or "
                                 "choose another Global.output") from None
        except OSError as exc:  # ENOLCK, ENOSYS, EOPNOTSUPP: no locks on this file system
            log.warning("%s: cannot lock it (%s): a second run into it would not be refused", folder, exc.strerror)
        else:
            with contextlib.suppress(OSError):  # the pid is for the message only
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # and with it the lock


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
    previous = {}
    try:  # a signal between the two calls below still finds the first one put back
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if caught:
            signal.raise_signal(caught[0])


def staging_path(final: Path) -> Path:
    """A hidden sibling of ``final`` to write into before it becomes ``final``, named after this
    process (``.<name>.<pid>.<8 hex digits>.tmp``, ``.old`` added while swapping). Leftovers of
    runs killed before they could clean up (kill -9, a power cut) are removed first: those named
    so, untouched for an hour and not of a process running here (``abandoned``)."""
    ours = re.compile(rf"\.{re.escape(final.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp(\.old)?")
    for leftover in final.parent.glob(f".{glob.escape(final.name)}.*.tmp*"):
        named = ours.fullmatch(leftover.name)
        if named and abandoned(named[1], leftover):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    return final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


ABANDONED_AFTER_S = 3600


def abandoned(pid: str, made: Path) -> bool:
    """Whether the staging ``made`` by process ``pid`` is a leftover: untouched for an hour (a
    staging lives seconds to minutes) and, where a pid can be asked about (``os.kill(pid, 0)``;
    Windows would end the process instead), not of a process running here. The age alone
    protects a run in another PID namespace (a container, another host) sharing the folder."""
    try:
        if time.time() - made.lstat().st_mtime < ABANDONED_AFTER_S:
            return False
    except FileNotFoundError:  # its run finished meanwhile
        return False
    if os.name != "posix" or not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


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
