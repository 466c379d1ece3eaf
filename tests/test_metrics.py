import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from flawscope.evaluation.metrics import (
    aupro,
    best_f1,
    f1_at,
    image_ap,
    image_auroc,
    pixel_auroc,
    pro_curve,
)

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def test_image_metrics_hand_computed():
    assert image_auroc(LABELS, SCORES) == pytest.approx(0.75)
    # Ranked: 0.8 (defect), 0.4 (good), 0.35 (defect): AP = 0.5 * 1 + 0.5 * 2/3.
    assert image_ap(LABELS, SCORES) == pytest.approx(5 / 6)


def test_image_metrics_single_class_is_none_and_constant_scores_are_chance():
    assert image_auroc([0, 0, 0], [0.1, 0.2, 0.3]) is None
    assert image_auroc([1, 1], [0.1, 0.2]) is None
    assert image_ap([0, 0], [0.1, 0.2]) is None
    assert image_auroc(LABELS, [0.3] * 4) == pytest.approx(0.5)


def test_best_f1_and_f1_at_agree():
    # At 0.35: tp=2, fp=1 -> precision 2/3, recall 1 -> F1 0.8 (the best).
    f1, threshold = best_f1(LABELS, SCORES)
    assert (f1, threshold) == (pytest.approx(0.8), 0.35)
    assert f1_at(LABELS, SCORES, threshold) == pytest.approx(0.8)
    assert f1_at(LABELS, SCORES, 0.5) == pytest.approx(2 / 3)  # score >= threshold is defect
    assert f1_at(LABELS, SCORES, 0.8) == pytest.approx(2 / 3)
    assert best_f1([0, 0], [0.1, 0.2]) is None
    assert f1_at([0, 0], [0.1, 0.2], 0.5) is None


def _random_case(seed: int, size: int = 24, images: int = 3):
    """Random maps with a few random rectangles, one-pixel defects and a defect-free image."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for index in range(images):
        mask = np.zeros((size, size), bool)
        if index > 0:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, size - 4, 2)
                h, w = rng.integers(1, 6, 2)
                mask[y : y + h, x : x + w] = True
            mask[tuple(rng.integers(0, size, 2))] = True
        amap = rng.random((size, size)) + 0.6 * mask * rng.random((size, size))
        masks.append(mask)
        maps.append(amap.astype(np.float32))
    return masks, maps


def _reference_aupro(masks, maps, fpr_limit):
    """Slow and direct: PRO and FPR at every distinct score, then clipped trapezoids."""
    regions = []
    for index, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labels == k) for k in range(1, n + 1)]
    negatives = sum(np.count_nonzero(~m) for m in masks)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]:
        preds = [a >= t for a in maps]
        fprs.append(sum(np.count_nonzero(p & ~m) for p, m in zip(preds, masks)) / negatives)
        pros.append(np.mean([preds[i][region].mean() for i, region in regions]))
    area = 0.0
    for x0, y0, x1, y1 in zip(fprs, pros, fprs[1:], pros[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_slow_reference(seed, fpr_limit):
    masks, maps = _random_case(seed)
    expected = _reference_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-9)
    binned = aupro(masks, maps, fpr_limit, max_exact_pixels=0, num_thresholds=1000)
    assert binned == pytest.approx(expected, abs=1e-2)


def test_pro_curve_hand_computed_and_8_connected():
    # One 5-pixel region (a 2x2 block plus a diagonal pixel: 8-connected, so one region).
    mask = np.zeros((4, 4), bool)
    mask[0:2, 0:2] = True
    mask[2, 2] = True
    amap = np.zeros((4, 4), np.float32)
    amap[2, 2] = 1.0
    fpr, pro = pro_curve([mask], [amap])
    np.testing.assert_allclose(fpr, [0, 0, 1])
    np.testing.assert_allclose(pro, [0, 0.2, 1])  # 4-connectivity would give 0.5
    # From (0, 0.2) to (1, 1): area on [0, 0.3] = 0.3 * 0.2 + 0.8 * 0.3**2 / 2.
    assert aupro([mask], [amap]) == pytest.approx((0.06 + 0.036) / 0.3)


def test_pro_is_mean_over_regions_not_pixels():
    # Regions of 1 and 3 pixels; the 1-pixel one and one pixel of the other are found first.
    mask = np.array([[1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
    amap = np.array([[9, 1, 1, 1], [1, 1, 8, 0], [1, 1, 0, 1], [1, 1, 1, 1]], np.float32)
    fpr, pro = pro_curve([mask], [amap])
    assert pro[np.flatnonzero(fpr == 0)[-1]] == pytest.approx((1 + 1 / 3) / 2)
    assert aupro([mask], [amap]) == pytest.approx(2 / 3)


def test_aupro_edge_cases():
    normal = [np.zeros((8, 8), bool)] * 2
    maps = [np.random.default_rng(0).random((8, 8))] * 2
    assert aupro(normal, maps) is None
    assert pixel_auroc(normal, maps) is None
    assert aupro([np.ones((8, 8), bool)], maps[:1]) is None  # no good pixel: FPR undefined

    one_pixel = np.zeros((8, 8), bool)
    one_pixel[3, 5] = True
    perfect = one_pixel * 0.9 + 0.1
    assert aupro([one_pixel], [perfect]) == pytest.approx(1.0)
    assert pixel_auroc([one_pixel], [perfect]) == pytest.approx(1.0)
    # A constant map is the diagonal: area fpr_limit**2 / 2, normalised fpr_limit / 2.
    constant = np.full((8, 8), 0.5)
    assert aupro([one_pixel], [constant]) == pytest.approx(0.15)
    assert aupro([one_pixel], [constant], max_exact_pixels=0) == pytest.approx(0.15)
    assert pixel_auroc([one_pixel], [constant]) == pytest.approx(0.5)

    with pytest.raises(ValueError):
        aupro([one_pixel], [constant[:4]])
    with pytest.raises(ValueError):
        aupro([one_pixel], [constant], fpr_limit=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_matches_sklearn_exact_and_binned(seed):
    masks, maps = _random_case(seed)
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in maps])
    )
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks, maps, max_exact_pixels=0) == pytest.approx(expected, abs=1e-4)
    coarse = pixel_auroc(masks, maps, max_exact_pixels=0, num_thresholds=100)
    assert coarse == pytest.approx(expected, abs=1e-2)
