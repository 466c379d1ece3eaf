"""Image- and pixel-level anomaly detection metrics, on top of scikit-learn.

Every metric returns None (never raises, never NaN) when the data cannot define it, e.g. a
test set with only good images has no image AUROC; the report prints "n/a" for those.

Pixel metrics (``pixel_auroc``, ``pro_curve``, ``aupro``, ``pixel_best_f1``) take a
``PixelScores``, to which images are added one at a time. They are exact up to
``max_exact_pixels`` pixels in total: all pixels are concatenated and scikit-learn sorts them.
Sorting costs roughly 60-80 bytes per pixel, and holding every map at full size 5 bytes, which
for a test set of camera images would be tens of GB; so above that size each image's scores
are counted into bins as it comes, and scikit-learn computes the curve from the per-bin
(weighted) counts. A bin is a float32 score with the 11 lowest of its 23 mantissa bits
dropped: 2^-12 of its value wide at any scale (4,096 bins an octave), so the bins need no range
known in advance, an outlier coarsens nothing, and any images' counts add up. That is the exact
curve of the quantised scores (as float32, as the models' maps are): it only differs where a
defect pixel and a good pixel fall into the same bin, scores within 0.025% of each other. So
maps of distances, which start near zero, lose nothing that shows (on the bundled model's maps
of MVTec transistor's 26 M test pixels: pixel AUROC and AUPRO within 2e-8 of the exact ones),
but a map far from zero compared with its spread would (1000 +- 1: AUROC off by ~1e-4). No
subsampling, so the result is deterministic and uses every pixel.

Thresholded metrics (``confusion``, ``rates``) score decisions already made,
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
_DROPPED_BITS = 11  # of float32's 23 mantissa bits: a bin is 2**-12 of its scores' value wide
_BLOCK_BITS = 23 - _DROPPED_BITS  # the bins are kept in blocks of one float exponent (an octave)


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

    None when there is no defect label (F1 is undefined). The threshold lies halfway between the
    lowest score it flags and the highest one it does not (or at the lowest score when it flags
    all), so ``f1_at(labels, scores, threshold)`` reproduces the F1, and a calibration threshold
    keeps a margin on both sides: one at the lowest defect score would miss that defect as soon
    as its score moved down a little (a bank refitted with more good images lowers every score).
    ``sample_weight`` lets the binned pixel data of ``pixel_best_f1`` stand for many pixels per
    entry; a bin holds pixels of many scores, so there the threshold stays at the bin's value.
    """
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return None
    scores = np.asarray(scores, dtype=np.float64)
    precision, recall, thresholds = precision_recall_curve(labels, scores, sample_weight=sample_weight)
    # The last (precision=1, recall=0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator),
                   where=denominator > 0)
    best = int(np.argmax(f1))
    threshold = float(thresholds[best])
    below = scores[scores < threshold]
    if sample_weight is None and below.size:
        highest = float(below.max())
        middle = highest + (threshold - highest) / 2  # not (a + b) / 2, which overflows near the float maximum
        threshold = middle if middle > highest else threshold  # adjacent floats have no middle
    return float(f1[best]), threshold


def f1_at(labels: ArrayLike, scores: ArrayLike, threshold: float) -> float | None:
    """F1 when predicting defect for score >= threshold; None when there is no defect label."""
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return None
    return float(f1_score(labels, np.asarray(scores, dtype=np.float64) >= threshold))


