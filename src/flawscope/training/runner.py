"""``Global.mode=train``: from a config to a calibrated inference model directory.

    output/
      config.yaml              the resolved config
      train.log                the log
      iter_<N>/                resumable checkpoints
      best_model/inference/    the inference model directory (what everything after training reads)
      train_result.json        done flag, metrics, file paths
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from flawscope.atomic import output_lock, write_atomic
from flawscope.data.io import read_image
from flawscope.backbones import backbone_spec
from flawscope.config import SCHEMA, check_value, dump_config
from flawscope.data.layouts import (Dataset, Sample, check_headers, load_dataset, unique_images,
                                    warn_before_training)
from flawscope.data.transforms import Resizer, normalize
from flawscope.device import peak_rss_mb
from flawscope.errors import FlawscopeError
from flawscope.evaluation.evaluate import REPORT_DIR, auroc_summary, collect, fitted_warning, no_good_warning
from flawscope.inference.model_dir import (META_FILE, Calibration, ModelInfo, among, image_digests, load_model_dir,
                                           read_fitted_images, save_model_dir)
from flawscope.inference.predictor import Predictor
from flawscope.logs import log, log_to_file
from flawscope.models import MODELS, build_model
from flawscope.models.image_bank import grid_splits
from flawscope.models.patchcore import PatchCore
from flawscope.models.stfpm import STFPM
from flawscope.training.calibrate import (MIN_CALIBRATION_IMAGES, CalibrationSet, calibrate, calibration_set,
                                         split_calibration)
from flawscope.training.distributed import World
from flawscope.training.patchcore_fit import add_normals, fit_patchcore, repeated_images
from flawscope.training.stfpm_trainer import (Checkpoint, STFPMTrainConfig, check_fits, fit_image_bank, fit_stfpm,
                                             read_checkpoint)


def load_training_images(samples: list[Sample], resizer: Resizer) -> torch.Tensor:
    """Decode and resize every training image once (NxSxSx3 uint8, a quarter of float32's memory)."""
    out = torch.empty((len(samples), resizer.size, resizer.size, 3), dtype=torch.uint8)
    for i, sample in enumerate(tqdm(samples, desc="load images", leave=False, unit="img", disable=None)):
        out[i] = torch.from_numpy(resizer.to_input(read_image(sample.image)))
    return out


def train(cfg: dict, world: World) -> dict:
    """Validate and load everything first, so a bad dataset leaves no half-written output.

    In a distributed run (``world.size > 1``) only rank 0 writes anything.
    """
    g, m, t = cfg["Global"], cfg["Model"], cfg["Train"]
    if not g["dataset_dir"]:
        raise FlawscopeError("Global.dataset_dir: required for training (-o Global.dataset_dir=PATH)")
    written = Path(g["output"]).resolve()
    if t.get("add_normals") and ((grown := Path(t["add_normals"]).resolve()) == written / "best_model/inference"
                                 or written.is_relative_to(grown)):
        raise FlawscopeError(f"Global.output: {g['output']} holds, or is in, the model Train.add_normals grows; write "
                             "the grown model to another folder, so that the model it grew from stays to go back to")
    dataset = load_dataset(g["dataset_dir"], cfg["CheckDataset"]["dataset_type"])
    defects = [s for s in dataset.train if s.label]
    as_defect = {os.path.abspath(s.image): s for s in dataset.val if s.label}
    for sample in dataset.train:
        if (defect := as_defect.get(os.path.abspath(sample.image))) is not None:
            how = f"with its mask {sample.mask}" if sample.label else "as good"
            raise FlawscopeError(f"{sample.image}: a defect image in the training split: listed in train {how} and "
                                 f"as a defect in val (its mask {defect.mask}); anomaly detection trains on good "
                                 "images only")
    if defects:
        more = f" (and {len(defects) - 1} more)" if len(defects) > 1 else ""
        raise FlawscopeError(f"{defects[0].image}: a defect image in the training split{more}: its mask "
                             f"{defects[0].mask} marks a defect, and anomaly detection trains on good images only; "
                             "list it in val.txt (CheckDataset.split moves defect images there)")
    # One read of each file finds the training images that copy others, and those that copy a defect
    # image (check_dataset calls that a problem; training took it for a good part).
    unique, copies = unique_images([s for s in dataset.val if s.label] + dataset.train)
    copied = next(((copy, original) for copy, original in copies if original.label and not copy.label), None)
    if copied is not None:
        raise FlawscopeError(f"{copied[0].image}: a defect image in the training split: the same bytes as "
                             f"{copied[1].image} (a {copied[1].defect_type} defect in val); anomaly detection "
                             "trains on good images only")
    train_samples = [s for s in unique if not s.label]
    copies = [(copy, original) for copy, original in copies if not copy.label]  # among the training images
    base = load_model_dir(t["add_normals"]) if t.get("add_normals") else None  # a model whose bank grows (PatchCore)
    if base is not None and not isinstance(base[0], PatchCore):
        raise FlawscopeError(f"Train.add_normals: {t['add_normals']} is a {base[1].model} model; only PatchCore "
                             "memory banks can take more normal images (retrain the others)")
    fraction = _growth_fraction(t, base[1].calibration, len(train_samples)) if base else t["calibration_fraction"]
    fit_samples, calib_samples = split_calibration(train_samples, fraction, g["seed"])
    calib_set = calibration_set(t, dataset, calib_samples, fit_samples)  # fails here, not after training
    differ = _take_base_settings(cfg, base[1]) if base is not None else []
    resizer = Resizer(m["input_size"], m["resize_mode"])
    check_headers(dataset.val + calib_set.good + calib_set.defects)
    resume = _read_resume(cfg, len(fit_samples), world.size) if g["model"] == "STFPM" and t["resume_path"] else None
    torch.manual_seed(g["seed"])  # the student's initial weights
    np.random.seed(g["seed"] % 2**32)
    model, info = base or _new_model(cfg)  # reads the backbone's weights before anything is written
    if resume is not None:
        check_fits(resume, model)
    images = load_training_images(fit_samples, resizer)  # reads every image before anything is written
    if resume is not None and resume.meta.get("train_images_digest") not in (None, _images_digest(images)):
        raise FlawscopeError(f"Train.resume_path: {resume.path} was trained on other images than this run's "
                             f"{len(images)} (as many, not the same); resume with the same images, or train anew")
    image_bank = isinstance(model, STFPM) and model.global_score  # the student's score is measured on them
    needed = base is not None or t["add_calibration_images"] or image_bank  # or the model checks them, or they join it
    calib_images = load_training_images(calib_samples if needed else [], resizer)
    held_out_count = len(calib_samples)
    dropped = 0
    known = read_fitted_images(t["add_normals"]) if base is not None else None  # the images the base model holds
    if base is not None:  # neither the held-out images nor calibration_dir's may be in the model already
        calib_samples, calib_images = _new_to(model, calib_samples, calib_images, info, known)
        calib_set = calibration_set(t, dataset, calib_samples, fit_samples)
        dropped = held_out_count - len(calib_samples)
        if calib_set.source != "training images":
            from_dir = calib_set.good[len(calib_samples):]
            calib_set.good[len(calib_samples):] = _new_to(model, from_dir, load_training_images(from_dir, resizer),
                                                          info, known)[0]
            dropped += len(from_dir) - (len(calib_set.good) - len(calib_samples))
        if held_out_count and (not calib_set.good or calib_set.source == "training images"):
            raise FlawscopeError(f"Train.add_normals: the good calibration images are all in {t['add_normals']} "
                                 "already; set Train.calibration_dir to new good images")
        if calib_set.source == "training images":  # they join the bank: thresholds set on them flag every part
            raise FlawscopeError(f"Train.add_normals: no new good image is held out to calibrate the grown model on "
                                 f"({len(fit_samples)} new training images, Train.calibration_fraction "
                                 f"{t['calibration_fraction']:g}; {MIN_CALIBRATION_IMAGES + 1} or more are needed); "
                                 "add more images, or set Train.calibration_dir to new good images")
        if dropped and len(calib_set.good) < MIN_CALIBRATION_IMAGES:  # one score sets no scale
            raise FlawscopeError(f"Train.add_normals: {dropped} of the good calibration images are in "
                                 f"{t['add_normals']} already, which leaves {len(calib_set.good)} to calibrate on "
                                 f"(at least {MIN_CALIBRATION_IMAGES} are needed); set Train.calibration_dir to new "
                                 "good images")
        _check_growth_calibration(t, len(calib_set.good), info.calibration, len(train_samples), dropped)
    # the student's score is measured against good images it never saw: the held-out ones, decoded above, then
    # Train.calibration_dir's (none: the image score stays the student's)
    extra = [] if calib_set.source == "training images" else calib_set.good[len(calib_samples):]
    held_out = torch.cat([calib_images, load_training_images(extra, resizer)]) if image_bank else None
    joining = calib_images if t["add_calibration_images"] else None
    output = Path(g["output"])
    with (output_lock(output) if world.is_main else nullcontext()), \
            (log_to_file(output / "train.log") if world.is_main else nullcontext()):
        if world.is_main:
            # Until this run ends, evaluate, predict and export must not take an earlier run's
            # best_model/ here for this one's: the done flag says it is not done (engine.inference_dir).
            write_atomic(output / "train_result.json",
                         json.dumps({"done_flag": False, "model_name": g["model"]}, indent=2).encode())
            dump_config(cfg, output / "config.yaml")
            warn_before_training(dataset, output)
        log.info("dataset %s (%s): %d good training images (%d trained on, %d held out for calibration), "
                 "%d validation images", dataset.root, dataset.layout, len(fit_samples) + len(calib_samples),
                 len(fit_samples), len(calib_samples), len(dataset.val))
        if copies:
            copy, original = copies[0]
            log.warning("%d training images are copies of others (%s of %s%s): each image is used once",
                        len(copies), copy.image, original.image, ", ..." if len(copies) > 1 else "")
        if differ:
            log.warning("Train.add_normals: the model keeps its own settings; the config's Model section differs "
                        "in %s", ", ".join(differ))
        if fraction != t["calibration_fraction"]:
            log.info("Train.add_normals: %d of this batch's %d images held out for calibration, as many as the base "
                     "model was calibrated on (or all but one; Train.calibration_fraction %g: %d); they join the banks "
                     "once the thresholds are set", held_out_count, len(train_samples), t["calibration_fraction"],
                     len(split_calibration(train_samples, t["calibration_fraction"], g["seed"])[1]))
        if dropped:
            log.warning("%d of the good calibration images are in %s already: not calibrated on", dropped,
                        t["add_normals"])
        loaded = _Loaded(dataset, fit_samples, calib_set, images, held_out, joining, resume, known)
        del images  # held by loaded alone, so that the second fit can let them go (_add_calibration_images)
        return _train(cfg, loaded, model.to(world.device), info, world, output)


# A grown model is calibrated on the new good images alone (the earlier ones are in its banks now): on
# fewer than this, where its base model had more, a new good part's odds of a false alarm rise several-fold.
MIN_GROWTH_CALIBRATION = 10


def _calibrated_on(base: Calibration | None) -> int:
    """The good images a base model's thresholds were set on; none where they were set on its
    training images (nothing held out), or it has none."""
    return int(base.details.get("num_good", 0)) if base is not None and base.source != "training images" else 0


def _growth_fraction(t: dict, base: Calibration | None, count: int) -> float:
    """``Train.calibration_fraction`` for growing a model: enough to hold out as many new images as
    its base model was calibrated on (or all but one). A grown model is calibrated on new images
    alone, and the held-out ones join its banks once the thresholds are set, so holding out more
    costs the bank nothing: a batch of 110 held out 11 of its own where the base magnetic_tile
    model was calibrated on 36, and the grown model flagged 60 of 238 good test images (7 on 36).
    Not with ``Train.calibration_dir`` (the user's choice), nor where the held-out images do not join."""
    fraction = t["calibration_fraction"]
    if t["calibration_dir"] or not t["add_calibration_images"] or fraction <= 0 or count <= MIN_CALIBRATION_IMAGES:
        return fraction
    wanted = min(_calibrated_on(base), count - 1)
    if not wanted:
        return fraction
    return max(fraction, (wanted + 0.25) / count)  # split_calibration rounds count * fraction to ``wanted``


def _check_growth_calibration(t: dict, count: int, base: Calibration | None, images: int,
                              dropped: int) -> None:
    """Refuse to replace a base model's thresholds by ones set on far fewer good images: a batch of
    15 held out 2, and a grown magnetic_tile model then flagged half the good test parts."""
    base_count = _calibrated_on(base)
    needed = min(base_count, MIN_GROWTH_CALIBRATION)
    if count >= needed:
        return
    held = f" ({dropped} held out are in the model already)" if dropped else ""
    kept_out = "Train.calibration_dir to good images kept out of every batch"
    if t["calibration_dir"]:
        more = "give more good images kept out of every batch in Train.calibration_dir"
    elif dropped:
        more = f"leave the images the model holds out of this batch, or set {kept_out}"
    elif not t["add_calibration_images"]:
        more = f"hold out more of this batch's {images} images with Train.calibration_fraction, or set {kept_out}"
    else:  # as many held out as the batch allows (_growth_fraction)
        more = f"add more images at once, or set {kept_out}"
    raise FlawscopeError(f"Train.add_normals: {count} new good images{held} would calibrate the grown model, whose "
                         f"thresholds are set on them alone (the base model's were set on {base_count}); {needed} "
                         f"or more are needed: {more}")


def _compare_thresholds(base: Calibration, grown: Calibration) -> None:
    """Say how the grown model's thresholds moved from its base model's, which they replace: each
    growth calibrates on its own new images, and a few of them set thresholds by chance."""
    was, now = base.details.get("image_fpr_bound"), grown.details.get("image_fpr_bound")
    worse = was is not None and now is not None and now > was
    (log.warning if worse else log.info)(
        "Train.add_normals: thresholds image %.4g -> %.4g, pixel %.4g -> %.4g, calibrated on %s good images (the base "
        "model on %s)%s", base.image_threshold, grown.image_threshold, base.pixel_threshold, grown.pixel_threshold,
        grown.details.get("num_good", "?"), base.details.get("num_good", "?"),
        f": a new good part is flagged with probability up to {now:.3g}, against {was:.3g}; "
        + ("give more good images in Train.calibration_dir" if grown.details.get("calibration_dir") else
           "to grow a model repeatedly, calibrate each growth on the same Train.calibration_dir") if worse else "")


def _take_base_settings(cfg: dict, info: ModelInfo) -> list[str]:
    """``Train.add_normals`` grows a model as it was built: its Model settings replace the
    config's, so config.yaml records what the model is. Returns where they differed. The coreset
    ratio and the image bank's cap are the fit's, kept in its provenance (the cap since 2026-11-29)."""
    m = cfg["Model"]
    fitted = {key: check_value(f"provenance {key}", SCHEMA["Model"][key], info.provenance[key],
                               f"Train.add_normals: {cfg['Train']['add_normals']}/{META_FILE}")
              for key in _FIT_SETTINGS if key in info.provenance}
    own = {**info.model_config, "input_size": info.input_size, "resize_mode": info.resize_mode, **fitted}
    differ = [f"{key} {m[key]!r} (the model's: {value!r})" for key, value in own.items() if key in m and m[key] != value]
    m.update({key: value for key, value in own.items() if key in m})
    return differ


def _read_resume(cfg: dict, train_images: int, processes: int) -> Checkpoint:
    """``Train.resume_path``, read and checked before anything is written."""
    t = cfg["Train"]
    checkpoint = read_checkpoint(t["resume_path"], _resume_settings(cfg, train_images, processes))
    if checkpoint.iteration > t["epochs_iters"]:
        raise FlawscopeError(f"Train.resume_path: {checkpoint.path} is at iteration {checkpoint.iteration}, past "
                             f"Train.epochs_iters {t['epochs_iters']}")
    return checkpoint


def _resume_settings(cfg: dict, train_images: int, processes: int) -> dict:
    """What a checkpoint records and a run resumed from it must share; ``processes``: each draws
    ``batch_size`` images of one global batch (torchrun), so their number decides the batches too."""
    g, m, t = cfg["Global"], cfg["Model"], cfg["Train"]
    return {"seed": g["seed"], "batch_size": t["batch_size"], "processes": processes, "train_images": train_images,
            "input_size": m["input_size"], "hard_fraction": t["hard_fraction"],
            "backbone": m["backbone"], "strides": list(m["strides"])}  # the levels the loss compares


def _images_digest(images: torch.Tensor) -> str:
    """Of the decoded training images, in their order (which the batches follow): a resumed run
    must train on the same images, not only on as many (checkpoints before it hold none)."""
    return hashlib.blake2b(np.ascontiguousarray(images.numpy()).data, digest_size=16).hexdigest()


@torch.no_grad()
def _new_to(model: PatchCore, samples: list[Sample], images: torch.Tensor, info: ModelInfo,
            known: torch.Tensor) -> tuple[list[Sample], torch.Tensor]:
    """The held-out calibration images that the model grown with ``Train.add_normals`` does not
    hold already: neither among the ``known`` digests of the images it was fitted on nor, by its
    image bank, a repeat of one (``repeated_images``; a model saved before the digests has only
    that). Images it holds score as low as a training image: calibrating on them would set the
    thresholds too low."""
    if not samples:
        return samples, images
    held = among(image_digests(images), known)
    if len(model.image_bank):
        descriptors = torch.cat([model.features(normalize(images[i:i + 8], info.mean, info.std))[1]
                                 for i in range(0, len(images), 8)])
        width = model.image_bank.shape[1]  # a model saved before the spread descriptor keeps the mean only
        held |= repeated_images(descriptors[:, :width], model.image_bank).cpu()
    return [s for s, h in zip(samples, held) if not h], images[~held]


def check_model_settings(cfg: dict) -> None:
    """Refuse Model settings that do not fit together (a grid, levels, a backbone) by building
    the model without its weights: the benchmark checks every run's config before the first."""
    check_grid(cfg["Model"])
    build_model(cfg["Global"]["model"], model_config_from(cfg["Global"]["model"], cfg["Model"]), pretrained=False)


def check_grid(m: dict) -> None:
    """Refuse an image-level score whose grid does not fit the input size, before any work."""
    side = m["input_size"] // 32  # the stride-32 feature map is side x side
    if m.get("global_score") and not grid_splits(side, m["global_grid"]):
        fits = ", ".join(str(d) for d in range(1, side + 1) if grid_splits(side, d))
        raise FlawscopeError(f"Model.global_grid: {m['global_grid']} does not split the {side}x{side} map of stride-32 "
                             f"features of a {m['input_size']}-pixel input into cells of 2x2 or more (use {fits})")


def _new_model(cfg: dict) -> tuple[torch.nn.Module, ModelInfo]:
    """The configured model with its pretrained backbone, and the inference description to fill."""
    g, m, t = cfg["Global"], cfg["Model"], cfg["Train"]
    check_grid(m)
    spec = backbone_spec(m["backbone"])
    model_config = model_config_from(g["model"], m)
    model = build_model(g["model"], model_config, pretrained=t["pretrain_weight_path"] or True)
    return model, ModelInfo(model=g["model"], model_config=model_config, input_size=m["input_size"],
                            resize_mode=m["resize_mode"], mean=list(spec.mean), std=list(spec.std), calibration=None)


@dataclass
class _Loaded:
    """What ``train`` reads and checks before anything is written."""

    dataset: Dataset
    fit_samples: list[Sample]  # the images the model is fitted on
    calib_set: CalibrationSet
    images: torch.Tensor  # fit_samples decoded and resized, NxSxSx3 uint8
    held_out: torch.Tensor | None  # STFPM with an image bank: the good images its own score is measured against
    joining: torch.Tensor | None  # Train.add_calibration_images: the held-out images that join the banks
    resume: Checkpoint | None  # Train.resume_path, read
    known: torch.Tensor | None  # Train.add_normals: the digests of the images the base model holds


def _train(cfg: dict, data: _Loaded, model: torch.nn.Module, info: ModelInfo, world: World, output: Path) -> dict:
    """Fit, calibrate, let the held-out good images join (``data.joining``), evaluate, save."""
    g, t = cfg["Global"], cfg["Train"]
    dataset, held_out, joining = data.dataset, data.held_out, data.joining
    device = world.device
    predictor = Predictor(model, info, device)
    normalizer = partial(normalize, mean=info.mean, std=info.std)
    evaluate = partial(_evaluate, predictor=predictor, samples=dataset.val) if dataset.val else None

    t0 = time.time()
    fit_digests = image_digests(data.images)  # before a second fit adds the held-out images to data.images
    if isinstance(model, STFPM):
        history = _fit_stfpm(cfg, model, data.images, held_out, world, normalizer, output, evaluate, data.resume)
    else:
        held = among(fit_digests, data.known) if data.known is not None else None
        history = _fit_patchcore(cfg, model, data.images, device, normalizer, held)
    if not world.is_main:
        return {}
    base_calibration = info.calibration  # Train.add_normals: the base model's
    info.calibration = calibrate(predictor, data.calib_set, t["image_fpr"], t["pixel_fpr"], t["threshold_method"])
    if t.get("add_normals") and base_calibration is not None:
        _compare_thresholds(base_calibration, info.calibration)
    if joining is not None and len(joining):
        history["provenance"]["calibration_images_added"] = _add_calibration_images(
            cfg, model, data, device, normalizer, history)
    grown_from = {"grown_from": {"model_dir": str(Path(t["add_normals"]).resolve()), **info.provenance}} \
        if t.get("add_normals") else {}  # the base model's own record: which images the bank held first
    info.provenance = {"dataset": str(dataset.root.resolve()), "layout": dataset.layout,
                       "train_images": history.get("fit", {}).get("new_images", len(data.fit_samples)),
                       "batch_size": t["batch_size"], "processes": world.size,
                       "seed": g["seed"], **history["provenance"], **grown_from}
    joined = history["provenance"].get("calibration_images_added", 0)
    seen = [fit_digests, *([image_digests(joining)] if joined else []),
            *([data.known] if data.known is not None else [])]
    fitted = torch.unique(torch.cat(seen), dim=0)  # what a later Train.add_normals must not take as new
    final_eval = history.pop("final_eval", None)
    if evaluate is not None and final_eval is not None:
        metrics = evaluate(model, fitted=fitted)
        log.info("eval %s%s", "with the image bank " if final_eval.get("image_bank") else "", json.dumps(metrics))
        history["eval"].append({**final_eval, **metrics})
    model_dir = save_model_dir(output / "best_model" / "inference", model, info, fitted)
    _drop_earlier_evaluation(output, model_dir)
    selected = history.get("selected_iteration")
    final = next((e for e in reversed(history["eval"]) if e.get("iteration") == selected), None) if selected else None
    final = final or (history["eval"][-1] if history["eval"] else {})
    result = {
        "done_flag": True,
        "model_name": info.model,
        "train_seconds": round(time.time() - t0, 1),
        "metrics": {k: final.get(k) for k in ("image_auroc", "pixel_auroc")},
        "eval_history": history["eval"],
        "selected_iteration": selected,
        "fit": history.get("fit", {}),
        "calibration": {"image_threshold": info.calibration.image_threshold,
                        "pixel_threshold": info.calibration.pixel_threshold,
                        "source": info.calibration.source},
        "models": {"best": {"inference_model_dir": str(model_dir), **history.get("files", {})}},
    }
    write_atomic(output / "train_result.json", json.dumps(result, indent=2).encode())
    log.info("training done in %.0fs; inference model: %s", result["train_seconds"], model_dir)
    return result


def _drop_earlier_evaluation(output: Path, model_dir: Path) -> None:
    """Remove ``evaluate_result.json`` and the report of the model this training replaced in
    ``model_dir``: beside the new model they would pass for its numbers."""
    result = output / "evaluate_result.json"
    try:
        evaluated = json.loads(result.read_text(encoding="utf-8")).get("model_dir")
    except (OSError, ValueError, AttributeError):  # none, or not ours
        return
    if isinstance(evaluated, str) and Path(evaluated).resolve() == model_dir.resolve():
        result.unlink()
        shutil.rmtree(output / REPORT_DIR, ignore_errors=True)
        log.warning("removed %s and %s/: they evaluated the model trained here before this one (evaluate again)",
                    result, output / REPORT_DIR)


def model_config_from(name: str, section: dict) -> dict:
    """The Model-section keys that model ``name``'s constructor takes (minus ``pretrained``)."""
    params = inspect.signature(MODELS[name].__init__).parameters
    return {k: section[k] for k in params if k in section and k != "pretrained"}


def _fit_stfpm(cfg: dict, model: STFPM, images: torch.Tensor, held_out: torch.Tensor | None, world: World,
               normalizer: Callable, output: Path, evaluate: Callable | None, resume: Checkpoint | None) -> dict:
    """Train the student; with ``global_score``, then fill the image bank, to be evaluated again
    (``final_eval``: the evaluations during training score with the student alone)."""
    g, m, t = cfg["Global"], cfg["Model"], cfg["Train"]
    train_cfg = STFPMTrainConfig(iterations=t["epochs_iters"], batch_size=t["batch_size"],
                                 learning_rate=t["learning_rate"], momentum=t["momentum"],
                                 weight_decay=t["weight_decay"], log_interval=t["log_interval"],
                                 eval_interval=t["eval_interval"], save_interval=t["save_interval"], seed=g["seed"],
                                 select_best=t["select_best"], hard_fraction=t["hard_fraction"])
    # on resume, ``train`` has checked the checkpoint's digest against these images: no second pass over them
    digest = (resume.meta.get("train_images_digest") if resume is not None else None) or _images_digest(images)
    settings = {**_resume_settings(cfg, len(images), world.size), "train_images_digest": digest,
                "epochs_iters": t["epochs_iters"]}
    if resume is not None and resume.meta.get("epochs_iters", t["epochs_iters"]) != t["epochs_iters"]:
        log.warning("Train.resume_path: %s was trained towards %d iterations, this run %d: the learning-rate "
                    "schedule changes from here on", resume.path, resume.meta["epochs_iters"], t["epochs_iters"])
    if t["select_best"] and evaluate is None:
        log.warning("Train.select_best: the dataset has no evaluation split to select on; the last iteration's "
                    "student is kept")
    earlier, started = _latest_checkpoint(output), time.time()
    if resume is None and earlier is not None and world.is_main:
        log.info("%s holds checkpoints of an earlier run (the latest: %s); this run starts anew "
                 "(-o Train.resume_path=%s would go on from there)", output, earlier.name, earlier)
    try:
        history = fit_stfpm(model, images, train_cfg, world.device, normalizer, output, evaluate, resume, world,
                            settings)
    except KeyboardInterrupt:
        last = _latest_checkpoint(output, since=started) or (resume.path if resume is not None else None)
        if world.is_main:
            log.warning("training stopped; %s", "no checkpoint saved yet" if last is None else
                        f"to go on from its last checkpoint: -o Train.resume_path={last}")
        raise
    if model.global_score and world.is_main:
        fit_image_bank(model, images, held_out, world.device, normalizer, size=m["image_bank_size"], seed=g["seed"])
        history["final_eval"] = {"iteration": history.get("selected_iteration", t["epochs_iters"]), "image_bank": True}
    history["provenance"] = {"iterations": history.get("selected_iteration", t["epochs_iters"]),
                             "hard_fraction": t["hard_fraction"],
                             # evaluating on that split again is optimistic: the evaluate mode says so
                             **({"selected_on_evaluation_split": True} if "selected_iteration" in history else {})}
    history["files"] = {"checkpoint": history.pop("checkpoint")}
    return history


def _latest_checkpoint(output: Path, since: float = 0.0) -> Path | None:
    """The ``iter_<N>`` folder of ``output`` saved last (whole: each is swapped in complete), if
    at time ``since`` or later."""
    found = [((path / "checkpoint.json").stat().st_mtime, path) for path in output.glob("iter_*")
             if path.name[5:].isdigit() and (path / "checkpoint.json").is_file()]
    latest = max(found, default=None)
    return latest[1] if latest is not None and latest[0] >= since else None


def _fit_patchcore(cfg: dict, model: PatchCore, images: torch.Tensor, device: torch.device,
                   normalizer: Callable, held: torch.Tensor | None) -> dict:
    """One pass over the images fills (or, with ``Train.add_normals``, extends) the memory bank;
    ``held``: which of the images the base model was fitted on already."""
    g, m, t = cfg["Global"], cfg["Model"], cfg["Train"]
    if t["add_normals"]:
        stats = add_normals(model, images, normalizer, device, m["coreset_ratio"], g["seed"], t["batch_size"],
                            image_bank_size=m["image_bank_size"], known=held)
        if stats["repeated_images"]:
            log.warning("%d of the %d good images are in the model %s already or repeat another: not added "
                        "again%s", stats["repeated_images"], len(images), t["add_normals"],
                        "" if stats["new_images"] else "; the memory bank is unchanged")
        log.info("added %d of %d new patches to the memory bank of %s: %d entries now", stats["added"],
                 stats["patches"], t["add_normals"], stats["bank_size"])
    else:
        stats = fit_patchcore(model, images, normalizer, device, m["coreset_ratio"], g["seed"], t["batch_size"],
                              m["projection_dim"], image_bank_size=m["image_bank_size"])
        if stats["repeated_images"]:
            log.warning("%d of the %d training images repeat another: each is fitted once",
                        stats["repeated_images"], len(images))
        per_image = (m["input_size"] // model.strides[0]) ** 2
        if stats["patches_per_image"] < per_image:  # extract_patches' bound on memory
            log.info("the %d images hold more patches than a fit reads (%d): the coreset is chosen from a random %d of "
                     "each image's %d", len(images), stats["patches"], stats["patches_per_image"], per_image)
        log.info("memory bank: %d of %d patches (features %.1fs, coreset %.1fs%s)", stats["bank_size"],
                 stats["patches"], stats["feature_seconds"], stats["coreset_seconds"],
                 f", image-level references {stats['reference_seconds']:.1f}s" if "reference_seconds" in stats else "")
        if "image_bank_size" in stats:
            log.info("image bank: %d of %d training images", stats["image_bank_size"],
                     len(images) - stats["repeated_images"])
    stats["bank_mb"] = _bank_mb(model)
    stats["peak_rss_mb"] = round(peak_rss_mb(), 1)  # this process so far: loading the images included
    log.info("memory bank %.1f MB; peak memory so far %.0f MB", stats["bank_mb"], stats["peak_rss_mb"])
    if t["add_normals"] and model.global_score and not len(model.image_bank):
        log.warning("the model %s has no image-level score (its first fit had too few images for one), and growing "
                    "it adds none: retrain on all the images for one", t["add_normals"])
    return {"eval": [], "fit": stats, "final_eval": {},
            "provenance": {**{key: m[key] for key in _FIT_SETTINGS}, "bank_size": int(len(model.memory_bank))}}


_FIT_SETTINGS = ("coreset_ratio", "image_bank_size")  # how a PatchCore was fitted, which growing it keeps


def _bank_mb(model: PatchCore) -> float:
    return round(model.memory_bank.numel() * 2 / 2**20, 1)  # saved as float16


def _add_calibration_images(cfg: dict, model: torch.nn.Module, data: _Loaded, device: torch.device,
                            normalizer: Callable, history: dict) -> int:
    """``Train.add_calibration_images``: once the thresholds are set, the banks are fitted again
    on every training image, the ``joining`` ones held out for calibration included: PatchCore's
    memory and image banks (a model grown with ``Train.add_normals`` takes them as more normals),
    STFPM's image bank (its student is not trained again, and its score stays measured against the
    ``held_out`` images it never saw). The thresholds stay as calibrated. Returns how many joined.
    ``data.images`` becomes every image, the earlier tensor let go before the second fit, as are
    the first fit's search indexes: the second fit's peak is the highest of the train mode."""
    g, m, t = cfg["Global"], cfg["Model"], cfg["Train"]
    joining = data.joining
    model.drop_indexes()
    start = time.perf_counter()
    if isinstance(model, PatchCore) and t["add_normals"]:
        stats = add_normals(model, joining, normalizer, device, m["coreset_ratio"], g["seed"], t["batch_size"],
                            image_bank_size=m["image_bank_size"])
        joined = stats["new_images"]
    elif isinstance(model, PatchCore):
        calibrated_without_bank = model.global_score and not len(model.image_bank)
        data.images = torch.cat([data.images, joining])
        stats = fit_patchcore(model, data.images, normalizer, device, m["coreset_ratio"], g["seed"],
                              t["batch_size"], m["projection_dim"], image_bank_size=m["image_bank_size"])
        if calibrated_without_bank:  # too few images for one then: a bank now would score on another scale
            model.set_image_bank(model.image_bank[:0], model.reference_scores[:0])
        joined = len(joining)
    elif model.global_score and len(model.image_bank):
        data.images = torch.cat([data.images, joining])
        fit_image_bank(model, data.images, data.held_out, device, normalizer, size=m["image_bank_size"],
                       seed=g["seed"])
        joined, stats = len(joining), None
    else:
        log.info("Train.add_calibration_images: this STFPM has no image bank for the held-out images to join")
        return 0
    log.info("the model's banks now hold the %d good images held out for calibration too", joined)
    if stats is not None:  # "fit" stays the fit that was calibrated; this one is saved
        history["fit"]["refit"] = {**stats, "bank_mb": _bank_mb(model), "peak_rss_mb": round(peak_rss_mb(), 1)}
        history["provenance"]["bank_size"] = len(model.memory_bank)
        log.info("memory bank: %d entries (%s in %.1fs)", len(model.memory_bank),
                 "grown again" if t["add_normals"] else "fitted again", time.perf_counter() - start)
    return joined


def _evaluate(model: torch.nn.Module, predictor: Predictor, samples: list[Sample],
              fitted: torch.Tensor | None = None) -> dict:
    """AUROCs on ``samples``; with ``fitted`` (the model's image digests: the final evaluation), a
    warning for evaluation images the model was fitted on, and one for an evaluation split of defect images only."""
    collected = collect(predictor, samples, miou=False, fitted=fitted)
    final = fitted is not None
    for warning in (fitted_warning(collected.outcomes), no_good_warning(collected.outcomes) if final else None):
        if warning:
            log.warning("the final evaluation: %s", warning)
    return auroc_summary(collected)
