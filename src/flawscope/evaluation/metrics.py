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


def best_f1(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float] | None:
    """(best F1, its threshold) over all thresholds, predicting defect when score >= threshold.

    None when there is no defect label (F1 is undefined). The threshold is one of the scores, so
    ``f1_at(labels, scores, threshold)`` reproduces the F1.
    """
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return None
    precision, recall, thresholds = precision_recall_curve(
        labels, np.asarray(scores, dtype=np.float64)
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
        if weighting == "pixel":
            return None
        labels, _ = ndimage.label(mask, structure=CONNECTIVITY)
        sizes = np.bincount(labels.ravel())
        return np.where(mask, 1.0 / np.maximum(sizes, 1)[labels], 1.0)

    if total <= max_exact_pixels:
        y_true = np.concatenate([m.ravel() for m in masks])
        y_score = np.concatenate([np.ravel(a) for a in maps])
        if weighting == "pixel":
            return y_true, y_score, None
        return y_true, y_score, np.concatenate([weights(m).ravel() for m in masks])

    low = min(float(np.min(a)) for a in maps)
    high = max(float(np.max(a)) for a in maps)
    scale = num_thresholds / (high - low) if high > low else 0.0
    good = np.zeros(num_thresholds)
    defect = np.zeros(num_thresholds)
    for mask, amap in zip(masks, maps):
        bins = ((np.asarray(amap, dtype=np.float64) - low) * scale).astype(np.int64)
        np.minimum(bins, num_thresholds - 1, out=bins)  # the max lands exactly on the top edge
        w = weights(mask)
        for totals, where in ((good, ~mask), (defect, mask)):
            totals += np.bincount(bins[where], None if w is None else w[where], num_thresholds)
    edges = low + np.arange(num_thresholds) / scale if scale else np.full(num_thresholds, low)
    y_true = np.repeat([False, True], num_thresholds)
    y_score = np.concatenate([edges, edges])
    weight = np.concatenate([good, defect])
    keep = weight > 0
    return y_true[keep], y_score[keep], weight[keep]
