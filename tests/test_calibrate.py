"""Thresholds from images the model never saw: the conformal FPR rule, calibration_dir, the F1
method, and the refusals that keep the evaluation split out of calibration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import make_mvtec, texture, tiny_overrides
from flawscope.cli import main
from flawscope.config import load_config
from flawscope.data.io import read_image, read_mask
from flawscope.data.layouts import Sample, load_dataset
from flawscope.errors import FlawscopeError
from flawscope.evaluation.metrics import PixelScores, best_f1, pixel_best_f1
from flawscope.inference.model_dir import Calibration
from flawscope.inference.predictor import Predictor
from flawscope.training.calibrate import CalibrationSet, calibrate, calibration_set, fpr_threshold, split_calibration


def test_fpr_threshold_is_the_conformal_quantile():
    scores = np.arange(10, 0, -1, dtype=float)  # 1..10, unsorted
    # rank ceil(11 * 0.8) = 9: threshold 9 flags {9, 10}; bound (10 - 9 + 1) / 11.
    assert fpr_threshold(scores, 0.2) == (9.0, pytest.approx(2 / 11))
    # Too few scores for 1%: just above the highest, and the bound says 1/11.
    threshold, bound = fpr_threshold(scores, 0.01)
    assert 10 < threshold < 10 + 1e-9 and bound == pytest.approx(1 / 11)
    assert fpr_threshold(scores, 0.0)[0] > 10
    # Constant scores: flagging from rank 3 of 5 would flag all five; just above them instead.
    threshold, bound = fpr_threshold(np.full(5, 0.3), 0.5)
    assert 0.3 < threshold < 0.3 + 1e-9 and bound == pytest.approx(1 / 6)


def test_fpr_threshold_with_tied_scores_flags_no_more_than_its_bound():
    """Most good scores at a floor of 0: the rank's value is 0, and ">= 0" would flag them all."""
    rng = np.random.default_rng(0)

    def good(n: int) -> np.ndarray:
        return np.where(rng.random(n) < 0.95, 0.0, rng.random(n) + 1)

    threshold, bound = fpr_threshold(good(200), 0.1)
    assert threshold >= 1 and bound == pytest.approx(20 / 201)
    assert np.mean(good(20000) >= threshold) <= bound


def test_fpr_threshold_bound_holds_on_new_samples():
    rng = np.random.default_rng(0)
    flagged = [rng.random() >= fpr_threshold(rng.random(99), 0.1)[0] for _ in range(4000)]
    assert np.mean(flagged) == pytest.approx(0.1, abs=0.015)


def _train_cfg(method: str = "fpr", directory: Path | None = None) -> dict:
    return {"threshold_method": method, "calibration_dir": str(directory) if directory else None}


def test_calibration_set_sources(tmp_path, monkeypatch):
    data = load_dataset(make_mvtec(tmp_path / "data"))
    held, fit = data.train[:2], data.train[2:]
    assert calibration_set(_train_cfg(), data, held, fit).source == "held-out good training images"
    fallback = calibration_set(_train_cfg(), data, [], fit)
    assert fallback.source == "training images" and fallback.good == fit

    folder = tmp_path / "more_good"
    folder.mkdir()
    Image.fromarray(texture(np.random.default_rng(99))).save(folder / "a.png")
    both = calibration_set(_train_cfg(directory=folder), data, held, fit)
    assert len(both.good) == 3 and both.defects == [] and "calibration_dir" in both.source
    monkeypatch.chdir(tmp_path)  # recorded absolute: evaluate may run from another folder
    assert calibration_set(_train_cfg(directory=Path("more_good")), data, held, fit).calibration_dir == str(folder)

    labelled = calibration_set(_train_cfg("f1", make_mvtec(tmp_path / "cal", n_train=2, seed=5)), data, held, fit)
    assert len(labelled.defects) == 2 and all(s.mask is not None for s in labelled.defects)
    assert len(labelled.good) == 2 + 2 + 2  # held out + the calibration set's train/good and test/good

    # The layout the f1 error suggests, test/<type>/ + ground_truth/ without train/good/, is taken.
    shutil.rmtree(tmp_path / "cal" / "train")
    defects_only = calibration_set(_train_cfg("f1", tmp_path / "cal"), data, held, fit)
    assert len(defects_only.defects) == 2 and len(defects_only.good) == 2 + 2


@pytest.mark.parametrize("case", ["f1_without_defects", "dataset_itself", "missing_dir", "training_copy",
                                  "evaluation_copy"])
