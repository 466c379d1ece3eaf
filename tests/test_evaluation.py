"""Global.mode=evaluate: the JSON a user reads, the report and its plots, and that evaluated
decisions are exactly the Predictor's."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flawscope.cli import main
from flawscope.data.io import read_image, read_mask
from flawscope.data.layouts import Sample, load_dataset
from flawscope.evaluation.evaluate import (
    Collected,
    Outcome,
    PixelGroup,
    collect,
    compute_metrics,
    evaluate_model,
    mask_warnings,
    no_good_warning,
    shift_warning,
    summarize,
)
from flawscope.errors import FlawscopeError
from flawscope.inference.model_dir import Calibration, read_fitted_images
from flawscope.inference.predictor import Predictor

METRICS = ("image_auroc", "image_ap", "image_f1", "image_precision", "image_recall", "image_fpr",
           "image_best_f1", "pixel_auroc", "aupro", "pixel_f1", "pixel_iou", "pixel_precision",
           "pixel_recall", "pixel_fpr", "pixel_best_f1", "paddlex_miou")
PLOTS = ("roc_curve.png", "pro_curve.png", "score_histogram.png")


def _valid_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 300, path
        image.verify()


def test_evaluate_writes_json_and_report(trained) -> None:
    dataset, out = trained
    assert main(["-c", "STFPM", "-o", "Global.mode=evaluate", "-o", f"Global.dataset_dir={dataset}",
                 "-o", f"Global.output={out}"]) == 0
    result = json.loads((out / "evaluate_result.json").read_text())
    m = result["metrics"]
    for key in METRICS:
        assert m[key] is None or 0 <= m[key] <= 1, key
    assert m["image_auroc"] is not None and m["aupro"] is not None and m["image_f1"] is not None
    assert (m["num_images"], m["num_good"], m["num_defect"], m["num_with_masks"]) == (4, 2, 2, 4)
    image, pixel = m["confusion"]["image"], m["confusion"]["pixel"]
    assert sum(image.values()) == 4 and sum(pixel.values()) == 4 * 64 * 64
    assert set(m["per_defect_type"]["scratch"]) >= {"count", "image_auroc", "pixel_auroc", "aupro", "pixel_f1"}
    thresholds = result["thresholds"]
    assert thresholds["image"]["normalized"] == 0.5 and thresholds["image"]["raw"] > 0
    assert thresholds["method"] == "fpr" and thresholds["source"] == "held-out good training images"
    report = Path(result["report"])
    assert report == out / "evaluate_report" / "evaluate_report.md"
    text = report.read_text()
    assert "AUPRO" in text and "PaddleX-compatible mIoU" in text
    for name in PLOTS:
        assert f"]({name})" in text
        _valid_png(report.parent / name)


def test_worst_mistake_grids_and_calibration_warning(trained, tmp_path) -> None:
    """Thresholds forced to flag everything, then nothing: the grids show the mistakes."""
    dataset, out = trained
    data = load_dataset(dataset)
    predictor = Predictor.from_dir(out / "best_model/inference")
    cal = predictor.info.calibration
    for image_threshold, grid in ((1e-9, "worst_false_positives.png"), (1e9, "worst_false_negatives.png")):
        predictor.info.calibration = dataclasses.replace(
            cal, image_threshold=image_threshold, details={**cal.details, "calibration_dir": str(dataset)})
        result = evaluate_model(predictor, data, tmp_path / grid, out / "best_model/inference")
        report = Path(result["report"])
        _valid_png(report.parent / grid)
        assert f"]({grid})" in report.read_text()
        assert result["warnings"] and "Warning" in report.read_text()
    assert result["metrics"]["image_recall"] == 0 and result["metrics"]["pixel_f1"] == 0  # judged OK: no outline


def test_odd_names_make_a_whole_report_and_a_failed_rerun_leaves_no_current_looking_result(trained, tmp_path,
                                                                                           monkeypatch) -> None:
    """A "$" in a file name was parsed as a formula (a traceback), a name that is not UTF-8 broke
    the font and the Markdown, a "|" in a defect type split its table row; a rerun that failed
    left the earlier run's result saying done, and its report beside the new run's plots."""
    dataset, out = trained
    odd = tmp_path / "odd"
    shutil.copytree(dataset, odd)
    (odd / "test" / "scratch").rename(odd / "test" / "scra|tch")
    (odd / "ground_truth" / "scratch").rename(odd / "ground_truth" / "scra|tch")
    good = sorted((odd / "test" / "good").iterdir())
    good[0].rename(good[0].with_name("cost_$5_$10.png"))
    good[1].rename(os.fsdecode(bytes(good[1].with_name("caf")) + b"\xe9.png"))
    predictor = Predictor.from_dir(out / "best_model/inference")
    predictor.info.calibration = dataclasses.replace(predictor.info.calibration, image_threshold=1e-9)  # grids of both
    result = evaluate_model(predictor, load_dataset(odd), tmp_path / "eval", out / "best_model/inference")
    text = Path(result["report"]).read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| scra"))
    assert row.startswith("| scra\\|tch |") and row.replace("\\|", "").count("|") == 9
    _valid_png(Path(result["report"]).parent / "worst_false_positives.png")

    monkeypatch.setattr("flawscope.evaluation.report.plot_roc", lambda *args: 1 / 0)  # a rerun that fails
    with pytest.raises(ZeroDivisionError):
        evaluate_model(predictor, load_dataset(dataset), tmp_path / "eval", out / "best_model/inference")
    assert json.loads((tmp_path / "eval" / "evaluate_result.json").read_text()) == {"done_flag": False}
    assert Path(result["report"]).read_text(encoding="utf-8") == text  # the earlier report, whole
    assert not list((tmp_path / "eval").glob(".*tmp"))


def test_what_a_reader_needs_to_trust_the_numbers(trained, tmp_path) -> None:
    """Every image's score in scores.csv; the pixel FPR on good images apart; warnings for a
    mask whose values are not 0 and one defect value (a JPEG mask's noise counted as defect,
    silently), for a model whose iteration was chosen on this split, and the caveat on a bound
    of thresholds calibrated before the held-out images joined the banks."""
    dataset, out = trained
    noisy = tmp_path / "noisy"
    shutil.copytree(dataset, noisy)
    mask_path = sorted((noisy / "ground_truth").rglob("*.png"))[0]
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[mask == 255] = 250
    mask[0, :3] = (1, 2, 3)
    Image.fromarray(mask).save(mask_path)
    predictor = Predictor.from_dir(out / "best_model/inference")
    predictor.info.provenance = {**predictor.info.provenance, "dataset": str(noisy), "iterations": 7,
                                 "selected_on_evaluation_split": True, "calibration_images_added": 3}
    result = evaluate_model(predictor, load_dataset(noisy), tmp_path / "eval", out / "best_model/inference")
    warnings = result["warnings"]
    assert any(w.startswith(f"1 mask(s) hold other values than 0 and one defect value (e.g. {mask_path}: mask has "
                            "values 0, 1, 2, 3, 250;") for w in warnings), warnings
    assert any("iteration 7 was chosen as the best on" in w and "optimistic" in w for w in warnings), warnings
    text = Path(result["report"]).read_text()
    assert "before the 3 held-out images joined its banks" in text
    assert result["thresholds"]["images_joined_after_calibration"] == 3

    confusion = result["metrics"]["confusion"]
    good = confusion["pixel_good_images"]
    assert good["tp"] == good["fn"] == 0 and good["fp"] + good["tn"] == 2 * 64 * 64  # the two good images' pixels
    assert all(confusion["pixel"][k] >= good[k] for k in good)
    assert "on good images," in text and "on defective images' good pixels" in text

    with open(Path(result["report"]).parent / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result["metrics"]["num_images"] == 4
    same_batch = Predictor(predictor.model, predictor.info, batch_size=len(rows))  # batching moves the last bits
    for row, res in zip(rows, same_batch.predict([row["image"] for row in rows])):
        assert (float(row["raw_score"]), float(row["score"])) == (res.raw_score, res.score)
        assert row["is_anomaly"] == str(res.is_anomaly) and int(row["label"]) == (row["defect_type"] != "good")
    assert sum(int(r["mask_pixels"]) for r in rows) == confusion["pixel"]["tp"] + confusion["pixel"]["fn"]
    assert {r["fitted"] for r in rows} == {"False"}  # test images, none the model was fitted on

    predictor.info.provenance["dataset"] = str(dataset)  # chosen on another dataset's split: nothing to say
    result = evaluate_model(predictor, load_dataset(noisy), tmp_path / "eval2", out / "best_model/inference")
    assert not any("was chosen as the best" in w for w in result["warnings"])


def test_a_labelled_test_set_alone_evaluates_and_a_mismatched_mask_writes_nothing(trained, tmp_path, capsys) -> None:
    """Evaluating a trained model needs test images and masks, not training images; a mask of
    another size than its image is one error line before anything is written (it left an
    unfinished result and an empty log)."""
    dataset, out = trained
    test_only = tmp_path / "test_only"
    for part in ("test", "ground_truth"):
        shutil.copytree(dataset / part, test_only / part)
    args = ["-c", "STFPM", "-o", "Global.mode=evaluate", "-o", f"Evaluate.weight_path={out / 'best_model/inference'}"]
    assert main([*args, "-o", f"Global.dataset_dir={test_only}", "-o", f"Global.output={tmp_path / 'eval'}"]) == 0
    m = json.loads((tmp_path / "eval" / "evaluate_result.json").read_text())["metrics"]
    assert (m["num_good"], m["num_defect"]) == (2, 2)
    good_only = tmp_path / "good_only"  # today's good parts alone: their false alarms
    shutil.copytree(dataset / "test" / "good", good_only / "test" / "good")
    assert main([*args, "-o", f"Global.dataset_dir={good_only}", "-o", f"Global.output={tmp_path / 'good'}"]) == 0
    m = json.loads((tmp_path / "good" / "evaluate_result.json").read_text())["metrics"]
    assert (m["num_good"], m["num_defect"], m["image_auroc"]) == (2, 0, None) and m["image_fpr"] is not None

    mask = next((test_only / "ground_truth").rglob("*.png"))
    Image.open(mask).resize((32, 32)).save(mask)
    assert main([*args, "-o", f"Global.dataset_dir={test_only}", "-o", f"Global.output={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {mask}: mask is 32x32") and not (tmp_path / "bad").exists()


def test_a_file_where_the_report_folder_goes_is_refused_not_replaced(trained, tmp_path) -> None:
    dataset, out = trained
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "evaluate_report").write_text("the user's notes")
    with pytest.raises(FlawscopeError, match="evaluate_report: a file, not a folder"):
        evaluate_model(Predictor.from_dir(out / "best_model/inference"), load_dataset(dataset), tmp_path / "eval",
                       out / "best_model/inference")
    assert (tmp_path / "eval" / "evaluate_report").read_text() == "the user's notes"
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["evaluate.log", "evaluate_report",
                                                                     "evaluate_result.json"]


def test_evaluating_on_images_the_model_was_fitted_on_is_said(trained, tmp_path) -> None:
    """Test images added as normals (Train.add_normals), or a test split that holds training images:
    they score as training images, and the evaluation says its metrics are optimistic."""
    dataset, out = trained
    mixed = tmp_path / "mixed"
    shutil.copytree(dataset, mixed)
    for image in (dataset / "train" / "good").iterdir():  # renamed copies: found by their pixels
        shutil.copy(image, mixed / "test" / "good" / f"copy_{image.name}")
    fitted = len(read_fitted_images(out / "best_model/inference"))
    assert 0 < fitted <= len(list((dataset / "train" / "good").iterdir()))
    predictor = Predictor.from_dir(out / "best_model/inference")
    result = evaluate_model(predictor, load_dataset(mixed), tmp_path / "eval", out / "best_model/inference")
    evaluated = len(load_dataset(mixed).val)
    (warning,) = [w for w in result["warnings"] if "fitted on" in w]
    with open(Path(result["report"]).parent / "scores.csv", newline="") as f:
        assert sum(row["fitted"] == "True" for row in csv.DictReader(f)) == fitted
    assert warning.startswith(f"{fitted} of the {evaluated} images evaluated are images the model was fitted on "
                              f"(e.g. {mixed / 'test' / 'good'}{os.sep}copy_") and warning.endswith("optimistic")
    clean = evaluate_model(predictor, load_dataset(dataset), tmp_path / "eval2", out / "best_model/inference")
    assert not any("fitted on" in w for w in clean["warnings"])


def test_good_images_flagged_beyond_chance_are_called_a_shift() -> None:
    """Calibration on 99 good images promised 5% of good parts flagged: 2 of 20 is chance, 6 of 20 is not.
    Set on 2 images, thresholds flag a share that varies widely: 15 of 20 is not called a shift, but too few."""
    cal = Calibration(1.0, 0.0, 1.0, 0.0, "held-out good training images", {"image_fpr_bound": 0.05, "num_good": 99})
    defect = Outcome(Sample(Path("bad.png"), None, 1, "crack"), 9.0, None, is_anomaly=False)

    def outcomes(flagged: int) -> list[Outcome]:
        return [defect] + [Outcome(Sample(Path(f"{i}.png"), None, 0, "good"), 0.0, 0, is_anomaly=i < flagged)
                           for i in range(20)]

    assert shift_warning(outcomes(2), cal) is None
    warning = shift_warning(outcomes(6), cal)
    assert warning.startswith("6 of the 20 good images here are flagged (30%)") and "5%" in warning
    assert "Train.calibration_dir" in warning
    assert shift_warning(outcomes(20), dataclasses.replace(cal, details={"method": "f1"})) is None  # no FPR promised
    few = dataclasses.replace(cal, details={"image_fpr_bound": 1 / 3, "num_good": 2})
    assert shift_warning(outcomes(8), few) is None
    warning = shift_warning(outcomes(15), few)
    assert warning.startswith("15 of the 20 good images here are flagged (75%), where the thresholds flag 33% of good "
                              "parts on average: set on only 2 good images") and "differ" not in warning
    on_training = dataclasses.replace(cal, source="training images")  # nothing held out: its own images
    assert "as near the model as its own training images" in shift_warning(outcomes(6), on_training)
    old = dataclasses.replace(cal, details={"image_fpr_bound": 1 / 3})  # calibrated before num_good was recorded
    assert "differ from those" in shift_warning(outcomes(15), old)


def test_defect_images_without_a_usable_mask_are_named() -> None:
    def outcome(name: str, label: int, mask: np.ndarray | None) -> Outcome:
        return Outcome(Sample(Path(name), None, label, "crack" if label else "good"), 1.0,
                       None if mask is None else int(mask.sum()))

    blank, marked = np.zeros((4, 4), bool), np.eye(4, dtype=bool)
    assert mask_warnings([outcome("good.png", 0, blank), outcome("a.png", 1, marked)]) == []
    warnings = mask_warnings([outcome("a.png", 1, None), outcome("b.png", 1, blank), outcome("c.png", 1, None)])
    assert warnings == ["2 defect image(s) have no mask (e.g. a.png): left out of the pixel metrics",
                        "1 defect image(s) have an empty mask (e.g. b.png): every pixel flagged on them counts as a "
                        "false positive"]


def test_an_evaluation_of_defect_images_only_says_how_to_add_good_ones() -> None:
    """As a LabelMe conversion leaves the lists: image AUROC null, and no word of why."""
    def outcome(label: int) -> Outcome:
        return Outcome(Sample(Path(f"{label}.png"), None, label, "crack" if label else "good"), 1.0, None)

    assert no_good_warning([outcome(1), outcome(0)]) is None and no_good_warning([]) is None
    warning = no_good_warning([outcome(1), outcome(1)])
    assert warning.startswith("the 2 evaluated images are all defect images: with no good one there is no image AUROC")
    assert "-o CheckDataset.split.enable=true" in warning


def test_evaluating_defect_images_only_warns_and_logs_what_cannot_be_measured(trained, tmp_path, caplog) -> None:
    dataset, out = trained
    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    shutil.rmtree(copy / "test" / "good")
    result = evaluate_model(Predictor.from_dir(out / "best_model/inference"), load_dataset(copy), tmp_path / "eval",
                            out / "best_model/inference")
    assert result["metrics"]["image_auroc"] is None
    assert any(w.startswith("the 2 evaluated images are all defect images") for w in result["warnings"])
    assert any("image AUROC n/a" in r.getMessage() for r in caplog.records)  # Python's None before


def test_evaluate_warns_when_the_good_images_are_flagged_too_often(trained, tmp_path) -> None:
    dataset, out = trained
    predictor = Predictor.from_dir(out / "best_model/inference")
    cal = predictor.info.calibration
    for image_threshold, warned in ((-1e9, True), (1e9, False)):  # every good image flagged, then none
        predictor.info.calibration = dataclasses.replace(
            cal, image_threshold=image_threshold, image_low=-2e9, details={**cal.details, "image_fpr_bound": 0.01})
        result = evaluate_model(predictor, load_dataset(dataset), tmp_path / str(warned), out / "best_model/inference")
        assert any("good images here are flagged" in w for w in result["warnings"]) == warned
        assert ("good images here are flagged" in Path(result["report"]).read_text()) == warned


def test_decisions_are_the_predictors(trained) -> None:
    dataset, out = trained
    predictor = Predictor.from_dir(out / "best_model/inference")
    paths = sorted(str(p) for p in (dataset / "test").rglob("*.png"))
    images = [read_image(p) for p in paths]
    same_batches = Predictor(predictor.model, predictor.info, batch_size=len(paths))  # batching moves the last bits
    for path, image, (raw_map, raw_score), res in zip(paths, images, predictor.raw_outputs(images),
                                                      same_batches.predict(paths)):
        ours = predictor.result(image, raw_map, raw_score)
        assert (ours.score, ours.is_anomaly, ours.raw_score) == (res.score, res.is_anomaly, res.raw_score), path
        assert np.array_equal(ours.pred, res.pred) and np.array_equal(ours.map, res.map)


def test_uncalibrated_model_gives_ranking_metrics_only(trained) -> None:
    """What training's periodic evaluation sees, before calibration exists."""
    dataset, out = trained
    predictor = Predictor.from_dir(out / "best_model/inference")
    predictor.info = dataclasses.replace(predictor.info, calibration=None)
    m = compute_metrics(collect(predictor, load_dataset(dataset).val))
    assert m["image_auroc"] is not None and m["pixel_auroc"] is not None
    assert m["image_f1"] is None and m["pixel_iou"] is None and m["confusion"] is None


