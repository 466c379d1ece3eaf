"""The pipeline API and quick start: every input type, batching, results, the pipeline config."""

from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from flawscope import create_pipeline
from flawscope.pipeline import get_pipeline_config
from flawscope.cli import main
from flawscope.data.io import read_image
from flawscope.errors import FlawscopeError
from flawscope.inference.predictor import Predictor, default_model_dir

DEMO = Path(__file__).resolve().parents[1] / "src" / "flawscope" / "assets" / "demo"


@pytest.fixture(scope="module")
def pipeline(trained):
    _, out = trained
    return create_pipeline("anomaly_detection", model_dir=str(out / "best_model/inference"))


@pytest.fixture
def http_root(trained):
    """A local HTTP server over the synthetic dataset, for URL inputs."""
    dataset, _ = trained
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(dataset))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_every_input_type_gives_the_same_result(pipeline, trained, http_root) -> None:
    dataset, _ = trained
    path = dataset / "test" / "scratch" / "000.png"
    array = np.asarray(Image.open(path).convert("RGB"))
    inputs = [str(path), path, f"{http_root}/test/scratch/000.png", array, Image.open(path),
              str(dataset / "test" / "scratch" / "000.*"),
              f"{http_root}/test/scratch/000.png?token={'A' * 4100}"]  # longer than any file name
    results = [list(pipeline.predict(item)) for item in inputs]
    assert all(len(r) == 1 and r[0].error is None for r in results)
    reference = results[0][0]
    for (res,) in results[1:]:
        assert res.score == pytest.approx(reference.score) and np.array_equal(res.pred, reference.pred)


def test_directory_list_and_bad_items(pipeline, trained, http_root, tmp_path) -> None:
    dataset, _ = trained
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    items = [str(dataset / "test" / "good"), str(broken), f"{http_root}/missing.png", str(tmp_path / "nope.png")]
    results = list(pipeline.predict(items))
    assert [r.error is None for r in results] == [True, True, False, False, False]
    assert str(broken) in results[2].error and "404" in results[3].error and "nope.png" in results[4].error
    with pytest.raises(Exception, match="broken.png"):
        list(pipeline.predict(str(broken), on_error="raise"))


def test_a_broken_link_in_a_folder_is_an_error_result_in_its_place(pipeline, trained, tmp_path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    good = next((trained[0] / "test" / "good").iterdir())
    for name in ("a.png", "c.png"):
        (folder / name).symlink_to(good)
    (folder / "b.png").symlink_to(tmp_path / "gone.png")
    results = list(pipeline.predict(str(folder)))
    assert [Path(r.input_path).name for r in results] == ["a.png", "b.png", "c.png"]
    assert [r.error is None for r in results] == [True, False, True]
    assert results[1].error == (f"{folder / 'b.png'}: a broken symbolic link (to {tmp_path / 'gone.png'}, "
                                "which does not exist)")


def test_a_bad_item_mid_batch_keeps_its_place(trained, tmp_path) -> None:
    dataset, out = trained
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    good = sorted(str(p) for p in (dataset / "test").rglob("*.png"))
    items = [good[0], good[1], str(broken), good[2], "x" * 5000]  # the last: a name too long to stat
    results = list(create_pipeline(model_dir=str(out / "best_model/inference"), batch_size=3).predict(items))
    assert [r.input_path for r in results] == items
    assert [r.error is None for r in results] == [True, True, False, True, False]


def test_results_read_before_the_inputs_fail_come_first(trained) -> None:
    """A camera that disconnects, or a listing that fails, after some images: their results are
    yielded, then the error is raised."""
    dataset, out = trained
    good = sorted(str(p) for p in (dataset / "test").rglob("*.png"))[:2]

    def camera():
        yield from good
        raise OSError("camera disconnected")

    class Listing:
        def __iter__(self):
            return camera()

    predictor = create_pipeline(model_dir=str(out / "best_model/inference"), batch_size=4)
    for inputs in (camera(), Listing()):
        results = []
        with pytest.raises(OSError, match="disconnected"):
            for result in predictor.predict(inputs):
                results.append(result)
        assert [r.input_path for r in results] == good


def test_a_generator_is_read_as_results_are_taken(trained) -> None:
    """A camera loop may refill one buffer per frame and wait for each result: nothing is read
    ahead of it, and each image is scored as it was when it was handed over."""
    _, out = trained
    produced = []

    def frames(buffer: np.ndarray):
        for value in (0, 255, 0, 255):
            buffer[:] = value
            produced.append(value)
            yield buffer

    class Camera:  # an iterable that is not itself an iterator
        def __iter__(self):
            return frames(np.zeros((64, 64, 3), np.uint8))

    fresh = [np.full((64, 64, 3), v, np.uint8) for v in (0, 255, 0, 255)]
    for batch_size in (1, 3):
        predictor = create_pipeline(model_dir=str(out / "best_model/inference"), batch_size=batch_size)
        expected = [r.score for r in predictor.predict(fresh)]
        for camera in (frames(np.zeros((64, 64, 3), np.uint8)), Camera()):
            produced.clear()
            scores = []
            for result in predictor.predict(camera):
                scores.append(result.score)
                if batch_size == 1:
                    assert len(produced) == len(scores)
            assert scores == pytest.approx(expected) and expected[0] != pytest.approx(expected[1])


def test_batch_of_four_equals_batch_of_one(trained) -> None:
    dataset, out = trained
    images = sorted((dataset / "test").rglob("*.png"))
    one = list(create_pipeline(model_dir=str(out / "best_model/inference"), batch_size=1).predict(images))
    four = list(create_pipeline(model_dir=str(out / "best_model/inference"), batch_size=4).predict(images))
    assert len(one) == len(four) == 4
    for a, b in zip(one, four):
        assert a.input_path == b.input_path
        assert np.allclose(a.map, b.map, atol=1e-5) and a.is_anomaly == b.is_anomaly


def test_array_inputs_of_every_accepted_shape_and_the_refused_ones(pipeline) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    gray = rgb[:, :, 1]
    as_rgb = list(pipeline.predict([rgb, np.dstack([rgb, np.full((40, 30), 7, np.uint8)]), np.asfortranarray(rgb)]))
    assert all(r.error is None and r.score == pytest.approx(as_rgb[0].score) for r in as_rgb)
    (from_gray,) = pipeline.predict(gray)
    (gray_rgb,) = pipeline.predict(np.repeat(gray[:, :, None], 3, axis=2))
    assert from_gray.score == pytest.approx(gray_rgb.score)
    # a camera SDK's mono frame (HxWx1), and 16-bit frames scaled by their range as 16-bit files are
    mono, deep = pipeline.predict([gray[:, :, None], rgb.astype(np.uint16) * 257])
    assert (mono.score, deep.score) == (from_gray.score, as_rgb[0].score)
    bad = list(pipeline.predict([np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((0, 0), np.uint8)]))
    assert "array must be HxW, HxWx1, HxWx3 (RGB) or HxWx4" in bad[0].error
    assert "array must be uint8 or uint16, got float32" in bad[1].error
    assert "not empty, got shape (0, 0)" in bad[2].error


def test_an_empty_path_and_a_folder_of_folders_say_what_to_give(pipeline, tmp_path) -> None:
    (empty,) = pipeline.predict("")
    assert "an empty path" in empty.error  # not the current directory
    (tmp_path / "lot1").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "lot1" / "a.png")
    (nested,) = pipeline.predict(str(tmp_path))
    assert "no images in this directory" in nested.error and "recursive=True" in nested.error
    assert [r.error for r in pipeline.predict(str(tmp_path), recursive=True)] == [None]


