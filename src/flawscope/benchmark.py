"""``flawscope benchmark``: train, evaluate and time models on datasets, into one table.

    flawscope benchmark --datasets DIR [DIR ...] [--models STFPM [PatchCore]] [-o Section.key=value ...]
                        [--output DIR] [--batch_size N] [--repeats N]

Each (dataset, model) runs in a fresh child process (``python -m flawscope.benchmark SPEC``), so
its peak memory (the process's ``ru_maxrss`` high-water mark) is its own. In
``<output>/<dataset>/<model>/`` the child trains with the model's shipped config plus the
overrides (``Global.device`` among them), evaluates (``evaluate_result.json`` and the report), then
times the Predictor from decoded image to ``AnomalyResult`` (disk reads are not timed) at batch 1
and batch N: median and 95th percentile per image after warm-up, and throughput at batch N.
Evaluation and timing run on ``Predict.backend`` (``-o Predict.backend=onnxruntime``: the
exported graph). The parent writes ``benchmark.json`` (everything, with the machine) and
``benchmark.md`` (the table).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flawscope.atomic import write_atomic
from flawscope.config import load_config
from flawscope.data.io import read_image
from flawscope.data.layouts import load_dataset
from flawscope.device import parse_device, peak_rss_mb
from flawscope.engine import evaluate, train
from flawscope.errors import FlawscopeError
from flawscope.inference.backends import choose_backend
from flawscope.inference.predictor import Predictor
from flawscope.training.runner import check_model_settings

RUN_FILE = "benchmark_run.json"
WARMUP = 3

# (header, keys shown as "a / b", decimals) of benchmark.md; benchmark.json has every key of every run.
COLUMNS = (
    ("dataset", ("dataset",), None), ("model", ("model",), None),
    ("image AUROC", ("image_auroc",), 3), ("pixel AUROC", ("pixel_auroc",), 3), ("AUPRO", ("aupro",), 3),
    ("train (s)", ("train_wall_s",), 1), ("backend", ("backend",), None),
    ("latency b1, ms/img (median / p95)", ("latency_b1_median_ms", "latency_b1_p95_ms"), 1),
    ("latency bN, ms/img (median / p95)", ("latency_bn_median_ms", "latency_bn_p95_ms"), 1),
    ("throughput bN (img/s)", ("throughput_img_s",), 1),
    ("peak RSS, MB (train / whole run)", ("peak_rss_train_mb", "peak_rss_mb"), 0),
    ("peak GPU (MB)", ("peak_gpu_mb",), 0), ("model size (MB)", ("model_size_mb",), 1),
)


def _gpu_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def cpu_model() -> str:
    """The CPU's marketing name where the OS tells it, else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What the numbers depend on: platform, CPU, thread count, torch, GPU."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _percentiles(seconds: list[float], per: int) -> tuple[float, float]:
    """(median, p95) in milliseconds per image of timings of ``per`` images each."""
    ms = np.asarray(seconds) * 1000 / per
    return round(float(np.median(ms)), 3), round(float(np.percentile(ms, 95)), 3)


def time_inference(predictor: Predictor, images: list[np.ndarray], batch_size: int, repeats: int,
                   warmup: int = WARMUP) -> dict:
    """Latency of ``Predictor.predict`` on decoded images: batch 1, then batches of ``batch_size``."""

    def timed(p: Predictor, batch: list[np.ndarray]) -> float:
        start = time.perf_counter()
        for _ in p.predict(batch, on_error="raise"):
            pass
        return time.perf_counter() - start

    single = Predictor(predictor.model, predictor.info, predictor.device, batch_size=1)
    batched = Predictor(predictor.model, predictor.info, predictor.device, batch_size=batch_size)
    batch = [images[i % len(images)] for i in range(batch_size)]
    for i in range(warmup):
        timed(single, [images[i % len(images)]])
        timed(batched, batch)
    b1 = _percentiles([timed(single, [images[i % len(images)]]) for i in range(repeats)], 1)
    bn_seconds = [timed(batched, batch) for _ in range(repeats)]
    bn = _percentiles(bn_seconds, batch_size)
    return {"latency_b1_median_ms": b1[0], "latency_b1_p95_ms": b1[1],
            "latency_bn_median_ms": bn[0], "latency_bn_p95_ms": bn[1],
            "throughput_img_s": round(batch_size / float(np.median(bn_seconds)), 2)}


def _run_config(spec: dict, mode: str) -> dict:
    """The model's shipped config + the user's overrides; the benchmark's own keys come last: a
    run evaluates and times the model it trained, whatever model directory an override names."""
    return load_config(spec["model"], [*spec["overrides"], f"Global.mode={mode}",
                                       f"Global.dataset_dir={spec['dataset_dir']}", f"Global.output={spec['run_dir']}",
                                       "Evaluate.weight_path=null"])


