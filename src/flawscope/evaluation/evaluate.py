"""Score a model on a labelled split: image and pixel metrics, overall and per defect type.

One forward pass per image feeds two kinds of metrics:

- ranking metrics (AUROC, AP, best F1, AUPRO) and PaddleX's mIoU use the *raw* maps and scores
  (the normalisation is monotone, so the rankings are the same; PaddleX thresholds raw scores);
- decision metrics (F1, IoU, precision, recall, FPR at the calibrated threshold) use the
  ``AnomalyResult`` the Predictor returns for that image: ``is_anomaly``, and ``pred``, which is
  empty for an image judged OK. So a defect on an image called OK counts as missed pixels, as it
  is for the user, who is shown no outline there.

Each defect type is scored together with all the good images of the split.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import betabinom, binomtest
from tqdm import tqdm

from flawscope.atomic import write_atomic
from flawscope.data.io import read_ahead, read_image, read_mask_values
from flawscope.data.layouts import VAL_WITHOUT_GOOD_FIX, Dataset, Sample, check_headers, unread_images
from flawscope.evaluation import metrics
from flawscope.inference.model_dir import WEIGHTS_FILE, Calibration, among, image_digests, read_fitted_images
from flawscope.inference.predictor import Predictor
from flawscope.inference.result import THRESHOLD
from flawscope.logs import log, log_to_file

AUPRO_FPR_LIMIT = 0.3
REPORT_DIR = "evaluate_report"
SHIFT_P_VALUE = 0.01  # below this, good images flagged too often to be chance
_METRIC_KEYS = ("image_auroc", "image_ap", "image_f1", "image_precision", "image_recall", "image_fpr", "image_best_f1",
                "pixel_auroc", "aupro", "pixel_f1", "pixel_iou", "pixel_precision", "pixel_recall", "pixel_fpr",
                "pixel_best_f1", "paddlex_miou")
_PER_TYPE_KEYS = ("image_auroc", "image_ap", "image_recall", "pixel_auroc", "aupro", "pixel_f1", "pixel_iou")


@dataclass
class Outcome:
    """What one image gave: its raw score for ranking, the Predictor's decision for thresholds."""

    sample: Sample
    raw_score: float
    mask_pixels: int | None  # defect pixels in its mask; None: a defect image without one (image metrics only)
    mask_problem: str | None = None  # its mask holds other values than 0 and one defect value (read_mask_values)
    score: float | None = None  # normalised; None while the model is not calibrated
    is_anomaly: bool | None = None
    fitted: bool = False  # one of the images the model was fitted on (``collect``'s ``fitted``)


@dataclass
class PixelGroup:
    """What the pixel metrics need of some images, summed as they come: no map outlives its
    image once the images pass ``metrics.MAX_EXACT_PIXELS`` (a test set of camera images would
    otherwise hold its maps, masks and predicted masks, 6 bytes a pixel, until the end)."""

    scores: metrics.PixelScores = field(default_factory=metrics.PixelScores)
    confusion: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("tp", "fp", "fn", "tn"), 0))
    paddlex: tuple[int, int] = (0, 0)  # metrics.paddlex_counts, summed

    def add(self, mask: np.ndarray, raw_map: np.ndarray, pred: np.ndarray | None, miou: bool = True) -> None:
        """One image: its mask, raw map and, once calibrated, the Predictor's predicted mask;
        ``miou``: also PaddleX's mIoU terms (an opening of the map, up to 50 ms a megapixel)."""
        self.scores.add(mask, raw_map)
        if miou:
            self.paddlex = tuple(a + b for a, b in zip(self.paddlex, metrics.paddlex_counts(mask, raw_map)))
        if pred is not None:
            self.confusion = {k: v + self.confusion[k] for k, v in metrics.confusion(mask, pred).items()}

    def __add__(self, other: PixelGroup) -> PixelGroup:
        return PixelGroup(self.scores + other.scores, {k: v + other.confusion[k] for k, v in self.confusion.items()},
                          tuple(a + b for a, b in zip(self.paddlex, other.paddlex)))