def test_result_maps_and_masks_have_the_images_own_size(pipeline) -> None:
    image = np.zeros((37, 91, 3), np.uint8)
    (res,) = pipeline.predict(image)
    assert res.map.shape == res.pred.shape == (37, 91) and res.size == (91, 37)


def test_get_pipeline_config_and_create_from_it(tmp_path, monkeypatch, capsys) -> None:
    target = tmp_path / "my_path"
    assert main(["--get_pipeline_config", "anomaly_detection", "--save_path", str(target)]) == 0
    written = target / "anomaly_detection.yaml"
    config = yaml.safe_load(written.read_text())
    assert config["pipeline_name"] == "anomaly_detection"
    sub = config["SubModules"]["AnomalyDetection"]
    assert sub["model_dir"] is None and sub["model_name"] == "STFPM" and sub["device"] == "cpu"
    # not a terminal: refuse to overwrite unless --yes
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["--get_pipeline_config", "anomaly_detection", "--save_path", str(written)]) == 2
    assert "--yes" in capsys.readouterr().err
    sub["batch_size"] = 2
    written.write_text(yaml.safe_dump(config))
    assert main(["--get_pipeline_config", "anomaly_detection", "--save_path", str(written), "--yes"]) == 0
    assert yaml.safe_load(written.read_text())["SubModules"]["AnomalyDetection"]["batch_size"] == 1
    sub["typo_key"] = 1
    written.write_text(yaml.safe_dump(config))
    with pytest.raises(Exception, match="typo_key"):
        create_pipeline(str(written))
    capsys.readouterr()
    assert main(["--get_pipeline_config", "anomaly_detection", "--save_path", "-"]) == 0  # to stdout, nothing written
    assert yaml.safe_load(capsys.readouterr().out) == get_pipeline_config("anomaly_detection")
    assert not (tmp_path / "-").exists() and not Path("-").exists()


@pytest.mark.parametrize("name", ["result.json", "result.png", "res.JPG"])
def test_a_save_path_that_names_a_file_is_refused_before_predicting(tmp_path, capsys, name) -> None:
    """--save_path is a folder of results: ``result.json`` used to become a folder of that name."""
    save = tmp_path / name
    assert main(["--pipeline", "anomaly_detection", "--input", str(DEMO), "--save_path", str(save)]) == 2
    err = capsys.readouterr().err
    assert f"--save_path: {save} names a file; give a folder" in err and len(err.strip().splitlines()) == 1
    assert not save.exists()
    save.mkdir()  # an existing folder of that name is a folder
    assert main(["--pipeline", "anomaly_detection", "--input", str(DEMO), "--save_path", str(save)]) == 0
    assert (save / "hazelnut_good_res.json").is_file()


