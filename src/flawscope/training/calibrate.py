"""Thresholds from images the model was not trained on: what a line has when it starts inspecting.

``Train.threshold_method: fpr`` (default) needs good images only. The image threshold is the
split-conformal quantile of the raw scores of n good images the model was not trained on: the
ceil((n+1)(1 - image_fpr))-th smallest, so a new good part is flagged with probability at most
``image_fpr``. When n is too small for that (n + 1 < 1 / image_fpr), the threshold goes just above
the highest good score and the bound is 1 / (n + 1), which the log and ``details`` state. The pixel
threshold likewise over their pixels: a random 65,536 of each larger map, so that images of
mixed sizes weigh alike (the pixel FPR is then an average over images, not over all pixels).

``Train.threshold_method: f1`` picks the thresholds that maximise F1 on good images plus labelled
defects (images with masks), each halfway between the scores on either side of it (``best_f1``).
Those defects must come from ``Train.calibration_dir``: the training dataset's own defects are its
evaluation split, and thresholds fitted there would make the reported numbers optimistic, so that
is refused before training starts rather than done silently.

``Train.calibration_dir`` is a folder of good images, or a dataset in any layout (its good images
and its defects with masks are used); its images must not be in the training dataset. Good images
held out of training (``Train.calibration_fraction``) are used as well. With neither, the
training images themselves are used, which flags too much (models score lower on what they were
fitted on): the log says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flawscope.data.io import read_image, read_mask, read_mask_values
from flawscope.data.layouts import Dataset, Sample, load_dataset, unique_images
from flawscope.errors import FlawscopeError
from flawscope.evaluation.metrics import PixelScores, best_f1, pixel_best_f1
from flawscope.inference.model_dir import Calibration
from flawscope.inference.predictor import Predictor

log = logging.getLogger("flawscope")

MIN_CALIBRATION_IMAGES = 2
_PIXELS_PER_IMAGE = 65536  # subsample of each good map kept for the pixel quantile


def fpr_threshold(scores: np.ndarray, fpr: float) -> tuple[float, float]:
    """(threshold, bound): flagging ``score >= threshold`` flags a new good sample with
    probability at most ``bound``, which is ``fpr`` unless there are too few scores to reach it.

    When scores tie at the rank's value (a floor such as a zero distance), flagging from it would
    flag every tied score: the threshold moves up to the next higher score, as a new score at
    or above that is above the rank's value, which the bound is for."""
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - fpr))  # 1-based rank among the sorted scores
    if rank <= n:
        value = np.partition(scores, rank - 1)[rank - 1]
        if np.count_nonzero(scores >= value) <= n - rank + 1:
            return float(value), (n - rank + 1) / (n + 1)
        above = scores[scores > value]
        if above.size:
            return float(above.min()), (n - rank + 1) / (n + 1)
    return float(np.nextafter(np.max(scores), np.inf)), 1 / (n + 1)


@dataclass
class CalibrationSet:
    """The images thresholds are fitted on; none of them was trained on or is evaluated on."""

    good: list[Sample]
    defects: list[Sample]  # labelled defects (with masks), only from Train.calibration_dir
    source: str
    calibration_dir: str | None = None