@dataclass
class Collected:
    """One pass of a model over a split: each image's outcome, and the pixels of the images with
    ground truth, grouped so that each defect type can be scored with the good images."""

    outcomes: list[Outcome]
    good: PixelGroup
    defects: dict[str, PixelGroup]  # by defect type
    _sums: dict[str | None, PixelGroup] = field(default_factory=dict, repr=False)

    def pixels(self, defect_type: str | None = None) -> PixelGroup:
        """The good images' pixels with every defect type's, or with one type's (summed once:
        the metrics and the report's plots ask for the same)."""
        if defect_type not in self._sums:
            chosen = self.defects.values() if defect_type is None else [self.defects.get(defect_type, PixelGroup())]
            self._sums[defect_type] = sum(chosen, self.good)
        return self._sums[defect_type]


def _read(sample: Sample) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """An image, its mask (the given one, all-clear for a good image, None for a defect without)
    and what is wrong with the mask's values."""
    image = read_image(sample.image)
    if sample.mask is not None:
        return image, *read_mask_values(sample.mask, (image.shape[1], image.shape[0]))
    return image, np.zeros(image.shape[:2], dtype=bool) if sample.label == 0 else None, None


def collect(predictor: Predictor, samples: Sequence[Sample], batch_size: int = 8,
            desc: str = "evaluate", miou: bool = True, fitted: torch.Tensor | None = None) -> Collected:
    """Run the model once over ``samples``, reading the next chunk meanwhile; decisions only when
    the model is calibrated; PaddleX's mIoU terms unless ``miou`` is false (``auroc_summary``
    does without). ``fitted``: the digests of the images the model was fitted on
    (``read_fitted_images``), which the outcomes of those images say (``Outcome.fitted``)."""
    calibrated = predictor.info.calibration is not None

    def read_chunk(chunk: list[Sample]) -> tuple[tuple, torch.Tensor, list[bool]]:
        """The chunk's images, masks and mask problems, its model inputs, and which were fitted on."""
        images, masks, problems = zip(*[_read(s) for s in chunk])
        inputs = torch.from_numpy(np.stack([predictor.resizer.to_input(image) for image in images]))
        seen = among(image_digests(inputs), fitted).tolist() if fitted is not None else [False] * len(chunk)
        return (images, masks, problems), inputs, seen

    chunks = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    reads = read_ahead(read_chunk, chunks, 1)
    collected = Collected([], PixelGroup(), {})
    with closing(reads):
        for chunk, reading in tqdm(reads, total=len(chunks), desc=desc, leave=False, unit="batch", disable=None):
            (images, masks, problems), inputs, seen = reading.result()
            for sample, image, mask, problem, was_fitted, (raw_map, raw_score) in zip(
                    chunk, images, masks, problems, seen, predictor.raw_outputs(images, inputs.numpy())):
                outcome = Outcome(sample, raw_score, None if mask is None else int(np.count_nonzero(mask)), problem,
                                  fitted=was_fitted)
                pred = None
                if calibrated:
                    res = predictor.result(image, raw_map, raw_score)
                    outcome.score, outcome.is_anomaly, pred = res.score, res.is_anomaly, res.pred
                if mask is not None:
                    group = collected.good if sample.label == 0 else collected.defects.setdefault(
                        sample.defect_type, PixelGroup())
                    group.add(mask, raw_map, pred, miou)
                collected.outcomes.append(outcome)
    return collected


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def auroc_summary(collected: Collected) -> dict:
    """Image and pixel AUROC only: what training logs at each ``Train.eval_interval``, without
    the AUPRO, F1 and per-type work of a full evaluation."""
    outcomes = collected.outcomes
    return {
        "image_auroc": _round(metrics.image_auroc([o.sample.label for o in outcomes], [o.raw_score for o in outcomes])),
        "pixel_auroc": _round(metrics.pixel_auroc(collected.pixels().scores)),
    }