class PixelScores:
    """The pixels of many images for the pixel metrics, added an image at a time so that no
    caller need hold every map: as they are while they total at most ``max_exact_pixels``, then
    as counts per score bin (see the module docstring). Two sets add up (``a + b``): a defect
    type is scored with the split's good images without scoring them again."""

    def __init__(self, max_exact_pixels: int = MAX_EXACT_PIXELS) -> None:
        self.max_exact_pixels = max_exact_pixels
        self.images: list[tuple[np.ndarray, np.ndarray]] = []  # (mask, map) while exact
        # Once binned: each octave's block of bins, 3 x 2**_BLOCK_BITS counts of good pixels,
        # defect pixels and defect pixels by region.
        self.blocks: dict[int, np.ndarray] | None = None
        self.pixels = self.defects = 0

    @classmethod
    def of(cls, masks: Sequence[np.ndarray], maps: Sequence[np.ndarray],
           max_exact_pixels: int = MAX_EXACT_PIXELS) -> PixelScores:
        if len(masks) != len(maps):
            raise ValueError(f"{len(masks)} masks but {len(maps)} maps")
        scores = cls(max_exact_pixels)
        for mask, amap in zip(masks, maps):
            scores.add(mask, amap)
        return scores

    def add(self, mask: np.ndarray, amap: np.ndarray) -> None:
        """One image: its ground truth (True = defect) and its map of the same shape."""
        mask, amap = np.asarray(mask, dtype=bool), np.asarray(amap)
        if mask.shape != amap.shape:
            raise ValueError(f"mask shape {mask.shape} != map shape {amap.shape}")
        self.pixels += mask.size
        self.defects += int(np.count_nonzero(mask))
        if self.blocks is None and self.pixels <= self.max_exact_pixels:  # kept: the caller may reuse its arrays
            mask, amap = mask.copy(), amap.copy()
        self._keep([(mask, amap)])

    def __add__(self, other: PixelScores) -> PixelScores:
        both = PixelScores(min(self.max_exact_pixels, other.max_exact_pixels))
        both.pixels, both.defects = self.pixels + other.pixels, self.defects + other.defects
        if self.blocks is not None or other.blocks is not None:
            mine, theirs = self.blocks or {}, other.blocks or {}
            both.blocks = {b: mine.get(b, 0) + theirs.get(b, 0) for b in mine.keys() | theirs.keys()}  # new arrays
        both._keep(self.images + other.images)
        return both

    def _keep(self, images: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Hold ``images`` as they are, or count them into the bins once the total is past
        ``max_exact_pixels``."""
        if self.blocks is None and self.pixels <= self.max_exact_pixels:
            self.images += images
            return
        if self.blocks is None:
            self.blocks = {}
        for mask, amap in self.images + images:
            keys, counts = _histogram(mask, amap)
            blocks = keys >> _BLOCK_BITS
            for block in np.unique(blocks):
                inside = slice(np.searchsorted(blocks, block), np.searchsorted(blocks, block, "right"))
                totals = self.blocks.setdefault(int(block), np.zeros((3, 1 << _BLOCK_BITS)))
                totals[:, keys[inside] & ((1 << _BLOCK_BITS) - 1)] += counts[:, inside]  # keys are unique
        self.images = []

    def data(self, weighting: Literal["pixel", "region"]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(y_true, y_score, sample_weight) for scikit-learn: one entry per pixel while exact, else
        one good and one defect entry per score bin, at the bin's lowest score, with the summed
        weights. ``weighting``: "pixel" (every pixel weighs 1: ROC) or "region" (a defect pixel
        weighs 1/its region's size: PRO). None without a defect pixel or without a good one."""
        if self.defects == 0 or self.defects == self.pixels:
            return None
        if self.blocks is None:
            y_true = np.concatenate([m.ravel() for m, _ in self.images])
            y_score = np.concatenate([a.ravel() for _, a in self.images])
            if weighting == "pixel":
                return y_true, y_score, None
            return y_true, y_score, np.concatenate([_region_weights(m).ravel() for m, _ in self.images])
        order = sorted(self.blocks)
        good, defect, by_region = np.concatenate([self.blocks[b] for b in order], axis=1)
        scores = _lowest_scores(np.concatenate([(b << _BLOCK_BITS) + np.arange(1 << _BLOCK_BITS) for b in order]))
        y_true = np.repeat([False, True], len(scores))
        y_score = np.concatenate([scores, scores])
        weight = np.concatenate([good, defect if weighting == "pixel" else by_region])
        keep = weight > 0
        return y_true[keep], y_score[keep], weight[keep]


def _region_weights(mask: np.ndarray) -> np.ndarray:
    """1 for a good pixel, 1/its region's size for a defect pixel (PRO as a weighted ROC)."""
    if not mask.any():
        return np.ones(mask.shape)
    labels, _ = ndimage.label(mask, structure=CONNECTIVITY)
    sizes = np.bincount(labels.ravel())
    return np.where(mask, 1.0 / np.maximum(sizes, 1)[labels], 1.0)


def _score_keys(amap: np.ndarray) -> np.ndarray:
    """Each score's bin: its float32 bits as an integer that sorts as the scores do (a negative
    float's bits sort backwards, so all but its sign bit are flipped), less the low bits."""
    bits = (np.asarray(amap, dtype=np.float32) + np.float32(0)).view(np.int32)  # -0.0 is +0.0
    return ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> _DROPPED_BITS).astype(np.int64)