def test_calibration_set_refusals(tmp_path, case):
    root = make_mvtec(tmp_path / "data")
    data = load_dataset(root)
    copies = {"training_copy": (data.train[3], "training"), "evaluation_copy": (data.val[0], "evaluation")}
    folder = tmp_path / "copies"  # a good image under a new name: a copy scores like the image it copies
    folder.mkdir()
    if case in copies:
        (folder / "new.png").write_bytes(copies[case][0].image.read_bytes())
    cfg = {"f1_without_defects": _train_cfg("f1"),
           "dataset_itself": _train_cfg("f1", root),
           "missing_dir": _train_cfg(directory=tmp_path / "nope")}.get(case, _train_cfg(directory=folder))
    with pytest.raises(FlawscopeError, match="Train.threshold_method=f1|Train.calibration_dir") as error:
        calibration_set(cfg, data, data.train[:2], data.train[2:])
    if case in copies:
        original, split = copies[case]
        assert f"new.png is the same image as {original.image}, in the {split} split" in str(error.value)
    if case == "dataset_itself":
        assert "is in the training split" in str(error.value)


def test_calibration_dir_copies_count_once_and_dataset_copies_are_no_reason_to_refuse(tmp_path):
    data = load_dataset(make_mvtec(tmp_path / "data"))
    data.train.append(Sample(data.train[0].image, None, 0, "good"))  # the dataset repeats itself
    folder = tmp_path / "more_good"
    folder.mkdir()
    Image.fromarray(texture(np.random.default_rng(99))).save(folder / "a.png")
    (folder / "b.png").write_bytes((folder / "a.png").read_bytes())
    cal = calibration_set(_train_cfg(directory=folder), data, data.train[:2], data.train[2:])
    assert [s.image.name for s in cal.good[2:]] == ["a.png"]


def test_normalised_scores_put_the_threshold_at_one_half():
    cal = Calibration(image_threshold=3.0, image_low=1.0, pixel_threshold=0.5, pixel_low=0.1)
    assert [cal.image_score(v) for v in (0.5, 1.0, 3.0, 5.0)] == pytest.approx([0.0, 0.0, 0.5, 2 / 3])
    raw = np.array([[0.0, 0.1], [0.5, 0.9]], dtype=np.float64)
    norm = cal.pixel_map(raw)
    assert norm.dtype == np.float32 and norm.shape == raw.shape  # the map's precision, whatever comes in
    np.testing.assert_allclose(norm, [[0.0, 0.0], [0.5, 2 / 3]], rtol=1e-6)


class _ScorePredictor:
    """Scores each image by its first pixel's red value; maps are that value everywhere."""

    def raw_outputs(self, images):
        return [(np.full(image.shape[:2], float(image[0, 0, 0]), np.float32), float(image[0, 0, 0])) for image in images]


def test_an_f1_threshold_under_every_good_score_still_maps_to_one_half(tmp_path):
    """A defect scoring lowest makes flagging everything F1-optimal: the threshold is then not
    above the lowest good score, and must still normalise to 0.5 with higher scores above it."""
    samples = []
    for i, (value, label) in enumerate([(20, 0), (30, 0), (10, 1), (40, 1)]):
        image, mask = tmp_path / f"{i}.png", tmp_path / f"{i}_mask.png"
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(image)
        Image.fromarray(np.full((8, 8), 255 * label, np.uint8)).save(mask)
        samples.append(Sample(image, mask if label else None, label, "bad" if label else "good"))
    cal_set = CalibrationSet(good=[s for s in samples if not s.label], defects=[s for s in samples if s.label],
                             source="calibration_dir")
    cal = calibrate(_ScorePredictor(), cal_set, 0.01, 0.01, "f1")
    assert cal.image_threshold == 10 and cal.image_low < 10
    assert [cal.image_score(v) for v in (9, 10, 20)] == pytest.approx([0.0, 0.5, 1.0], abs=1e-3)
    assert cal.image_score(30) > cal.image_score(20)
    assert cal.pixel_map(np.array([cal.pixel_threshold]))[0] == pytest.approx(0.5, abs=1e-4)


def test_f1_thresholds_are_f1_optimal_on_the_calibration_set(trained, tmp_path):
    dataset, out = trained
    predictor = Predictor.from_dir(out / "best_model/inference")
    data = load_dataset(dataset)
    cal_set = calibration_set(_train_cfg("f1", make_mvtec(tmp_path / "cal", n_train=2, seed=5)), data, [], data.train)
    cal = calibrate(predictor, cal_set, 0.01, 0.01, "f1")
    samples = cal_set.good + cal_set.defects
    outputs = predictor.raw_outputs([read_image(s.image) for s in samples])
    assert cal.image_threshold == best_f1([s.label for s in samples], [score for _, score in outputs])[1]
    masks = [read_mask(s.mask, m.shape[::-1]) if s.mask else np.zeros(m.shape, bool)
             for s, (m, _) in zip(samples, outputs)]
    assert cal.pixel_threshold == pytest.approx(pixel_best_f1(PixelScores.of(masks, [m for m, _ in outputs]))[1])
    assert cal.details["method"] == "f1" and cal.details["num_defect"] == 2
    assert cal.image_score(cal.image_threshold) == pytest.approx(0.5)


