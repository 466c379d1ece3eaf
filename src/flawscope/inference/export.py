"""``Global.mode=export``: the inference model as ONNX (for ONNX Runtime) or as OpenVINO IR.

The exported graph is the model's ``map_and_score``: a normalised Bx3xSxS float32 batch in, the raw
Bx1xSxS anomaly map and the B raw image scores out, for B = 1: PatchCore's chunked neighbour
search traces to fixed shapes, and batch 1 is what a CPU inspection station runs.
``inference.yml`` is copied beside it, so the resizing, normalisation and calibrated thresholds
travel with the graph and a deployment gives the same decisions; it gains the graph files' digests.

The OpenVINO IR (``model.xml`` + ``model.bin``) is converted from the ONNX graph with float32
weights: OpenVINO's default float16 compression, like its default bf16 inference on recent CPUs,
changes the scores. Compile it with ``{"INFERENCE_PRECISION_HINT": "f32"}`` for the same reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import yaml

from flawscope.atomic import abandoned, deferred_signals
from flawscope.errors import FlawscopeError
from flawscope.config import load_yaml
from flawscope.inference.model_dir import META_FILE, WEIGHTS_FILE, file_digest, load_model_dir
from flawscope.inference.runtimes import import_runtime
from flawscope.logs import log

ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"
OPENVINO_WEIGHTS = "model.bin"  # beside model.xml
GRAPH_FILES = (ONNX_FILE, OPENVINO_FILE, OPENVINO_WEIGHTS)
_STAGING_PREFIX = ".export."
# torch's ONNX exporter keeps its state in globals (and warnings.catch_warnings is process-wide):
# two threads exporting at once (two pipelines loading exported backends) failed an assertion in it.
_EXPORT_LOCK = threading.Lock()
_ONNX_FILE_LIMIT = 2**31  # protobuf: one serialised message, so one graph file, of at most 2 GiB


class _MapAndScore(torch.nn.Module):
    """Exports ``map_and_score`` (the exporter traces ``forward`` only)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.map_and_score(x)


def export_graph(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], input_names: list[str], target: Path,
                 fmt: str) -> Path:
    """``module``'s forward, with outputs ``anomaly_map`` and ``image_score``, written to ``target``
    as an ONNX graph or (``fmt="openvino"``) as OpenVINO IR with float32 weights.

    ``module`` is put in eval mode first and stays so: the exporter restores the mode it finds,
    and a wrapper built just before is in training mode, which it would pass on to the model.
    """
    module.eval()
    tmp = target.with_name(f".{target.stem}.onnx.tmp")
    try:
        with _EXPORT_LOCK, warnings.catch_warnings():
            # The trace fixes the input size and the bank's size on purpose (see above); the
            # exporter's warnings about exactly that would only alarm users.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", r"(Constant folding|Exporting aten::index)", UserWarning)
            torch.onnx.export(module, inputs, str(tmp), input_names=input_names,
                              output_names=["anomaly_map", "image_score"], opset_version=17, dynamo=False)
        if fmt == "openvino":
            openvino = import_runtime("openvino")
            # read_model, not convert_model: the same ONNX front end, without convert_model's
            # usage report to Google Analytics (sent from a forked process, which could hang)
            openvino.save_model(openvino.Core().read_model(str(tmp)), str(target), compress_to_fp16=False)
        else:
            tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def export_model(model_dir: str | Path, output: str | Path, fmt: str = "onnx", say: bool = True) -> dict:
    """Write ``output/model.onnx`` (``fmt="onnx"``) or ``output/model.xml`` + ``.bin``
    (``fmt="openvino"``), and ``output/inference.yml``. ``say``: log where they went."""
    try:
        import onnx  # noqa: F401 - torch's exporter needs it
    except ImportError:
        extra = "openvino" if fmt == "openvino" else "export"
        raise FlawscopeError(f"Export: the onnx package is missing; pip install 'flawscope[{extra}]'") from None
    if fmt == "openvino":
        try:
            import_runtime("openvino")  # export_graph reads the ONNX graph into an IR with it
        except ImportError:
            raise FlawscopeError("Export.format=openvino: the openvino package is missing; "
                                 "pip install 'flawscope[openvino]'") from None
    model, info = load_model_dir(model_dir, exact_search=True)  # the graph searches exactly in any case
    size = sum(t.numel() * 4 for t in model.state_dict().values())  # float32 in the graph
    if size >= _ONNX_FILE_LIMIT:
        raise FlawscopeError(f"{model_dir}: the model holds {size / 2**30:.1f} GiB of weights and banks, over the "
                             "2 GiB an ONNX file can hold; train with a smaller Model.coreset_ratio or "
                             "Model.image_bank_size")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FlawscopeError(f"{output}: a file, not a folder to export into: move it away or choose another output")
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, info.input_size, info.input_size)
    name = OPENVINO_FILE if fmt == "openvino" else ONNX_FILE
    # Written beside, then moved in, an earlier export's graphs gone: a folder holding another
    # model's model.xml next to this inference.yml would predict with that model.
    for leftover in output.glob(f"{_STAGING_PREFIX}*"):  # of an export killed before it could clean up
        if abandoned(leftover.name[len(_STAGING_PREFIX):].split(".")[0], leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}.", dir=output))
    try:
        export_graph(_MapAndScore(model), (example,), ["image"], staging / name, fmt)
        # inference.yml as trained, with the graph's digests: loading refuses it beside another model's graph
        meta = load_yaml((Path(model_dir) / META_FILE).read_text(encoding="utf-8"))
        # An earlier release's inference.yml has no digests: the export records the weights' anyway, which
        # tells a retraining apart.
        files = meta.get("files") or {WEIGHTS_FILE: file_digest(Path(model_dir) / WEIGHTS_FILE)}
        meta["files"] = {**files, **{path.name: file_digest(path) for path in staging.iterdir()}}
        (staging / META_FILE).write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True), encoding="utf-8")
        with deferred_signals():  # an interruption here left no graph at all
            written = set()
            for path in staging.iterdir():
                path.replace(output / path.name)
                written.add(path.name)
            for stale in set(GRAPH_FILES) - written:
                (output / stale).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(output.iterdir()):  # a failed export leaves no empty folder
            output.rmdir()
    if say:
        log.info("exported %s to %s", model_dir, output / name)
    return {"done_flag": True, "format": fmt, "model_file": str(output / name)}
