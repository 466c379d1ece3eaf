"""Image- and pixel-level anomaly detection metrics, on top of scikit-learn.

Every metric returns None (never raises, never NaN) when the data cannot define it, e.g. a
test set with only good images has no image AUROC; the report prints "n/a" for those.

Pixel metrics (``pixel_auroc``, ``pro_curve``, ``aupro``) are exact up to
``max_exact_pixels`` pixels in total: all pixels are concatenated and scikit-learn sorts them.
Sorting costs roughly 60-80 bytes per pixel, which for a full-resolution test set would be tens
of GB, so above that size the scores are binned into ``num_thresholds`` equal-width bins between
the global min and max of the maps (streamed image by image), and scikit-learn computes the curve
from the per-bin (weighted) counts. That is the exact curve of the quantised scores: it only
differs where a defect pixel and a good pixel fall into the same bin, which with 100,000 bins over
[0, 1] means scores closer than 1e-5. No subsampling, so the result is deterministic and uses
every pixel.

Thresholded metrics (``confusion``, ``rates``, ``mask_confusion``) score decisions already made,
e.g. ``AnomalyResult.is_anomaly`` and ``AnomalyResult.pred``, so they measure exactly what a user
of the Predictor sees.

PRO (per-region overlap, MVTec AD): at a threshold, each connected ground-truth region (3x3
8-connectivity, as MVTec's reference code) scores the fraction of its pixels predicted defective;
PRO is the mean over all regions of all images, and FPR is false positive pixels over all good
pixels. This is a weighted ROC: give each good pixel weight 1 and each defect pixel weight
1/size-of-its-region, then the weighted TPR is exactly PRO. So ``roc_curve`` with
``sample_weight`` computes the PRO curve at every distinct score, like MVTec's sort-based code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from scipy.integrate import trapezoid
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from flawscope.inference.result import CONNECTIVITY

MAX_EXACT_PIXELS = 4_000_000
NUM_THRESHOLDS = 100_000


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """ROC AUC of image scores (label 1 = defect); None unless both classes are present."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """Average precision of image scores; None unless both classes are present."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return None
    return float(average_precision_score(labels, np.asarray(scores, dtype=np.float64)))


def best_f1(labels: ArrayLike, scores: ArrayLike,
            sample_weight: ArrayLike | None = None) -> tuple[float, float] | None:
    """(best F1, its threshold) over all thresholds, predicting defect when score >= threshold.

    None when there is no defect label (F1 is undefined). The threshold is one of the scores, so
    ``f1_at(labels, scores, threshold)`` reproduces the F1. ``sample_weight`` lets the binned
    pixel data of ``pixel_best_f1`` stand for many pixels per entry.
    """
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return None
    precision, recall, thresholds = precision_recall_curve(
        labels, np.asarray(scores, dtype=np.float64), sample_weight=sample_weight
    )
    # The last (precision=1, recall=0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator),
                   where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def f1_at(labels: ArrayLike, scores: ArrayLike, threshold: float) -> float | None:
    """F1 when predicting defect for score >= threshold; None when there is no defect label."""
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return None
    return float(f1_score(labels, np.asarray(scores, dtype=np.float64) >= threshold))


def pixel_auroc(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    *,
    max_exact_pixels: int = MAX_EXACT_PIXELS,
    num_thresholds: int = NUM_THRESHOLDS,
) -> float | None:
    """ROC AUC over all pixels of all images; None without both defect and good pixels.

    Exact up to ``max_exact_pixels``, binned above (see the module docstring).
    """
    data = _pixel_data(masks, maps, "pixel", max_exact_pixels, num_thresholds)
    if data is None:
        return None
    y_true, y_score, weight = data
    return float(roc_auc_score(y_true, y_score, sample_weight=weight))


def pixel_roc_curve(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    *,
    max_exact_pixels: int = MAX_EXACT_PIXELS,
    num_thresholds: int = NUM_THRESHOLDS,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, tpr) of all pixels, for plotting; None when ``pixel_auroc`` is None."""
    data = _pixel_data(masks, maps, "pixel", max_exact_pixels, num_thresholds)
    if data is None:
        return None
    fpr, tpr, _ = roc_curve(data[0], data[1], sample_weight=data[2])
    return fpr, tpr


def pixel_best_f1(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    *,
    max_exact_pixels: int = MAX_EXACT_PIXELS,
    num_thresholds: int = NUM_THRESHOLDS,
) -> tuple[float, float] | None:
    """(best pixel F1 over all thresholds, its threshold): the segmentation F1-max of the
    literature, and the F1-optimal pixel threshold for calibration. None without both classes."""
    data = _pixel_data(masks, maps, "pixel", max_exact_pixels, num_thresholds)
    if data is None:
        return None
    return best_f1(*data)


def pro_curve(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    *,
    max_exact_pixels: int = MAX_EXACT_PIXELS,
    num_thresholds: int = NUM_THRESHOLDS,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, pro) from (0, 0) to (1, 1), fpr non-decreasing, for plotting and ``aupro``.

    None without a defect region or without a good pixel. Collinear points are dropped; that
    changes neither the plot nor the integral.
    """
    data = _pixel_data(masks, maps, "region", max_exact_pixels, num_thresholds)
    if data is None:
        return None
    y_true, y_score, weight = data
    fpr, pro, _ = roc_curve(y_true, y_score, sample_weight=weight)
    return fpr, np.clip(pro, 0.0, 1.0)  # float rounding of the 1/size weights


