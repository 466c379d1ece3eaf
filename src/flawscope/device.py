"""Turn ``Global.device`` (``cpu``, ``gpu``, ``gpu:0``, ``gpu:0,1``; ``cuda`` is an alias) into
torch devices, failing early with the reason when the machine cannot provide them."""

from __future__ import annotations

import re
import resource
import sys

import torch

from flawscope.errors import FlawscopeError
from flawscope.logs import log

_SPEC = re.compile(r"(?P<cpu>cpu)|(?:gpu|cuda)(?::(?P<ids>\d+(?:,\d+)*))?")
_ACCEPTED_FORMS = "cpu, gpu (all visible GPUs), gpu:N, gpu:N,M,... (cuda works as gpu)"


def check_device_spec(spec: str, key: str = "Global.device") -> re.Match:
    """The spec's form alone (not whether this machine has the device): what every mode checks,
    also those that run no model. ``key``: where the spec came from, for the error."""
    match = _SPEC.fullmatch("".join(spec.split()).lower())
    if match is None:
        raise FlawscopeError(f"{key}: {spec!r} is not a device; use {_ACCEPTED_FORMS}")
    return match


def parse_device(spec: str, key: str = "Global.device") -> list[torch.device]:
    """Parse a device spec; ``gpu`` alone means every visible CUDA device.

    Case and whitespace are ignored (``GPU: 0, 1``). Asking for a GPU that this torch build or
    machine cannot give is an error here rather than a CUDA traceback later.
    """
    match = check_device_spec(spec, key)
    if match["cpu"]:
        return [torch.device("cpu")]
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
        raise FlawscopeError(
            f"{key}: {spec!r} asked for a GPU but CUDA is not available "
            f"(this torch build: {torch.__version__}, {build})"
        )
    count = torch.cuda.device_count()
    if match["ids"] is None:
        return [torch.device("cuda", i) for i in range(count)]
    ids = [int(i) for i in match["ids"].split(",")]
    if len(set(ids)) != len(ids):
        raise FlawscopeError(f"{key}: {spec!r} names the same GPU more than once")
    for i in ids:
        if i >= count:
            raise FlawscopeError(
                f"{key}: {spec!r} asked for GPU {i} but {count} CUDA device(s) are visible"
            )
    return [torch.device("cuda", i) for i in ids]


def one_device(spec: str, key: str = "Global.device") -> torch.device:
    """The device that prediction and evaluation run on: the first of several GPUs, said so
    (only training spreads over several)."""
    devices = parse_device(spec, key)
    if len(devices) > 1:
        log.warning("%s: %s names %d GPUs; only training uses several, this runs on the first (%s)",
                    key, spec, len(devices), devices[0])
    return devices[0]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB. On Linux ``VmHWM``: ``ru_maxrss`` keeps
    the peak of the process that started this one (a benchmark child reported its parent's 1.7 GB
    for its own 0.4 GB). Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        # not ASCII: the first line holds the process's name, which may be "prüfe.py"
        with open("/proc/self/status", encoding="utf-8", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
