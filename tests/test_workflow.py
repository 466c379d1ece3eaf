"""The module workflow through the CLI, as a user runs it: train, resume, evaluate, predict, export,
and the bad inputs that must fail with one line, exit code 2 and nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
import safetensors.numpy
import safetensors.torch
from safetensors.torch import load_file

from conftest import make_mvtec, tiny_overrides, written_before_digests
from flawscope.cli import main
from flawscope.errors import Terminated
from flawscope.inference.model_dir import file_digest
from flawscope.inference.predictor import Predictor
from flawscope.inference.runtimes import import_runtime
from flawscope.logs import log, log_to_file
from flawscope.pipeline import create_pipeline


def _cli(*overrides: str) -> int:
    args = ["-c", "STFPM"]
    for o in overrides:
        args += ["-o", o]
    return main(args)


def test_train_writes_every_output(trained) -> None:
    _, out = trained
    result = json.loads((out / "train_result.json").read_text())
    assert result["done_flag"] is True
    assert Path(result["models"]["best"]["inference_model_dir"]).is_dir()
    for name in ("config.yaml", "train.log", "iter_3/checkpoint.safetensors", "iter_6/checkpoint.json",
                 "best_model/inference/model.safetensors", "best_model/inference/inference.yml"):
        assert (out / name).is_file(), name
    assert "iter 6/6 loss" in (out / "train.log").read_text()
    cal = result["calibration"]
    assert cal["source"] == "held-out good training images" and cal["image_threshold"] > 0


def test_resume_reproduces_an_uninterrupted_run(trained, tmp_path) -> None:
    """Stopping at iteration 3 and resuming gives the same weights as training straight through."""
    dataset, full = trained
    resumed = tmp_path / "resumed"
    assert _cli("Global.mode=train", *tiny_overrides(dataset, resumed),
                f"Train.resume_path={full / 'iter_3'}") == 0
    a = load_file(str(full / "best_model/inference/model.safetensors"))
    b = load_file(str(resumed / "best_model/inference/model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_batch_larger_than_the_training_set_says_it_repeats_images(trained, tmp_path, capsys) -> None:
    dataset, _ = trained  # 8 good training images, 2 of them held out: 6 to train on
    out = tmp_path / "out"
    assert _cli("Global.mode=train", *tiny_overrides(dataset, out, iters=1), "Train.batch_size=7") == 0
    assert "Train.batch_size 7 is more than the 6 training images: each batch repeats some" in capsys.readouterr().err
    assert _cli("Global.mode=train", *tiny_overrides(dataset, out, iters=1), "Train.batch_size=6") == 0
    assert "repeats" not in capsys.readouterr().err


def test_resuming_on_other_images_of_the_same_number_is_refused(trained, tmp_path, capsys) -> None:
    """The checkpoint held only how many images it was trained on: one swapped for another resumed
    as a continuation. A checkpoint written before the images' digest resumes as it did."""
    dataset, full = trained
    swapped = tmp_path / "swapped"
    shutil.copytree(dataset, swapped)
    goods = sorted((swapped / "train/good").iterdir())
    with Image.open(goods[1]) as image:  # as many images, one of them another
        Image.fromarray(255 - np.asarray(image.convert("RGB"))).save(goods[1])
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, "Global.mode=train", *tiny_overrides(swapped, out),
                   f"Train.resume_path={full / 'iter_3'}", fragment="was trained on other images than this run's")
    older = tmp_path / "iter_3"
    shutil.copytree(full / "iter_3", older)
    meta = json.loads((older / "checkpoint.json").read_text())
    assert len(meta.pop("train_images_digest")) == 32
    (older / "checkpoint.json").write_text(json.dumps(meta))
    assert _cli("Global.mode=train", *tiny_overrides(dataset, tmp_path / "resumed"), f"Train.resume_path={older}") == 0
    assert "records no" not in capsys.readouterr().err  # the settings it records are checked


def test_a_checkpoint_recording_no_settings_says_they_go_unchecked(trained, tmp_path, capsys) -> None:
    """The first releases' checkpoints record the iteration alone: resumed with today's shipped
    config (another loss, another image score) they trained on silently as another run would."""
    dataset, full = trained
    older = tmp_path / "run" / "iter_3"
    shutil.copytree(full / "iter_3", older)
    shutil.copy(full / "config.yaml", older.parent / "config.yaml")
    (older / "checkpoint.json").write_text(json.dumps({"iteration": 3}))
    assert _cli("Global.mode=train", *tiny_overrides(dataset, tmp_path / "resumed"), f"Train.resume_path={older}") == 0
    err = capsys.readouterr().err
    assert f"{older} was saved by an earlier flawscope and records no seed, batch_size, processes, " in err
    assert f"to continue that training as it was, resume with -c {older.parent / 'config.yaml'}" in err


def test_resuming_towards_more_iterations_says_the_schedule_changes(trained, tmp_path) -> None:
    dataset, full = trained
    longer = tmp_path / "longer"
    assert _cli("Global.mode=train", *tiny_overrides(dataset, longer, iters=9), f"Train.resume_path={full / 'iter_3'}") == 0
    log = (longer / "train.log").read_text()
    assert "was trained towards 6 iterations, this run 9: the learning-rate schedule changes" in log
    assert f"resuming from {full / 'iter_3'} at iteration 3 of 9" in log