def test_get_pipeline_config_at_a_terminal_asks_and_ctrl_d_is_no(tmp_path, monkeypatch, capsys) -> None:
    written = tmp_path / "Pipe.YAML"  # a file name in any case, not a folder
    assert main(["--get_pipeline_config", "anomaly_detection", "--save_path", str(written)]) == 0
    assert written.is_file()
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)

    def ctrl_d(prompt: str) -> str:
        raise EOFError

    monkeypatch.setattr("builtins.input", ctrl_d)
    before = written.read_text() + "# mine\n"
    written.write_text(before)
    assert main(["--get_pipeline_config", "anomaly_detection", "--save_path", str(written)]) == 2
    assert "not overwritten" in capsys.readouterr().err and written.read_text() == before
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["--get_pipeline_config", "anomaly_detection", "--save_path", str(written)]) == 0
    assert "# mine" not in written.read_text()


@pytest.mark.parametrize("key, value, allowed", [
    ("batch_size", "two", "an integer >= 1"), ("batch_size", 0, "an integer >= 1"),
    ("min_region_area", -3, "an integer >= 0"), ("recursive", "maybe", "true or false"),
    ("on_error", "skip", "one of result, raise"), ("json_arrays", "foo", "one of rle, list, png, none"),
    ("threshold", "high", "a number > 0 and < 1"), ("backend", "tensorrt", "one of auto")])