def test_train_with_calibration_dir_and_f1(tmp_path):
    """The user path: thresholds land in the model directory with where they came from."""
    data, out = make_mvtec(tmp_path / "data"), tmp_path / "out"
    cal_dir = make_mvtec(tmp_path / "cal", n_train=2, seed=5)
    assert main(["-c", "STFPM", *[a for o in ["Global.mode=train", *tiny_overrides(data, out, iters=2),
                                               "Train.threshold_method=f1", f"Train.calibration_dir={cal_dir}"]
                                  for a in ("-o", o)]]) == 0
    meta = yaml.safe_load((out / "best_model/inference/inference.yml").read_text())["calibration"]
    assert meta["details"]["method"] == "f1" and meta["details"]["calibration_dir"] == str(cal_dir)
    assert "calibration_dir" in json.loads((out / "train_result.json").read_text())["calibration"]["source"]


def test_f1_with_defect_masks_that_mark_nothing_fails_before_training(tmp_path, capsys):
    """Found after the whole training run before (an F1 pixel threshold needs defect pixels)."""
    data, out = make_mvtec(tmp_path / "data"), tmp_path / "out"
    cal_dir = make_mvtec(tmp_path / "cal", n_train=2, seed=5)
    for mask in (cal_dir / "ground_truth" / "scratch").iterdir():
        Image.fromarray(np.zeros((8, 8), np.uint8)).resize(Image.open(mask).size).save(mask)
    args = ["Global.mode=train", *tiny_overrides(data, out), "Train.threshold_method=f1",
            f"Train.calibration_dir={cal_dir}"]
    assert main(["-c", "STFPM", *[a for o in args for a in ("-o", o)]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == (f"error: Train.calibration_dir: {cal_dir}: the defect masks mark no pixel; "
                                        "cannot fit an F1-optimal pixel threshold (use Train.threshold_method=fpr)")
    assert not out.exists()


def test_f1_without_labelled_defects_fails_before_training(tmp_path, capsys):
    data, out = make_mvtec(tmp_path / "data"), tmp_path / "out"
    args = ["Global.mode=train", *tiny_overrides(data, out), "Train.threshold_method=f1"]
    assert main(["-c", "STFPM", *[a for o in args for a in ("-o", o)]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Train.threshold_method=f1")
    assert not out.exists()


def test_config_keys():
    cfg = load_config("STFPM")
    assert cfg["Train"]["threshold_method"] == "fpr" and cfg["Train"]["calibration_dir"] is None
    with pytest.raises(FlawscopeError, match="Train.threshold_method"):
        load_config("STFPM", ["Train.threshold_method=best"])


def test_at_least_two_images_are_held_out_where_that_leaves_one_to_train_on(tmp_path):
    """Never one: a single good score sets no scale (its normalised scores were all 0 or 1)."""
    samples = [Sample(tmp_path / f"{i}.png", None, 0, "good") for i in range(12)]
    assert [len(split_calibration(samples[:n], 0.1, 0)[1]) for n in (1, 2, 3, 12)] == [0, 0, 2, 2]
    assert len(split_calibration(samples * 3, 0.1, 0)[1]) == 4  # 10% of 36
    assert split_calibration(samples, 0.0, 0) == (samples, [])


class _TablePredictor:
    """Gives the outputs stored for each image, looked up by its first pixel's red value."""

    def __init__(self, outputs: dict[int, tuple[np.ndarray, float]]):
        self.outputs = outputs

    def raw_outputs(self, images):
        return [self.outputs[int(image[0, 0, 0])] for image in images]


def _good_samples(tmp_path: Path, count: int, side: int = 16) -> list[Sample]:
    samples = []
    for i in range(count):
        path = tmp_path / f"good_{i}.png"
        Image.fromarray(np.full((side, side, 3), i, np.uint8)).save(path)
        samples.append(Sample(path, None, 0, "good"))
    return samples


def _conformal_rank_holds(values: np.ndarray, threshold: float, fpr: float) -> None:
    """``threshold`` is one of ``values`` and the conformal quantile: the k values at or above it
    keep k / (n + 1) within ``fpr``, and one value more would not."""
    n, k = values.size, int(np.count_nonzero(values >= threshold))
    assert threshold in values
    assert k / (n + 1) <= fpr < (k + 1) / (n + 1)
    assert abs(k / n - fpr) <= 1 / n + fpr / n  # the share of good ones flagged: fpr up to rounding


def test_fpr_calibration_sets_each_threshold_at_its_quantile_of_the_good_images(tmp_path):
    """Image threshold from the good image scores at image_fpr, pixel threshold from all good
    pixels at pixel_fpr: distinct values, so each quantile is one exact value."""
    count, side = 24, 16
    rng = np.random.default_rng(7)
    # Every pixel of every map distinct; image scores on another scale than pixels.
    pixels = rng.permutation(count * side * side).reshape(count, side, side) / (count * side * side)
    scores = 10 + rng.permutation(count) + rng.random(count) * 0.5
    outputs = {i: (pixels[i].astype(np.float64), float(scores[i])) for i in range(count)}
    cal_set = CalibrationSet(good=_good_samples(tmp_path, count, side), defects=[], source="test")
    image_fpr, pixel_fpr = 0.1, 0.05
    cal = calibrate(_TablePredictor(outputs), cal_set, image_fpr, pixel_fpr, batch_size=5)

    _conformal_rank_holds(scores, cal.image_threshold, image_fpr)
    assert np.count_nonzero(scores >= cal.image_threshold) == 2  # ceil(25 * 0.9) = 23rd of 24
    all_pixels = pixels.ravel()
    _conformal_rank_holds(all_pixels, cal.pixel_threshold, pixel_fpr)
    assert np.count_nonzero(all_pixels >= cal.pixel_threshold) == 307  # ceil(6145 * 0.95) = 5838th of 6144
    assert cal.details["image_fpr_bound"] == pytest.approx(2 / 25, abs=1e-6)
    assert (cal.details["image_fpr"], cal.details["pixel_fpr"], cal.details["num_good"]) == (0.1, 0.05, count)

    # A higher target lowers each threshold to its own new quantile.
    looser = calibrate(_TablePredictor(outputs), cal_set, 0.3, 0.2)
    _conformal_rank_holds(scores, looser.image_threshold, 0.3)
    _conformal_rank_holds(all_pixels, looser.pixel_threshold, 0.2)
    assert looser.image_threshold < cal.image_threshold and looser.pixel_threshold < cal.pixel_threshold


def test_train_image_fpr_and_pixel_fpr_reach_the_calibration(tmp_path):
    """Train.image_fpr / Train.pixel_fpr set the stored thresholds: they are the quantiles, at
    those rates, of the trained model's outputs on the calibration images, not at the defaults'."""
    data, out, folder = make_mvtec(tmp_path / "data"), tmp_path / "out", tmp_path / "cal_good"
    folder.mkdir()
    rng = np.random.default_rng(123)
    for i in range(6):
        Image.fromarray(texture(rng)).save(folder / f"{i}.png")
    image_fpr, pixel_fpr = 0.4, 0.2
    assert load_config("STFPM")["Train"]["image_fpr"] != image_fpr  # not the defaults
    args = ["Global.mode=train", *tiny_overrides(data, out, iters=2), "Train.calibration_fraction=0",
            f"Train.calibration_dir={folder}", f"Train.image_fpr={image_fpr}", f"Train.pixel_fpr={pixel_fpr}"]
    assert main(["-c", "STFPM", *[a for o in args for a in ("-o", o)]]) == 0

    predictor = Predictor.from_dir(out / "best_model/inference")
    cal = predictor.info.calibration
    assert cal.source == f"Train.calibration_dir {folder}" and cal.details["num_good"] == 6
    outputs = predictor.raw_outputs([read_image(p) for p in sorted(folder.glob("*.png"))])
    scores = np.array([s for _, s in outputs])
    pixels = np.concatenate([m.ravel() for m, _ in outputs])
    expected = {"image": fpr_threshold(scores, image_fpr)[0], "pixel": fpr_threshold(pixels, pixel_fpr)[0]}
    assert cal.image_threshold == pytest.approx(expected["image"], rel=1e-4)
    assert cal.pixel_threshold == pytest.approx(expected["pixel"], rel=1e-4)
    # What the defaults, or the two rates swapped, would have given instead.
    for other_image, other_pixel in ((0.01, 0.01), (pixel_fpr, image_fpr)):
        assert cal.image_threshold != pytest.approx(fpr_threshold(scores, other_image)[0], rel=1e-3)
        assert cal.pixel_threshold != pytest.approx(fpr_threshold(pixels, other_pixel)[0], rel=1e-3)
    saved = json.loads((out / "train_result.json").read_text())["calibration"]
    assert (saved["image_threshold"], saved["pixel_threshold"]) == (cal.image_threshold, cal.pixel_threshold)