def split_calibration(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of the good training images: at least two, and one left to train on.
    One good score sets no scale (the normalised scores of a model calibrated on one image were
    all 0 or 1), so of two images none is held out: the training images calibrate, with a warning."""
    if fraction <= 0 or len(samples) <= MIN_CALIBRATION_IMAGES:
        return list(samples), []
    count = min(max(MIN_CALIBRATION_IMAGES, round(len(samples) * fraction)), len(samples) - 1)
    order = np.random.default_rng(seed).permutation(len(samples))
    held = set(order[:count].tolist())
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


def calibration_set(train_cfg: dict, dataset: Dataset, held_out: list[Sample],
                    fit_samples: list[Sample]) -> CalibrationSet:
    """Gather and check the calibration images before training, so a config that cannot be
    calibrated fails in seconds instead of after the training run."""
    f1 = train_cfg["threshold_method"] == "f1"
    good, defects, sources = list(held_out), [], ["held-out good training images"] if held_out else []
    directory = train_cfg["calibration_dir"]
    if directory:
        extra_good, labelled = _load_calibration_dir(Path(directory), dataset)
        good += extra_good
        defects = labelled if f1 else []  # the FPR method uses good images only
        sources.append(f"Train.calibration_dir {directory}")
    if f1 and defects and not any(read_mask(s.mask).any() for s in defects):
        raise FlawscopeError(f"Train.calibration_dir: {directory}: the defect masks mark no pixel; cannot fit an "
                             "F1-optimal pixel threshold (use Train.threshold_method=fpr)")
    if f1 and not defects:
        raise FlawscopeError(
            "Train.threshold_method=f1: needs defective images with masks that are not the evaluation "
            "split; set Train.calibration_dir to a dataset holding some (e.g. test/<type>/ + "
            "ground_truth/), or use Train.threshold_method=fpr")
    # Absolute: evaluate compares it with its dataset, from whatever folder it is run in.
    directory = str(Path(directory).resolve()) if directory else None
    if not good:
        return CalibrationSet(list(fit_samples), defects, "training images", directory)
    return CalibrationSet(good, defects, " + ".join(sources), directory)


def _load_calibration_dir(directory: Path, dataset: Dataset) -> tuple[list[Sample], list[Sample]]:
    """(good images, defects with masks) of a folder or dataset that shares no image with ``dataset``."""
    try:
        cal = load_dataset(directory, require_train=False)
    except FlawscopeError as exc:
        raise FlawscopeError(f"Train.calibration_dir: {exc}") from None
    samples = cal.train + cal.val
    split_of = {id(s): split for split, group in (("training", dataset.train), ("evaluation", dataset.val))
                for s in group}
    # By content, not path: a copy of a training image scores like the image it copies.
    repeats = set()
    for copy, original in unique_images(dataset.train + dataset.val + samples)[1]:
        split = split_of.get(id(original))
        if split is None:  # a calibration image that repeats another: counted once
            repeats.add(id(copy))
        elif id(copy) not in split_of:
            what = "is" if copy.image.resolve() == original.image.resolve() else \
                f"is the same image as {original.image},"
            raise FlawscopeError(f"Train.calibration_dir: {copy.image} {what} in the {split} split of "
                                 f"{dataset.root}; calibration images must be new to the model and to evaluation")
    samples = [s for s in samples if id(s) not in repeats]
    good = [s for s in samples if s.label == 0]
    defects = [s for s in samples if s.label == 1 and s.mask is not None]
    if not good and not defects:
        raise FlawscopeError(f"Train.calibration_dir: {directory}: no images found")
    skipped = sum(1 for s in samples if s.label == 1 and s.mask is None)
    if skipped:
        log.info("calibration_dir: %d defective images without masks are not used", skipped)
    return good, defects


def _outputs(predictor: Predictor, samples: list[Sample],
             batch_size: int) -> Iterator[tuple[Sample, np.ndarray, float]]:
    """Each sample with its anomaly map and image score, a batch at a time: the caller keeps what
    it needs of a map (a 9 MP image's is 36 MB), not the maps."""
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        for sample, (amap, score) in zip(batch, predictor.raw_outputs([read_image(s.image) for s in batch])):
            yield sample, amap, score


def _below(low: float, threshold: float) -> float:
    """``low``, or just under ``threshold`` when it is not below it (an F1 threshold under every
    good score): the normalisation needs room between them to map the threshold to 0.5."""
    return low if low < threshold else threshold - max(abs(threshold) * 1e-3, 1e-12)


def calibrate(predictor: Predictor, cal_set: CalibrationSet, image_fpr: float, pixel_fpr: float,
              method: str = "fpr", batch_size: int = 8) -> Calibration:
    """Fit the image and pixel thresholds (see the module docstring) on ``cal_set``."""
    if cal_set.source == "training images":
        log.warning("no good images held out: thresholds fitted on training images will flag too many parts")
    elif len(cal_set.good) < MIN_CALIBRATION_IMAGES:
        log.warning("%d good calibration image sets no scale: normalised scores will be about 0 or 1; "
                    "give more good images in Train.calibration_dir", len(cal_set.good))
    rng = np.random.default_rng(0)
    f1 = method != "fpr"
    scores, pixels, defect_scores, pixel_scores = [], [], [], PixelScores()
    for _, amap, score in _outputs(predictor, cal_set.good, batch_size):
        scores.append(score)
        pixels.append(amap.ravel() if amap.size <= _PIXELS_PER_IMAGE
                      else rng.choice(amap.ravel(), _PIXELS_PER_IMAGE, replace=False))
        if f1:
            pixel_scores.add(np.zeros(amap.shape, bool), amap)
    scores, pixels = np.array(scores), np.concatenate(pixels)
    details = {"method": method, "num_good": len(scores), "num_defect": len(cal_set.defects),
               "image_fpr": image_fpr, "pixel_fpr": pixel_fpr, "calibration_dir": cal_set.calibration_dir}
    if not f1:
        image_threshold, bound = fpr_threshold(scores, image_fpr)
        pixel_threshold, _ = fpr_threshold(pixels, pixel_fpr)
        details["image_fpr_bound"] = round(bound, 6)
        if bound > image_fpr:
            log.warning("%d good calibration images are too few for an image FPR of %g: the threshold is just "
                        "above the highest good score, which a new good part exceeds with probability up to "
                        "%.3g; %s", len(scores), image_fpr, bound,
                        "give more good images in Train.calibration_dir" if cal_set.calibration_dir else
                        "hold out more images or set Train.calibration_dir")
    else:
        odd = []
        for sample, amap, score in _outputs(predictor, cal_set.defects, batch_size):
            defect_scores.append(score)
            mask, problem = read_mask_values(sample.mask, (amap.shape[1], amap.shape[0]))
            pixel_scores.add(mask, amap)
            odd += [f"{sample.mask}: {problem}"] if problem else []
        if odd:
            log.warning("Train.calibration_dir: %d mask(s) hold other values than 0 and one defect value (e.g. %s): "
                        "every nonzero pixel counts as defect, which moves the pixel threshold; save the masks as "
                        "PNG with 0 and 255", len(odd), odd[0])
        labels = [0] * len(scores) + [1] * len(defect_scores)
        image_f1, image_threshold = best_f1(labels, [*scores, *defect_scores])
        best = pixel_best_f1(pixel_scores)
        if best is None:
            raise FlawscopeError("Train.calibration_dir: the defect masks mark no pixel (or every pixel); "
                                 "cannot fit an F1-optimal pixel threshold")
        pixel_f1, pixel_threshold = best
        details |= {"image_f1": round(image_f1, 6), "pixel_f1": round(pixel_f1, 6)}
    # Where normalised scores start: the lowest good image score, and the typical good pixel.
    image_low = _below(float(scores.min()) if scores.size else 0.0, image_threshold)
    pixel_low = _below(float(np.median(pixels)) if pixels.size else 0.0, pixel_threshold)
    cal = Calibration(image_threshold=image_threshold, image_low=image_low, pixel_threshold=pixel_threshold,
                      pixel_low=pixel_low, source=cal_set.source, details=details)
    log.info("calibrated (%s) on %d good + %d defective images from %s: image threshold %.5g, pixel threshold %.5g",
             method, len(scores), len(cal_set.defects), cal_set.source, cal.image_threshold, cal.pixel_threshold)
    return cal