def summarize(outcomes: Sequence[Outcome], pixels: PixelGroup, fpr_limit: float = AUPRO_FPR_LIMIT,
              keys: Collection[str] | None = None) -> dict:
    """Every metric of ``outcomes`` and their ``pixels`` (flat, rounded, None where undefined)
    plus the confusion counts and the best-F1 thresholds found on them; with ``keys``, only those
    metrics (each pixel metric is a pass over every pixel's score)."""
    labels = np.array([o.sample.label for o in outcomes], dtype=int)
    raw = np.array([o.raw_score for o in outcomes], dtype=np.float64)
    image_best = functools.cache(lambda: metrics.best_f1(labels, raw))
    pixel_best = functools.cache(lambda: metrics.pixel_best_f1(pixels.scores))
    tn, good_pixels = pixels.paddlex
    wanted = set(_METRIC_KEYS if keys is None else keys)
    computed = {
        "image_auroc": lambda: metrics.image_auroc(labels, raw),
        "image_ap": lambda: metrics.image_ap(labels, raw),
        "image_best_f1": lambda: image_best()[0] if image_best() else None,
        "pixel_auroc": lambda: metrics.pixel_auroc(pixels.scores),
        "aupro": lambda: metrics.aupro(pixels.scores, fpr_limit),
        "pixel_best_f1": lambda: pixel_best()[0] if pixel_best() else None,
        "paddlex_miou": lambda: tn / good_pixels if good_pixels else None,
    }
    out = {key: computed[key]() if key in computed and key in wanted else None for key in _METRIC_KEYS}
    confusion = None
    if outcomes and outcomes[0].is_anomaly is not None:
        confusion = {"image": metrics.confusion(labels, [o.is_anomaly for o in outcomes]), "pixel": pixels.confusion}
        for level in ("image", "pixel"):
            for name, value in metrics.rates(confusion[level]).items():
                if f"{level}_{name}" in out:
                    out[f"{level}_{name}"] = value
    out = {k: _round(v) for k, v in out.items() if k in wanted}
    if keys is not None:
        return out
    out |= {
        "num_images": len(outcomes),
        "num_good": int((labels == 0).sum()),
        "num_defect": int((labels == 1).sum()),
        "num_with_masks": sum(o.mask_pixels is not None for o in outcomes),
        "confusion": confusion,
        # raw scores, unrounded: a small model's scores may lie closer together than 1e-6
        "best_f1_thresholds": {"image": image_best()[1] if image_best() else None,
                               "pixel": pixel_best()[1] if pixel_best() else None},
    }
    return out


def compute_metrics(collected: Collected, fpr_limit: float = AUPRO_FPR_LIMIT) -> dict:
    """``summarize`` of the split, with ``per_defect_type`` (each type with the good images)."""
    outcomes = collected.outcomes
    result = summarize(outcomes, collected.pixels(), fpr_limit)
    if result["confusion"] is not None:  # the pixel threshold's target is good images' pixels
        result["confusion"]["pixel_good_images"] = collected.good.confusion
    good = [o for o in outcomes if o.sample.label == 0]
    per_type = {}
    for defect_type in sorted({o.sample.defect_type for o in outcomes if o.sample.label == 1}):
        chosen = [o for o in outcomes if o.sample.label == 1 and o.sample.defect_type == defect_type]
        per_type[defect_type] = {"count": len(chosen), **summarize(good + chosen, collected.pixels(defect_type),
                                                                   fpr_limit, _PER_TYPE_KEYS)}
    result["per_defect_type"] = per_type
    return result


def fitted_warning(outcomes: Sequence[Outcome]) -> str | None:
    """Evaluated images that the model was fitted on (``Outcome.fitted``: e.g. test images added as
    normals with ``Train.add_normals``) score as training images: the metrics are optimistic."""
    trained_on = [o.sample.image for o in outcomes if o.fitted]
    if not trained_on:
        return None
    return (f"{len(trained_on)} of the {len(outcomes)} images evaluated are images the model was fitted on "
            f"(e.g. {trained_on[0]}): they score as training images, so the metrics here are optimistic")


