"""A finished folder swapped for the earlier one: never neither of them."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flawscope.atomic import output_lock, staging_path, swap_in


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "model.txt").write_text(text)
    return path


def test_a_failed_swap_puts_the_earlier_folder_back(tmp_path, monkeypatch):
    old, new = _folder(tmp_path / "inference", "old"), _folder(tmp_path / ".inference.1.tmp", "new")
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        swap_in(new, old)
    assert (old / "model.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        ".inference.1.tmp", "inference"]


def test_an_interruption_between_the_renames_waits_for_the_new_folder(tmp_path, monkeypatch):
    """Ctrl-C after the earlier folder was moved aside left no folder at all."""
    old, new = _folder(tmp_path / "inference", "old"), _folder(tmp_path / ".inference.1.tmp", "new")
    real_rename = Path.rename

    def interrupted(self, target):
        result = real_rename(self, target)
        os.kill(os.getpid(), signal.SIGINT)  # right after the earlier folder moved aside
        return result

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        swap_in(new, old)
    assert (old / "model.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["inference"]


def test_leftovers_of_killed_runs_are_removed_those_of_running_ones_kept(tmp_path):
    """kill -9 leaves hidden staging folders that no later run removed; a run in another PID
    namespace (a container sharing the folder) is told apart by its staging's age alone."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = ended.stdout.strip()
    hours_ago = time.time() - 2 * 3600
    gone = [f".inference.{dead}.0123abcd.tmp", f".inference.{dead}.0123abcd.tmp.old"]
    kept = [f".inference.{os.getppid()}.0123abcd.tmp",  # a run still going
            f".inference.{dead}.89abcdef.tmp",  # touched within the hour: maybe a run elsewhere
            ".inference.backup.tmp", f".inference.{dead}.notours.tmp", ".other.1.0123abcd.tmp"]  # not ours
    for name in gone + kept:
        (tmp_path / name).mkdir()
    (tmp_path / f".inference.{dead}.4567cdef.tmp").write_text("a list half written")
    for name in [*gone, f".inference.{dead}.4567cdef.tmp", *(k for k in kept if "89abcdef" not in k)]:
        os.utime(tmp_path / name, (hours_ago, hours_ago))
    staging = staging_path(tmp_path / "inference")
    assert staging.name.startswith(f".inference.{os.getpid()}.") and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_an_output_lock_where_the_file_system_has_none_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with output_lock(tmp_path / "out"):
        ran = True
    assert ran and "cannot lock it" in caplog.text