def aupro(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
    *,
    max_exact_pixels: int = MAX_EXACT_PIXELS,
    num_thresholds: int = NUM_THRESHOLDS,
) -> float | None:
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit (so in [0, 1]).

    As MVTec AD's reference: trapezoids, with the curve linearly interpolated at fpr_limit. A
    random/constant map gives fpr_limit / 2 (the diagonal). None when ``pro_curve`` is None.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    curve = pro_curve(masks, maps, max_exact_pixels=max_exact_pixels,
                      num_thresholds=num_thresholds)
    if curve is None:
        return None
    fpr, pro = curve
    right = int(np.searchsorted(fpr, fpr_limit, side="right"))  # first point past the limit
    if right < len(fpr):
        left = right - 1
        t = (fpr_limit - fpr[left]) / (fpr[right] - fpr[left])
        fpr = np.append(fpr[:right], fpr_limit)
        pro = np.append(pro[:right], pro[left] + t * (pro[right] - pro[left]))
    return float(trapezoid(pro, fpr) / fpr_limit)


def _pixel_data(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    weighting: Literal["pixel", "region"],
    max_exact_pixels: int,
    num_thresholds: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(y_true, y_score, sample_weight) for scikit-learn: one entry per pixel when small enough,
    else one good and one defect entry per score bin with the summed weights.

    ``weighting``: "pixel" (every pixel weighs 1: ROC) or "region" (defect pixels weigh
    1/region size: PRO). None when there is no defect pixel or no good pixel.
    """
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks but {len(maps)} maps")
    masks = [np.asarray(m, dtype=bool) for m in masks]
    for mask, amap in zip(masks, maps):
        if mask.shape != amap.shape:
            raise ValueError(f"mask shape {mask.shape} != map shape {amap.shape}")
    total = sum(m.size for m in masks)
    positives = sum(np.count_nonzero(m) for m in masks)
    if positives == 0 or positives == total:
        return None

    def weights(mask: np.ndarray) -> np.ndarray | None:
        """None where every pixel weighs 1: all of them for ROC, a good image's for PRO."""
        if weighting == "pixel" or not mask.any():
            return None
        labels, _ = ndimage.label(mask, structure=CONNECTIVITY)
        sizes = np.bincount(labels.ravel())
        return np.where(mask, 1.0 / np.maximum(sizes, 1)[labels], 1.0)

    if total <= max_exact_pixels:
        y_true = np.concatenate([m.ravel() for m in masks])
        y_score = np.concatenate([np.ravel(a) for a in maps])
        if weighting == "pixel":
            return y_true, y_score, None
        return y_true, y_score, np.concatenate([np.ones(m.size) if (w := weights(m)) is None else w.ravel()
                                                for m in masks])

    low = min(float(np.min(a)) for a in maps)
    high = max(float(np.max(a)) for a in maps)
    scale = num_thresholds / (high - low) if high > low else 0.0
    good = np.zeros(num_thresholds)
    defect = np.zeros(num_thresholds)
    for mask, amap in zip(masks, maps):
        bins = ((np.asarray(amap, dtype=np.float64) - low) * scale).astype(np.int64)
        np.minimum(bins, num_thresholds - 1, out=bins)  # the max lands exactly on the top edge
        if not mask.any():  # a good image: every pixel counts once, as a good one
            good += np.bincount(bins.ravel(), None, num_thresholds)
            continue
        w = weights(mask)
        for totals, where in ((good, ~mask), (defect, mask)):
            totals += np.bincount(bins[where], None if w is None else w[where], num_thresholds)
    edges = low + np.arange(num_thresholds) / scale if scale else np.full(num_thresholds, low)
    y_true = np.repeat([False, True], num_thresholds)
    y_score = np.concatenate([edges, edges])
    weight = np.concatenate([good, defect])
    keep = weight > 0
    return y_true[keep], y_score[keep], weight[keep]


def confusion(labels: ArrayLike, predicted: ArrayLike) -> dict[str, int]:
    """Counts of tp, fp, fn, tn for boolean decisions (label 1 / True = defect)."""
    labels = np.asarray(labels, dtype=bool).ravel()
    predicted = np.asarray(predicted, dtype=bool).ravel()
    if labels.shape != predicted.shape:
        raise ValueError(f"{labels.size} labels but {predicted.size} predictions")
    tp = int(np.count_nonzero(labels & predicted))
    fp = int(np.count_nonzero(~labels & predicted))
    fn = int(np.count_nonzero(labels & ~predicted))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": labels.size - tp - fp - fn}


def mask_confusion(masks: Sequence[np.ndarray], preds: Sequence[np.ndarray]) -> dict[str, int]:
    """``confusion`` summed over images without concatenating them (one image in memory at a time)."""
    if len(masks) != len(preds):
        raise ValueError(f"{len(masks)} masks but {len(preds)} predicted masks")
    total = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for mask, pred in zip(masks, preds):
        if np.shape(mask) != np.shape(pred):
            raise ValueError(f"mask shape {np.shape(mask)} != predicted mask shape {np.shape(pred)}")
        for key, value in confusion(mask, pred).items():
            total[key] += value
    return total


def rates(counts: dict[str, int]) -> dict[str, float | None]:
    """precision, recall, F1, IoU of the defect class and FPR of the good one, from ``confusion``.

    Recall, F1 and IoU are None without a defect label (as ``f1_at``), precision is None when
    nothing was predicted defective, FPR is None without a good label.
    """
    tp, fp, fn, tn = counts["tp"], counts["fp"], counts["fn"], counts["tn"]
    has_defect = tp + fn > 0
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn) if has_defect else None,
        "iou": _ratio(tp, tp + fp + fn) if has_defect else None,
        "fpr": _ratio(fp, fp + tn),
    }


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def disk(radius: int) -> np.ndarray:
    """Boolean disk footprint, (2r+1)x(2r+1), x^2 + y^2 <= r^2 (as skimage.morphology.disk)."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def paddlex_miou(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    threshold: float = 0.01,
    opening_radius: int = 4,
) -> float | None:
    """The "mIoU" PaddleX reports for STFPM: the fraction of good pixels predicted good.

    How PaddleX computes it (PaddleSeg ``paddleseg/core/infer.py`` ``stfpm_post_transform`` and
    ``paddleseg/utils/metrics.py`` ``calculate_area``/``mean_iou``, used by PaddleX's
    ``anomaly_detection`` evaluator): a pixel is predicted defective when its *raw* map value is
    > 0.01, the binary mask is opened with a disk of radius 4 (reflected borders), and IoU is
    taken over ``num_classes: 1`` with defect pixels (mask value 255) as ``ignore_index``.
    Only the good class is scored and its predicted area is restricted to good pixels, so
    intersection = predicted area = true negatives and union = all good pixels: the number is
    1 - (pixel false-positive rate) at a fixed raw threshold, areas summed over the split
    (PaddleX's MVTec conversion puts only the defective test images in val.txt; here it is
    whatever split is evaluated). It says nothing about whether defects are found.
    Differences: we open the map at each image's own size (PaddleX at the model input, before
    resizing back), and raw scales differ between implementations (ours halves each level's
    squared distance), so 0.01 is not the same operating point. None when there is no good
    pixel (PaddleX prints 0).
    """
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks but {len(maps)} maps")
    footprint = disk(opening_radius)
    true_negatives = good = 0
    for mask, amap in zip(masks, maps):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != np.shape(amap):
            raise ValueError(f"mask shape {mask.shape} != map shape {np.shape(amap)}")
        predicted = _open_reflected(np.asarray(amap) > threshold, footprint)
        true_negatives += int(np.count_nonzero(~predicted & ~mask))
        good += int(np.count_nonzero(~mask))
    return true_negatives / good if good else None


def _open_reflected(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary opening with the image mirrored at its borders (PaddleSeg's, through skimage).

    A mirrored pixel inside the footprint has its original inside it too, so mirroring is the same
    as an outside that never erodes (border 1) and never dilates (border 0); binary morphology
    that way is 2-2.5x faster than grey opening of the 0/1 image, with the same result.
    """
    if mask.all() or not mask.any():  # PatchCore's raw distances are all above PaddleX's 0.01
        return mask
    eroded = ndimage.binary_erosion(mask, footprint, border_value=1)
    return ndimage.binary_dilation(eroded, footprint, border_value=0)
