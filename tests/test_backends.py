"""Prediction on ONNX Runtime and OpenVINO: the same decisions as torch, from a trained directory
(exported on the fly) or an exported one, through the Python API and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_mvtec

from flawscope import pipeline as pipeline_module
from flawscope.cli import main
from flawscope.data.io import read_image
from flawscope.errors import FlawscopeError
from flawscope.inference.backends import ExportedModel, one_torch_thread, torch_thread_budget
from flawscope.inference.export import export_model
from flawscope.inference.predictor import Predictor
from flawscope.pipeline import create_pipeline

GRAPHS = ("onnxruntime", "openvino")


def _images(dataset: Path) -> list[str]:
    return sorted(str(p) for p in (dataset / "test").glob("*/*.png"))


def _assert_same_results(expected, got) -> None:
    for a, b in zip(expected, got, strict=True):
        assert a.input_path == b.input_path
        # image scores with an image bank are in spreads of a few reference scores: float32 rounding shows more
        assert b.raw_score == pytest.approx(a.raw_score, rel=1e-3, abs=1e-5)
        assert b.is_anomaly == a.is_anomaly
        assert np.abs(a.map - b.map).max() < 1e-3
        assert (a.pred != b.pred).mean() < 1e-3  # pixels exactly at the threshold may flip


@pytest.fixture(scope="module")
def patchcore_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("patchcore")
    dataset = make_mvtec(base / "data")
    assert main(["-c", "PatchCore", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={dataset}",
                 "-o", f"Global.output={base / 'out'}", "-o", "Model.input_size=128", "-o", "Model.global_grid=2",
                 "-o", "Model.coreset_ratio=0.5", "-o", "Train.calibration_fraction=0.25"]) == 0
    return dataset, base / "out/best_model/inference"


@pytest.mark.parametrize("model", ["STFPM", "PatchCore"])
def test_exported_graphs_decide_like_torch(trained, patchcore_dir, model) -> None:
    dataset, model_dir = (trained[0], trained[1] / "best_model/inference") if model == "STFPM" else patchcore_dir
    images = _images(dataset)
    expected = list(Predictor.from_dir(model_dir, backend="torch").predict(images))
    assert any(r.is_anomaly for r in expected) and not all(r.is_anomaly for r in expected)
    for backend in GRAPHS:
        predictor = Predictor.from_dir(model_dir, backend=backend, batch_size=3)  # batches run image by image
        assert isinstance(predictor.model, ExportedModel) and predictor.model.backend == backend
        _assert_same_results(expected, list(predictor.predict(images)))


def test_an_exported_patchcore_holds_its_bank_once(patchcore_dir, tmp_path, monkeypatch) -> None:
    """The search runs over chunks of patches; the exporter did not recognise the bank buffers in
    the state dict (saved as float16 copies), so it embedded the bank once per chunk: a 92k-entry
    bank made a 5 GB graph that OpenVINO needed 11 GB to run."""
    import onnx
    from onnx import numpy_helper

    import flawscope.models.knn as knn

    _, model_dir = patchcore_dir
    model = Predictor.from_dir(model_dir, backend="torch").model
    entries, channels = model.memory_bank.shape
    monkeypatch.setattr(knn, "CHUNK_ELEMENTS", entries * 50)  # 50 patches a chunk: 6 chunks of the 256 an image
    export_model(model_dir, tmp_path)
    graph = onnx.load(str(tmp_path / "model.onnx"))
    tensors = [numpy_helper.to_array(t) for t in graph.graph.initializer]
    tensors += [numpy_helper.to_array(n.attribute[0].t) for n in graph.graph.node if n.op_type == "Constant"]
    assert sum(t.shape in ((entries, channels), (channels, entries)) for t in tensors) == 1
    expected = list(Predictor.from_dir(model_dir, backend="torch").predict(_images(patchcore_dir[0])[:4]))
    _assert_same_results(expected, list(Predictor.from_dir(tmp_path, backend="onnxruntime").predict(
        _images(patchcore_dir[0])[:4])))


def test_torch_runs_single_threaded_only_while_a_graph_predicts(trained, monkeypatch) -> None:
    """The runtime's threads must not compete with torch's; afterwards, even after an error, torch
    has its own count back."""
    predictor = Predictor.from_dir(trained[1] / "best_model/inference", backend="onnxruntime")
    threads, seen = torch.get_num_threads(), []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # as on a 2-core machine, wherever this runs
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n) or set_threads(n))

    def failing(x):
        seen.append(("inside", torch._C.get_num_threads()))
        raise RuntimeError("runtime failed")

    monkeypatch.setattr(predictor.model, "map_and_score", failing)
    with pytest.raises(RuntimeError, match="runtime failed"):
        predictor.raw_outputs([np.zeros((64, 64, 3), np.uint8)])
    assert seen == [1, ("inside", 1), 2]
    set_threads(threads)


def test_graphs_predict_one_at_a_time_across_threads(trained, monkeypatch) -> None:
    """Two threads must not interleave lowering and restoring torch's (per-process) thread count."""
    predictor = Predictor.from_dir(trained[1] / "best_model/inference", backend="onnxruntime")
    threads, entered, release, order = torch.get_num_threads(), threading.Event(), threading.Event(), []
    real = predictor.model.map_and_score

    def slow_first(x):
        order.append(threading.current_thread().name)
        if len(order) == 1:
            entered.set()
            release.wait(10)
        return real(x)

    monkeypatch.setattr(predictor.model, "map_and_score", slow_first)
    image = np.zeros((64, 64, 3), np.uint8)
    first = threading.Thread(target=predictor.raw_outputs, args=([image],), name="first")
    second = threading.Thread(target=predictor.raw_outputs, args=([image],), name="second")
    first.start()
    assert entered.wait(10)
    second.start()
    second.join(0.3)
    assert order == ["first"], "the second thread ran its graph while the first one held torch's threads"
    release.set()
    first.join(10)
    second.join(10)
    assert order == ["first", "second"] and torch.get_num_threads() == threads


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_an_exported_directory_predicts_and_evaluates_like_the_trained_one(trained, tmp_path, fmt) -> None:
    dataset, out = trained
    model_dir, exported = out / "best_model/inference", tmp_path / "export"
    common = ["-c", "STFPM", "-o", f"Global.dataset_dir={dataset}"]
    assert main([*common, "-o", "Global.mode=export", "-o", f"Global.output={tmp_path}",
                 "-o", f"Export.weight_path={model_dir}", "-o", f"Export.format={fmt}"]) == 0
    assert not (exported / "model.safetensors").exists()
    runs = {}
    for name, directory in (("torch", model_dir), ("exported", exported)):
        run_out = tmp_path / name
        assert main([*common, "-o", "Global.mode=predict", "-o", f"Global.output={run_out}",
                     "-o", f"Predict.model_dir={directory}", "-o", f"Predict.input={dataset}/test/*/*.png"]) == 0
        assert main([*common, "-o", "Global.mode=evaluate", "-o", f"Global.output={run_out}",
                     "-o", f"Evaluate.weight_path={directory}"]) == 0
        runs[name] = run_out
    results = sorted(runs["torch"].glob("*_res.json"))
    assert len(results) == len(_images(dataset))
    for result in results:
        a, b = json.loads(result.read_text()), json.loads((runs["exported"] / result.name).read_text())
        assert b["is_anomaly"] == a["is_anomaly"] and b["score"] == pytest.approx(a["score"], abs=1e-4)
    metrics = [json.loads((runs[n] / "evaluate_result.json").read_text())["metrics"] for n in ("torch", "exported")]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], abs=1e-3)
    if fmt == "onnx":  # OpenVINO runs an ONNX export as it is (it was refused: "no model.xml for backend openvino")
        predictor = Predictor.from_dir(exported, backend="openvino")
        assert predictor.model.backend == "openvino"
        onnxruntime = {r["input_path"]: r for r in map(json.loads, map(Path.read_text, runs["exported"].glob("*_res.json")))}
        got = list(predictor.predict(_images(dataset)))
        assert sorted(r.input_path for r in got) == sorted(onnxruntime)
        for r in got:
            assert r.is_anomaly == onnxruntime[r.input_path]["is_anomaly"]
            assert r.score == pytest.approx(onnxruntime[r.input_path]["score"], abs=1e-4)