def test_the_last_checkpoint_recalibrates_on_new_good_images_without_training(trained, tmp_path) -> None:
    """What the evaluate mode's shift warning advises for STFPM: resume from the last checkpoint with
    Train.calibration_dir. The student is the trained one; the thresholds come from the new images."""
    dataset, full = trained
    cal_dir = make_mvtec(tmp_path / "new_line", n_train=6, seed=5) / "train" / "good"
    out = tmp_path / "recalibrated"
    assert _cli("Global.mode=train", *tiny_overrides(dataset, out), f"Train.resume_path={full / 'iter_6'}",
                f"Train.calibration_dir={cal_dir}") == 0
    a = load_file(str(full / "best_model/inference/model.safetensors"))
    b = load_file(str(out / "best_model/inference/model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a if k.startswith("student."))
    assert "nothing left to train" in (out / "train.log").read_text()
    cal = yaml.safe_load((out / "best_model/inference/inference.yml").read_text())["calibration"]
    assert str(cal_dir) in cal["source"] and cal["details"]["num_good"] == 2 + 6  # held out + new
    files = json.loads((out / "train_result.json").read_text())["models"]["best"]
    assert files["checkpoint"] == str(full / "iter_6")  # nothing trained: the checkpoint resumed from


def test_saved_models_are_readable_as_the_umask_allows(trained, tmp_path) -> None:
    """A service under another account must be able to read a model: no private files or folders
    (safetensors writes 0600 and mkdtemp 0700 of their own)."""
    dataset, _ = trained
    old = os.umask(0o022)
    try:
        out = tmp_path / "shared"
        assert _cli("Global.mode=train", *tiny_overrides(dataset, out, iters=3)) == 0
        assert _cli("Global.mode=export", f"Export.weight_path={out / 'best_model/inference'}",
                    f"Global.output={tmp_path / 'exported'}") == 0
    finally:
        os.umask(old)
    paths = [p for root in (out, tmp_path / "exported") for p in root.rglob("*")]
    assert any(p.name == "checkpoint.safetensors" for p in paths) and any(p.suffix == ".onnx" for p in paths)
    for path in paths:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def test_select_best_keeps_the_best_evaluated_student(trained, tmp_path) -> None:
    """With Train.select_best the inference model is the student of the best evaluation, like
    PaddleX's best_model; by default it is the last iteration's."""
    dataset, _ = trained
    out = tmp_path / "best"
    assert _cli("Global.mode=train", *tiny_overrides(dataset, out, iters=9), "Train.eval_interval=3",
                "Train.select_best=true", "Train.learning_rate=2.0") == 0
    result = json.loads((out / "train_result.json").read_text())
    *students, final = result["eval_history"]  # the evaluations while training, then the kept one with its image bank
    assert [e["iteration"] for e in students] == [3, 6, 9] and not any("image_bank" in e for e in students)
    best = max(students, key=lambda e: (e["image_auroc"], e["pixel_auroc"], -e["iteration"]))
    assert best["iteration"] != 9  # a run whose last evaluation is not its best (lr 2.0 makes it unsteady)
    assert result["selected_iteration"] == best["iteration"]
    assert final["image_bank"] and final["iteration"] == best["iteration"]
    assert result["metrics"] == {k: final[k] for k in ("image_auroc", "pixel_auroc")}
    saved = load_file(str(out / "best_model/inference/model.safetensors"))
    for it in (3, 6, 9):
        checkpoint = load_file(str(out / f"iter_{it}/checkpoint.safetensors"))
        same = all(np.array_equal(saved[k], checkpoint[f"model.{k[len('student.'):]}"])
                   for k in saved if k.startswith("student."))
        assert same == (it == best["iteration"]), it
    assert "best evaluation" in (out / "train.log").read_text()

    # Resumed after the best evaluation: the selection and the history carry on from the checkpoint.
    resumed = tmp_path / "resumed"
    assert _cli("Global.mode=train", *tiny_overrides(dataset, resumed, iters=9), "Train.eval_interval=3",
                "Train.select_best=true", "Train.learning_rate=2.0", f"Train.resume_path={out / 'iter_6'}") == 0
    again = json.loads((resumed / "train_result.json").read_text())
    assert again["eval_history"] == result["eval_history"] and again["selected_iteration"] == best["iteration"]
    assert again["models"]["best"]["checkpoint"] == str(resumed / "iter_9")
    again_saved = load_file(str(resumed / "best_model/inference/model.safetensors"))
    assert all(np.array_equal(saved[k], again_saved[k]) for k in saved)


def test_hard_fraction_trains_on_the_hardest_positions(trained, tmp_path) -> None:
    """Train.hard_fraction reaches the loop: on the same first batch and weights its loss, the mean
    of the hardest positions, is above the paper's mean over all of them; the model records it."""
    dataset, _ = trained
    losses = {}
    for fraction in ("null", "0.25"):
        out = tmp_path / fraction
        assert _cli("Global.mode=train", *tiny_overrides(dataset, out, iters=1), "Train.log_interval=1",
                    f"Train.hard_fraction={fraction}") == 0
        losses[fraction] = float((out / "train.log").read_text().split("iter 1/1 loss ")[1].split()[0])
        info = yaml.safe_load((out / "best_model/inference/inference.yml").read_text())
        assert info["provenance"]["hard_fraction"] == (None if fraction == "null" else 0.25)
    assert losses["0.25"] > losses["null"] > 0


def test_same_seed_same_model_other_seed_other_model(trained, tmp_path) -> None:
    dataset, first = trained
    assert _cli("Global.mode=train", *tiny_overrides(dataset, tmp_path / "again")) == 0
    assert _cli("Global.mode=train", *tiny_overrides(dataset, tmp_path / "seed7"), "Global.seed=7") == 0
    weights = [load_file(str(d / "best_model/inference/model.safetensors"))
               for d in (first, tmp_path / "again", tmp_path / "seed7")]
    key = "student._conv_stem.weight"
    assert np.array_equal(weights[0][key], weights[1][key])
    assert not np.array_equal(weights[0][key], weights[2][key])


def test_evaluate_reports_image_and_pixel_auroc(trained, tmp_path) -> None:
    dataset, out = trained
    assert _cli("Global.mode=evaluate", f"Global.dataset_dir={dataset}", f"Global.output={out}") == 0
    metrics = json.loads((out / "evaluate_result.json").read_text())["metrics"]
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    assert metrics["num_good"] == 2 and metrics["num_defect"] == 2
    assert set(metrics["per_defect_type"]) == {"scratch"}


def test_predict_writes_json_and_picture_at_the_image_size(trained, tmp_path, capsys) -> None:
    dataset, out = trained
    image = dataset / "test" / "scratch" / "000.png"
    save = tmp_path / "pred"
    assert _cli("Global.mode=predict", f"Global.output={save}",
                f"Predict.model_dir={out / 'best_model/inference'}", f"Predict.input={image}") == 0
    res = json.loads((save / "000_res.json").read_text())
    assert res["size"] == [64, 64] and isinstance(res["is_anomaly"], bool) and 0 <= res["score"] <= 1
    assert Image.open(save / "000_res.png").size == (64, 64)
    assert str(image) in capsys.readouterr().out
    # A PatchCore config given an STFPM directory: the directory decides, and the user is told.
    assert main(["-c", "PatchCore", "-o", "Global.mode=predict", "-o", f"Global.output={save}",
                 "-o", f"Predict.model_dir={out / 'best_model/inference'}", "-o", f"Predict.input={image}"]) == 0
    assert "holds a STFPM model: it is used as it is (Global.model PatchCore" in capsys.readouterr().err
    # A training setting given to another mode changes nothing there (it was ignored silently).
    assert _cli("Global.mode=predict", f"Global.output={save}", f"Predict.model_dir={out / 'best_model/inference'}",
                f"Predict.input={image}", "Model.resize_mode=letterbox") == 0
    assert ("Model.resize_mode: used when training only; the predict mode takes the model's own settings from its "
            "directory: ignored") in capsys.readouterr().err


def test_the_predict_mode_takes_the_pipelines_decision_settings(trained, tmp_path, capsys) -> None:
    """Predict.threshold / min_region_area / outline_ok_images act as the pipeline's settings do."""
    dataset, out = trained
    model = out / "best_model/inference"
    image = dataset / "test" / "scratch" / "000.png"
    (default,) = create_pipeline(model_dir=str(model)).predict(image)
    strict = min(0.99, default.score + 0.01)
    assert _cli("Global.mode=predict", f"Global.output={tmp_path / 'strict'}", f"Predict.model_dir={model}",
                f"Predict.input={image}", f"Predict.threshold={strict}", "Predict.outline_ok_images=true") == 0
    res = json.loads((tmp_path / "strict/000_res.json").read_text())
    (expected,) = create_pipeline(model_dir=str(model), threshold=strict, outline_ok_images=True).predict(image)
    assert res["is_anomaly"] is False and expected.score == default.score
    assert abs(res["score"] - default.score) < 1e-4
    assert len(res["regions"]) == len(expected.regions)
    assert _cli("Global.mode=predict", f"Global.output={tmp_path / 'big'}", f"Predict.model_dir={model}",
                f"Predict.input={image}", "Predict.threshold=0.01", "Predict.min_region_area=1000000") == 0
    res = json.loads((tmp_path / "big/000_res.json").read_text())
    assert res["is_anomaly"] is True and res["regions"] == []
    capsys.readouterr()
    assert _cli("Global.mode=predict", f"Global.output={tmp_path / 'bad'}", f"Predict.model_dir={model}",
                f"Predict.input={image}", "Predict.threshold=1.5") != 0
    assert "Predict.threshold" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_predict_says_when_it_falls_back_to_the_bundled_model(trained, tmp_path, capsys) -> None:
    dataset, _ = trained
    save = tmp_path / "never_trained"
    assert _cli("Global.mode=predict", f"Global.output={save}", f"Predict.input={dataset / 'test/good'}") == 0
    err = capsys.readouterr().err
    assert "bundled default model" in err and str(save) in err


def _assert_onnx_matches_torch(model_dir: Path, output: Path, cli=_cli) -> None:
    from flawscope.inference.model_dir import load_model_dir

    ort = import_runtime("onnxruntime")

    assert cli("Global.mode=export", f"Global.output={output}", f"Export.weight_path={model_dir}") == 0
    model, info = load_model_dir(model_dir)
    x = torch.randn(1, 3, info.input_size, info.input_size)
    onnx_map, onnx_score = ort.InferenceSession(str(output / "export/model.onnx")).run(None, {"image": x.numpy()})
    with torch.no_grad():
        torch_map, torch_score = model.map_and_score(x)
    assert np.allclose(onnx_map, torch_map.numpy(), atol=1e-4)
    assert np.allclose(onnx_score, torch_score.numpy(), atol=1e-4)
    assert (output / "export/inference.yml").is_file()


def _assert_openvino_matches_torch(model_dir: Path, output: Path, cli=_cli) -> None:
    """The IR keeps float32 weights: compiled with the f32 hint it scores like torch."""
    from flawscope.inference.model_dir import load_model_dir

    ov = import_runtime("openvino")

    assert cli("Global.mode=export", f"Global.output={output}", f"Export.weight_path={model_dir}",
               "Export.format=openvino") == 0
    assert sorted(p.name for p in (output / "export").iterdir()) == ["inference.yml", "model.bin", "model.xml"]
    compiled = ov.Core().compile_model(str(output / "export/model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    model, info = load_model_dir(model_dir)
    x = torch.randn(1, 3, info.input_size, info.input_size)
    outputs = compiled(x.numpy())
    with torch.no_grad():
        torch_map, torch_score = model.map_and_score(x)
    assert np.allclose(outputs[compiled.output("anomaly_map")], torch_map.numpy(), atol=1e-4)
    assert np.allclose(outputs[compiled.output("image_score")], torch_score.numpy(), atol=1e-4)


def test_export_onnx_and_openvino_match_torch(trained, tmp_path) -> None:
    _assert_onnx_matches_torch(trained[1] / "best_model/inference", tmp_path / "onnx")
    _assert_openvino_matches_torch(trained[1] / "best_model/inference", tmp_path / "openvino")


def _fails_cleanly(capsys, output: Path, *overrides: str, fragment: str) -> None:
    assert _cli(*overrides) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err
    assert fragment in errors[0], err
    assert not output.exists(), "a failed run must not leave an output folder"


def test_missing_dataset(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, "Global.mode=train", *tiny_overrides(tmp_path / "nope", out), fragment="nope")


def test_empty_train_split(tmp_path, capsys) -> None:
    data = make_mvtec(tmp_path / "data")
    for f in (data / "train" / "good").iterdir():
        f.unlink()
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, "Global.mode=train", *tiny_overrides(data, out), fragment=str(data))


def test_unreadable_training_image(tmp_path, capsys) -> None:
    data = make_mvtec(tmp_path / "data")
    bad = data / "train" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:60])
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, "Global.mode=train", *tiny_overrides(data, out), fragment=str(bad))


def test_mask_of_another_size(tmp_path, capsys) -> None:
    data = make_mvtec(tmp_path / "data")
    mask = data / "ground_truth" / "scratch" / "000_mask.png"
    Image.new("L", (32, 32)).save(mask)
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, "Global.mode=train", *tiny_overrides(data, out), fragment=str(mask))


def test_a_copy_of_a_defect_image_among_the_good_ones_fails_before_training(tmp_path, capsys) -> None:
    """check_dataset calls it a problem; training took it into the model as a good part, and the
    defect it copies then scored 0.000 in the evaluation."""
    data = make_mvtec(tmp_path / "data")
    shutil.copy(data / "test/scratch/001.png", data / "train/good/999.png")
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, "Global.mode=train", *tiny_overrides(data, out),
                   fragment=f"{data / 'train/good/999.png'}: a defect image in the training split: the same bytes as "
                            f"{data / 'test/scratch/001.png'} (a scratch defect in val)")


