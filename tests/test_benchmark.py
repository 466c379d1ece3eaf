"""``flawscope benchmark`` end to end on two tiny synthetic datasets (each run in its own child)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

import pytest

from conftest import make_mvtec
from flawscope.benchmark import COLUMNS, _failure, _run_dirs, markdown_table
from flawscope.cli import main
from flawscope.device import peak_rss_mb

TINY = ["Model.input_size=64", "Model.global_grid=1", "Train.epochs_iters=2", "Train.batch_size=2", "Train.calibration_fraction=0.3"]


def _args(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("-o", o)]


def test_benchmark_two_datasets(tmp_path, capsys) -> None:
    first = make_mvtec(tmp_path / "texture", n_train=5, n_good=1, n_defect=2, seed=1)
    second = make_mvtec(tmp_path / "other" / "texture", n_train=5, n_good=1, n_defect=2, seed=2)  # same name
    out = tmp_path / "bench"
    (out / "benchmark.md").parent.mkdir()
    (out / "benchmark.md").write_text("an earlier benchmark's table")
    elsewhere = f"Evaluate.weight_path={tmp_path / 'another_model'}"  # each run evaluates the model it trained
    assert main(["benchmark", "--datasets", str(first), str(second), "--output", str(out),
                 "--batch_size", "2", "--repeats", "2", *_args(*TINY, elsewhere)]) == 0
    report = json.loads((out / "benchmark.json").read_text())
    assert report["complete"] is True
    assert set(report["machine"]) >= {"platform", "cpu", "torch_threads", "gpu"}
    runs = report["runs"]
    assert [(r["dataset"], r["model"], r["status"]) for r in runs] == [("texture", "STFPM", "ok"),
                                                                       ("texture_2", "STFPM", "ok")]
    for run in runs:
        for _, keys, _ in COLUMNS[2:]:
            for key in keys:
                assert key in run, key
        assert run["latency_b1_median_ms"] > 0 and run["throughput_img_s"] > 0
        assert run["peak_rss_mb"] >= run["peak_rss_train_mb"] > 50 and run["model_size_mb"] > 1
        assert run["peak_gpu_mb"] is None and run["torch_threads"] >= 1
        evaluation = json.loads((out / run["dataset"] / "STFPM" / "evaluate_result.json").read_text())
        assert Path(evaluation["model_dir"]).parent.parent == Path(run["run_dir"])
    table = (out / "benchmark.md").read_text()
    assert "Incomplete" not in table and "earlier" not in table
    header = next(line for line in table.splitlines() if line.startswith("| dataset"))
    assert header.count("|") == len(COLUMNS) + 1
    for name in ("image AUROC", "pixel AUROC", "AUPRO", "train (s)", "latency b1", "latency bN", "throughput",
                 "peak RSS", "model size"):
        assert name in header
    printed = capsys.readouterr().out  # the numbers on the terminal, not only in a file
    assert "benchmark.md" in printed and table in printed
    ok_lines = [line for line in printed.splitlines() if line.startswith("[benchmark] texture") and "image AUROC" in line]
    assert len(ok_lines) == 2 and f"image AUROC {runs[0]['image_auroc']:.3f}" in ok_lines[0]


def test_failed_run_is_a_row_not_a_crash() -> None:
    report = {"machine": {"cpu": "x", "logical_cpus": 2, "platform": "p", "gpu": None, "torch": "t",
                          "torch_threads": 1, "OMP_NUM_THREADS": None},
              "settings": {"batch_size": 8, "repeats": 20, "warmup": 3, "overrides": []},
              "runs": [{"dataset": "d", "model": "STFPM", "status": "failed", "error": "a | b"}]}
    row = markdown_table(report).strip().splitlines()[-1]
    assert row.startswith("| d | STFPM | failed: a \\| b |") and row.count(" |") == len(COLUMNS)


def test_names_with_a_pipe_keep_the_table_whole_and_an_incomplete_one_says_so() -> None:
    report = {"machine": {"cpu": "x", "logical_cpus": 2, "platform": "p", "gpu": None, "torch": "t",
                          "torch_threads": 1, "OMP_NUM_THREADS": None},
              "settings": {"batch_size": 8, "repeats": 20, "warmup": 3, "overrides": [], "datasets": ["a", "b"],
                           "models": ["STFPM"]},
              "planned_runs": 3, "complete": False,  # the planned runs, not datasets x models (a model listed twice)
              "runs": [{"dataset": "lot|7", "model": "STFPM", "status": "ok"}]}
    table = markdown_table(report)
    assert "**Incomplete: 1 of 3 runs so far" in table
    row = table.strip().splitlines()[-1]
    assert row.startswith("| lot\\|7 | STFPM |") and row.replace("\\|", "").count("|") == len(COLUMNS) + 1


def test_a_killed_run_says_it_was_killed_and_an_error_line_beats_a_later_warning() -> None:
    assert _failure(-signal.SIGKILL, "a warning") == "killed by signal SIGKILL (out of memory?)"
    assert _failure(2, "error: bad image\nWARNING: a late warning\n") == "bad image"  # "failed: error:" before
    assert _failure(1, "Traceback\nValueError: x\n") == "ValueError: x" and _failure(3, "") == "exit status 3"
    assert _failure(-40, "") == "killed by signal 40"  # a real-time signal has no name (a ValueError before)


def test_peak_memory_is_read_in_a_process_whose_name_is_not_ascii(tmp_path) -> None:
    """/proc/self/status opens with the process's name: read as ASCII, training crashed at its end."""
    script = tmp_path / "prüfe.py"
    script.write_text(f"#!{sys.executable}\nfrom flawscope.device import peak_rss_mb\nprint(peak_rss_mb())\n")
    script.chmod(0o755)
    assert float(subprocess.run([str(script)], capture_output=True, text=True, check=True).stdout) > 10


