"""Batch-1 latency of an inference model directory in torch, and exported, in ONNX Runtime and OpenVINO.

    python benchmarks/export_latency.py output/best_model/inference [--threads 2]

Times the model's ``map_and_score`` on one normalised input (decoding and resizing excluded): in
torch as the Predictor runs it (BatchNorms folded, channels-last, faiss search where installed),
then the graphs that ``Global.mode=export`` writes (``Export.format=onnx`` and ``openvino``),
OpenVINO compiled with the float32 precision hint. Prints the median of each and the image scores,
which must agree.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch

from flawscope.inference.export import ONNX_FILE, OPENVINO_FILE, export_model
from flawscope.inference.predictor import Predictor


def median_ms(run: Callable[[], object], repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    predictor = Predictor.from_dir(args.model_dir)
    model, info = predictor.model, predictor.info
    x = torch.randn(1, 3, info.input_size, info.input_size, generator=torch.Generator().manual_seed(0))
    x_nhwc = x.contiguous(memory_format=torch.channels_last)  # what the Predictor's normalised batch is
    report = {"model_dir": args.model_dir, "model": info.model, "input_size": info.input_size, "threads": args.threads,
              "torch_ms": median_ms(lambda: model.map_and_score(x_nhwc), args.repeats),
              "score_torch": float(model.map_and_score(x_nhwc)[1][0])}
    with tempfile.TemporaryDirectory() as tmp:
        export_model(args.model_dir, Path(tmp) / "onnx", "onnx")
        export_model(args.model_dir, Path(tmp) / "openvino", "openvino")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(Path(tmp) / "onnx" / ONNX_FILE), options)
        feed = {"image": x.numpy()}
        report["onnxruntime_ms"] = median_ms(lambda: session.run(None, feed), args.repeats)
        report["score_onnxruntime"] = float(session.run(None, feed)[1][0])
        compiled = ov.Core().compile_model(str(Path(tmp) / "openvino" / OPENVINO_FILE), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": args.threads})
        report["openvino_ms"] = median_ms(lambda: compiled(x.numpy()), args.repeats)
        report["score_openvino"] = float(compiled(x.numpy())[compiled.output("image_score")][0])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