def test_quick_start_with_a_backend(trained, tmp_path, capsys, monkeypatch) -> None:
    image = _images(trained[0])[-1]
    built, real = [], pipeline_module.AnomalyDetectionPipeline
    monkeypatch.setattr(pipeline_module, "AnomalyDetectionPipeline", lambda cfg: built.append(real(cfg)) or built[-1])
    assert main(["--pipeline", "anomaly_detection", "--input", image, "--save_path", str(tmp_path),
                 "--model_dir", str(trained[1] / "best_model/inference"), "--backend", "openvino"]) == 0
    assert built[0].predictor.model.backend == "openvino"
    assert f"{image}\tscore=" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*_res.json"))) == 1
    with pytest.raises(FlawscopeError, match='pipeline setting: backend must be one of auto, .*, got "tensorrt"'):
        create_pipeline(backend="tensorrt")


def test_backend_errors_name_the_directory_and_the_problem(trained, tmp_path) -> None:
    model_dir = trained[1] / "best_model/inference"
    taken = tmp_path / "export"
    taken.write_text("not a folder")
    with pytest.raises(FlawscopeError, match=f"{taken}: a file, not a folder to export into"):
        export_model(model_dir, taken)
    assert taken.read_text() == "not a folder"
    graphless = tmp_path / "only_description"
    graphless.mkdir()
    shutil.copy(model_dir / "inference.yml", graphless)
    with pytest.raises(FlawscopeError, match="no model here"):
        Predictor.from_dir(graphless)
    with pytest.raises(FlawscopeError, match=r"no model\.onnx for backend onnxruntime, and no model\.safetensors"):
        Predictor.from_dir(graphless, backend="onnxruntime")
    with pytest.raises(FlawscopeError, match="missing model.safetensors"):
        Predictor.from_dir(graphless, backend="torch")
    with pytest.raises(FlawscopeError, match="unknown backend 'tensorrt'"):
        Predictor.from_dir(model_dir, backend="tensorrt")
    with pytest.raises(FlawscopeError, match=f"{model_dir}: backend openvino runs on the CPU only"):
        Predictor.from_dir(model_dir, torch.device("cuda"), backend="openvino")  # as a GPU machine has it
    (graphless / "model.xml").write_text("<net>broken")
    (graphless / "model.bin").write_bytes(b"")
    # it offers only the backends that run what is there (it offered onnxruntime for an OpenVINO export)
    with pytest.raises(FlawscopeError, match=r"\(model\.xml\), which torch does not run: use backend auto or "
                                             r"openvino, or the trained"):
        Predictor.from_dir(graphless, backend="torch")
    (graphless / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(FlawscopeError, match=r"\(model\.onnx\), which torch does not run: use backend auto, "
                                             r"onnxruntime or openvino, or"):
        Predictor.from_dir(graphless, backend="torch")
    for backend, graph in (("onnxruntime", "model.onnx"), ("openvino", "model.xml")):
        with pytest.raises(FlawscopeError, match=f"{graphless / graph}: cannot be loaded by {backend} ") as info:
            Predictor.from_dir(graphless, backend=backend)
        message = str(info.value)
        assert "\n" not in message and "Exception from" not in message


def test_an_export_whose_description_has_another_input_size_fails_on_loading(trained, tmp_path) -> None:
    model_dir = trained[1] / "best_model/inference"
    for fmt, backend in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        exported = tmp_path / fmt
        export_model(model_dir, exported, fmt)
        meta = exported / "inference.yml"
        meta.write_text(meta.read_text().replace("input_size: 64", "input_size: 96"))
        with pytest.raises(FlawscopeError, match=r"does not take the 96x96 input that inference\.yml") as info:
            Predictor.from_dir(exported, backend=backend)
        assert "\n" not in str(info.value)


def test_an_export_replaces_the_graphs_of_an_earlier_export_in_its_folder(trained, tmp_path) -> None:
    model_dir, exported = trained[1] / "best_model/inference", tmp_path / "export"
    (exported / ".export.killed").mkdir(parents=True)  # what an export killed half-way leaves
    (exported / ".export.killed" / "model.onnx").write_bytes(b"half")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (exported / f".export.{dead.stdout.strip()}.abc").mkdir()  # and one of an export that ended since
    running = exported / f".export.{os.getppid()}.abc"  # another export, still running: its staging stays
    running.mkdir()
    hours_ago = time.time() - 2 * 3600  # leftovers are an hour old at least
    for leftover in exported.iterdir():
        os.utime(leftover, (hours_ago, hours_ago))
    export_model(model_dir, exported, "openvino")
    running.rmdir()
    assert {p.name for p in exported.iterdir()} == {"inference.yml", "model.xml", "model.bin"}
    export_model(model_dir, exported, "onnx")
    # a model.xml left beside would be what "auto" picks first
    assert {p.name for p in exported.iterdir()} == {"inference.yml", "model.onnx"}
    assert Predictor.from_dir(exported).model.backend == "onnxruntime"


def test_a_bad_backend_in_the_config_is_a_config_error(tmp_path, capsys) -> None:
    assert main(["-c", "STFPM", "-o", "Global.mode=predict", "-o", "Predict.backend=tensorrt",
                 "-o", f"Global.output={tmp_path / 'out'}"]) == 2
    assert "Predict.backend" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_patchcore_with_feature_dim_and_approximate_search_exports_without_faiss(tmp_path, monkeypatch) -> None:
    """Channel pooling is a constant matrix in the graph (adaptive pooling did not export), and the
    graph searches exactly, so a deployment machine needs no faiss for an approximate model."""
    from flawscope.inference.model_dir import load_model_dir
    from flawscope.models import knn

    dataset = make_mvtec(tmp_path / "data")
    assert main(["-c", "PatchCore", "-o", "Global.mode=train", "-o", f"Global.dataset_dir={dataset}",
                 "-o", f"Global.output={tmp_path / 'out'}", "-o", "Model.input_size=128", "-o", "Model.global_grid=2",
                 "-o", "Model.feature_dim=64", "-o", "Model.search=approximate",
                 "-o", "Train.calibration_fraction=0.25"]) == 0
    model_dir = tmp_path / "out/best_model/inference"
    images = _images(dataset)
    expected = list(Predictor(*load_model_dir(model_dir, exact_search=True)).predict(images))
    monkeypatch.setattr(knn, "faiss", None)
    export_model(model_dir, tmp_path / "export", "onnx")
    _assert_same_results(expected, list(Predictor.from_dir(tmp_path / "export").predict(images)))
    with pytest.raises(FlawscopeError, match=r"inference\.yml: .*approximate.*faiss"):
        Predictor.from_dir(model_dir, backend="torch")  # torch itself would search with faiss


def test_a_model_too_large_for_one_onnx_file_is_refused_before_tracing(trained, tmp_path, monkeypatch) -> None:
    from flawscope.inference import export

    monkeypatch.setattr(export, "_ONNX_FILE_LIMIT", 1000)
    with pytest.raises(FlawscopeError, match=r"GiB of weights and banks, over the 2 GiB an ONNX file can hold"):
        export_model(trained[1] / "best_model/inference", tmp_path / "export", "onnx")
    assert not (tmp_path / "export").exists()


def test_a_model_swapped_in_while_it_is_read_is_read_again_whole(trained, tmp_path, monkeypatch) -> None:
    """A training swapping in its new model between the reads of inference.yml and the weights
    paired one model's thresholds with the other's weights, silently."""
    import flawscope.inference.backends as backends
    from flawscope.atomic import swap_in

    source = trained[1] / "best_model/inference"
    live, newer = tmp_path / "live", tmp_path / ".newer"
    shutil.copytree(source, live)
    shutil.copytree(source, newer)
    meta = newer / "inference.yml"
    threshold = Predictor.from_dir(source).info.calibration.image_threshold
    meta.write_text(meta.read_text().replace(f"image_threshold: {threshold}", "image_threshold: 123.5"))
    real_load = backends.load_model_dir

    def swapped_meanwhile(model_dir, device):
        if newer.exists():  # the training's swap lands after inference.yml was read
            swap_in(newer, live)
        return real_load(model_dir, device)

    monkeypatch.setattr(backends, "load_model_dir", swapped_meanwhile)
    model, info = backends.load_backend(live, "cpu", "torch")
    assert info.calibration.image_threshold == 123.5 and not newer.exists()


def test_two_threads_exporting_at_once_both_load(trained) -> None:
    """torch's exporter keeps its state in globals: two pipelines loading an exported backend in two
    threads at once failed an assertion inside it."""
    from concurrent.futures import ThreadPoolExecutor

    model_dir = trained[1] / "best_model/inference"
    image = read_image(next((trained[0] / "test" / "good").iterdir()))
    with ThreadPoolExecutor(2) as pool:
        loaded = list(pool.map(lambda _: Predictor.from_dir(model_dir, backend="onnxruntime"), range(2)))
    assert loaded[0].raw_outputs([image])[0][1] == loaded[1].raw_outputs([image])[0][1]


def test_exporting_and_predicting_with_the_runtimes_sends_nothing(trained, tmp_path) -> None:
    """flawscope works offline: importing OpenVINO reported it to Google Analytics (from a forked
    process, which hung a test run; its client id and counts in ~/intel), and ONNX Runtime records
    usage events under ~/.cache/Microsoft from its import on."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME", "CI")}
    model_dir, image = trained[1] / "best_model/inference", _images(trained[0])[0]
    for fmt, backend in (("openvino", "openvino"), ("onnx", "onnxruntime")):
        out = tmp_path / fmt
        for mode in (["Global.mode=export", f"Export.weight_path={model_dir}", f"Export.format={fmt}"],
                     ["Global.mode=predict", f"Predict.model_dir={out / 'export'}", f"Predict.input={image}",
                      f"Predict.backend={backend}"]):
            args = [arg for override in [f"Global.output={out}", *mode] for arg in ("-o", override)]
            subprocess.run([sys.executable, "-m", "flawscope", "-c", "STFPM", *args], env=env | {"HOME": str(home)},
                           check=True, capture_output=True)
    assert not (home / "intel").exists() and not (home / ".cache" / "Microsoft").exists()


def test_a_thread_that_first_ran_torch_while_a_graph_predicted_does_not_leave_the_process_on_one() -> None:
    """A service's thread that first ran torch while another predicted with an exported graph keeps
    torch's count of that moment, 1; its own prediction then 'restored' 1 for the process, so every
    later thread ran torch on one thread, and models loaded later ran their runtimes on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    started, release, seen = threading.Event(), threading.Event(), {}

    def predicting() -> None:
        with one_torch_thread():
            started.set()
            release.wait()

    def late_thread() -> None:
        seen["first"] = torch.get_num_threads()  # its first torch call, while the other predicts
        release.set()
        other.join()
        with one_torch_thread():  # its own prediction
            pass
        seen["budget"] = torch_thread_budget()  # what a model it loads now gets

    def new_thread() -> None:
        seen["new"] = torch.get_num_threads()

    try:
        other = threading.Thread(target=predicting)
        other.start()
        started.wait()
        for target in (late_thread, new_thread):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
        assert seen == {"first": 1, "budget": 2, "new": 2} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_export_for_one_run_does_not_name_its_temporary_folder(trained, caplog) -> None:
    """It said 'exported ... to /tmp/flawscope_export_.../model.xml', a folder gone by the end of the run."""
    caplog.set_level("INFO", logger="flawscope")
    Predictor.from_dir(trained[1] / "best_model/inference", backend="onnxruntime")
    assert "for onnxruntime, for this run only" in caplog.text and "flawscope_export_" not in caplog.text