def _lowest_scores(keys: np.ndarray) -> np.ndarray:
    """The lowest score of each bin of ``_score_keys``: a threshold there flags the whole bin."""
    ordered = keys.astype(np.int32) << _DROPPED_BITS
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(np.float32).astype(np.float64)


def _histogram(mask: np.ndarray, amap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One image's occupied bins, ascending, and their 3 x N counts: good pixels, defect pixels
    and defect pixels by region."""
    keys, flat = _score_keys(amap).ravel(), mask.ravel()
    if not keys.size:
        return keys, np.zeros((3, 0))
    low, high = int(keys.min()), int(keys.max())
    if high - low < 4 * keys.size:  # a dense count over the span: no sort
        present, index = np.arange(low, high + 1), keys - low
    else:
        present, index = np.unique(keys, return_inverse=True)
    counts = np.zeros((3, len(present)))
    if flat.any():
        defects = index[flat]
        counts[0] = np.bincount(index[~flat], minlength=len(present))
        counts[1] = np.bincount(defects, minlength=len(present))
        counts[2] = np.bincount(defects, _region_weights(mask).ravel()[flat], len(present))
    else:  # a good image: no regions to label
        counts[0] = np.bincount(index, minlength=len(present))
    occupied = counts[0] + counts[1] > 0
    return present[occupied], counts[:, occupied]


def pixel_auroc(scores: PixelScores) -> float | None:
    """ROC AUC over all pixels of all images; None without both defect and good pixels."""
    data = scores.data("pixel")
    if data is None:
        return None
    y_true, y_score, weight = data
    return float(roc_auc_score(y_true, y_score, sample_weight=weight))


def pixel_roc_curve(scores: PixelScores) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, tpr) of all pixels, for plotting; None when ``pixel_auroc`` is None."""
    data = scores.data("pixel")
    if data is None:
        return None
    fpr, tpr, _ = roc_curve(data[0], data[1], sample_weight=data[2])
    return fpr, tpr


def pixel_best_f1(scores: PixelScores) -> tuple[float, float] | None:
    """(best pixel F1 over all thresholds, its threshold): the segmentation F1-max of the
    literature, and the F1-optimal pixel threshold for calibration. None without both classes."""
    data = scores.data("pixel")
    if data is None:
        return None
    return best_f1(*data)


def pro_curve(scores: PixelScores) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, pro) from (0, 0) to (1, 1), fpr non-decreasing, for plotting and ``aupro``.

    None without a defect region or without a good pixel. Collinear points are dropped; that
    changes neither the plot nor the integral.
    """
    data = scores.data("region")
    if data is None:
        return None
    y_true, y_score, weight = data
    fpr, pro, _ = roc_curve(y_true, y_score, sample_weight=weight)
    return fpr, np.clip(pro, 0.0, 1.0)  # float rounding of the 1/size weights


def aupro(scores: PixelScores, fpr_limit: float = 0.3) -> float | None:
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit (so in [0, 1]).

    As MVTec AD's reference: trapezoids, with the curve linearly interpolated at fpr_limit. A
    random/constant map gives fpr_limit / 2 (the diagonal). None when ``pro_curve`` is None.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    curve = pro_curve(scores)
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
    terms = [paddlex_counts(mask, amap, threshold, opening_radius) for mask, amap in zip(masks, maps)]
    good = sum(g for _, g in terms)
    return sum(t for t, _ in terms) / good if good else None


def paddlex_counts(mask: np.ndarray, amap: np.ndarray, threshold: float = 0.01,
                   opening_radius: int = 4) -> tuple[int, int]:
    """``paddlex_miou``'s terms for one image: (good pixels predicted good, good pixels)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != np.shape(amap):
        raise ValueError(f"mask shape {mask.shape} != map shape {np.shape(amap)}")
    predicted = _open_reflected(np.asarray(amap) > threshold, disk(opening_radius))
    return int(np.count_nonzero(~predicted & ~mask)), int(np.count_nonzero(~mask))


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