def test_no_defect_images(trained) -> None:
    """A split of good images only: no AUROC, no F1, but the false-alarm rates are defined."""
    dataset, out = trained
    predictor = Predictor.from_dir(out / "best_model/inference")
    good = [s for s in load_dataset(dataset).val if s.label == 0]
    m = compute_metrics(collect(predictor, good))
    assert m["image_auroc"] is None and m["aupro"] is None and m["pixel_f1"] is None
    assert m["image_fpr"] is not None and m["pixel_fpr"] is not None and m["paddlex_miou"] is not None
    assert m["per_defect_type"] == {}


def test_collect_keeps_maps_only_where_there_is_ground_truth(trained, tmp_path) -> None:
    dataset, out = trained
    predictor = Predictor.from_dir(out / "best_model/inference")
    defects = [dataclasses.replace(s, mask=None) for s in load_dataset(dataset).val if s.label == 1]
    collected = collect(predictor, defects)
    assert all(o.mask_pixels is None and o.is_anomaly is not None for o in collected.outcomes)
    assert collected.defects == {} and collected.pixels().scores.pixels == 0
    assert compute_metrics(collected)["num_with_masks"] == 0



def test_collect_pairs_each_image_with_its_own_mask(trained) -> None:
    dataset, out = trained
    samples = load_dataset(dataset).val
    collected = collect(Predictor.from_dir(out / "best_model/inference"), samples, batch_size=4)
    assert [o.sample for o in collected.outcomes] == samples
    defects = [o for o in collected.outcomes if o.sample.mask is not None]
    masks = [read_mask(o.sample.mask) for o in defects]
    assert len(defects) == 2 and not np.array_equal(*masks)
    assert [o.mask_pixels for o in defects] == [int(m.sum()) for m in masks]
    held = [mask for group in collected.defects.values() for mask, _ in group.scores.images]  # small: exact
    assert len(held) == 2 and all(any(np.array_equal(h, m) for h in held) for m in masks)
    assert not collected.good.scores.defects and collected.good.scores.pixels > 0


