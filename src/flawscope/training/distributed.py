"""Training on several GPUs with torch.distributed: one process per device, as torchrun starts them.

``Global.device=gpu:0,1`` from a plain ``flawscope`` call re-launches the training under
``torch.distributed.run`` (torchrun) with one process per listed GPU; each process trains on its
share of every batch (``Train.batch_size`` images per device) and DistributedDataParallel averages
the gradients. Rank 0 alone writes checkpoints, evaluates, calibrates and saves the model.
Started by torchrun directly (``WORLD_SIZE`` set), the same code runs as it is; on CPUs it uses
the gloo backend, which is how the tests exercise it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from flawscope.config import dump_config
from flawscope.errors import FlawscopeError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(devices: list[torch.device]) -> World:
    """Join the process group torchrun set up; this process's device is its local rank's."""
    rank, size, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = devices[0].type == "cuda"
    if cuda and len(devices) != size:
        raise FlawscopeError(f"Global.device lists {len(devices)} GPUs but torchrun started {size} processes")
    device = devices[local] if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return World(rank, size, device)


def relaunch(cfg: dict, devices: list[torch.device]) -> dict:
    """Run this training as ``len(devices)`` torchrun processes; returns rank 0's train_result."""
    with tempfile.TemporaryDirectory() as tmp:
        config = dump_config(cfg, Path(tmp) / "config.yaml")
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible_devices(devices))
        # The children see the listed GPUs as 0..N-1: rewrite the spec accordingly.
        spec = "gpu:" + ",".join(str(i) for i in range(len(devices)))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(devices)}",
                   "-m", "flawscope", "-c", str(config), "-o", f"Global.device={spec}"]
        code = subprocess.call(command, env=env)
    if code != 0:
        raise FlawscopeError(f"distributed training on {len(devices)} GPUs failed (exit status {code}); see the log above")
    return json.loads((Path(cfg["Global"]["output"]) / "train_result.json").read_text())


def visible_devices(devices: list[torch.device]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for children that use ``devices``: their indices count among the
    GPUs this process sees, which a scheduler (SLURM: ``CUDA_VISIBLE_DEVICES=4,5``) may already
    have narrowed, so they are mapped through what it set."""
    inherited = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return ",".join(inherited[d.index] if d.index < len(inherited) else str(d.index) for d in devices)


def leave(failed: bool = False) -> None:
    """Leave the process group: together after a run, at once after a failure, whose other ranks
    may wait in another collective (a barrier there would hang; torchrun ends them once this
    process exits)."""
    if dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()