def test_a_dataset_folder_named_as_defects_and_unread_images_are_in_the_records(tmp_path, capsys) -> None:
    """Pointed at ng/, training took its defects for good parts without a word; the warnings of
    images no split reads reached the console only, not train.log, evaluate.log or the result."""
    data = make_mvtec(tmp_path / "data")
    lot = data / "test" / "scratch" / "lot2"
    lot.mkdir()
    shutil.copy(data / "test/scratch/000.png", lot / "x.png")
    out = tmp_path / "out"
    assert _cli("Global.mode=train", *tiny_overrides(data, out, iters=1)) == 0
    assert _cli("Global.mode=evaluate", f"Global.dataset_dir={data}", f"Global.output={out}") == 0
    for log_file in ("train.log", "evaluate.log"):
        assert f"{lot / 'x.png'}" in (out / log_file).read_text(), log_file
    assert "8 good training images (6 trained on, 2 held out for calibration)" in (out / "train.log").read_text()
    assert any("in no split and were not evaluated" in w
               for w in json.loads((out / "evaluate_result.json").read_text())["warnings"])
    ng = tmp_path / "ng"
    shutil.copytree(data / "train/good", ng)
    capsys.readouterr()
    assert _cli("Global.mode=train", *tiny_overrides(ng, tmp_path / "out_ng", iters=1)) == 0
    assert f"{ng}: a folder named ng read as a dataset of good images" in capsys.readouterr().err


def test_an_image_good_in_train_and_defective_in_val_fails_before_training(tmp_path, capsys) -> None:
    data = make_mvtec(tmp_path / "data")
    goods = sorted((data / "train" / "good").glob("*.png"))
    (data / "train.txt").write_text("".join(f"{p.relative_to(data)}\n" for p in goods) + f"{data}/test/scratch/000.png\n")
    (data / "val.txt").write_text("test/scratch/000.png ground_truth/scratch/000_mask.png\ntest/good/000.png\n")
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, "Global.mode=train", *tiny_overrides(data, out),
                   fragment="listed in train as good and as a defect in val")
    # Listed with its defect mask in train too: it was said to be listed "as good" there.
    (data / "train.txt").write_text("".join(f"{p.relative_to(data)}\n" for p in goods)
                                    + "test/scratch/000.png ground_truth/scratch/000_mask.png\n")
    _fails_cleanly(capsys, out, "Global.mode=train", *tiny_overrides(data, out),
                   fragment="000.png: a defect image in the training split: listed in train with its mask "
                            f"{data / 'ground_truth/scratch/000_mask.png'} and as a defect in val")


def test_a_defect_image_in_a_segdataset_train_list_fails_before_training(tmp_path, capsys) -> None:
    data = make_mvtec(tmp_path / "data")
    goods = sorted((data / "train" / "good").glob("*.png"))
    (data / "train.txt").write_text("".join(f"{p.relative_to(data)}\n" for p in goods)
                                    + "test/scratch/000.png ground_truth/scratch/000_mask.png\n")
    (data / "val.txt").write_text("test/scratch/001.png ground_truth/scratch/001_mask.png\ntest/good/000.png\n")
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, "Global.mode=train", *tiny_overrides(data, out),
                   fragment=f"{data / 'test/scratch/000.png'}: a defect image in the training split")


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])  # Pillow turns a TIFF's header size upright itself
def test_an_exif_rotated_test_image_with_its_upright_mask_trains(tmp_path, suffix) -> None:
    """The mask fits the image as it is read (turned upright), not as its header stores it."""
    data = make_mvtec(tmp_path / "data", n_defect=1)
    image = data / "test" / "scratch" / "000.png"
    mask = data / "ground_truth" / "scratch" / "000_mask.png"
    upright = Image.open(image).convert("RGB").resize((64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: read back as upright's 64x48
    upright.transpose(Image.Transpose.ROTATE_90).save(image.with_suffix(suffix), exif=exif)
    image.unlink()
    Image.open(mask).resize((64, 48)).save(mask)
    out = tmp_path / "out"
    assert _cli("Global.mode=train", *tiny_overrides(data, out, iters=2)) == 0


@pytest.mark.parametrize("bad", ["test/good/000.png", "calibration"])
def test_an_image_that_is_no_image_fails_before_training(tmp_path, capsys, bad) -> None:
    """A test image (first read at the first evaluation) or a calibration_dir image (at calibration,
    after training) that is no image stops the run before it starts."""
    data = make_mvtec(tmp_path / "data")
    extra = []
    if bad == "calibration":
        cal = make_mvtec(tmp_path / "cal", n_train=2, seed=5) / "train" / "good"
        extra, bad = [f"Train.calibration_dir={cal}"], next(cal.iterdir())
    else:
        bad = data / bad
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, "Global.mode=train", *tiny_overrides(data, out), *extra,
                   fragment=f"{bad}: not a readable image")


def test_a_checkpoint_resumes_only_with_as_many_processes(trained, tmp_path) -> None:
    """Each torchrun process draws batch_size images of one global batch: a checkpoint of one
    process resumed under two trained on other batches, silently."""
    from flawscope.config import load_config
    from flawscope.errors import FlawscopeError
    from flawscope.training.runner import _read_resume

    dataset, out = trained
    cfg = load_config("STFPM", ["Global.mode=train", *tiny_overrides(dataset, tmp_path / "out"),
                                f"Train.resume_path={out / 'iter_6'}"])
    assert _read_resume(cfg, 6, 1).iteration == 6
    with pytest.raises(FlawscopeError, match="was trained with processes 1, this run has 2"):
        _read_resume(cfg, 6, 2)


@pytest.mark.parametrize("case, fragment", [
    (["Train.epochs_iters=3"], "is at iteration 6, past Train.epochs_iters 3"),
    (["Global.seed=8"], "was trained with seed 42, this run has 8"),
    (["Train.batch_size=2"], "was trained with batch_size 4, this run has 2"),
    ("truncate", "checkpoint.safetensors: not a readable safetensors file"),
    ("json", "checkpoint.json: damaged checkpoint description"),
    ("fraction", "checkpoint.json: damaged checkpoint description (iteration must be a whole number >= 0, not 5.7)"),
    ("nan", "checkpoint.safetensors: damaged checkpoint ("),  # it trained on, and 'diverged' two iterations later
    (["Model.strides=[16,32]"], "was trained with strides [8, 16, 32], this run has [16, 32]"),  # the same student
    ("unrecorded strides",  # a checkpoint written before they were recorded: its weights tell
     "does not fit this model (90 weights differ in name or shape, first _blocks.11"),
])
def test_a_checkpoint_that_cannot_be_resumed_fails_before_anything_is_written(trained, tmp_path, capsys, case,
                                                                            fragment) -> None:
    dataset, full = trained
    checkpoint = tmp_path / "iter_6"
    shutil.copytree(full / "iter_6", checkpoint)
    if case == "truncate":
        weights = checkpoint / "checkpoint.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "json":
        (checkpoint / "checkpoint.json").write_text('{"iter')
    elif case == "fraction":
        meta = json.loads((checkpoint / "checkpoint.json").read_text())
        (checkpoint / "checkpoint.json").write_text(json.dumps(meta | {"iteration": 5.7}))
    elif case == "nan":
        weights = checkpoint / "checkpoint.safetensors"
        tensors = load_file(weights)
        name = next(k for k, v in tensors.items() if v.is_floating_point() and v.ndim == 4)
        safetensors.torch.save_file(tensors | {name: torch.full_like(tensors[name], torch.nan)}, weights)
    elif case == "unrecorded strides":
        meta = json.loads((checkpoint / "checkpoint.json").read_text())
        del meta["strides"], meta["backbone"]
        (checkpoint / "checkpoint.json").write_text(json.dumps(meta))
        case = ["Model.strides=[8,16]", "Model.global_strides=[16]"]
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, "Global.mode=train", *tiny_overrides(dataset, out), f"Train.resume_path={checkpoint}",
                   *(case if isinstance(case, list) else []), fragment=fragment)


def test_a_failed_training_leaves_no_model_to_be_taken_for_its_own(trained, tmp_path, capsys) -> None:
    """A second run into the same output that fails part-way: the first run's best_model/ is still
    there, but evaluate and predict must not use it as if it were the new run's."""
    dataset, _ = trained
    out = tmp_path / "out"
    assert _cli("Global.mode=train", *tiny_overrides(dataset, out, iters=2)) == 0
    assert _cli("Global.mode=train", *tiny_overrides(dataset, out, iters=2), "Train.learning_rate=1e30") == 2
    assert "training diverged" in capsys.readouterr().err
    lines = (out / "train.log").read_text().splitlines()
    starts = [line for line in lines if "---- run started (pid " in line]
    assert len(starts) == 2  # the log is appended to: each run's part is marked
    assert "ERROR ---- run stopped: error: " in lines[-1] and "training diverged" in lines[-1]  # not the console alone
    assert json.loads((out / "train_result.json").read_text())["done_flag"] is False
    image = next((dataset / "test" / "good").iterdir())
    assert _cli("Global.mode=predict", f"Global.output={out}", f"Predict.input={image}") == 2
    err = capsys.readouterr().err
    assert "the last training in" in err and "did not finish" in err and not list(out.glob("*_res.json"))
    assert _cli("Global.mode=predict", f"Global.output={out}", f"Predict.input={image}",
                f"Predict.model_dir={out / 'best_model/inference'}") == 0  # given explicitly, it is the user's call

    first = tmp_path / "first"  # a first training that failed left no model: not the bundled one silently
    assert _cli("Global.mode=train", *tiny_overrides(dataset, first, iters=2), "Train.learning_rate=1e30") == 2
    capsys.readouterr()
    assert _cli("Global.mode=predict", f"Global.output={first}", f"Predict.input={image}") == 2
    err = capsys.readouterr().err
    assert "did not finish (done_flag false), and left no model" in err and not list(first.glob("*_res.json"))