def run_one(spec: dict) -> dict:
    """Train, evaluate and time one (dataset, model) in this process; what a benchmark child does."""
    cfg = _run_config(spec, "train")
    device = parse_device(cfg["Global"]["device"])[0]
    start = time.perf_counter()
    trained = train(cfg)
    train_wall = time.perf_counter() - start
    out = {"train_wall_s": round(train_wall, 2), "fit_s": trained["train_seconds"],
           "peak_rss_train_mb": round(peak_rss_mb(), 1), "peak_gpu_train_mb": _gpu_peak_mb(device)}
    eval_cfg = _run_config(spec, "evaluate")
    eval_cfg["Evaluate"]["backend"] = cfg["Predict"]["backend"]  # metrics and timings from the same backend
    evaluation = evaluate(eval_cfg)
    m = evaluation["metrics"]
    model_dir = Path(evaluation["model_dir"])
    backend = choose_backend(model_dir, cfg["Predict"]["backend"])
    predictor = Predictor.from_dir(model_dir, device, backend)
    samples = load_dataset(spec["dataset_dir"], cfg["CheckDataset"]["dataset_type"]).val
    images = [read_image(s.image) for s in samples[:max(spec["batch_size"], spec["repeats"])]]
    out |= {"backend": backend} | time_inference(predictor, images, spec["batch_size"], spec["repeats"], spec["warmup"])
    out |= {
        "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"],
        "image_f1": m["image_f1"], "pixel_f1": m["pixel_f1"], "paddlex_miou": m["paddlex_miou"],
        "num_eval_images": m["num_images"],
        "model_size_mb": round(sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file()) / 2**20, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), "peak_gpu_mb": _gpu_peak_mb(device),
        "torch_threads": torch.get_num_threads(), "device": str(device),
        "evaluate_report": evaluation["report"],
    }
    return out


def _child(spec_path: str) -> int:
    """Entry point of a benchmark child: run one spec, write its JSON next to the run."""
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run_one(spec)
    except FlawscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (Path(spec["run_dir"]) / RUN_FILE).write_text(json.dumps(result, indent=2))
    return 0


def _run_dirs(datasets: list[Path], models: list[str], output: Path) -> list[tuple[Path, str, str, Path]]:
    """(dataset dir, dataset name, model, run dir) for every pair: a folder per dataset, named
    after it, and in it one per model (a config file's by its stem), numbered where names repeat."""
    names = _unique([Path(os.path.abspath(d)).name for d in datasets])  # a link's own name, "." resolved
    models = list(dict.fromkeys(models))  # the same model twice is one run
    folders = _unique([Path(m).stem for m in models])
    return [(d, n, m, output / n / f) for d, n in zip(datasets, names) for m, f in zip(models, folders)]


def _unique(names: list[str]) -> list[str]:
    """``names`` with a repeated one numbered (``hz``, ``hz_2``), never onto a name taken before
    it or one that a later name is itself."""
    taken: list[str] = []
    for i, name in enumerate(names):
        candidate, number = name, 1
        while candidate in taken or (candidate != name and candidate in names[i + 1:]):
            number += 1
            candidate = f"{name}_{number}"
        taken.append(candidate)
    return taken


def _run_child(spec: dict) -> dict:
    """Run one spec in a fresh Python process; its row of the table (with the error if it failed)."""
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, log_path = run_dir / "benchmark_spec.json", run_dir / "benchmark.log"
    spec_path.write_text(json.dumps(spec, indent=2))
    (run_dir / RUN_FILE).unlink(missing_ok=True)
    print(f"[benchmark] {spec['dataset']} / {spec['model']}: training and evaluating in {run_dir}", flush=True)
    with open(log_path, "w") as log_file:
        code = subprocess.call([sys.executable, "-m", "flawscope.benchmark", str(spec_path)],
                               stdout=log_file, stderr=subprocess.STDOUT)
    row = {key: spec[key] for key in ("dataset", "dataset_dir", "model", "run_dir")}
    if code == 0:
        row |= {"status": "ok", **json.loads((run_dir / RUN_FILE).read_text())}
        print(f"[benchmark] {spec['dataset']} / {spec['model']}: " + ", ".join(
            f"{header} {' / '.join(_cell(row.get(k), d) for k in keys)}" for header, keys, d in COLUMNS[2:]), flush=True)
        return row
    error = _failure(code, log_path.read_text(errors="replace"))
    print(f"[benchmark] {spec['dataset']} / {spec['model']} failed: {error} (see {log_path})", flush=True)
    return row | {"status": "failed", "error": error}


