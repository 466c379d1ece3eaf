"""Batch-1 latency of an inference model directory on each prediction backend: torch, ONNX Runtime, OpenVINO.

    python benchmarks/export_latency.py output/best_model/inference [--images DIR] [--threads 2]

For each backend (``Predictor.from_dir(..., backend=...)``: torch as the Predictor runs it, with
BatchNorms folded, channels-last and faiss search where installed; the exported graphs, OpenVINO
compiled with the float32 precision hint) it times:

- the model alone: ``map_and_score`` on one normalised input (decoding and resizing excluded);
- with ``--images``, prediction end to end: a decoded image to its ``AnomalyResult`` at batch 1
  (resizing, the model, the map back at the image's size, calibration, regions), over the images;
- the same from the file's path, reading and decoding it included;
- and a folder: ``predict`` over all the image files, per image, where the next images are read
  while the model runs (what a peer's prediction over a folder of images times).

For PatchCore it also times the scoring alone, the backbone excluded (``score_features``: the
bank search, the image score, the map): in torch as the Predictor runs it, and as a graph of
just that part exported to ONNX Runtime and OpenVINO the way ``Global.mode=export`` exports
the whole model.

The backends take turns in blocks of calls, so a slow spell of a shared machine falls on all of
them alike; the first calls of a block are not timed, as the threads of the runtime before may
still be spinning. Prints the medians, and each backend's image scores, which must agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flawscope.data.io import read_image
from flawscope.errors import FlawscopeError
from flawscope.inference.backends import graph_run
from flawscope.inference.export import export_graph
from flawscope.inference.predictor import Predictor

BACKENDS = ("torch", "onnxruntime", "openvino")


def _medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {backend: round(float(np.median(t)) * 1e3, 2) for backend, t in times.items()}


def _seconds(run, *args) -> float:
    start = time.perf_counter()
    run(*args)
    return time.perf_counter() - start


class _Scoring(nn.Module):
    """PatchCore after its backbone, as one graph: patch features (and image descriptors) in."""

    def __init__(self, model: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.model, self.size = model, size

    def forward(self, emb: torch.Tensor, *descriptor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.score_features(emb, descriptor[0] if descriptor else None, self.size)


def _scoring_runs(model: nn.Module, x: torch.Tensor, threads: int, folder: str) -> dict[str, Callable[[], float]]:
    """Per backend, a call that scores ``x``'s backbone features and returns the image score."""
    emb, descriptor = model.features(x)
    inputs = (emb,) if descriptor is None else (emb, descriptor)
    names = ["emb", "descriptor"][:len(inputs)]
    scoring = _Scoring(model, tuple(x.shape[-2:]))
    runs = {backend: graph_run(export_graph(scoring, inputs, names, Path(folder) / f"scoring.{suffix}", fmt),
                               backend, threads)
            for backend, suffix, fmt in (("onnxruntime", "onnx", "onnx"), ("openvino", "xml", "openvino"))}
    feeds = {name: np.ascontiguousarray(t.numpy()) for name, t in zip(names, inputs)}
    return {"torch": lambda: float(model.score_features(emb, descriptor, x.shape[-2:])[1][0])} | \
        {backend: (lambda run=run: float(np.reshape(run(feeds)[1], -1)[0])) for backend, run in runs.items()}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--images", help="a folder of images (searched recursively) to time prediction end to end on")
    ap.add_argument("--max-images", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="torch's threads, which the runtimes also get")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10, help="timed calls per backend per block")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    predictors = {b: Predictor.from_dir(args.model_dir, backend=b) for b in BACKENDS}
    info = predictors["torch"].info
    x = torch.randn(1, 3, info.input_size, info.input_size, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)  # what the Predictor's normalised batch is
    paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")) \
        if args.images else []
    paths = paths[: args.max_images]
    images = [read_image(p) for p in paths]
    scratch = tempfile.TemporaryDirectory()
    scoring = _scoring_runs(predictors["torch"].model, x, args.threads, scratch.name) \
        if hasattr(predictors["torch"].model, "score_features") else {}
    scoring_s = {b: [] for b in scoring}
    model_s = {b: [] for b in BACKENDS}
    predict_s = {b: [] for b in BACKENDS}
    from_file_s = {b: [] for b in BACKENDS}
    folder_s = {b: [] for b in BACKENDS}
    for block in range(args.blocks):
        for backend, predictor in predictors.items():
            with predictor.torch_threads():  # as the Predictor runs the model
                for i in range(args.calls + 3):  # the first 3 calls let other runtimes' threads go idle
                    t = _seconds(predictor.model.map_and_score, x)
                    if i >= 3:
                        model_s[backend].append(t)
                for i in range(args.calls + 3 if scoring else 0):
                    t = _seconds(scoring[backend])
                    if i >= 3:
                        scoring_s[backend].append(t)
            for i in range(args.calls + 3 if images else 0):
                k = (block * args.calls + i) % len(images)  # each block moves on through the images
                t = _seconds(lambda p, im: list(p.predict([im])), predictor, images[k])
                t_file = _seconds(lambda p, path: list(p.predict([str(path)])), predictor, paths[k])
                if i >= 3:
                    predict_s[backend].append(t)
                    from_file_s[backend].append(t_file)
            if paths:
                folder_s[backend].append(_seconds(lambda p: list(p.predict([str(f) for f in paths])), predictor)
                                         / len(paths))
    report = {"model_dir": args.model_dir, "model": info.model, "input_size": info.input_size,
              "threads": args.threads, "timed_calls": args.blocks * args.calls,
              "model_ms": _medians_ms(model_s),
              "score": {b: float(p.model.map_and_score(x)[1][0]) for b, p in predictors.items()}}
    if scoring:
        report |= {"scoring_ms": _medians_ms(scoring_s), "scoring_score": {b: run() for b, run in scoring.items()}}
    if images:
        report |= {"images": len(images), "image_size": f"{images[0].shape[1]}x{images[0].shape[0]}",
                   "predict_ms": _medians_ms(predict_s), "predict_from_file_ms": _medians_ms(from_file_s),
                   "folder_ms_per_image": _medians_ms(folder_s)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    try:
        main()
    except FlawscopeError as exc:  # a model or image folder that is not one: one line, as the CLI says it
        sys.exit(f"error: {exc}")