def test_sigterm_stops_a_training_as_ctrl_c_does(trained, tmp_path) -> None:
    """systemd, docker and kill stop a run with SIGTERM: it ends with one line and 143, and, as
    after Ctrl-C, leaves no model and a result that says it did not finish."""
    dataset, _ = trained
    out = tmp_path / "out"
    overrides = [x for o in tiny_overrides(dataset, out, iters=100000) for x in ("-o", o)]
    run = subprocess.Popen([sys.executable, "-m", "flawscope", "-c", "STFPM", "-o", "Global.mode=train",
                            *overrides, "-o", "Train.log_interval=1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while "iter 4/" not in ((out / "train.log").read_text() if (out / "train.log").exists() else ""):
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 143 and err.strip().splitlines()[-1] == "terminated", err[-2000:]
    assert json.loads((out / "train_result.json").read_text())["done_flag"] is False
    assert not (out / "best_model").exists() and not list(out.rglob("*.tmp"))
    saved = sorted(out.glob("iter_*"), key=lambda path: int(path.name[5:]))
    stopped = "training stopped; " + (f"to go on from its last checkpoint: -o Train.resume_path={saved[-1]}"
                                      if saved else "no checkpoint saved yet")
    assert stopped in (out / "train.log").read_text()
    if saved:  # a plain rerun starts anew, and says how to go on from the stopped one instead
        assert _cli("Global.mode=train", *tiny_overrides(dataset, out, iters=2)) == 0
        assert f"holds checkpoints of an earlier run (the latest: {saved[-1].name}); this run starts anew " \
               f"(-o Train.resume_path={saved[-1]} would go on from there)" in (out / "train.log").read_text()


def test_a_second_training_into_a_busy_output_is_refused(trained, tmp_path, capsys) -> None:
    """Two trainings into one folder interleaved their logs, and the first one's done flag stood
    for the second one's model until that replaced it."""
    from flawscope.atomic import output_lock

    dataset, _ = trained
    out = tmp_path / "out"
    with output_lock(out):  # another run, training there now
        assert _cli("Global.mode=train", *tiny_overrides(dataset, out, iters=2)) == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"error: {out}: another flawscope run is writing there " \
            f"(process {os.getpid()}); wait for it to end or choose another Global.output"
        assert [p.name for p in out.iterdir()] == [".flawscope.lock"]
    assert _cli("Global.mode=train", *tiny_overrides(dataset, out, iters=2)) == 0  # once it has ended


def test_the_cli_starts_without_torch() -> None:
    """torch and scipy are imported inside main, where a Ctrl-C in the first second or two is one
    'interrupted' line (it was a traceback from inside the imports, or a RecursionError)."""
    code = "import sys, flawscope.cli; print(sorted({'torch', 'scipy', 'numpy'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_a_full_disk_is_one_line_not_a_traceback(monkeypatch, capsys) -> None:
    """A write or close that fails for space names no file; other nameless errors are bugs."""
    def full(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("flawscope.cli.run", full)
    assert main([]) == 2
    assert capsys.readouterr().err == f"error: writing the output: {os.strerror(errno.ENOSPC)}\n"
    monkeypatch.setattr("flawscope.cli.run", lambda argv: (_ for _ in ()).throw(OSError(errno.EBADF, "bad")))
    with pytest.raises(OSError):
        main([])


def test_unknown_config_key(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, "Global.mode=train", f"Global.output={out}", "Train.epoch_iters=5",
                   fragment="Train.epoch_iters")


def test_missing_model_directory(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, "Global.mode=predict", f"Global.output={out}", f"Predict.model_dir={tmp_path / 'm'}",
                   f"Predict.input={tmp_path}", fragment=str(tmp_path / "m"))


@pytest.mark.parametrize("under", [False, True])
def test_an_output_folder_that_is_a_file(trained, tmp_path, capsys, under) -> None:
    """Every mode, and the quick start, refuse it in one line before any work."""
    dataset, _ = trained
    in_the_way = tmp_path / "results"
    in_the_way.write_text("not a folder")
    out = in_the_way / "run" if under else in_the_way
    image = str(next((dataset / "test" / "good").iterdir()))
    runs = [["-c", "STFPM", "-o", "Global.mode=train", *[a for o in tiny_overrides(dataset, out) for a in ("-o", o)]],
            ["-c", "STFPM", "-o", "Global.mode=check_dataset", "-o", f"Global.dataset_dir={dataset}",
             "-o", f"Global.output={out}"],
            ["--pipeline", "anomaly_detection", "--input", image, "--save_path", str(out)]]
    for argv in runs:
        assert main(argv) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and str(in_the_way) in errors[0] and "a file, not a folder" in errors[0], errors
    assert in_the_way.read_text() == "not a folder"


@pytest.mark.parametrize("edit, message", [
    (("model: STFPM", "model: PatchCore"), "inference.yml: model_config does not fit model PatchCore"),
    (("image_threshold: ", "image_threshold: high #"), "calibration.image_threshold must be a finite number, not 'high'"),
    (("image_threshold: ", "image_threshold: .nan #"), "calibration.image_threshold must be a finite number, not nan"),
    (("std:\n- 0.5", "std:\n- 0"), "std must be three finite numbers above 0"),
    ({"calibration": None}, "calibration must be a mapping of the calibrated thresholds"),
    (("input_size: 64", "input_size: 64\ninput_size: 64"),
     "unreadable model description (YAML line 18, column 1: 'input_size' appears twice in one mapping)"),
    (("input_size: 64", "input_size: 100"), "input_size must be a multiple of 32 from 32 to 4096, not 100"),
    (("  backbone: ", "  backbone: nonet #"), "inference.yml: Model.backbone: unknown backbone 'nonet'"),
    (("input_size: 64", "input_size: 64\nfoo: 1"), "damaged model description: unknown key foo"),
    (("input_size: 64\n", ""), "damaged model description: missing key input_size"),
    (("resize_mode: resize", "resize_mode: crop"), "resize_mode must be one of resize, letterbox"),
    (("  smooth_sigma: ", "  smooth_sigma: 100 #"),
     "inference.yml: model_config smooth_sigma 100 blurs over the whole 64-pixel input: it must be at most 15.75"),
    (("  smooth_sigma: ", "  smooth_sigma: -1 #"),
     "inference.yml: model_config smooth_sigma must be a number >= 0, got -1"),
    (("  smooth_sigma: ", "  smooth_sigma: .nan #"),
     "inference.yml: model_config smooth_sigma must be a number >= 0, got NaN"),
    (("  smooth_sigma: ", "  smooth_sigma: .inf #"),
     "inference.yml: model_config smooth_sigma must be a number >= 0, got Infinity"),
    (("  global_grid: ", "  global_grid: .inf #"),
     "inference.yml: model_config global_grid must be an integer >= 1, got Infinity"),
    (("  global_grid: ", "  global_grid: 1.5 #"),
     "inference.yml: model_config global_grid must be an integer >= 1, got 1.5"),
    ("truncate", "model.safetensors: not a readable safetensors file, truncated or damaged"),
    ("nan", "model.safetensors: not the file inference.yml beside it was written with (its SHA-256 differs)"),
    ("nan written before digests", "model: the model's output (STFPM) is NaN or infinite: its weights are damaged"),
])
def test_a_damaged_model_directory_is_one_error_line(trained, tmp_path, capsys, edit, message) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(trained[1] / "best_model/inference", model_dir)
    if edit == "truncate":
        weights = model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif isinstance(edit, str) and edit.startswith("nan"):  # readable, every value in place, and one weight NaN
        tensors = safetensors.numpy.load_file(model_dir / "model.safetensors")
        name = next(k for k, v in tensors.items() if "student" in k and v.dtype.kind == "f" and v.ndim == 4)
        tensors[name] = np.full_like(tensors[name], np.nan)
        safetensors.numpy.save_file(tensors, model_dir / "model.safetensors")
        if edit != "nan":
            written_before_digests(model_dir)  # only the NaN output tells
    elif isinstance(edit, dict):  # set keys to values
        meta = model_dir / "inference.yml"
        meta.write_text(yaml.safe_dump(yaml.safe_load(meta.read_text()) | edit, sort_keys=False))
    else:  # replace a text
        meta = model_dir / "inference.yml"
        assert edit[0] in meta.read_text()
        meta.write_text(meta.read_text().replace(edit[0], edit[1], 1))
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, "Global.mode=predict", f"Global.output={out}", f"Predict.model_dir={model_dir}",
                   f"Predict.input={next((trained[0] / 'test' / 'good').iterdir())}", fragment=message)


def test_a_model_folder_put_together_from_two_models_is_refused(tmp_path, capsys) -> None:
    """``inference.yml`` lists the SHA-256 of the files written with it, and the weights record the
    input they were fitted on: another model's ``inference.yml`` beside them (two folders mixed up,
    one file replaced after a retraining) or an edited input size is one error line, not a model
    whose thresholds and features belong to another (it flagged every pixel of a good hazelnut)."""
    small = ["Model.input_size=128", "Model.global_grid=2", "Model.coreset_ratio=0.5"]
    models = {}
    for seed in (0, 3):
        models[seed] = tmp_path / f"model{seed}"
        data = make_mvtec(tmp_path / f"data{seed}", seed=seed)
        assert _patchcore("Global.mode=train", f"Global.dataset_dir={data}", f"Global.output={models[seed]}", *small) == 0
        assert _patchcore("Global.mode=export", f"Global.output={models[seed]}") == 0
    image, out = next((tmp_path / "data0/test/good").iterdir()), tmp_path / "out"

    def refused(model_dir: Path, fragment: str) -> None:
        _fails_cleanly(capsys, out, "Global.mode=predict", f"Global.output={out}", f"Predict.model_dir={model_dir}",
                       f"Predict.input={image}", fragment=fragment)

    for folder, graph in (("best_model/inference", "model.safetensors"), ("export", "model.onnx")):
        mixed = tmp_path / folder.replace("/", "_")
        shutil.copytree(models[0] / folder, mixed)
        shutil.copy(models[3] / folder / "inference.yml", mixed)
        refused(mixed, f"{mixed / graph}: not the file inference.yml beside it was written with (its SHA-256 differs)")
    edited = tmp_path / "edited"
    shutil.copytree(models[0] / "best_model/inference", edited)
    meta = edited / "inference.yml"
    meta.write_text(meta.read_text().replace("input_size: 128", "input_size: 256"))
    refused(edited, f"{meta}: input_size 256 is not the 128 that model.safetensors was fitted on")
    # Trained again into the same output, not exported again: predicting from the export says so, and
    # the earlier model's evaluation is gone rather than passing for the new one's.
    assert _patchcore("Global.mode=evaluate", f"Global.dataset_dir={tmp_path / 'data0'}",
                      f"Global.output={models[0]}") == 0
    assert (models[0] / "evaluate_result.json").is_file() and (models[0] / "evaluate_report").is_dir()
    capsys.readouterr()
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={tmp_path / 'data3'}", f"Global.output={models[0]}",
                      *small) == 0
    assert not (models[0] / "evaluate_result.json").exists() and not (models[0] / "evaluate_report").exists()
    assert "they evaluated the model trained here before this one" in capsys.readouterr().err
    assert _patchcore("Global.mode=predict", f"Global.output={out}", f"Predict.model_dir={models[0] / 'export'}",
                      f"Predict.input={image}") == 0
    assert (f"{models[0] / 'export'} was exported from an earlier model than {models[0] / 'best_model/inference'} "
            "beside it (trained again since)") in capsys.readouterr().err
    shutil.rmtree(out)
    # Written before both records: an input size the grid does not split is still one line, not a traceback.
    weights = edited / "model.safetensors"
    safetensors.torch.save_file(load_file(weights), weights)
    written_before_digests(edited)
    meta.write_text(meta.read_text().replace("input_size: 256", "input_size: 64"))
    refused(edited, f"{meta}: model_config global_grid 2 does not split the 2x2 map of stride-32 features of input_size 64")


@pytest.mark.parametrize("stop, reason", [(KeyboardInterrupt, "interrupted"), (Terminated, "terminated")])
def test_a_run_stopped_by_a_signal_says_so_in_its_log_file(tmp_path, stop, reason) -> None:
    """Ctrl-C and SIGTERM were said on the console only: train.log ended at its last progress line."""
    with pytest.raises(stop), log_to_file(tmp_path / "train.log"):
        log.info("iter 10/2000")
        raise stop
    assert (tmp_path / "train.log").read_text().splitlines()[-1].endswith(f"ERROR ---- run stopped: {reason}")


def test_patchcore_training_says_what_its_steps_took_and_read(tmp_path, capsys, monkeypatch) -> None:
    """A fit over thousands of images said nothing of the patches it left out beyond its cap, nor
    of its image-level references or its second fit, which took most of its time."""
    import functools

    import flawscope.training.patchcore_fit as patchcore_fit
    import flawscope.training.runner as runner

    monkeypatch.setattr(runner, "fit_patchcore", functools.partial(patchcore_fit.fit_patchcore, max_patches=1000))
    data = make_mvtec(tmp_path / "data", seed=0)  # 8 good training images, 2 held out, of 16x16 patches at 128
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={data}", f"Global.output={tmp_path / 'out'}",
                      "Model.input_size=128", "Model.global_grid=2", "Train.add_calibration_images=true") == 0
    err = capsys.readouterr().err
    assert "the 6 images hold more patches than a fit reads (996): the coreset is chosen from a random 166 of each " \
           "image's 256" in err
    assert re.search(r"memory bank: \d+ of 996 patches \(features [\d.]+s, coreset [\d.]+s, image-level references "
                     r"[\d.]+s\)", err)
    assert re.search(r"memory bank: \d+ entries \(fitted again in [\d.]+s\)", err)