def _failure(code: int, log: str) -> str:
    """Why a child failed: the signal that killed it (the out-of-memory killer's SIGKILL, most
    often: its last log line would be some warning), else its error line, else its last line."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:  # a real-time signal has no name
            name = str(-code)
        return f"killed by signal {name}" + (" (out of memory?)" if code == -signal.SIGKILL else "")
    lines = log.strip().splitlines()
    error = next((line for line in reversed(lines) if line.startswith("error: ")), None)
    return error.removeprefix("error: ") if error else lines[-1] if lines else f"exit status {code}"


def run_benchmark(datasets: list[str | Path], models: list[str], overrides: list[str], output: str | Path,
                  batch_size: int = 8, repeats: int = 20, warmup: int = WARMUP) -> dict:
    """Every (dataset, model), each in its own child process; ``benchmark.json``/``.md`` in ``output``.

    Everything a user can get wrong (a dataset, a model without a shipped config, an override, a
    device) is checked before the first run starts. A run that fails is recorded with its error
    and the others go on.
    """
    if batch_size < 1 or repeats < 1:
        raise FlawscopeError(f"--batch_size and --repeats must be >= 1, got {batch_size} and {repeats}")
    output = Path(output)
    specs = [{"dataset": name, "model": model, "overrides": list(overrides), "dataset_dir": str(dataset_dir),
              "run_dir": str(run_dir), "batch_size": batch_size, "repeats": repeats, "warmup": warmup}
             for dataset_dir, name, model, run_dir in _run_dirs([Path(d) for d in datasets], list(models), output)]
    for spec in specs:
        cfg = _run_config(spec, "train")
        device = parse_device(cfg["Global"]["device"])[0]
        if device.type != "cpu" and cfg["Predict"]["backend"] in ("onnxruntime", "openvino"):
            raise FlawscopeError(f"Predict.backend {cfg['Predict']['backend']} runs on the CPU only, not on "
                                 f"Global.device {cfg['Global']['device']}: the run would train and then fail")
        check_model_settings(cfg)
        if not load_dataset(spec["dataset_dir"], cfg["CheckDataset"]["dataset_type"]).val:
            raise FlawscopeError(f"{spec['dataset_dir']}: no test/validation images to evaluate on")
    report = {"machine": machine_info(),
              "settings": {"datasets": [str(d) for d in datasets], "models": list(models),
                           "overrides": list(overrides), "batch_size": batch_size, "repeats": repeats,
                           "warmup": warmup},
              "planned_runs": len(specs), "complete": False, "runs": []}
    _write_report(output, report)  # an earlier benchmark's table must not stand for this one's runs
    for spec in specs:
        report["runs"].append(_run_child(spec))
        report["complete"] = len(report["runs"]) == len(specs)
        _write_report(output, report)  # after each run: a stopped benchmark keeps the rows it finished
    return report


def _write_report(output: Path, report: dict) -> None:
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / "benchmark.json", json.dumps(report, indent=2).encode())
    write_atomic(output / "benchmark.md", markdown_table(report).encode())


def _cell(value, decimals: int | None) -> str:
    if value is None:
        return "n/a"
    return _text(str(value)) if decimals is None else f"{value:.{decimals}f}"


def _text(text: str) -> str:
    """A table cell's text: a ``|`` in a folder's name would split the cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(report: dict) -> str:
    """``benchmark.md``: the machine and settings, then one row per run."""
    machine, settings = report["machine"], report["settings"]
    lines = [
        "# flawscope benchmark", "",
        f"- Machine: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), {machine['platform']}, "
        f"GPU: {machine['gpu'] or 'none'}",
        f"- torch {machine['torch']}, {machine['torch_threads']} threads (OMP_NUM_THREADS="
        f"{machine['OMP_NUM_THREADS'] or 'unset'})",
        f"- Batch N = {settings['batch_size']}, {settings['repeats']} timed repeats after {settings['warmup']} "
        f"warm-up; latency = decoded image to AnomalyResult; train = the whole train mode (loading, fitting "
        f"with its periodic evaluations, calibration, with Train.add_calibration_images the second fit, the "
        f"last evaluation on the test split, saving)",
        f"- Overrides: {' '.join(settings['overrides']) or 'none'}", "",
        *([] if report.get("complete", True) else
          [f"**Incomplete: {len(report['runs'])} of {report['planned_runs']} runs so far (running, or stopped).**",
           ""]),
        "| " + " | ".join(header for header, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for run in report["runs"]:
        if run["status"] == "ok":
            lines.append("| " + " | ".join(" / ".join(_cell(run.get(k), d) for k in keys)
                                           for _, keys, d in COLUMNS) + " |")
        else:
            lines.append(f"| {_text(run['dataset'])} | {_text(run['model'])} | failed: {_text(run['error'])} |"
                         + " |" * (len(COLUMNS) - 3))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
