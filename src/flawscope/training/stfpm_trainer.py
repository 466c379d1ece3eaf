"""The loop that fits an STFPM student to its frozen teacher.

The teacher never changes and there is no augmentation, so its features for the whole training set
are computed once and cached (float16, while they fit in ``cache_limit_bytes``): each iteration then
costs one student forward and backward pass, about a third less than recomputing the teacher.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from flawscope.data.io import check_local
from flawscope.errors import FlawscopeError, first_line
from flawscope.inference.model_dir import CHECKPOINT_FILES, staged_dir, write_safetensors
from flawscope.models.stfpm import STFPM, stfpm_loss
from flawscope.training.patchcore_fit import image_bank_rows
from flawscope.training.distributed import World

log = logging.getLogger("flawscope")


@dataclass
class STFPMTrainConfig:
    iterations: int
    batch_size: int
    learning_rate: float
    momentum: float
    weight_decay: float
    log_interval: int
    eval_interval: int
    save_interval: int
    seed: int
    select_best: bool = False
    hard_fraction: float | None = None
    warmup_fraction: float = 0.05
    cache_limit_bytes: int = 4 << 30


def _lr_factor(iteration: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up then cosine decay to zero: a random-init student at lr 0.4 needs the warm-up."""
    warmup = max(1, int(total * warmup_fraction))
    if iteration < warmup:
        return (iteration + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (iteration - warmup) / max(1, total - warmup)))


def _batch_indices(n: int, batch_size: int, seed: int, iteration: int) -> torch.Tensor:
    """The batch of ``iteration``, a pure function of (seed, iteration): resuming needs no RNG state."""
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, step = divmod(iteration, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    if n < batch_size:  # tiny sets: sample with repetition so batch statistics stay usable
        return perm.repeat(math.ceil(batch_size / n))[:batch_size]
    return perm[step * batch_size:(step + 1) * batch_size]


def _teacher_features(model: STFPM, images: torch.Tensor, device: torch.device,
                      normalize: Callable[[torch.Tensor], torch.Tensor], limit: int) -> list[torch.Tensor] | None:
    """All teacher features, or None when they would take more than ``limit`` bytes."""
    size = images.shape[-2]
    per_image = sum(c * (size // s) ** 2 for c, s in zip(model.teacher.out_channels, model.strides)) * 2
    if per_image * len(images) > limit:
        log.info("teacher features would take %.1f GB: computing them per batch", per_image * len(images) / 1e9)
        return None
    feats: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), 32), desc="teacher features", leave=False, disable=None):
            batch = normalize(images[i:i + 32]).to(device)
            feats.append([f.half() for f in model.teacher(batch)])
    return [torch.cat(level) for level in zip(*feats)]


@dataclass
class Checkpoint:
    """A checkpoint, read and checked before the run writes anything (``read_checkpoint``)."""

    path: Path
    iteration: int
    tensors: dict[str, torch.Tensor]  # student weights, SGD momentum and, with select_best, the best student
    meta: dict  # checkpoint.json: the iteration, the settings it was trained with, select_best's state