def test_an_earlier_releases_export_still_says_when_it_is_of_an_earlier_model(tmp_path, capsys) -> None:
    """Folders written before inference.yml's digests: an export of such a trained folder recorded
    no weights digest, nor did such an export itself, and predicting from it after a retraining
    said nothing. The export now records the digest, and without one the thresholds tell."""
    small = ["Model.input_size=128", "Model.global_grid=2", "Model.coreset_ratio=0.5"]
    data, out = make_mvtec(tmp_path / "data", seed=0), tmp_path / "model"
    image = next((data / "test/good").iterdir())
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={data}", f"Global.output={out}", *small) == 0
    written_before_digests(out / "best_model/inference")  # an earlier release's model, exported today
    assert _patchcore("Global.mode=export", f"Global.output={out}") == 0
    weights = file_digest(out / "best_model/inference/model.safetensors")
    assert yaml.safe_load((out / "export/inference.yml").read_text())["files"]["model.safetensors"] == weights
    older = tmp_path / "older"
    shutil.copytree(out, older)
    written_before_digests(older / "export")  # and an earlier release's export of it
    for output in (out, older):
        predict = ["Global.mode=predict", f"Global.output={tmp_path / 'res'}", f"Predict.model_dir={output / 'export'}",
                   f"Predict.input={image}"]
        capsys.readouterr()
        assert _patchcore(*predict) == 0
        assert "exported from an earlier model" not in capsys.readouterr().err
        assert _patchcore("Global.mode=train", f"Global.dataset_dir={data}", f"Global.output={output}", *small,
                          "Global.seed=7") == 0
        assert _patchcore(*predict) == 0
        assert f"{output / 'export'} was exported from an earlier model than" in capsys.readouterr().err


def _mode_overrides(mode: str, trained: tuple[Path, Path], out: Path) -> list[str]:
    """Inputs ``mode`` accepts, so that the device is the only thing wrong in the tests below."""
    dataset, model_dir = trained[0], trained[1] / "best_model/inference"
    return {
        "check_dataset": [f"Global.dataset_dir={dataset}", f"Global.output={out}"],
        "train": tiny_overrides(dataset, out, iters=1),
        "evaluate": [f"Global.dataset_dir={dataset}", f"Global.output={out}", f"Evaluate.weight_path={model_dir}"],
        "predict": [f"Global.output={out}", f"Predict.model_dir={model_dir}",
                    f"Predict.input={next((dataset / 'test' / 'good').iterdir())}"],
        "export": [f"Global.output={out}", f"Export.weight_path={model_dir}"],
    }[mode]


@pytest.mark.parametrize("mode", ["check_dataset", "train", "evaluate", "predict", "export"])
def test_a_device_that_is_no_device_fails_in_every_mode(trained, tmp_path, capsys, mode) -> None:
    """Even the modes that run no model (check_dataset, export) refuse a malformed Global.device
    before any work, in one line, leaving no output folder."""
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, f"Global.mode={mode}", *_mode_overrides(mode, trained, out), "Global.device=tpu",
                   fragment="Global.device: 'tpu' is not a device")


def test_pipeline_and_module_config_together_is_refused(capsys) -> None:
    assert main(["--pipeline", "anomaly_detection", "--input", "x.png", "-c", "PatchCore"]) == 2
    assert "give one of them" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["train", "evaluate", "predict"])