def test_a_child_reports_its_own_peak_memory_not_its_parents() -> None:
    """Linux's ru_maxrss starts a new program at its parent's peak: a benchmark child called from a
    process that had held 1.5 GB reported 1.7 GB for its own 0.4 GB."""
    held = np.ones(400 << 20, np.uint8)  # this process: at least 400 MB more at its peak than the child imports
    held[::4096] = 2
    own = peak_rss_mb()
    code = "from flawscope.device import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del held
    # python, numpy and torch's imports: 150-250 MB with a CPU build of torch, 500 with a CUDA one
    assert child < own - 300


def test_an_exported_backend_on_a_gpu_fails_before_any_run(tmp_path, capsys, monkeypatch) -> None:
    """ONNX Runtime and OpenVINO run on the CPU: asked for beside a GPU, the child trained in full and
    failed when it evaluated."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    data = make_mvtec(tmp_path / "data", n_train=3, n_good=1, n_defect=1)
    out = tmp_path / "bench"
    assert main(["benchmark", "--datasets", str(data), "--output", str(out),
                 *_args("Global.device=gpu", "Predict.backend=onnxruntime")]) == 2
    assert "Predict.backend onnxruntime runs on the CPU only, not on Global.device gpu" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args, fragment", [
    (["--models", "NoSuchModel"], "NoSuchModel"),
    (["-o", "Train.epoch_iters=3"], "Train.epoch_iters"),
    (["-o", "Model.input_size=128"], "Model.global_grid: 4 does not split the 4x4 map"),
    (["-o", "Model.strides=[4,8,16]"], "global_strides [16, 32] must be among the strides [4, 8, 16]"),
    (["-o", "Model.backbone=resnet50"], 'Model.backbone must be one of efficientnet_lite0, efficientnet_lite1, '
                                        'efficientnet_lite2, resnet18, wide_resnet50_2, got "resnet50"'),
])
def test_bad_arguments_fail_before_any_run(tmp_path, capsys, args, fragment) -> None:
    data = make_mvtec(tmp_path / "data", n_train=3, n_good=1, n_defect=1)
    out = tmp_path / "bench"
    assert main(["benchmark", "--datasets", str(data), "--output", str(out), *args]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def test_every_run_gets_its_own_folder() -> None:
    """Datasets hz, hz_2 and hz again, the same model twice, and config files by path: no run
    writes into another's folder, and none into the config file's own path."""
    runs = _run_dirs([Path("/a/hz"), Path("/b/hz_2"), Path("/c/hz")],
                     ["PatchCore", "PatchCore", "/tmp/mine.yaml", "/x/PatchCore.yaml"], Path("out"))
    folders = [run_dir for *_, run_dir in runs]
    assert len(runs) == 3 * 3 and len(set(folders)) == len(folders)
    assert {f.parent.name for f in folders} == {"hz", "hz_2", "hz_3"}
    assert {f.name for f in folders} == {"PatchCore", "mine", "PatchCore_2"}


def test_a_dataset_given_through_a_link_is_named_after_the_link(tmp_path) -> None:
    (tmp_path / "tex").mkdir()
    (tmp_path / "bottle").symlink_to(tmp_path / "tex")
    assert [name for _, name, _, _ in _run_dirs([tmp_path / "bottle", tmp_path / "tex" / ".."], ["STFPM"], tmp_path)] \
        == ["bottle", tmp_path.name]