def shift_warning(outcomes: Sequence[Outcome], cal: Calibration) -> str | None:
    """Why the good images of this split are flagged far more often than calibration promised.

    The FPR calibration bounds the share of *new good parts like its good images* that are
    flagged, on average over calibration sets: thresholds set on n good images flag a share that
    varies as Beta(a, n + 1 - a) around that bound (a = bound (n + 1), the good scores at or above
    the threshold's rank, plus one), so the count flagged among m new good images is beta-binomial.
    When this split's good images are flagged more often than that allows, they are not like
    them: other lighting, position or material, and the thresholds do not carry over, whatever the
    AUROC says. When only the bound's own binomial is exceeded, the thresholds were set on too
    few images to hold it. (Models calibrated before ``num_good`` was recorded: the binomial.)
    """
    bound = cal.details.get("image_fpr_bound")
    flags = [o.is_anomaly for o in outcomes if o.sample.label == 0 and o.is_anomaly is not None]
    if bound is None or not flags:
        return None
    flagged, count, calibrated = int(sum(flags)), len(flags), cal.details.get("num_good")
    if binomtest(flagged, count, bound, alternative="greater").pvalue >= SHIFT_P_VALUE:
        return None
    share = f"{flagged} of the {count} good images here are flagged ({flagged / count:.0%}), where the thresholds flag"
    if cal.source == "training images":  # no image held out: the bound is for images as near the banks as those
        return (f"{share} {bound:.0%} of good parts as near the model as its own training images, which they were "
                "calibrated on (Train.calibration_fraction 0, no Train.calibration_dir): new good parts score higher. "
                "Calibrate on good images the model was not fitted on: Train.calibration_fraction or "
                "Train.calibration_dir")
    if calibrated:
        above = round(bound * (calibrated + 1))
        if betabinom.sf(flagged - 1, count, above, calibrated + 1 - above) >= SHIFT_P_VALUE:
            return (f"{share} {bound:.0%} of good parts on average: set on only {calibrated} good images "
                    f"({cal.source}), thresholds land this far from it by chance too often to tell that from good "
                    "images unlike those (lighting, position, material). Calibrate on more good images to tell: a "
                    "larger Train.calibration_fraction, or Train.calibration_dir")
    return (f"{share} at most {bound:.0%} of good parts like the {calibrated or '?'} they were "
            f"calibrated on ({cal.source}): these good images differ from those (lighting, position, material). "
            "Calibrate on good images like them: train again with Train.calibration_dir set to a folder of them "
            "(STFPM: from its last checkpoint, Train.resume_path=OUTPUT/iter_N, which trains nothing more; "
            "PatchCore: or add them with Train.add_normals)")


def thresholds_of(predictor: Predictor) -> dict:
    """The calibrated thresholds as stored in the model directory, raw and normalised."""
    cal = predictor.info.calibration
    return {
        "image": {"raw": cal.image_threshold, "normalized": THRESHOLD},
        "pixel": {"raw": cal.pixel_threshold, "normalized": THRESHOLD},
        "method": cal.details.get("method", "fpr"),
        "source": cal.source,
        "calibration": cal.details,
        # the held-out images that joined the banks after calibration (Train.add_calibration_images):
        # the thresholds, and the bound in ``calibration``, are those of the model before they joined
        "images_joined_after_calibration": predictor.info.provenance.get("calibration_images_added", 0),
    }


def no_good_warning(outcomes: Sequence[Outcome]) -> str | None:
    """Defect images only (a conversion's lists, every good image in train): image AUROC and the
    false-positive rates are left null, which a user reads for a broken model."""
    if outcomes and all(o.sample.label == 1 for o in outcomes):
        return (f"the {len(outcomes)} evaluated images are all defect images: with no good one there is no image "
                "AUROC, AP or false-positive rate; " + VAL_WITHOUT_GOOD_FIX)
    return None