@pytest.mark.parametrize(("gpus", "device", "fragment"), [
    (0, "gpu:0", "Global.device: 'gpu:0' asked for a GPU but CUDA is not available (this torch build: "),
    (1, "gpu:0,1", "Global.device: 'gpu:0,1' asked for GPU 1 but 1 CUDA device(s) are visible"),
], ids=["no-cuda", "missing-gpu"])
def test_gpu_on_a_cpu_machine(trained, tmp_path, capsys, monkeypatch, mode, gpus, device, fragment) -> None:
    """Every mode that runs a model names the GPU it cannot have, in one line, before any work. torch.cuda's
    view of the machine is faked, so this runs (and means the same) on machines with and without GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    out = tmp_path / "out"
    _fails_cleanly(capsys, out, f"Global.mode={mode}", *_mode_overrides(mode, trained, out),
                   f"Global.device={device}", fragment=fragment)


def _patchcore(*overrides: str) -> int:
    args = ["-c", "PatchCore"]
    for o in overrides:
        args += ["-o", o]
    return main(args)


def test_patchcore_on_four_images_with_half_held_out_still_flags_the_defects(tmp_path) -> None:
    """Two images fitted: each is the other's nearest, so the image bank's distances have no
    spread; dividing by it put good images millions of spreads away, and once the held-out images
    joined the thresholds flagged nothing."""
    data = make_mvtec(tmp_path / "data", n_train=4, n_good=3, n_defect=3)
    out = tmp_path / "out"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={data}", f"Global.output={out}",
                      "Model.input_size=64", "Model.global_grid=1", "Train.calibration_fraction=0.5") == 0
    predictor = Predictor.from_dir(out / "best_model/inference")
    assert predictor.info.calibration.image_threshold < 1000
    results = list(predictor.predict(str(data / "test"), recursive=True))
    assert [r.is_anomaly for r in results] == [False] * 3 + [True] * 3  # test/good/, then test/scratch/


def test_patchcore_trains_evaluates_and_grows_its_bank(trained, tmp_path) -> None:
    dataset, stfpm_out = trained
    # the held-out images stay out of the banks: calibrating again on them below meets unseen images
    small = ["Model.input_size=128", "Model.global_grid=2", "Model.coreset_ratio=0.5",
             "Train.calibration_fraction=0.25", "Train.add_calibration_images=false"]
    first = tmp_path / "pc"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={first}", *small) == 0
    result = json.loads((first / "train_result.json").read_text())
    assert result["model_name"] == "PatchCore" and result["fit"]["bank_size"] > 0
    embed_dim = 40 + 112  # Lite0 strides 8 and 16
    assert result["fit"]["bank_mb"] == round(result["fit"]["bank_size"] * embed_dim * 2 / 2**20, 1)
    assert result["fit"]["peak_rss_mb"] > 100  # torch alone takes more
    assert 0 <= result["metrics"]["image_auroc"] <= 1
    assert _patchcore("Global.mode=evaluate", f"Global.dataset_dir={dataset}", f"Global.output={first}") == 0
    _assert_onnx_matches_torch(first / "best_model/inference", tmp_path / "pc_export", _patchcore)  # faiss vs torch
    _assert_openvino_matches_torch(first / "best_model/inference", tmp_path / "pc_openvino", _patchcore)
    approximate = tmp_path / "pc_approx"  # faiss's inverted-file search, set at training time
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={approximate}", *small,
                      "Model.search=approximate", "Model.image_bank_size=3") == 0
    assert "search: approximate" in (approximate / "best_model/inference/inference.yml").read_text()
    assert len(load_file(str(approximate / "best_model/inference/model.safetensors"))["image_bank"]) == 3
    assert "image bank: 3 of " in (approximate / "train.log").read_text()

    more = make_mvtec(tmp_path / "more", n_train=4, seed=3)
    grown = tmp_path / "pc2"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={more}", f"Global.output={grown}", *small,
                      f"Train.add_normals={first / 'best_model/inference'}") == 0
    before = json.loads((first / "train_result.json").read_text())["fit"]["bank_size"]
    after = json.loads((grown / "train_result.json").read_text())["fit"]
    assert after["bank_size"] > before and after["added"] == after["bank_size"] - before
    assert after["repeated_images"] == 0
    first_info, grown_info = (yaml.safe_load((d / "best_model/inference/inference.yml").read_text())
                              for d in (first, grown))
    assert grown_info["provenance"]["dataset"] == str(more)  # the new batch, and what the bank held before it
    assert grown_info["provenance"]["grown_from"] == {"model_dir": str((first / "best_model/inference").resolve()),
                                                      **first_info["provenance"]}

    again = tmp_path / "pc3"  # the first model's own training images: nothing to add
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={again}", *small,
                      f"Train.add_normals={first / 'best_model/inference'}") == 0
    fit = json.loads((again / "train_result.json").read_text())["fit"]
    first_info, again_info = (yaml.safe_load((d / "best_model/inference/inference.yml").read_text())
                              for d in (first, again))
    assert fit["repeated_images"] == first_info["provenance"]["train_images"] and fit["new_images"] == 0
    assert fit["added"] == 0 and fit["bank_size"] == before
    assert again_info["provenance"]["train_images"] == 0  # what it trained on: none it did not hold
    assert "in the model" in (again / "train.log").read_text()
    assert again_info["calibration"]["image_threshold"] == pytest.approx(first_info["calibration"]["image_threshold"])


@pytest.mark.parametrize("model", ["PatchCore", "STFPM"])
def test_held_out_images_join_the_banks_once_the_thresholds_are_set(trained, tmp_path, model) -> None:
    """``Train.add_calibration_images``: the same thresholds as without it (calibrated first, on
    images the model had not seen), and banks that hold the held-out images as well."""

    def train(dataset: Path, out: Path, *extra: str) -> tuple[dict, dict, str]:
        overrides = [*tiny_overrides(dataset, out, iters=2), "Model.coreset_ratio=0.5", *extra]
        assert main(["-c", model, "-o", "Global.mode=train", *(x for o in overrides for x in ("-o", o))]) == 0
        return (yaml.safe_load((out / "best_model/inference/inference.yml").read_text()),
                load_file(str(out / "best_model/inference/model.safetensors")), (out / "train.log").read_text())

    dataset = trained[0]
    kept, kept_weights, _ = train(dataset, tmp_path / "kept", "Train.add_calibration_images=false")
    joined, joined_weights, log = train(dataset, tmp_path / "joined", "Train.add_calibration_images=true")
    held_out = len(list((dataset / "train/good").iterdir())) - kept["provenance"]["train_images"]
    assert joined["calibration"] == kept["calibration"] and held_out == 2
    assert joined["provenance"]["calibration_images_added"] == held_out
    assert "calibration_images_added" not in kept["provenance"]
    assert len(joined_weights["image_bank"]) == len(kept_weights["image_bank"]) + held_out
    assert f"the model's banks now hold the {held_out} good images held out for calibration too" in log
    if model == "STFPM":  # the student is measured against the same held-out images
        assert torch.equal(joined_weights["reference_scores"], kept_weights["reference_scores"])
        return
    # PatchCore: the held-out images' patches too, and the references of their own scores
    assert len(joined_weights["memory_bank"]) > len(kept_weights["memory_bank"])
    assert len(joined_weights["memory_bank"]) == joined["provenance"]["bank_size"]
    assert len(joined_weights["reference_scores"]) == len(kept_weights["reference_scores"]) + held_out
    more = make_mvtec(tmp_path / "more", n_train=4, seed=3)  # 2 fitted, 2 held out, then all 4 in: a model that grows
    base = tmp_path / "joined/best_model/inference"
    grown, grown_weights, _ = train(more, tmp_path / "grown", f"Train.add_normals={base}")
    assert grown["provenance"]["calibration_images_added"] == 2
    assert len(grown_weights["image_bank"]) == len(joined_weights["image_bank"]) + 4


def _with_four_new_images(dataset: Path, tmp_path: Path) -> Path:
    """A copy of ``dataset`` whose train/good/ holds 4 new images (``new_*``) beside its own."""
    grown_data = tmp_path / "grown_data"
    shutil.copytree(dataset, grown_data)
    for image in (make_mvtec(tmp_path / "more", n_train=4, seed=3) / "train/good").iterdir():
        shutil.copy(image, grown_data / "train/good" / f"new_{image.name}")
    return grown_data


def _seed_holding_out(grown_data: Path, new: Callable[[int], bool]) -> tuple[int, int, int]:
    """(seed, old, new): the first seed whose calibration split of ``grown_data`` (fraction 0.25)
    holds out some of its old images, and a number of the ``new_*`` ones that ``new`` accepts."""
    from flawscope.data.layouts import load_dataset, unique_images
    from flawscope.training.calibrate import split_calibration

    samples = unique_images(load_dataset(grown_data).train)[0]
    for seed in range(100):
        held = split_calibration(samples, 0.25, seed)[1]
        n_new = sum(s.image.name.startswith("new_") for s in held)
        if n_new < len(held) and new(n_new):
            return seed, len(held) - n_new, n_new
    raise AssertionError("no seed up to 100 splits the images so")


def test_the_final_evaluation_says_when_it_evaluates_images_the_model_was_fitted_on(tmp_path) -> None:
    """A test split that holds training images (or test images added as normals) scores them as training
    images: the train mode's final evaluation warns, as the evaluate mode does."""
    dataset = make_mvtec(tmp_path / "data", n_train=8)
    for image in sorted((dataset / "train" / "good").iterdir()):  # all: the held-out ones join the banks
        shutil.copy(image, dataset / "test" / "good" / f"copy_{image.name}")
    out = tmp_path / "out"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={out}",
                      "Model.input_size=128", "Model.global_grid=2", "Model.coreset_ratio=0.5") == 0
    assert re.search(r"the final evaluation: 8 of the \d+ images evaluated are images the model was fitted on "
                     r"\(e\.g\. .*copy_.*\): they score as training images", (out / "train.log").read_text())


def test_a_grown_model_is_not_calibrated_on_far_fewer_images_than_its_base(tmp_path, capsys) -> None:
    """Each growth calibrates on its own new good images: a small batch held out 2, and thresholds
    set on them replaced ones set on many more (a grown magnetic_tile model flagged half the good
    test parts). A batch holds out as many as its base was calibrated on (they join the banks
    afterwards); one too small for that is refused with what to do, as is growing in place; given
    Train.calibration_dir, the model grows and the log says how its thresholds moved."""
    small = ["Model.input_size=128", "Model.global_grid=2", "Model.coreset_ratio=0.5"]
    dataset = make_mvtec(tmp_path / "data", n_train=20)
    first = tmp_path / "first"  # 10 of 20 held out: thresholds set on 10 good images
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={first}", *small,
                      "Train.calibration_fraction=0.5") == 0
    more = make_mvtec(tmp_path / "more", n_train=4, seed=3)
    base = f"Train.add_normals={first / 'best_model/inference'}"
    grown = tmp_path / "grown"
    capsys.readouterr()
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={more}", f"Global.output={grown}", *small, base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: Train.add_normals: 3 new good images would calibrate the grown model, whose thresholds "
                       "are set on them alone (the base model's were set on 10); 10 or more are needed: add more "
                       "images at once, or set Train.calibration_dir to good images kept out of every batch")
    assert not grown.exists()
    for inside in (first, first / "best_model/inference"):  # in place, the base would be gone (or hold another)
        assert _patchcore("Global.mode=train", f"Global.dataset_dir={more}", f"Global.output={inside}", *small,
                          base) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: Global.output: {inside} holds, or is in, the model Train.add_normals grows; write the grown "
            "model to another folder, so that the model it grew from stays to go back to")
    assert not (first / "best_model/inference/best_model").exists()
    batch = make_mvtec(tmp_path / "batch", n_train=12, seed=4)  # its own 10% would be 2: as many as the base's held out
    held = tmp_path / "held"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={batch}", f"Global.output={held}", *small, base) == 0
    assert ("Train.add_normals: 10 of this batch's 12 images held out for calibration, as many as the base model "
            "was calibrated on (or all but one; Train.calibration_fraction 0.1: 2); they join the banks") in (
        held / "train.log").read_text()
    held_info = yaml.safe_load((held / "best_model/inference/inference.yml").read_text())
    assert held_info["calibration"]["details"]["num_good"] == 10
    assert held_info["provenance"]["calibration_images_added"] == 10  # then in the bank, as the other 2
    kept_out = make_mvtec(tmp_path / "kept_out", n_train=12, seed=5) / "train"  # good images in no batch
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={more}", f"Global.output={grown}", *small, base,
                      f"Train.calibration_dir={kept_out}") == 0
    assert "Train.add_normals: thresholds image " in (grown / "train.log").read_text()
    assert "good images (the base model on 10)" in (grown / "train.log").read_text()