def test_a_bad_pipeline_setting_names_the_file_and_setting(tmp_path, capsys, key, value, allowed) -> None:
    """In an edited config file, through the CLI, and as a keyword of create_pipeline: one line,
    exit 2, before the model loads."""
    config = get_pipeline_config("anomaly_detection")
    config["SubModules"]["AnomalyDetection"][key] = value
    written = tmp_path / "edited.yaml"
    written.write_text(yaml.safe_dump(config))
    assert main(["--pipeline", str(written), "--input", str(DEMO), "--save_path", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(written) in err[0] and f"SubModules.AnomalyDetection.{key} must be {allowed}" in err[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(FlawscopeError, match=f"pipeline setting: {key} must be {allowed}"):
        create_pipeline("anomaly_detection", **{key: value})


def test_create_pipeline_refuses_unknown_settings_and_bad_devices_before_loading(tmp_path) -> None:
    """The model directory does not exist: each call must fail on its setting, not on the model."""
    missing = tmp_path / "no_model"
    with pytest.raises(FlawscopeError, match="unknown pipeline setting 'batchsize' .*batch_size"):
        create_pipeline("anomaly_detection", model_dir=missing, batchsize=2)
    with pytest.raises(FlawscopeError, match="pipeline setting: device"):
        create_pipeline("anomaly_detection", model_dir=missing, device="tpu:0")


def test_create_pipeline_takes_paths_and_partial_configs(trained) -> None:
    _, out = trained
    model_dir = out / "best_model/inference"
    by_path = create_pipeline("anomaly_detection", model_dir=model_dir, batch_size=2)
    assert by_path.predictor.batch_size == 2
    partial = create_pipeline(config={"SubModules": {"AnomalyDetection": {"model_dir": str(model_dir),
                                                                          "on_error": "raise"}}})
    assert partial.on_error == "raise" and partial.predictor.info.model == by_path.predictor.info.model


def test_quick_start_with_the_bundled_model(tmp_path, capsys) -> None:
    assert (default_model_dir() / "model.safetensors").stat().st_size < 10 * 2**20
    save = tmp_path / "output"
    assert main(["--pipeline", "anomaly_detection", "--input", str(DEMO), "--save_path", str(save)]) == 0
    printed = capsys.readouterr().out
    decisions = {Path(line.split("\t")[0]).name: line.split("is_anomaly=")[1] for line in printed.splitlines()}
    assert decisions == {"hazelnut_colour_defect.jpg": "True", "hazelnut_good.jpg": "False"}
    res = json.loads((save / "hazelnut_colour_defect_res.json").read_text())
    assert res["is_anomaly"] and res["regions"] and res["size"] == [512, 512]
    assert Image.open(save / "hazelnut_colour_defect_res.png").size == (512, 512)


def test_a_folder_with_an_unreadable_image_exits_2_after_saving_the_others(tmp_path, capsys) -> None:
    """Through the quick start and the predict mode alike: the good image's result is saved, the
    broken one is named with its problem, and the exit status tells a script that not all went well."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.jpg").write_bytes((DEMO / "hazelnut_good.jpg").read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    runs = {"pipeline": ["--pipeline", "anomaly_detection", "--input", str(folder), "--save_path", str(tmp_path / "a")],
            "module": ["-c", "STFPM", "-o", "Global.mode=predict", "-o", f"Predict.input={folder}",
                       "-o", f"Global.output={tmp_path / 'b'}"]}
    for name, argv in runs.items():
        assert main(argv) == 2, name
        captured = capsys.readouterr()
        assert f"{folder / 'broken.png'}\terror: " in captured.out and "is_anomaly=False" in captured.out
        assert captured.err.strip().splitlines()[-1] == (f"error: {folder / 'broken.png'}: not an image, or a corrupt or "
                                                          "unsupported image file (1 of 2 inputs could not be read)")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["good_res.json", "good_res.png"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["good_res.json", "good_res.png"]


def test_tabs_and_line_breaks_in_file_names_keep_one_line_per_result(tmp_path, capsys) -> None:
    """stdout is a line per input, tab-separated, and an error one line: a name may hold both."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a\tb.jpg").write_bytes((DEMO / "hazelnut_good.jpg").read_bytes())
    (folder / "bad\nname.png").write_bytes(b"not an image")
    assert main(["--pipeline", "anomaly_detection", "--input", str(folder), "--save_path", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == [f"{folder}/a\\tb.jpg",
                                                                           f"{folder}/bad\\nname.png"]
    assert captured.err.strip().splitlines()[-1].startswith(f"error: {folder}/bad\\nname.png: not an image")
    assert main(["--pipeline", "anomaly_detection", "--input", str(folder / "bad\nname.png"),
                 "--save_path", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"error: {folder}/bad\\nname.png: not an image, or a corrupt or unsupported "
                                       "image file\n")


def test_one_unreadable_input_is_one_error_line_naming_it(tmp_path, capsys) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["--pipeline", "anomaly_detection", "--input", str(broken), "--save_path", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {broken}: not an image, or a corrupt or unsupported image file"]


def test_same_file_names_in_two_folders_do_not_overwrite(trained, tmp_path, capsys) -> None:
    dataset, out = trained
    save = tmp_path / "out"
    assert main(["--pipeline", "anomaly_detection", "--model_dir", str(out / "best_model/inference"),
                 "--input", str(dataset / "test"), "--recursive", "--save_path", str(save)]) == 0
    # test/good/000.png and test/scratch/000.png both exist
    written = sorted(p.name for p in save.glob("*_res.json"))
    assert written == ["000_res.json", "001_res.json", "scratch_000_res.json", "scratch_001_res.json"]
    sources = {json.loads((save / name).read_text())["input_path"] for name in written}
    assert len(sources) == 4


def test_pipeline_save_settings_reach_every_file_and_no_two_outputs_share_a_name(trained, tmp_path, capsys) -> None:
    """json_arrays=png and save_extra from the pipeline file hold in the CLI and for results saved
    through the API; inputs a.png, a_res.png and A.png (a case-blind file system) get apart."""
    dataset, out = trained
    inputs = tmp_path / "in"
    image = (dataset / "test" / "scratch" / "000.png").read_bytes()
    for name in ("x/a.png", "x/a_res.png", "y/A.png"):
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        (inputs / name).write_bytes(image)
    config = get_pipeline_config("anomaly_detection")
    config["SubModules"]["AnomalyDetection"].update(json_arrays="png", save_extra=True, threshold=0.8,
                                                    model_dir=str(out / "best_model/inference"))
    written = tmp_path / "pipe.yaml"
    written.write_text(yaml.safe_dump(config))
    save = tmp_path / "out"
    assert main(["--pipeline", str(written), "--input", str(inputs), "--recursive", "--save_path", str(save)]) == 0
    assert len(list(save.iterdir())) == 3 * 6  # JSON, its two arrays, three pictures each
    assert sorted(p.name for p in save.glob("*.json")) == ["a_res.json", "a_res_res.json", "y_A_res.json"]
    for data in map(json.loads, map(Path.read_text, save.glob("*.json"))):
        assert Image.open(save / data["map"]).mode.startswith("I;16")
    good, missing = create_pipeline(str(written)).predict([str(inputs / "x/a.png"), str(tmp_path / "nope.png")])
    assert missing.error and missing.threshold == 0.8
    assert len(good.save_to_img(tmp_path / "api")) == 3
    assert json.loads(good.save_to_json(tmp_path / "api").read_text())["map"] == "a_res.map.png"


def test_a_reader_that_stops_early_stops_the_cli_quietly(tmp_path) -> None:
    """flawscope ... | head: the closed pipe ends the run with SIGPIPE's status, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    run = subprocess.run([sys.executable, "-m", "flawscope", "--pipeline", "anomaly_detection", "--input", str(DEMO),
                          "--save_path", str(tmp_path / "out")], stdout=write_end, stderr=subprocess.PIPE, text=True,
                         timeout=300)
    os.close(write_end)
    assert run.returncode == 141 and "Traceback" not in run.stderr


def test_threshold_override_changes_the_decision_not_the_score(trained) -> None:
    dataset, out = trained
    image = dataset / "test" / "scratch" / "000.png"
    (default,) = create_pipeline(model_dir=str(out / "best_model/inference")).predict(image)
    (strict,) = create_pipeline(model_dir=str(out / "best_model/inference"),
                                threshold=min(0.99, default.score + 0.01)).predict(image)
    assert strict.score == default.score and strict.is_anomaly is False and not strict.regions
    with pytest.raises(Exception, match="threshold"):
        create_pipeline(model_dir=str(out / "best_model/inference"), threshold=1.5)


def test_odd_inputs_become_error_results_and_the_others_go_on(pipeline, trained) -> None:
    """A malformed URL (port not a number, a space in it), encoded bytes, a PIL image that cannot
    be RGB or has no pixels: each is one error result in its place, not the end of the run."""
    dataset, _ = trained
    good = str(dataset / "test" / "good" / "000.png")
    odd = ["http://127.0.0.1:port/a.png", "http://127.0.0.1:1/a b.png", b"\x89PNG\r\n", Image.new("La", (4, 4)),
           Image.new("RGB", (0, 3))]
    results = list(pipeline.predict([good, *odd, good]))
    assert [r.error is None for r in results] == [True, False, False, False, False, False, True]
    assert "download failed" in results[1].error and "download failed" in results[2].error
    assert "bytes" in results[3].error and "La" in results[4].error and "empty" in results[5].error
    # Unnamed items are named by their place in the list (a camera's batch of arrays said "array" alone).
    assert results[3].error.startswith("inputs[3]: cannot predict on an object of type bytes")
    assert results[4].error.startswith("inputs[4] (PIL image): ")
    assert results[5].error.startswith("inputs[5] (PIL image): the image is empty")
    frame = np.zeros((8, 8, 3), np.uint8)
    errors = [r.error for r in pipeline.predict([frame, [frame, frame.astype(np.float32)], None])]
    assert errors == [None, None, "inputs[1][1] (array): array must be uint8 or uint16, got float32",
                      "inputs[2]: cannot predict on an object of type NoneType"]
    (alone,) = pipeline.predict(frame.astype(np.float32))
    assert alone.error == "array: array must be uint8 or uint16, got float32"
    # A file opened with PIL and cut short: its pixels are read when predicted (it said "cannot convert RGB to RGB").
    data = (DEMO / "hazelnut_good.jpg").read_bytes()
    (cut,) = pipeline.predict(Image.open(io.BytesIO(data[:len(data) // 2])))
    assert cut.error.startswith("PIL image: corrupt or truncated image (image file is truncated")


@pytest.fixture
def any_path_server(trained):
    """Serves one good image for any path; paths with "slow" trickle it out a few bytes at a time."""
    dataset, _ = trained
    body = (dataset / "test" / "good" / "000.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            step = 64 if "slow" in self.path else len(body)
            for start in range(0, len(body), step):
                self.wfile.write(body[start:start + step])
                self.wfile.flush()
                time.sleep(0.05 if step < len(body) else 0)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_with_odd_names_and_slow_servers(pipeline, any_path_server, monkeypatch) -> None:
    """A last segment of ".." or over a file name's length still downloads and predicts; an
    upper-case scheme is a URL; a server slower than the timeout in all is an error result, even
    though no single read waits that long."""
    base = any_path_server
    fine = [f"{base}/sub/..", f"{base}/{'a' * 300}.png", f"HTTP://{base.removeprefix('http://')}/x.png"]
    assert [r.error for r in pipeline.predict(fine)] == [None, None, None]
    monkeypatch.setattr("flawscope.inference.inputs.URL_TIMEOUT_S", 1)
    slow, after = pipeline.predict([f"{base}/slow.png", f"{base}/x.png"])
    assert slow.error == f"{base}/slow.png: download failed (not complete after 1 s)" and after.error is None


def test_arrays_and_pil_images_over_the_pixel_limit_are_error_results(pipeline, monkeypatch) -> None:
    monkeypatch.setattr("flawscope.inference.inputs.MAX_PIXELS", 99)
    results = list(pipeline.predict([np.zeros((10, 10), np.uint8), Image.new("RGB", (20, 5)),
                                     np.zeros((9, 11, 3), np.uint8)]))
    assert [r.error for r in results] == ["inputs[0] (array): image is too large (10x10 = 100 pixels, limit 99)",
                                          "inputs[1] (PIL image): image is too large (20x5 = 100 pixels, limit 99)",
                                          None]


def test_a_16_bit_pil_image_reads_as_the_same_file_does(pipeline, tmp_path) -> None:
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    from_file, from_pil = pipeline.predict([str(path), Image.fromarray(ramp)])
    assert from_pil.error is None and from_pil.score == pytest.approx(from_file.score)
    np.testing.assert_array_equal(from_pil.image, from_file.image)
    assert 100 < from_pil.image.mean() < 150  # scaled by the 16-bit range, not clipped to white


def test_numpy_numbers_are_settings_and_a_config_must_be_a_mapping(trained) -> None:
    _, out = trained
    pipe = create_pipeline(model_dir=out / "best_model/inference", batch_size=np.int64(3), threshold=np.float32(0.25))
    assert pipe.predictor.batch_size == 3 and type(pipe.predictor.batch_size) is int
    assert pipe.predictor.threshold == pytest.approx(0.25)
    with pytest.raises(FlawscopeError, match="config: must be a dict"):
        create_pipeline(config=[1])


def test_a_pipeline_file_that_is_not_utf8_repeats_a_key_or_names_no_device(tmp_path, capsys) -> None:
    unreadable = tmp_path / "binary.yaml"
    unreadable.write_bytes(b"\xff\xfe\x00junk")
    config = get_pipeline_config("anomaly_detection")
    config["SubModules"]["AnomalyDetection"]["device"] = "tpu"
    no_device = tmp_path / "tpu.yaml"
    no_device.write_text(yaml.safe_dump(config))
    twice = tmp_path / "twice.yaml"  # plain YAML would keep the second SubModules, without the model_dir
    twice.write_text(yaml.safe_dump(config) + "SubModules: {}\n")
    for path, problem in ((unreadable, "cannot read the pipeline config"),
                          (twice, f"invalid YAML at line {len(yaml.safe_dump(config).splitlines()) + 1}, column 1: "
                                  "'SubModules' appears twice in one mapping"),
                          (no_device, "SubModules.AnomalyDetection.device: 'tpu' is not a device")):
        assert main(["--pipeline", str(path), "--input", str(DEMO), "--save_path", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and problem in err[0]
    assert main(["--pipeline", "anomaly_detection", "--device", "tpu", "--input", str(DEMO),
                 "--save_path", str(tmp_path / "out")]) == 2
    assert "error: --device: 'tpu' is not a device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pipeline_options_with_a_module_config_are_refused(tmp_path, capsys) -> None:
    """-c predicts where Global.output says; a --save_path given with it would be ignored."""
    assert main(["-c", "STFPM", "-o", "Global.mode=predict", "-o", f"Predict.input={DEMO}",
                 "--save_path", str(tmp_path / "out"), "--batch_size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--save_path, --batch_size" in err[0] and "Global.output" in err[0]
    assert not (tmp_path / "out").exists()


def test_model_name_is_checked_against_the_model_and_a_config_names_a_known_pipeline(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="flawscope")
    create_pipeline(model_name="PatchCore")  # the bundled model is an STFPM: used, with a warning
    assert "the bundled STFPM model is used: model_name PatchCore chooses nothing" in caplog.text
    caplog.clear()
    create_pipeline()
    assert "chooses nothing" not in caplog.text
    with pytest.raises(FlawscopeError, match="config: pipeline_name must be one of anomaly_detection, got 'foo'"):
        create_pipeline(config={"pipeline_name": "foo"})


@pytest.mark.parametrize("device", ["", 0])
def test_an_empty_or_falsy_device_is_refused_not_ignored(device) -> None:
    with pytest.raises(FlawscopeError, match="device"):
        create_pipeline(device=device)


@pytest.mark.parametrize("kwargs, fragment", [({"on_error": "bogus"}, "on_error must be"),
                                              ({"recursive": "no"}, "recursive must be true or false")])
def test_bad_predict_arguments_are_flawscope_errors(kwargs, fragment) -> None:
    with pytest.raises(FlawscopeError, match=fragment):
        create_pipeline().predict(np.zeros((8, 8, 3), np.uint8), **kwargs)  # when called, not on the first result


def test_a_predictor_takes_device_names_as_the_configs_do() -> None:
    """torch's own error (RuntimeError: Expected one of cpu, cuda...) for 'gpu', a traceback."""
    assert Predictor.from_dir(None, "cpu").device == torch.device("cpu")
    with pytest.raises(FlawscopeError, match="device: 'nonsense' is not a device; use cpu, gpu"):
        Predictor.from_dir(None, "nonsense")


@pytest.mark.parametrize("batch_size", [1, 4])
def test_on_error_raise_yields_the_results_read_before_the_bad_input(trained, batch_size) -> None:
    dataset, out = trained
    good = sorted(str(p) for p in (dataset / "test").rglob("*.png"))[:2]
    predictor = create_pipeline(model_dir=str(out / "best_model/inference"), batch_size=batch_size)
    results = []
    with pytest.raises(FlawscopeError, match="missing.png"):
        for result in predictor.predict([*good, "missing.png", good[0]], on_error="raise"):
            results.append(result)
    assert [r.input_path for r in results] == good


def test_a_file_name_that_is_not_utf8_is_predicted_and_saved(tmp_path, capsys) -> None:
    """A Latin-1 name from an old share or USB stick: its result is saved, and the run succeeds."""
    folder = tmp_path / "in"
    folder.mkdir()
    Path(os.fsdecode(bytes(folder) + b"/caf\xe9.jpg")).write_bytes((DEMO / "hazelnut_good.jpg").read_bytes())
    assert main(["--pipeline", "anomaly_detection", "--input", str(folder), "--save_path", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["caf\ufffd_res.json", "caf\ufffd_res.png"]
    assert "caf\\udce9.jpg\tscore=" in capsys.readouterr().out


def test_a_folder_of_folders_in_module_mode_is_told_its_recursive_key(tmp_path, capsys) -> None:
    """-c refuses --recursive, so its hint is Predict.recursive, which descends (the module config had none)."""
    (tmp_path / "in" / "lot1").mkdir(parents=True)
    (tmp_path / "in" / "lot1" / "a.jpg").write_bytes((DEMO / "hazelnut_good.jpg").read_bytes())
    predict = ["-c", "STFPM", "-o", "Global.mode=predict", "-o", f"Predict.input={tmp_path / 'in'}",
               "-o", f"Global.output={tmp_path / 'out'}"]
    assert main(predict) == 2
    err = capsys.readouterr().err
    assert "-o Predict.recursive=true" in err and "--recursive" not in err
    assert main([*predict, "-o", "Predict.recursive=true"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_res.json", "a_res.png"]


@pytest.mark.parametrize("name", [["anomaly_detection"], {"anomaly_detection": None}])
def test_a_pipeline_name_that_is_not_text_is_refused(tmp_path, capsys, name) -> None:
    """A list or mapping where the name goes (an edited file): one error line, not TypeError: unhashable."""
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump({"pipeline_name": name}))
    assert main(["--pipeline", str(edited), "--input", str(DEMO), "--save_path", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {edited}: pipeline_name must be one of anomaly_detection, got {name!r}"]
    with pytest.raises(FlawscopeError, match=re.escape(f"config: pipeline_name must be one of anomaly_detection, "
                                                       f"got {name!r}")):
        create_pipeline(config={"pipeline_name": name})


def test_a_relative_model_dir_that_is_not_there_says_where_it_was_looked_for(tmp_path, monkeypatch) -> None:
    """A service started in / read a pipeline file's relative model_dir from there, with an error
    that named neither the key nor the folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FlawscopeError) as refused:
        create_pipeline("anomaly_detection", model_dir="pc/best_model/inference")
    assert str(refused.value) == ("SubModules.AnomalyDetection.model_dir: pc/best_model/inference does not exist in "
                                  f"the working folder {tmp_path}, which relative paths are from (as in PaddleX); "
                                  "give an absolute path")


def test_a_model_file_given_for_its_folder_says_so(trained) -> None:
    weights = trained[1] / "best_model/inference/model.safetensors"
    with pytest.raises(FlawscopeError, match=re.escape(f"{weights}: a file, not a model directory: give the folder "
                                                       f"that holds it ({weights.parent})")):
        create_pipeline("anomaly_detection", model_dir=weights)


def test_paddlexs_module_api_create_model_predicts_with_its_batch_size(trained, monkeypatch, caplog) -> None:
    """PaddleX's module code: create_model(model_name=...).predict(input, batch_size=...)."""
    from flawscope import create_model

    dataset, out = trained
    images = [p for p in sorted(dataset.rglob("*.png")) if "ground_truth" not in p.parts][:5]
    model = create_model(model_name="STFPM", model_dir=out / "best_model/inference")
    sizes = []
    raw_outputs = Predictor.raw_outputs
    monkeypatch.setattr(Predictor, "raw_outputs", lambda self, batch, inputs=None: sizes.append(len(batch))
                        or raw_outputs(self, batch, inputs))
    results = list(model.predict(images, batch_size=2))
    assert sizes == [2, 2, 1] and model.predictor.batch_size == 1  # this call's, not the pipeline's
    expected = list(create_pipeline(model_dir=out / "best_model/inference").predict(images))
    assert [r.score for r in results] == pytest.approx([r.score for r in expected], abs=1e-4)  # batched sums
    assert [r.score for r in create_model().predict(DEMO)] == pytest.approx(
        [r.score for r in create_pipeline().predict(DEMO)])  # the bundled STFPM, as PaddleX's default
    with pytest.raises(FlawscopeError, match="no bundled PatchCore model; give model_dir"):
        create_model(model_name="PatchCore")
    assert not caplog.records
    assert create_model(model_name="PatchCore", model_dir=out / "best_model/inference").predictor.info.model == "STFPM"
    assert [r.getMessage() for r in caplog.records] == [f"{out / 'best_model/inference'} holds a STFPM model: it is "
                                                        "used as it is (model_name PatchCore)"]
    with pytest.raises(FlawscopeError, match="batch_size must be a whole number >= 1, not 0"):
        model.predict(images, batch_size=0)


def test_paddlex_style_model_paths_point_to_the_model_directory(trained, tmp_path, capsys) -> None:
    """PaddleX's configs name best_model/model.pdparams, a best_model folder, or a weights URL."""
    best = trained[1] / "best_model"
    for given, told in ((best / "model.pdparams", f"{best / 'model.pdparams'}: a Paddle model file; flawscope reads "
                         "an inference model directory (a folder of inference.yml and model.safetensors, such as "
                         f"output/best_model/inference); give {best / 'inference'}"),
                        (best, f"{best}: not an inference model directory (missing inference.yml); give "
                               f"{best / 'inference'}"),
                        ("https://example.com/STFPM_pretrained.pdparams", "https://example.com/STFPM_pretrained.pdparams:"
                         " a URL of Paddle weights, which flawscope cannot read: a model directory is a local one that "
                         "flawscope wrote"),
                        ("https://example.com/model", "https://example.com/model: a URL; a model directory is a local "
                                                      "one: download it first")):
        with pytest.raises(FlawscopeError) as refused:
            create_pipeline("anomaly_detection", model_dir=given)
        assert str(refused.value) == told
    capsys.readouterr()
    assert main(["-c", "STFPM", "-o", "Global.mode=export", "-o", f"Global.output={tmp_path / 'x'}",
                 "-o", "Export.weight_path=https://example.com/STFPM_pretrained.pdparams"]) == 2
    assert "error: Export.weight_path: https://example.com/STFPM_pretrained.pdparams: a URL of Paddle" in capsys.readouterr().err
    # A dataset or checkpoint URL (PaddleX's demo data is one) was a folder "https:" that did not exist.
    for key, what in (("Global.dataset_dir", "a dataset directory"), ("Train.resume_path", "a checkpoint directory")):
        given = {"Global.dataset_dir": trained[0], key: "https://example.com/mvtec_examples.tar"}
        assert main(["-c", "STFPM", "-o", "Global.mode=train", "-o", f"Global.output={tmp_path / 'x'}",
                     *[arg for k, v in given.items() for arg in ("-o", f"{k}={v}")]]) == 2
        assert (f"error: https://example.com/mvtec_examples.tar: a URL; {what} is a local one: download it first"
                in capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_the_quick_start_takes_a_home_folder_as_the_module_cli_does(tmp_path, monkeypatch) -> None:
    """A launcher without a shell (systemd, a runner's argument list) passes "~" as it is: the
    output went to a folder named "~" in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(DEMO / "hazelnut_good.jpg", tmp_path / "part.jpg")
    (work := tmp_path / "work").mkdir()
    monkeypatch.chdir(work)
    assert main(["--pipeline", "anomaly_detection", "--input", "~/part.jpg", "--save_path", "~/out"]) == 0
    assert (tmp_path / "out/part_res.json").is_file() and not list(work.iterdir())


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_one_pipeline_shared_by_threads_gives_the_results_of_one_by_one_runs(backend) -> None:
    """As a service shares one pipeline among its request threads (README)."""
    from concurrent.futures import ThreadPoolExecutor

    pipeline = create_pipeline(backend=backend)
    images = [read_image(path) for path in sorted(DEMO.glob("*.jpg"))] * 4
    alone = [next(iter(pipeline.predict(image))) for image in images]
    with ThreadPoolExecutor(4) as pool:
        shared = list(pool.map(lambda image: next(iter(pipeline.predict(image))), images))
    for a, b in zip(alone, shared):
        assert a.score == b.score and np.array_equal(a.pred, b.pred) and np.allclose(a.map, b.map, atol=1e-6)


def _predict_in_child(pipeline, image: np.ndarray, results) -> None:
    (result,) = pipeline.predict(image)
    results.put(result.score)


def test_a_process_forked_after_torch_predicted_predicts_too(pipeline) -> None:
    """multiprocessing's default on Linux, and a server's preloaded workers: the children hung in
    their first prediction (GNU OpenMP's threads do not survive a fork)."""
    import multiprocessing

    image = np.full((64, 64, 3), 120, np.uint8)
    (parent,) = pipeline.predict(image)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_predict_in_child, args=(pipeline, image, results))
    child.start()
    child.join(60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0
    assert results.get(timeout=5) == pytest.approx(parent.score, abs=1e-5)  # one thread: sums in another order


def test_paddlexs_use_hpip_predicts_on_openvino(trained, tmp_path, capsys) -> None:
    """PaddleX's high-performance inference flag was an unknown argument; here it is OpenVINO."""
    model_dir = trained[1] / "best_model/inference"
    image = trained[0] / "test/scratch/000.png"
    fast = create_pipeline(model_dir=model_dir, use_hpip=True)
    assert fast.config["SubModules"]["AnomalyDetection"]["backend"] == "openvino"
    (expected,) = create_pipeline(model_dir=model_dir, backend="openvino").predict(image)
    assert main(["--pipeline", "anomaly_detection", "--input", str(image), "--model_dir", str(model_dir),
                 "--use_hpip", "--save_path", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out/000_res.json").read_text())["score"] == pytest.approx(expected.score, abs=1e-6)
    with pytest.raises(FlawscopeError, match="use_hpip runs the model on OpenVINO, but backend is 'torch'"):
        create_pipeline(model_dir=model_dir, use_hpip=True, backend="torch")
    with pytest.raises(FlawscopeError, match='use_hpip must be true or false, got "false"'):
        create_pipeline(model_dir=model_dir, use_hpip="false")
    capsys.readouterr()
    assert main(["-c", "STFPM", "--use_hpip", "-o", "Global.mode=predict"]) == 2
    assert "with -c set -o Predict.backend=openvino" in capsys.readouterr().err