def mask_warnings(outcomes: Sequence[Outcome]) -> list[str]:
    """Masks that cannot say where the defect is: without one, an image counts in the image
    metrics only; with an empty one, its flagged pixels all count as false positives; with values
    besides 0 and one defect value, every nonzero one counts as defect."""
    defects = [o for o in outcomes if o.sample.label == 1]
    missing = [o.sample.image for o in defects if o.mask_pixels is None]
    empty = [o.sample.image for o in defects if o.mask_pixels == 0]
    odd = [o for o in outcomes if o.mask_problem]
    warnings = []
    if odd:
        warnings.append(f"{len(odd)} mask(s) hold other values than 0 and one defect value (e.g. {odd[0].sample.mask}: "
                        f"{odd[0].mask_problem}): every nonzero pixel counts as defect, so a JPEG mask's compression "
                        "noise adds defect pixels to the pixel metrics; save the masks as PNG with 0 and 255")
    if missing:
        warnings.append(f"{len(missing)} defect image(s) have no mask (e.g. {missing[0]}): left out of the pixel "
                        "metrics")
    if empty:
        warnings.append(f"{len(empty)} defect image(s) have an empty mask (e.g. {empty[0]}): every pixel flagged on "
                        "them counts as a false positive")
    return warnings


def evaluate_model(predictor: Predictor, dataset: Dataset, output: Path, model_dir: Path,
                   batch_size: int = 8) -> dict:
    """``Global.mode=evaluate``: ``evaluate_result.json``, ``evaluate.log`` and the report."""
    from flawscope.evaluation.report import write_report

    check_headers(dataset.val)
    output.mkdir(parents=True, exist_ok=True)
    # Until this evaluation ends, an earlier one's result here must not pass for it.
    write_atomic(output / "evaluate_result.json", json.dumps({"done_flag": False}).encode())
    with log_to_file(output / "evaluate.log"):
        fitted = read_fitted_images(model_dir) if (model_dir / WEIGHTS_FILE).is_file() else None  # not exported ones
        collected = collect(predictor, dataset.val, batch_size, fitted=fitted)
        outcomes = collected.outcomes
        result = {"done_flag": True, "model_dir": str(model_dir.resolve()), "dataset_dir": str(dataset.root.resolve()),
                  "metrics": compute_metrics(collected), "thresholds": thresholds_of(predictor),
                  "aupro_fpr_limit": AUPRO_FPR_LIMIT, "warnings": []}
        calibration_dir = predictor.info.calibration.details.get("calibration_dir")
        if calibration_dir and Path(calibration_dir).resolve() == dataset.root.resolve():
            result["warnings"].append(f"the thresholds were calibrated on {dataset.root} itself: the "
                                      "threshold metrics are optimistic")
        provenance = predictor.info.provenance
        chosen_on = provenance.get("dataset") if provenance.get("selected_on_evaluation_split") else None
        if chosen_on and Path(chosen_on).resolve() == dataset.root.resolve():
            result["warnings"].append(f"the model's iteration {provenance.get('iterations')} was chosen as the best on "
                                      f"{dataset.root}'s evaluation split (Train.select_best): every metric here is "
                                      "optimistic; evaluate on images it was not chosen on")
        for warning in (no_good_warning(outcomes), fitted_warning(outcomes),
                        shift_warning(outcomes, predictor.info.calibration)):
            if warning:
                result["warnings"].append(warning)
        result["warnings"] += mask_warnings(outcomes)
        unread = unread_images(dataset, output.absolute())
        if unread:  # a lot of defects in a subfolder, never evaluated: the record must say so
            result["warnings"].append(f"{len(unread)} image file(s) under {dataset.root} are in no split and were "
                                      f"not evaluated (e.g. {unread[0]}); check_dataset lists them")
        result["report"] = str(write_report(output / REPORT_DIR, result, collected, predictor))
        write_atomic(output / "evaluate_result.json", json.dumps(result, indent=2).encode())
        m = result["metrics"]
        for warning in result["warnings"]:
            log.warning(warning)
        shown = {key: "n/a" if m[key] is None else m[key]  # null in the JSON: not measurable on these images
                 for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1")}
        log.info("evaluate %s on %s: image AUROC %s, pixel AUROC %s, AUPRO %s, image F1 %s, pixel F1 %s; "
                 "report %s", model_dir, dataset.root, *shown.values(), result["report"])
    return result