def test_a_grown_model_is_not_calibrated_on_images_it_holds(trained, tmp_path, capsys) -> None:
    """Growing a model (``Train.add_normals``) with a folder that holds its training images too:
    the held-out images it holds already would score like training images and pull the thresholds
    down, so they are not calibrated on; when all of them are, or all but one, that is one error line."""
    dataset = trained[0]
    small = ["Model.input_size=128", "Model.global_grid=2", "Model.coreset_ratio=0.5", "Train.calibration_fraction=0.25"]
    first = tmp_path / "first"  # holds all 8 images: the held-out ones join its banks
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={first}", *small) == 0
    base = f"Train.add_normals={first / 'best_model/inference'}"
    again = tmp_path / "again"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={again}", *small, base) == 2
    err = capsys.readouterr().err
    assert "error: Train.add_normals: the good calibration images are all in" in err
    assert "Traceback" not in err and not again.exists()

    grown_data = _with_four_new_images(dataset, tmp_path)
    # A split that leaves one new image to calibrate on is refused: one score sets no scale (it
    # calibrated a hazelnut model's threshold from 1.30 to 0.47).
    one = _seed_holding_out(grown_data, lambda new: new == 1)[0]
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={grown_data}", f"Global.output={tmp_path / 'one'}",
                      *small, base, f"Global.seed={one}") == 2
    err = capsys.readouterr().err
    assert f"images are in {first / 'best_model/inference'} already, which leaves 1 to calibrate on" in err
    assert "Traceback" not in err and not (tmp_path / "one").exists()

    # Too few new images to hold any out, or none held out: the new images would calibrate while in the
    # bank, and the grown model's thresholds flagged every good part (an image threshold of -1.9 from 1.8).
    two = make_mvtec(tmp_path / "two", n_train=2, seed=7)
    for data, more in ((two, []), (grown_data, ["Train.calibration_fraction=0"])):
        assert _patchcore("Global.mode=train", f"Global.dataset_dir={data}", f"Global.output={tmp_path / 'none'}",
                          *small, *more, base) == 2
        err = capsys.readouterr().err
        assert "error: Train.add_normals: no new good image is held out to calibrate the grown model on" in err
        assert "Traceback" not in err and not (tmp_path / "none").exists()

    seed, held_old, new = _seed_holding_out(grown_data, lambda new: new >= 2)
    grown = tmp_path / "grown"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={grown_data}", f"Global.output={grown}", *small,
                      base, f"Global.seed={seed}") == 0
    info = yaml.safe_load((grown / "best_model/inference/inference.yml").read_text())
    assert info["calibration"]["details"]["num_good"] == new
    log = (grown / "train.log").read_text()
    assert f"{held_old} of the good calibration images are in" in log

    # Train.calibration_dir's good images are filtered alike, and the model keeps its own settings.
    new_data = make_mvtec(tmp_path / "new_data", n_train=4, seed=3)
    cal = tmp_path / "cal"
    cal.mkdir()
    for image in sorted((dataset / "train/good").iterdir())[:2]:  # in the base model's banks
        shutil.copy(image, cal / f"old_{image.name}")
    shutil.copy(next((make_mvtec(tmp_path / "newer", n_train=1, seed=5) / "train/good").iterdir()), cal / "newer.png")
    with_dir = tmp_path / "with_dir"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={new_data}", f"Global.output={with_dir}", *small,
                      base, f"Train.calibration_dir={cal}", "Model.input_size=64") == 0
    info = yaml.safe_load((with_dir / "best_model/inference/inference.yml").read_text())
    assert info["calibration"]["details"]["num_good"] == 2 + 1 and info["input_size"] == 128
    log = (with_dir / "train.log").read_text()
    assert "2 of the good calibration images are in" in log
    assert "the config's Model section differs in input_size 64 (the model's: 128)" in log
    assert yaml.safe_load((with_dir / "config.yaml").read_text())["Model"]["input_size"] == 128


def test_a_grown_model_keeps_how_it_was_fitted(tmp_path) -> None:
    """The coreset ratio and the image bank's cap are the base model's, as its Model settings are
    (growing dropped a cap of 4 images to none, and took the config's 1% coreset for its 50%); a
    base fitted on too few images for an image-level score gets none from growing, and says so."""
    small = ["Model.input_size=128", "Model.global_grid=2"]
    fit = [*small, "Model.coreset_ratio=0.5", "Train.calibration_fraction=0.25"]
    new = make_mvtec(tmp_path / "new", n_train=4, seed=3)
    for name, n_train, cap in (("capped", 8, ["Model.image_bank_size=4"]), ("tiny", 3, [])):
        base = tmp_path / name
        data = make_mvtec(tmp_path / f"{name}_data", n_train=n_train)
        assert _patchcore("Global.mode=train", f"Global.dataset_dir={data}", f"Global.output={base}", *fit, *cap) == 0
        grown = tmp_path / f"{name}_grown"
        assert _patchcore("Global.mode=train", f"Global.dataset_dir={new}", f"Global.output={grown}", *small,
                          f"Train.add_normals={base / 'best_model/inference'}") == 0
        provenance = yaml.safe_load((grown / "best_model/inference/inference.yml").read_text())["provenance"]
        image_bank = load_file(str(grown / "best_model/inference/model.safetensors"))["image_bank"]
        log = (grown / "train.log").read_text()
        assert provenance["coreset_ratio"] == 0.5 and "coreset_ratio 0.01 (the model's: 0.5)" in log
        if name == "capped":
            assert provenance["image_bank_size"] == 4 and len(image_bank) == 4
            assert "image_bank_size None (the model's: 4)" in log
        else:
            assert len(image_bank) == 0 and "has no image-level score (its first fit had too few images" in log


def test_copied_training_images_are_used_once(tmp_path, capsys) -> None:
    """A copy of a training image is neither fitted twice nor held out for calibration, where it
    would score like the image it copies: the model is the one without the copies."""
    plain = make_mvtec(tmp_path / "plain", n_train=8)
    copied = tmp_path / "copied"
    shutil.copytree(plain, copied)
    for image in sorted((plain / "train/good").iterdir())[:3]:
        shutil.copy(image, copied / "train/good" / f"copy_{image.name}")
    small = ["Model.input_size=128", "Model.global_grid=2", "Model.coreset_ratio=0.5", "Train.calibration_fraction=0.25"]
    for data in (plain, copied):
        assert _patchcore("Global.mode=train", f"Global.dataset_dir={data}", f"Global.output={data}_out", *small) == 0
    assert "3 training images are copies of others" in capsys.readouterr().err
    assert "3 training images are copies of others" in Path(f"{copied}_out/train.log").read_text()
    plain_info, copied_info = (yaml.safe_load(Path(f"{d}_out/best_model/inference/inference.yml").read_text())
                               for d in (plain, copied))
    assert copied_info["provenance"]["train_images"] == plain_info["provenance"]["train_images"] == 6
    assert copied_info["calibration"]["details"]["num_good"] == 2
    assert copied_info["calibration"]["image_threshold"] == pytest.approx(plain_info["calibration"]["image_threshold"])


def test_a_resnet_backbone_from_a_torchvision_weights_file(trained, tmp_path, capsys) -> None:
    """``Model.backbone=resnet18`` with a torchvision weights file: both models train with
    ImageNet's normalisation, PatchCore exports like with Lite0, and a missing file is one error."""
    from flawscope.backbones.resnet import ResNet

    dataset, _ = trained
    weights = tmp_path / "resnet18-f37072fd.pth"  # torchvision's names and shapes (tests/test_backbone.py)
    torch.save(ResNet(classifier=True, arch="resnet18").state_dict(), weights)
    resnet = ["Model.backbone=resnet18", f"Train.pretrain_weight_path={weights}"]
    patchcore = tmp_path / "pc"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={patchcore}", *resnet,
                      "Model.input_size=64", "Model.global_grid=1", "Model.coreset_ratio=0.5",
                      "Train.calibration_fraction=0.25") == 0
    info = yaml.safe_load((patchcore / "best_model/inference/inference.yml").read_text())
    assert info["model_config"]["backbone"] == "resnet18"
    assert info["mean"] == [0.485, 0.456, 0.406] and info["std"] == [0.229, 0.224, 0.225]
    _assert_onnx_matches_torch(patchcore / "best_model/inference", tmp_path / "pc_export", _patchcore)

    stfpm = tmp_path / "stfpm"
    assert _cli("Global.mode=train", *tiny_overrides(dataset, stfpm), *resnet) == 0
    assert _cli("Global.mode=predict", f"Global.output={stfpm}", f"Predict.input={dataset / 'test/scratch'}") == 0
    assert len(list(stfpm.glob("*_res.json"))) == len(list((dataset / "test/scratch").iterdir()))
    bad = tmp_path / "bad"
    _fails_cleanly(capsys, bad, "Global.mode=train", *tiny_overrides(dataset, bad), "Model.backbone=resnet18",
                   f"Train.pretrain_weight_path={tmp_path / 'none.pth'}", fragment="none.pth: backbone weights file not found")


def test_nan_backbone_weights_fail_before_anything_is_written(tmp_path, capsys) -> None:
    """Found when the file is read, which names it and the tensor: not from NaN features once
    config.yaml, train.log and train_result.json are written."""
    from flawscope.backbones.resnet import ResNet

    state = ResNet(classifier=True, arch="resnet18").state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    weights, data, out = tmp_path / "nan.pth", make_mvtec(tmp_path / "data"), tmp_path / "out"
    torch.save(state, weights)
    _fails_cleanly(capsys, out, "Global.mode=train", *tiny_overrides(data, out), "Model.backbone=resnet18",
                   f"Train.pretrain_weight_path={weights}",
                   fragment=f"error: {weights}: layer1.0.conv1.weight holds NaN or infinite values")


