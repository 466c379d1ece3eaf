from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from flawscope.data.layouts import Sample
from flawscope.evaluation.evaluate import AUPRO_FPR_LIMIT, Outcome, PixelGroup, summarize
from flawscope.evaluation.metrics import (
    PixelScores,
    aupro,
    best_f1,
    confusion,
    disk,
    f1_at,
    image_ap,
    image_auroc,
    paddlex_miou,
    pixel_auroc,
    pixel_best_f1,
    pixel_roc_curve,
    pro_curve,
    rates,
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
    # From 0.35 up: tp=2, fp=1 -> precision 2/3, recall 1 -> F1 0.8 (the best); the threshold
    # lies halfway to the highest score left unflagged (0.1), a margin on both sides.
    f1, threshold = best_f1(LABELS, SCORES)
    assert (f1, threshold) == (pytest.approx(0.8), pytest.approx(0.225))
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
    assert aupro(PixelScores.of(masks, maps), fpr_limit) == pytest.approx(expected, abs=1e-9)
    binned = aupro(PixelScores.of(masks, maps, 0), fpr_limit)
    assert binned == pytest.approx(expected, abs=1e-4)


def test_pro_curve_hand_computed_and_8_connected():
    # One 5-pixel region (a 2x2 block plus a diagonal pixel: 8-connected, so one region).
    mask = np.zeros((4, 4), bool)
    mask[0:2, 0:2] = True
    mask[2, 2] = True
    amap = np.zeros((4, 4), np.float32)
    amap[2, 2] = 1.0
    fpr, pro = pro_curve(PixelScores.of([mask], [amap]))
    np.testing.assert_allclose(fpr, [0, 0, 1])
    np.testing.assert_allclose(pro, [0, 0.2, 1])  # 4-connectivity would give 0.5
    # From (0, 0.2) to (1, 1): area on [0, 0.3] = 0.3 * 0.2 + 0.8 * 0.3**2 / 2.
    assert aupro(PixelScores.of([mask], [amap])) == pytest.approx((0.06 + 0.036) / 0.3)


def test_pro_is_mean_over_regions_not_pixels():
    # Regions of 1 and 3 pixels; the 1-pixel one and one pixel of the other are found first.
    mask = np.array([[1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
    amap = np.array([[9, 1, 1, 1], [1, 1, 8, 0], [1, 1, 0, 1], [1, 1, 1, 1]], np.float32)
    fpr, pro = pro_curve(PixelScores.of([mask], [amap]))
    assert pro[np.flatnonzero(fpr == 0)[-1]] == pytest.approx((1 + 1 / 3) / 2)
    assert aupro(PixelScores.of([mask], [amap])) == pytest.approx(2 / 3)


def test_aupro_edge_cases():
    normal = [np.zeros((8, 8), bool)] * 2
    maps = [np.random.default_rng(0).random((8, 8))] * 2
    assert aupro(PixelScores.of(normal, maps)) is None
    assert pixel_auroc(PixelScores.of(normal, maps)) is None
    assert aupro(PixelScores.of([np.ones((8, 8), bool)], maps[:1])) is None  # no good pixel: FPR undefined

    one_pixel = np.zeros((8, 8), bool)
    one_pixel[3, 5] = True
    perfect = one_pixel * 0.9 + 0.1
    assert aupro(PixelScores.of([one_pixel], [perfect])) == pytest.approx(1.0)
    assert pixel_auroc(PixelScores.of([one_pixel], [perfect])) == pytest.approx(1.0)
    # A constant map is the diagonal: area fpr_limit**2 / 2, normalised fpr_limit / 2.
    constant = np.full((8, 8), 0.5)
    assert aupro(PixelScores.of([one_pixel], [constant])) == pytest.approx(0.15)
    assert aupro(PixelScores.of([one_pixel], [constant], 0)) == pytest.approx(0.15)
    assert pixel_auroc(PixelScores.of([one_pixel], [constant])) == pytest.approx(0.5)

    with pytest.raises(ValueError):
        PixelScores.of([one_pixel], [constant[:4]])
    with pytest.raises(ValueError):
        aupro(PixelScores.of([one_pixel], [constant]), fpr_limit=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_matches_sklearn_exact_and_binned(seed):
    masks, maps = _random_case(seed)
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in maps])
    )
    assert pixel_auroc(PixelScores.of(masks, maps)) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(PixelScores.of(masks, maps, 0)) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("shift", [0.0, -0.5, -2.0])
def test_binned_metrics_hold_with_an_outlier_and_negative_scores(shift):
    """The bins follow each score's own magnitude: one pixel 50,000 times the others' scale
    coarsens nothing (equal-width bins over min..max put the rest into two bins), and scores
    below zero, or on both sides of it, keep their order."""
    masks, maps = _random_case(0)
    maps = [a + shift for a in maps]
    maps[0] = maps[0].copy()
    maps[0][0, 0] = 50_000.0
    for metric in (pixel_auroc, aupro):
        exact = metric(PixelScores.of(masks, maps))
        assert metric(PixelScores.of(masks, maps, 0)) == pytest.approx(exact, abs=1e-4), metric.__name__


def test_pixel_scores_stream_and_add_up():
    """Images added one at a time past the exact limit, or two sets added together, give the
    counts of all the images binned at once: evaluation scores each defect type with the good
    images this way, without holding their maps."""
    masks, maps = _random_case(1, images=6)
    whole = PixelScores.of(masks, maps, 0)
    streamed = PixelScores(max_exact_pixels=2 * masks[0].size)  # exact for two images, then binned
    for mask, amap in zip(masks, maps):
        streamed.add(mask, amap)
    assert not streamed.images and streamed.pixels == sum(m.size for m in masks)
    halves = PixelScores.of(masks[:3], maps[:3], 10**6) + PixelScores.of(masks[3:], maps[3:], 2 * masks[0].size)
    for scores in (streamed, halves):
        for weighting in ("pixel", "region"):
            for got, want in zip(scores.data(weighting), whole.data(weighting)):
                np.testing.assert_array_equal(got, want)
    exact = PixelScores.of(masks[:2], maps[:2]) + PixelScores.of(masks[2:4], maps[2:4])  # small: stays exact
    assert len(exact.images) == 4 and pixel_auroc(exact) == pytest.approx(
        roc_auc_score(np.concatenate([m.ravel() for m in masks[:4]]), np.concatenate([a.ravel() for a in maps[:4]])))


def test_best_f1_threshold_keeps_a_margin_on_both_sides():
    labels, scores = [0, 0, 1, 1, 1], [1.0, 2.0, 4.0, 5.0, 6.0]
    f1, threshold = best_f1(labels, scores)
    assert (f1, threshold) == (1.0, 3.0)  # halfway between the highest good and the lowest defect
    assert f1_at(labels, [1.0, 2.4, 3.6, 5.0, 6.0], threshold) == 1.0  # both moved towards each other
    assert best_f1([0, 1], [1e308, 1.7e308]) == (1.0, 1.35e308)  # no overflow to inf
    # binned pixels: a bin holds many scores, so the threshold stays at one's value
    assert best_f1([0, 0, 1], [1.0, 3.9, 4.0], sample_weight=[1, 0, 1]) == (1.0, 4.0)


def test_best_f1_constant_scores_predicts_everything():
    # One threshold only: all four predicted defective, tp=2 fp=2 -> F1 = 4 / 6.
    assert best_f1(LABELS, [0.3] * 4) == (pytest.approx(2 / 3), 0.3)


def test_confusion_and_rates_hand_computed():
    counts = confusion([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    assert counts == {"tp": 2, "fp": 1, "fn": 1, "tn": 6}
    r = rates(counts)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3) and r["iou"] == pytest.approx(0.5)
    assert r["fpr"] == pytest.approx(1 / 7)
    with pytest.raises(ValueError):
        confusion([1, 0], [1])


def test_rates_edge_cases():
    # No defect at all (all-normal masks): only the false-positive rate is defined.
    assert rates({"tp": 0, "fp": 3, "fn": 0, "tn": 5}) == {
        "precision": 0.0, "recall": None, "f1": None, "iou": None, "fpr": 3 / 8}
    # Defects, nothing predicted: precision undefined, the rest 0.
    assert rates({"tp": 0, "fp": 0, "fn": 4, "tn": 5}) == {
        "precision": None, "recall": 0.0, "f1": 0.0, "iou": 0.0, "fpr": 0.0}
    # No good sample: FPR undefined.
    assert rates({"tp": 2, "fp": 0, "fn": 0, "tn": 0})["fpr"] is None


def test_pixel_confusion_counts_a_one_pixel_defect_and_an_image_judged_ok():
    """Evaluation sums each image's pixel counts as it comes (``PixelGroup``): a one-pixel defect
    outlined is a true positive; the same defect on an image judged OK (no predicted mask) is missed."""
    one_pixel = np.zeros((5, 5), bool)
    one_pixel[2, 3] = True
    amap = one_pixel.astype(np.float32)
    found = PixelGroup()
    found.add(one_pixel, amap, one_pixel.copy())
    assert found.confusion == {"tp": 1, "fp": 0, "fn": 0, "tn": 24}
    assert rates(found.confusion)["f1"] == 1.0 and rates(found.confusion)["iou"] == 1.0
    missed = PixelGroup()
    for mask in (one_pixel, np.zeros((5, 5), bool)):
        missed.add(mask, amap, np.zeros((5, 5), bool))
    assert missed.confusion == {"tp": 0, "fp": 0, "fn": 1, "tn": 49} and rates(missed.confusion)["f1"] == 0.0
    uncalibrated = PixelGroup()
    uncalibrated.add(one_pixel, amap, None)  # no thresholds yet: nothing decided, nothing counted
    assert uncalibrated.confusion == {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    with pytest.raises(ValueError):
        found.add(one_pixel, amap, np.zeros((4, 4), bool))


def _brute_best_f1(masks, maps):
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    return max(rates(confusion(y, s >= t))["f1"] for t in np.unique(s))


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_best_f1_matches_brute_force(seed):
    masks, maps = _random_case(seed)
    f1, threshold = pixel_best_f1(PixelScores.of(masks, maps))
    assert f1 == pytest.approx(_brute_best_f1(masks, maps), abs=1e-12)
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    assert rates(confusion(y, s >= threshold))["f1"] == pytest.approx(f1)
    binned, _ = pixel_best_f1(PixelScores.of(masks, maps, 0))
    assert binned == pytest.approx(f1, abs=1e-4)


def test_pixel_best_f1_and_roc_edge_cases():
    one_pixel = np.zeros((8, 8), bool)
    one_pixel[3, 5] = True
    constant = np.full((8, 8), 0.5)
    # Constant map: the only threshold predicts all 64 pixels, tp=1 fp=63 -> F1 = 2 / 65.
    assert pixel_best_f1(PixelScores.of([one_pixel], [constant]))[0] == pytest.approx(2 / 65)
    assert pixel_best_f1(PixelScores.of([one_pixel], [one_pixel * 0.9 + 0.1])) == (pytest.approx(1.0), pytest.approx(0.55))
    assert pixel_best_f1(PixelScores.of([np.zeros((8, 8), bool)], [constant])) is None  # all-normal masks
    assert pixel_roc_curve(PixelScores.of([np.zeros((8, 8), bool)], [constant])) is None
    fpr, tpr = pixel_roc_curve(PixelScores.of([one_pixel], [constant]))
    np.testing.assert_allclose(fpr, [0, 1])
    np.testing.assert_allclose(tpr, [0, 1])


def test_pixel_roc_curve_integrates_to_pixel_auroc():
    masks, maps = _random_case(3)
    fpr, tpr = pixel_roc_curve(PixelScores.of(masks, maps))
    assert fpr[0] == 0 and fpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(pixel_auroc(PixelScores.of(masks, maps)), abs=1e-12)


def test_paddlex_miou_hand_computed():
    # 14 good pixels; raw > 0.01 on one defect pixel (ignored) and two good ones (false alarms);
    # exactly 0.01 is not above the threshold. Radius 0 leaves the mask as it is.
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = True
    amap = np.zeros((4, 4))
    amap[0, 0] = amap[3, 3] = amap[2, 3] = 0.5
    amap[1, 1] = 0.01
    assert paddlex_miou([mask], [amap], opening_radius=0) == pytest.approx(12 / 14)
    # The opening (radius 4) erases both blobs: every good pixel counts as predicted good.
    assert paddlex_miou([mask], [amap]) == 1.0
    # A defect found perfectly does not raise it, a clean map cannot lower it.
    assert paddlex_miou([mask], [mask * 1.0], opening_radius=0) == 1.0
    # Areas are summed over images: 14 + 16 good pixels, 2 false alarms.
    assert paddlex_miou([mask, np.zeros((4, 4), bool)], [amap, np.zeros((4, 4))],
                        opening_radius=0) == pytest.approx(28 / 30)


def test_paddlex_miou_edge_cases():
    assert paddlex_miou([np.ones((6, 6), bool)], [np.zeros((6, 6))]) is None  # no good pixel
    assert paddlex_miou([np.zeros((6, 6), bool)], [np.full((6, 6), 0.02)]) == 0.0  # constant, all above
    assert paddlex_miou([np.zeros((6, 6), bool)], [np.full((6, 6), 0.005)]) == 1.0
    with pytest.raises(ValueError):
        paddlex_miou([np.zeros((6, 6), bool)], [np.zeros((5, 6))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paddlex_miou_matches_paddleseg_procedure(seed):
    """Reference: PaddleSeg's steps spelled out with skimage (threshold, opening with disk(4),
    class-0 IoU with defect pixels ignored)."""
    morphology = pytest.importorskip("skimage.morphology")
    rng = np.random.default_rng(seed)
    masks, maps, tn, good = [], [], 0, 0
    for _ in range(3):
        mask = np.zeros((40, 48), bool)
        mask[rng.integers(0, 30):, rng.integers(0, 40):][:6, :5] = True
        smooth = np.kron(rng.random((10, 12)), np.ones((4, 4)))  # blobs of many sizes after thresholding
        amap = 0.02 * smooth
        binary = (amap > 0.01).astype(np.float32)
        opened = morphology.opening(binary, morphology.disk(4))
        label = np.where(mask, 255, 0)
        pred_good = (opened == 0) & (label != 255)
        tn += np.count_nonzero(pred_good & (label == 0))
        good += np.count_nonzero(label == 0)
        masks.append(mask)
        maps.append(amap)
    assert np.array_equal(disk(4), morphology.disk(4).astype(bool))
    assert paddlex_miou(masks, maps) == pytest.approx(tn / good, abs=1e-12)


def _random_outcomes(seed: int) -> tuple[list[Outcome], PixelGroup, list[tuple]]:
    """Good images, defects with masks of two strengths, and one defect without a mask (image
    metrics only); decisions made at fixed raw thresholds, as a Predictor would. Also the
    (mask, map, predicted mask) of each image with a mask, and their PixelGroup."""
    rng = np.random.default_rng(seed)
    outcomes, pixel, group = [], [], PixelGroup()
    for index in range(9):
        label, has_mask = int(index >= 4), index != 8
        mask = np.zeros((20, 20), bool)
        if label:
            y, x = rng.integers(0, 14, 2)
            mask[y:y + rng.integers(2, 7), x:x + rng.integers(2, 7)] = True
        amap = (rng.random((20, 20)) + (0.3 + 0.4 * (index % 2)) * mask * rng.random((20, 20))).astype(np.float32)
        score = float(amap.max() + 0.3 * rng.random())
        pred = amap > 0.95 if score > 1.1 else np.zeros_like(mask)
        outcomes.append(Outcome(Sample(Path(f"{index}.png"), None, label, "crack" if label else "good"), score,
                                int(mask.sum()) if has_mask else None, is_anomaly=score > 1.1))
        if has_mask:
            pixel.append((mask, amap, pred))
            group.add(mask, amap, pred)
    return outcomes, group, pixel


@pytest.mark.parametrize("seed", [1, 6])
def test_summarize_reports_what_the_metric_functions_give(seed):
    """Each number of ``summarize`` is the metric of the right data: image metrics over every
    image's raw score, pixel metrics over the masked images' raw maps, AUPRO up to FPR 0.3,
    decision metrics from the Predictor's is_anomaly and pred."""
    outcomes, group, pixel = _random_outcomes(seed)
    labels = [o.sample.label for o in outcomes]
    scores = [o.raw_score for o in outcomes]
    masks, maps, preds = map(list, zip(*pixel))
    y, s = np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in maps])
    image_rates = rates(confusion(labels, [o.is_anomaly for o in outcomes]))
    pixel_rates = rates(confusion(y, np.concatenate([p.ravel() for p in preds])))
    assert AUPRO_FPR_LIMIT == 0.3
    expected = {
        "image_auroc": roc_auc_score(labels, scores),
        "image_ap": average_precision_score(labels, scores),
        "image_best_f1": best_f1(labels, scores)[0],
        "pixel_auroc": roc_auc_score(y, s),
        "aupro": aupro(PixelScores.of(masks, maps), 0.3),
        "pixel_best_f1": pixel_best_f1(PixelScores.of(masks, maps))[0],
        "paddlex_miou": paddlex_miou(masks, maps),
        **{f"image_{k}": v for k, v in image_rates.items() if k != "iou"},  # no image IoU reported
        **{f"pixel_{k}": v for k, v in pixel_rates.items()},
    }
    # Guards that make the comparison discriminating: every value defined, and the values a wiring
    # slip would mix up differ.
    assert None not in expected.values()
    assert abs(expected["image_auroc"] - expected["pixel_auroc"]) > 0.01
    assert abs(aupro(PixelScores.of(masks, maps), 1.0) - expected["aupro"]) > 0.01
    assert abs(aupro(PixelScores.of(masks, maps), 0.05) - expected["aupro"]) > 0.01
    assert len({round(v, 3) for k, v in expected.items() if k.startswith("image_")}) >= 5

    result = summarize(outcomes, group)
    assert set(expected) <= set(result)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key
    assert (result["num_images"], result["num_good"], result["num_defect"], result["num_with_masks"]) == (9, 4, 5, 8)
    assert result["best_f1_thresholds"] == {"image": pytest.approx(best_f1(labels, scores)[1], abs=1e-6),
                                            "pixel": pytest.approx(pixel_best_f1(PixelScores.of(masks, maps))[1], abs=1e-6)}
    assert summarize(outcomes, group, fpr_limit=0.05)["aupro"] == pytest.approx(
        aupro(PixelScores.of(masks, maps), 0.05), abs=1e-6)


def test_binned_scores_of_minus_zero_tie_with_zero_and_kept_images_are_copies():
    """-0.0 and 0.0 are one score (their bits differ); an exact set holds its own copies, so a
    caller may reuse one buffer per image; an image of no pixels adds nothing."""
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    amap = np.where(mask, np.float32(0.0), np.float32(-0.0)).astype(np.float32)
    for limit in (10**6, 0):
        assert pixel_auroc(PixelScores.of([mask], [amap], limit)) == pytest.approx(0.5)
    masks, maps = _random_case(2, images=4)
    expected = pixel_auroc(PixelScores.of(masks, maps))
    streamed, mask_buffer, map_buffer = PixelScores(), np.empty_like(masks[0]), np.empty_like(maps[0])
    for mask, amap in zip(masks, maps):
        mask_buffer[...], map_buffer[...] = mask, amap
        streamed.add(mask_buffer, map_buffer)
    assert pixel_auroc(streamed) == pytest.approx(expected, abs=1e-12)
    empty = PixelScores.of(masks, maps, 0)
    empty.add(np.zeros((0, 5), bool), np.zeros((0, 5), np.float32))
    assert pixel_auroc(empty) == pytest.approx(pixel_auroc(PixelScores.of(masks, maps, 0)))


def test_best_f1_thresholds_keep_small_raw_scores_exact():
    """A model of small raw scores: rounding the threshold to 6 decimals made it 0, flagging all."""
    outcomes, group, _ = _random_outcomes(1)
    for o in outcomes:
        o.raw_score *= 1e-8
    result = summarize(outcomes, group)
    labels, scores = [o.sample.label for o in outcomes], [o.raw_score for o in outcomes]
    threshold = result["best_f1_thresholds"]["image"]
    assert threshold == best_f1(labels, scores)[1] > 0
    assert f1_at(labels, scores, threshold) == pytest.approx(result["image_best_f1"], abs=1e-6)