def save_checkpoint(path: Path, model: STFPM, optimizer: torch.optim.Optimizer, meta: dict,
                    best: dict[str, torch.Tensor] | None = None) -> None:
    """Student weights, SGD momentum (and the best student so far) as safetensors, ``meta`` as
    JSON (no pickle). Written as a model directory is (``staged_dir``), so an interrupted save
    leaves the previous checkpoint of that name whole, never half of one."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.student.state_dict().items()}
    for i, p in enumerate(model.student.parameters()):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{i}"] = buf.detach().cpu().contiguous()
    tensors |= {f"best.{k}": v.cpu().contiguous() for k, v in (best or {}).items()}
    with staged_dir(path) as staging:
        write_safetensors(tensors, staging / CHECKPOINT_FILES[0])
        (staging / CHECKPOINT_FILES[1]).write_text(json.dumps(meta))


def read_checkpoint(path: str | Path, settings: dict) -> Checkpoint:
    """Read ``Train.resume_path``, refusing one trained with other ``settings`` (the seed decides
    which images were held out for calibration, the batch size and images what each iteration
    saw): the resumed run would be no continuation of it."""
    check_local(path, "a checkpoint directory")
    path = Path(path)
    files = [path / name for name in CHECKPOINT_FILES]
    if not all(f.is_file() for f in files):
        hint = f": give the folder that holds it ({path.parent})" if path.name in CHECKPOINT_FILES else ""
        raise FlawscopeError(f"Train.resume_path: {path} is not a checkpoint directory (needs "
                             f"{', '.join(CHECKPOINT_FILES)}){hint}")
    try:
        meta = json.loads(files[1].read_text(encoding="utf-8"))
        iteration = meta["iteration"]
        if type(iteration) is not int or iteration < 0:  # 5.7 was read as 5, -5 trained 25 iterations
            raise ValueError(f"iteration must be a whole number >= 0, not {iteration!r}")
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        raise FlawscopeError(f"{files[1]}: damaged checkpoint description ({first_line(exc)})") from None
    try:
        tensors = load_file(str(files[0]))
    except (OSError, SafetensorError) as exc:
        raise FlawscopeError(f"{files[0]}: not a readable safetensors file, truncated or damaged "
                             f"({first_line(exc)})") from None
    # Damaged values would surface as a divergence (blamed on the learning rate) iterations later.
    broken = next((name for name, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())), None)
    if broken is not None:
        raise FlawscopeError(f"{files[0]}: damaged checkpoint ({broken} holds NaN or infinite values)")
    for key, value in settings.items():
        if key in meta and meta[key] != value:
            raise FlawscopeError(f"Train.resume_path: {path} was trained with {key} {meta[key]!r}, this run has "
                                 f"{value!r}; resume with the same settings, or train anew")
    unrecorded = [key for key in settings if key not in meta]
    if unrecorded:  # an earlier flawscope's checkpoint: a config of today's defaults changes its training
        config = path.parent / "config.yaml"
        log.warning("Train.resume_path: %s was saved by an earlier flawscope and records no %s: this run's are taken "
                    "unchecked; to continue that training as it was, resume with %s", path, ", ".join(unrecorded),
                    f"-c {config}" if config.is_file() else "the config it was trained with")
    return Checkpoint(path, iteration, tensors, meta)


def check_fits(checkpoint: Checkpoint, model: STFPM) -> None:
    """Refuse a checkpoint whose student is not this model's (other strides or backbone), before
    the run writes anything: the same names and shapes of weights."""
    own = {k: tuple(v.shape) for k, v in model.student.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in _student_state(checkpoint).items()}
    if own != saved:
        differ = sorted(k for k in own.keys() | saved.keys() if own.get(k) != saved.get(k))
        raise FlawscopeError(f"Train.resume_path: {checkpoint.path} does not fit this model ({len(differ)} weights "
                             f"differ in name or shape, first {differ[0]}); resume with the Model settings it was "
                             "trained with")


def _student_state(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The student's weights in a checkpoint, saved under ``model.``."""
    return {k[6:]: v for k, v in checkpoint.tensors.items() if k.startswith("model.")}


def _restore(checkpoint: Checkpoint, model: STFPM, optimizer: torch.optim.Optimizer) -> None:
    tensors = checkpoint.tensors
    check_fits(checkpoint, model)
    model.student.load_state_dict(_student_state(checkpoint))
    device = next(model.student.parameters()).device
    for i, p in enumerate(model.student.parameters()):
        if f"momentum.{i}" in tensors:
            optimizer.state[p]["momentum_buffer"] = tensors[f"momentum.{i}"].to(device)


def _mean_over_processes(loss: torch.Tensor, world: World) -> torch.Tensor:
    """The loss of the whole global batch: what the log shows, and what stops every process at
    once when training diverges (one raising alone would leave the others waiting for it in the
    gradients' all-reduce)."""
    if world.size == 1:
        return loss
    total = loss.clone()
    dist.all_reduce(total)
    return total / world.size