@pytest.mark.parametrize("train", [_patchcore, _cli])
def test_a_global_grid_that_does_not_divide_the_feature_map_is_one_error(trained, tmp_path, capsys, train) -> None:
    out = tmp_path / "out"
    assert train("Global.mode=train", f"Global.dataset_dir={trained[0]}", f"Global.output={out}",
                 "Model.input_size=128") == 2  # the shipped 4x4 grid on a 4x4 map: cells of one feature
    err = capsys.readouterr().err
    assert "error: Model.global_grid: 4 does not split the 4x4 map" in err and "(use 1, 2)" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_stfpm_trains_an_image_bank_and_scores_with_it(trained, tmp_path, capsys) -> None:
    """The shipped STFPM config fills the image bank after training: one row per training image,
    the student measured against the held-out good images, and an evaluation that uses it."""
    dataset, out = trained
    info = yaml.safe_load((out / "best_model/inference/inference.yml").read_text())
    assert info["model_config"]["global_score"] and info["model_config"]["global_strides"] == [16, 32]
    weights = load_file(str(out / "best_model/inference/model.safetensors"))
    fitted = json.loads((out / "train_result.json").read_text())
    held_out = len(list((dataset / "train/good").iterdir())) - info["provenance"]["train_images"]
    assert info["provenance"]["calibration_images_added"] == held_out >= 2  # after calibrating, as descriptors
    assert len(weights["image_bank"]) == info["provenance"]["train_images"] + held_out
    assert weights["image_bank"].dtype == torch.float16
    assert len(weights["reference_scores"]) == held_out
    assert fitted["eval_history"][-1]["image_bank"]
    assert "eval with the image bank" in (out / "train.log").read_text()
    capped = tmp_path / "capped"
    assert _cli("Global.mode=train", *tiny_overrides(dataset, capped, iters=1), "Model.image_bank_size=2") == 0
    assert len(load_file(str(capped / "best_model/inference/model.safetensors"))["image_bank"]) == 2
    alone = tmp_path / "alone"  # no good image held out: the student would be measured on images it fitted
    assert _cli("Global.mode=train", *tiny_overrides(dataset, alone, iters=1), "Train.calibration_fraction=0") == 0
    assert len(load_file(str(alone / "best_model/inference/model.safetensors"))["image_bank"]) == 0
    assert "the image score is the student's alone" in (alone / "train.log").read_text()
    bad = tmp_path / "bad"
    assert _cli("Global.mode=train", *tiny_overrides(dataset, bad), "Model.strides=[16, 32]", "Model.global_strides=[8, 32]") == 2
    err = capsys.readouterr().err
    assert "global_strides [8, 32] must be among the strides [16, 32]" in err and not bad.exists()


@pytest.mark.parametrize("bank", ["Model.image_bank_size=3", "Model.global_score=false"])
def test_a_model_knows_its_images_whatever_its_image_bank_keeps(trained, tmp_path, capsys, bank) -> None:
    """A capped image bank keeps 3 of the images, and without the image-level score there is none:
    the model directory's digests of the images it was fitted on still tell them apart. Growing
    such a model with its own dataset calibrated on images it was fitted on (its image threshold
    fell from 1.43 to 0.90, or 23 to 0.04) and re-added every patch; now it is refused as with the
    full bank, and a new batch holding them adds only the new images."""
    dataset = trained[0]
    small = ["Model.input_size=128", "Model.global_grid=2", "Model.coreset_ratio=0.5", "Train.calibration_fraction=0.25",
             bank]
    first = tmp_path / "first"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={first}", *small) == 0
    base = f"Train.add_normals={first / 'best_model/inference'}"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={tmp_path / 'again'}",
                      *small, base) == 2
    assert "error: Train.add_normals: the good calibration images are all in" in capsys.readouterr().err
    grown_data = _with_four_new_images(dataset, tmp_path)
    seed, old_held, new_held = _seed_holding_out(grown_data, lambda new: new >= 2)
    grown = tmp_path / "grown"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={grown_data}", f"Global.output={grown}", *small,
                      base, f"Global.seed={seed}", "Train.add_calibration_images=false") == 0
    fit = json.loads((grown / "train_result.json").read_text())["fit"]
    assert (fit["new_images"], fit["repeated_images"]) == (4 - new_held, 8 - old_held)
    info = yaml.safe_load((grown / "best_model/inference/inference.yml").read_text())
    assert info["calibration"]["details"]["num_good"] == new_held  # not the held-out images it holds
    fitted = load_file(str(grown / "best_model/inference/model.safetensors"))["fitted_images"]
    assert fitted.shape == (8 + 4 - new_held, 8)


def test_a_model_saved_before_the_spread_descriptor_grows_without_calibrating_on_its_images(trained, tmp_path) -> None:
    """Its image bank holds the stride-32 mean alone: the held-out images are checked against that
    part of their descriptors (a shape error before)."""
    dataset = trained[0]
    small = ["Model.input_size=128", "Model.global_grid=2", "Model.coreset_ratio=0.5", "Train.calibration_fraction=0.25"]
    first = tmp_path / "first"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={dataset}", f"Global.output={first}", *small,
                      "Model.global_strides=[32]") == 0
    weights = first / "best_model/inference/model.safetensors"
    state = load_file(str(weights))
    mean_width = state["image_bank"].shape[1] // 2
    state["image_bank"] = state["image_bank"][:, :mean_width].contiguous()
    state["score_reference"] = state["score_reference"][:4].contiguous()
    del state["reference_counts"]  # newer still
    safetensors.torch.save_file(state, str(weights))
    written_before_digests(weights.parent)
    grown_data = _with_four_new_images(dataset, tmp_path)
    seed = _seed_holding_out(grown_data, lambda new: new >= 2)[0]
    grown = tmp_path / "grown"
    assert _patchcore("Global.mode=train", f"Global.dataset_dir={grown_data}", f"Global.output={grown}", *small,
                      f"Train.add_normals={first / 'best_model/inference'}", f"Global.seed={seed}") == 0
    assert "of the good calibration images are in" in (grown / "train.log").read_text()
    assert load_file(str(grown / "best_model/inference/model.safetensors"))["image_bank"].shape == (12, mean_width)


def test_select_best_without_an_evaluation_split_says_it_keeps_the_last_student(tmp_path) -> None:
    dataset = make_mvtec(tmp_path / "data") / "train" / "good"  # a folder of good images: nothing to evaluate
    out = tmp_path / "out"
    assert _cli("Global.mode=train", *tiny_overrides(dataset, out, iters=2), "Train.select_best=true") == 0
    assert "Train.select_best: the dataset has no evaluation split to select on" in (out / "train.log").read_text()


def test_add_normals_refuses_an_stfpm_model(trained, tmp_path, capsys) -> None:
    dataset, stfpm_out = trained
    out = tmp_path / "out"
    assert _patchcore("Global.mode=train", *tiny_overrides(dataset, out),
                      f"Train.add_normals={stfpm_out / 'best_model/inference'}") == 2
    err = capsys.readouterr().err
    assert err.rstrip().splitlines()[-1].startswith("error: Train.add_normals: ") and "only PatchCore" in err
    assert not out.exists()


def test_distributed_training_under_torchrun(trained, tmp_path) -> None:
    """The several-GPU path (one process per device, DistributedDataParallel) run on CPUs with gloo."""
    import subprocess
    import sys

    dataset, _ = trained
    out = tmp_path / "ddp"
    overrides = [a for o in tiny_overrides(dataset, out) for a in ("-o", o)]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "flawscope", "-c", "STFPM", "-o", "Global.mode=train", *overrides],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "train_result.json").read_text())
    assert result["done_flag"] and (out / "best_model/inference/model.safetensors").is_file()
    log = (out / "train.log").read_text()
    assert log.count("iter 6/6 loss") == 1  # rank 0 alone logs to the file

    from flawscope.atomic import output_lock

    with output_lock(out):  # another run is writing there: refused, where rank 0 waited in a barrier forever
        refused = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                  "-m", "flawscope", "-c", "STFPM", "-o", "Global.mode=train", *overrides],
                                 capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "another flawscope run is writing there" in refused.stderr


def test_several_gpus_relaunch_under_torchrun(tmp_path, monkeypatch) -> None:
    """gpu:2,3 on a plain call becomes two torchrun processes that see those GPUs as 0 and 1."""

    from flawscope.config import load_config
    from flawscope.training import distributed

    calls = []

    def fake_call(command, env):
        calls.append((command, env["CUDA_VISIBLE_DEVICES"], Path(command[command.index("-c") + 1]).read_text()))
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "train_result.json").write_text('{"done_flag": true}')
        return 0

    monkeypatch.setattr(distributed.subprocess, "call", fake_call)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = load_config("STFPM", [f"Global.output={tmp_path / 'out'}"])
    assert distributed.relaunch(cfg, [torch.device("cuda", 2), torch.device("cuda", 3)]) == {"done_flag": True}
    (command, visible, config_text), = calls
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=2" in command
    assert visible == "2,3" and command[-1] == "Global.device=gpu:0,1" and "epochs_iters" in config_text


def test_gpu_indices_count_among_the_gpus_a_scheduler_left_visible(monkeypatch) -> None:
    """Under SLURM's CUDA_VISIBLE_DEVICES=4,5,6 this process's gpu:0,2 are physical GPUs 4 and 6."""
    from flawscope.training.distributed import visible_devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert visible_devices([torch.device("cuda", 0), torch.device("cuda", 2)]) == "4,6"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b, GPU-3c4d")  # UUIDs as well
    assert visible_devices([torch.device("cuda", 1)]) == "GPU-3c4d"
