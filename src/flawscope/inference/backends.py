"""Where a model runs: in torch, or as its exported graph in ONNX Runtime or OpenVINO.

Every backend offers the torch models' ``map_and_score``: a normalised Bx3xSxS float32 batch in,
the raw Bx1xSxS anomaly maps and B image scores out. So the Predictor, evaluation and the benchmark
work the same on each, and an exported directory (``Global.mode=export``) predicts and evaluates
like the trained one. On a CPU the exported graphs run the model up to 4x faster than torch,
depending on the model and the runtime (docs/benchmarks.md); torch is the default because it also
runs on GPUs and needs no extra package. The runtimes use as many threads as torch is set to.
An exported PatchCore searches its bank exactly, also when ``Model.search=approximate`` made torch
use faiss's approximate index.

``backend="auto"`` runs what the directory holds: the torch weights, else ``model.xml``, else
``model.onnx``. Naming ``onnxruntime`` or ``openvino`` for a trained directory exports it first,
into a temporary folder, in the few seconds that export takes.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flawscope.config import BACKENDS
from flawscope.data.io import check_local
from flawscope.errors import FlawscopeError, first_line
from flawscope.inference.export import ONNX_FILE, OPENVINO_FILE, OPENVINO_WEIGHTS, export_model
from flawscope.inference.model_dir import (
    META_FILE,
    WEIGHTS_FILE,
    ModelInfo,
    check_files,
    load_model_dir,
    read_model_info,
)
from flawscope.inference.runtimes import import_runtime
from flawscope.logs import log

_GRAPH_OF_BACKEND = {"onnxruntime": ONNX_FILE, "openvino": OPENVINO_FILE}
_EXTRAS = {"onnxruntime": "export", "openvino": "openvino"}  # the pip extra that installs each runtime

GraphRun = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]  # named inputs -> (map, score)


class ExportedModel:
    """An exported graph with the torch models' ``map_and_score``; the graph takes one image, so
    a batch runs image by image (batch 1 is also what these runtimes are fastest at on a CPU)."""

    def __init__(self, run: GraphRun, backend: str) -> None:
        self._run, self.backend = run, backend

    def map_and_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [self._run({"image": np.ascontiguousarray(x[i : i + 1].cpu().numpy(), dtype=np.float32)})
                   for i in range(len(x))]
        maps = np.concatenate([m for m, _ in outputs])
        scores = np.concatenate([np.reshape(s, (-1,)) for _, s in outputs])
        return torch.from_numpy(maps), torch.from_numpy(scores)


def _onnxruntime(path: Path, threads: int) -> GraphRun:
    ort = import_runtime("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: tuple(session.run(["anomaly_map", "image_score"], feeds))


def _openvino(path: Path, threads: int) -> GraphRun:
    ov = import_runtime("openvino")
    core = ov.Core()
    # Read into memory, not mapped from disk: an on-the-fly export's folder is deleted after loading.
    # An ONNX graph (``graph_run``'s other format) is read whole by its front end.
    model = core.read_model(str(path)) if path.suffix == ".onnx" else \
        core.read_model(model=path.read_bytes(), weights=path.with_suffix(".bin").read_bytes())
    # f32: OpenVINO's default bf16 on recent CPUs changes the scores; LATENCY: one image at a time.
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    maps, scores = compiled.output("anomaly_map"), compiled.output("image_score")

    def run(feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        out = request.infer(feeds)
        return out[maps].copy(), out[scores].copy()  # a batch's later images may reuse the request's buffers

    return run


def _require(backend: str) -> None:
    try:
        import_runtime(backend)
    except ImportError:
        raise FlawscopeError(f"backend {backend}: the {backend} package is missing; "
                             f"pip install 'flawscope[{_EXTRAS[backend]}]'") from None


def graph_run(path: Path, backend: str, threads: int) -> GraphRun:
    """A graph with outputs ``anomaly_map`` and ``image_score`` (``model.onnx``, ``model.xml``, or
    a part of a model exported the same way, as the benchmarks do), run as the Predictor runs it."""
    return _onnxruntime(path, threads) if backend == "onnxruntime" else _openvino(path, threads)


# Held while an exported graph predicts, so that two threads cannot interleave saving and restoring
# torch's thread count (and leave it at one). Re-entrant: a caller may nest predictions.
_GRAPH_LOCK = threading.RLock()


def torch_thread_budget() -> int:
    """torch's thread count for the process, not one a thread kept: a thread takes torch's count
    when it first runs torch and keeps it, so one that first ran while a graph predicted elsewhere
    (``one_torch_thread``) reads 1, and restoring or passing on that 1 left a service's later
    threads and models on one thread. Such a count is read again in a new thread, which takes
    the process's."""
    with _GRAPH_LOCK:  # not while a graph predicts: the process's count is 1 then
        threads = torch.get_num_threads()
        if threads > 1:
            return threads
        found: list[int] = []
        reader = threading.Thread(target=lambda: found.append(torch.get_num_threads()))
        reader.start()
        reader.join()
        return found[0]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread while an exported graph predicts: the runtime has its own threads, and
    torch's idle ones spinning beside them cost 25-50% latency on a 2-core machine.

    torch's thread count is per process, so exported graphs predict one at a time across a
    process's Python threads (the runtime already uses every core it is given); torch work in
    other threads meanwhile runs on one thread too.
    """
    with _GRAPH_LOCK:
        threads = torch_thread_budget()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _load_graph(path: Path, backend: str, input_size: int) -> ExportedModel:
    """The graph, run once on a blank input of ``inference.yml``'s size: a graph that does not fit
    its description (an edited ``input_size``) fails here in one line, not on the first image."""
    threads = torch_thread_budget()  # the same thread budget as torch (and faiss) get
    try:
        run = graph_run(path, backend, threads)
    except Exception as exc:  # the runtimes raise their own error types for a damaged graph
        raise FlawscopeError(f"{path}: cannot be loaded by {backend} ({first_line(exc)})") from None
    try:
        run({"image": np.zeros((1, 3, input_size, input_size), np.float32)})
    except Exception as exc:
        raise FlawscopeError(f"{path}: does not take the {input_size}x{input_size} input that {META_FILE} "
                             f"beside it gives ({first_line(exc)})") from None
    return ExportedModel(run, backend)


def _warn_if_trained_since(model_dir: Path, info: ModelInfo) -> None:
    """An export in a training output (``output/export``) whose weights are not those of the
    ``best_model`` beside it: the output was trained again and not exported again since, and a
    line that predicts from the export would run the earlier model without a word."""
    trained = model_dir.parent / "best_model" / "inference"
    if not (trained / META_FILE).is_file():
        return
    try:
        current = read_model_info(trained)
    except FlawscopeError:  # that folder's own problem, met when it is used
        return
    exported, weights = info.files.get(WEIGHTS_FILE), current.files.get(WEIGHTS_FILE)
    if exported and weights:
        trained_since = weights != exported
    else:  # an earlier release's folders hold no digests: a new training shows in its thresholds
        trained_since = current.calibration != info.calibration
    if trained_since:
        log.warning("%s was exported from an earlier model than %s beside it (trained again since): export again "
                    "to predict with the new one", model_dir, trained)


def _graph(model_dir: Path, backend: str) -> Path | None:
    """The graph in ``model_dir`` that ``backend`` runs: its own, or for OpenVINO an ONNX export,
    which it reads as it is (an export made for ONNX Runtime, or before OpenVINO IR)."""
    for name in (_GRAPH_OF_BACKEND[backend], ONNX_FILE) if backend == "openvino" else (_GRAPH_OF_BACKEND[backend],):
        if (model_dir / name).is_file():
            return model_dir / name
    return None


def choose_backend(model_dir: Path, backend: str) -> str:
    """The backend ``auto`` stands for in ``model_dir``: the first of torch, openvino, onnxruntime it holds."""
    if backend not in BACKENDS:
        raise FlawscopeError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    for name, file in (("torch", WEIGHTS_FILE), ("openvino", OPENVINO_FILE), ("onnxruntime", ONNX_FILE)):
        if (model_dir / file).is_file():
            return name
    raise FlawscopeError(f"{model_dir}: no model here (none of {WEIGHTS_FILE}, {OPENVINO_FILE}, {ONNX_FILE})")


_LOAD_TRIES = 5
MODEL_FILES = (META_FILE, WEIGHTS_FILE, ONNX_FILE, OPENVINO_FILE, OPENVINO_WEIGHTS)


def load_backend(model_dir: str | Path, device: torch.device | str = "cpu",
                 backend: str = "auto") -> tuple[nn.Module | ExportedModel, ModelInfo]:
    """The model of ``model_dir`` on ``backend``, and its description, both of one model.

    A model is read from several files (``inference.yml``, then the weights or the graph); a
    training that swaps in a new folder, or an export that moves in new files, between those
    reads would pair one model's thresholds with another's weights, silently (a service that
    reloads after each retraining). So the load is repeated until the folder and its files are
    the same after it as before.
    """
    check_local(model_dir, "a model directory")
    model_dir = Path(model_dir)
    for _ in range(_LOAD_TRIES):
        before = _snapshot(model_dir)
        try:
            loaded = _load_backend(model_dir, device, backend)
        except FlawscopeError:
            if _snapshot(model_dir) == before:
                raise
            continue  # caught between a swap's two renames: read it again
        if _snapshot(model_dir) == before:
            return loaded
    raise FlawscopeError(f"{model_dir}: replaced {_LOAD_TRIES} times while it was read (a training or export writing "
                         "there); load it once that has finished")


def _snapshot(model_dir: Path) -> tuple:
    """What a load must find unchanged: the folder itself (a training swaps in another) and each
    model file in it (an export replaces them one by one)."""
    found: list[tuple | None] = []
    for path in (model_dir, *(model_dir / name for name in MODEL_FILES)):
        try:
            st = path.stat()
        except OSError:
            found.append(None)
            continue
        found.append((st.st_dev, st.st_ino) if path == model_dir else (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(found)


def _load_backend(model_dir: Path, device: torch.device | str,
                  backend: str) -> tuple[nn.Module | ExportedModel, ModelInfo]:
    info = read_model_info(model_dir)
    backend = choose_backend(model_dir, backend)
    if backend == "torch":
        runtimes = [name for name in _GRAPH_OF_BACKEND if _graph(model_dir, name) is not None]
        if runtimes and not (model_dir / WEIGHTS_FILE).is_file():  # offer the backends that run what is there
            *others, last = ["auto", *runtimes]
            raise FlawscopeError(f"{model_dir}: an exported model ({_GRAPH_OF_BACKEND[runtimes[0]]}), which torch does "
                                 f"not run: use backend {', '.join(others)} or {last}, or the trained directory it "
                                 "was exported from")
        return load_model_dir(model_dir, device)
    if torch.device(device).type != "cpu":
        raise FlawscopeError(f"{model_dir}: backend {backend} runs on the CPU only, not on {device}")
    _require(backend)
    graph = _graph(model_dir, backend)
    if graph is not None:
        loaded = _load_graph(graph, backend, info.input_size)
        check_files(model_dir, info, [graph.name, OPENVINO_WEIGHTS] if graph.name == OPENVINO_FILE else [graph.name])
        _warn_if_trained_since(model_dir, info)
        return loaded, info
    if not (model_dir / WEIGHTS_FILE).is_file():
        raise FlawscopeError(f"{model_dir}: no {_GRAPH_OF_BACKEND[backend]} for backend {backend}, and no {WEIGHTS_FILE} "
                             "to export it from")
    log.info("exporting %s for %s, for this run only (Global.mode=export keeps an export)", model_dir, backend)
    with tempfile.TemporaryDirectory(prefix="flawscope_export_") as tmp:  # gone when loaded: not told as a place
        export_model(model_dir, tmp, "openvino" if backend == "openvino" else "onnx", say=False)
        return _load_graph(Path(tmp) / _GRAPH_OF_BACKEND[backend], backend, info.input_size), info
