"""``flawscope benchmark`` end to end on two tiny synthetic datasets (each run in its own child)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_mvtec
from flawscope.benchmark import COLUMNS, _run_dirs, markdown_table
from flawscope.cli import main

TINY = ["Model.input_size=64", "Model.global_grid=1", "Train.epochs_iters=2", "Train.batch_size=2", "Train.calibration_fraction=0.3"]


def _args(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("-o", o)]


def test_benchmark_two_datasets(tmp_path, capsys) -> None:
    first = make_mvtec(tmp_path / "texture", n_train=5, n_good=1, n_defect=2, seed=1)
    second = make_mvtec(tmp_path / "other" / "texture", n_train=5, n_good=1, n_defect=2, seed=2)  # same name
    out = tmp_path / "bench"
    assert main(["benchmark", "--datasets", str(first), str(second), "--output", str(out),
                 "--batch_size", "2", "--repeats", "2", *_args(*TINY)]) == 0
    report = json.loads((out / "benchmark.json").read_text())
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
        assert (out / run["dataset"] / "STFPM" / "evaluate_result.json").is_file()
    table = (out / "benchmark.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| dataset"))
    assert header.count("|") == len(COLUMNS) + 1
    for name in ("image AUROC", "pixel AUROC", "AUPRO", "train (s)", "latency b1", "latency bN", "throughput",
                 "peak RSS", "model size"):
        assert name in header
    assert "benchmark.md" in capsys.readouterr().out


def test_failed_run_is_a_row_not_a_crash() -> None:
    report = {"machine": {"cpu": "x", "logical_cpus": 2, "platform": "p", "gpu": None, "torch": "t",
                          "torch_threads": 1, "OMP_NUM_THREADS": None},
              "settings": {"batch_size": 8, "repeats": 20, "warmup": 3, "overrides": []},
              "runs": [{"dataset": "d", "model": "STFPM", "status": "failed", "error": "error: a | b"}]}
    row = markdown_table(report).strip().splitlines()[-1]
    assert row.startswith("| d | STFPM | failed: error: a \\| b |") and row.count(" |") == len(COLUMNS)


@pytest.mark.parametrize("args, fragment", [
    (["--models", "NoSuchModel"], "NoSuchModel"),
    (["-o", "Train.epoch_iters=3"], "Train.epoch_iters"),
    (["-o", "Model.input_size=128"], "Model.global_grid: 4 does not split the 4x4 map"),
    (["-o", "Model.strides=[4,8,16]"], "global_strides [16, 32] must be among the strides [4, 8, 16]"),
    (["-o", "Model.backbone=resnet50"], "unknown backbone 'resnet50'"),
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