def test_each_defect_type_is_scored_with_all_good_images() -> None:
    """The per-type table computes fewer metrics than the whole split, with the same values."""
    rng = np.random.default_rng(0)
    collected = Collected([], PixelGroup(), {})

    def outcome(name: str, label: int, kind: str, strength: float) -> Outcome:
        mask = np.zeros((16, 16), bool)
        mask[4:4 + 4 * label, 5:9] = True
        amap = (rng.random((16, 16)) + strength * mask).astype(np.float32)
        pred = amap > 1.1
        group = collected.defects.setdefault(kind, PixelGroup()) if label else collected.good
        group.add(mask, amap, pred)
        return Outcome(Sample(Path(name), None, label, kind), float(amap.max()), int(mask.sum()),
                       is_anomaly=bool(pred.any()))

    good = [outcome(f"good{i}", 0, "good", 0) for i in range(5)]
    types = {"crack": [outcome(f"crack{i}", 1, "crack", 0.8) for i in range(3)],
             "stain": [outcome(f"stain{i}", 1, "stain", 0.2) for i in range(4)]}
    collected.outcomes = good + types["crack"] + types["stain"]
    per_type = compute_metrics(collected)["per_defect_type"]
    keys = ("image_auroc", "image_ap", "image_recall", "pixel_auroc", "aupro", "pixel_f1", "pixel_iou")
    for kind, chosen in types.items():
        full = summarize(good + chosen, collected.good + collected.defects[kind])
        assert per_type[kind] == {"count": len(chosen), **{key: full[key] for key in keys}}
    assert per_type["crack"]["pixel_auroc"] > per_type["stain"]["pixel_auroc"]