def fit_stfpm(model: STFPM, images: torch.Tensor, cfg: STFPMTrainConfig, device: torch.device,
              normalize: Callable[[torch.Tensor], torch.Tensor], output: Path,
              evaluate: Callable[[STFPM], dict] | None = None, resume: Checkpoint | None = None,
              world: World = World(), settings: dict | None = None) -> dict:
    """Train ``model.student`` on ``images`` (NxSxSx3 uint8); returns the metrics and losses.

    With ``cfg.select_best`` the student ends with the weights of the evaluation that scored best
    (image AUROC, then pixel AUROC; the earliest on ties), as PaddleX's best_model does; otherwise
    with the last iteration's.

    Checkpoints go to ``output/iter_<N>/`` every ``save_interval`` iterations and at the end,
    with ``settings`` (what a resumed run must share) and the evaluations so far, so that a run
    resumed from one selects as the uninterrupted run would. In a distributed run every process
    draws the same global batch of ``batch_size`` images per process and trains on its own slice;
    rank 0 alone saves and evaluates.
    """
    # NHWC: the depthwise convolutions of the student train about 1.7x faster on CPU (same maths, rounding aside).
    model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.student.parameters(), lr=cfg.learning_rate,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    history: dict = {"loss": [], "eval": [], "checkpoint": None}
    best: tuple[tuple[float, float], int, dict] | None = None  # (key, iteration, student weights)
    start = 0
    if resume is not None:
        _restore(resume, model, optimizer)
        start, history["eval"], history["checkpoint"] = resume.iteration, list(resume.meta.get("eval", [])), str(resume.path)
        if cfg.select_best and "best" in resume.meta:
            weights = {k[5:]: v.to(device) for k, v in resume.tensors.items() if k.startswith("best.")}
            best = tuple(resume.meta["best"]["key"]), resume.meta["best"]["iteration"], weights
        if start == cfg.iterations:
            log.info("checkpoint is at iteration %d of %d: nothing left to train", start, cfg.iterations)
        else:
            log.info("resuming from %s at iteration %d of %d", resume.path, start, cfg.iterations)
    drawn = cfg.batch_size * world.size
    if drawn > len(images) and world.is_main:
        log.warning("Train.batch_size %d%s is more than the %d training images: each batch repeats some of them "
                    "(a batch the size of the set needs less memory)", cfg.batch_size,
                    f" x {world.size} processes" if world.size > 1 else "", len(images))
    student = model.student
    if world.size > 1:
        student = DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
    cached = _teacher_features(model, images, device, normalize, cfg.cache_limit_bytes) if start < cfg.iterations else None
    t0 = time.time()
    # A bar only on a terminal: piped to a file, the log line every log_interval carries the progress.
    bar = tqdm(total=cfg.iterations, initial=start, desc="train", unit="it", dynamic_ncols=True,
               disable=True if not world.is_main else None)
    for it in range(start, cfg.iterations):
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * _lr_factor(it, cfg.iterations, cfg.warmup_fraction)
        idx = _batch_indices(len(images), cfg.batch_size * world.size, cfg.seed, it)[world.rank::world.size]
        batch = normalize(images[idx]).to(device)
        if cached is None:
            with torch.no_grad():
                teacher = model.teacher(batch)
        else:
            teacher = [level[idx].to(device).float() for level in cached]
        loss = stfpm_loss(teacher, student(batch), cfg.hard_fraction)
        shown = _mean_over_processes(loss.detach(), world)
        if not torch.isfinite(shown):
            raise FlawscopeError(f"training diverged at iteration {it + 1} (loss {shown.item()}); lower Train.learning_rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = it + 1
        bar.update(1)
        bar.set_postfix(loss=f"{shown.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
        if done % cfg.log_interval == 0 or done == cfg.iterations:
            elapsed = time.time() - t0
            eta = elapsed / (done - start) * (cfg.iterations - done)
            log.info("iter %d/%d loss %.5f lr %.4g elapsed %.0fs eta %.0fs", done, cfg.iterations, shown.item(),
                     optimizer.param_groups[0]["lr"], elapsed, eta)
            history["loss"].append([done, round(shown.item(), 6)])
        if not world.is_main:
            continue
        if evaluate is not None and (done % cfg.eval_interval == 0 or done == cfg.iterations):
            model.eval()
            metrics = evaluate(model)
            model.train()
            log.info("iter %d eval %s", done, json.dumps(metrics))
            history["eval"].append({"iteration": done, **metrics})
            key = (metrics.get("image_auroc") or 0.0, metrics.get("pixel_auroc") or 0.0)
            if cfg.select_best and (best is None or key > best[0]):
                best = key, done, {k: v.detach().clone() for k, v in model.student.state_dict().items()}
        if done % cfg.save_interval == 0 or done == cfg.iterations:  # after the evaluation, which it records
            meta = {"iteration": done, **(settings or {}), "eval": history["eval"]}
            if best is not None:
                meta["best"] = {"key": list(best[0]), "iteration": best[1]}
            history["checkpoint"] = str(output / f"iter_{done}")
            save_checkpoint(Path(history["checkpoint"]), model, optimizer, meta, best[2] if best else None)
    bar.close()
    if best is not None:
        model.student.load_state_dict(best[2])
        history["selected_iteration"] = best[1]
        log.info("keeping the student of iteration %d, the best evaluation (chosen on the evaluation split: "
                 "its metrics there are optimistic)", best[1])
    model.eval()
    history["train_seconds"] = round(time.time() - t0, 1)
    return history


@torch.no_grad()
def fit_image_bank(model: STFPM, images: torch.Tensor, held_out: torch.Tensor, device: torch.device,
                   normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 32,
                   size: int | None = None, seed: int = 0) -> None:
    """Fill a ``global_score`` model's image bank: the teacher's descriptors of the training
    ``images`` (at most ``size`` of them kept: ``image_bank_rows``), and the trained student's
    scores of ``held_out`` good images (NxSxSx3 uint8 both). The student has fitted the training
    images, so its scores there would be an optimistic reference; the held-out images score as new
    good parts do."""
    model.eval()
    model.set_image_bank(model.image_bank[:0], model.reference_scores[:0])  # map_and_score: the student's own score
    descriptors, scores = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="image bank", leave=False, disable=None):
        descriptors.append(model.teacher_descriptors(model.teacher(normalize(images[i:i + batch_size]).to(device))))
    for i in range(0, len(held_out), batch_size):
        scores.append(model.map_and_score(normalize(held_out[i:i + batch_size]).to(device))[1])
    descriptors = torch.cat(descriptors)
    model.set_image_bank(descriptors, torch.cat(scores) if scores else torch.empty(0),
                         image_bank_rows(model, descriptors, size, seed))
    if len(model.image_bank):
        log.info("image bank: %d of %d training images; the student's score measured against %d held-out good "
                 "images", len(model.image_bank), len(descriptors), len(held_out))
    else:
        log.warning("fewer than 2 good images held out of training (Train.calibration_fraction): the image score "
                    "is the student's alone")
