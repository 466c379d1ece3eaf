"""PatchCore's scoring after the backbone (``score_features``) in torch, per CPU search index.

    python benchmarks/patchcore_search.py MODEL_DIR IMAGE_DIR [--images 16] [--threads 2] [--blocks 5]

Times ``score_features`` (the bank search, the image score, the map) on the backbone features of
real images (the search's shortcuts depend on how close the patches lie to the bank: random
inputs do not show it) with each index the machine runs: ``int8`` (``knn.Int8Index`` for banks of
``knn.INT8_MIN_BANK`` entries or ``knn.INT8_MIN_VALUES`` values or more, float32 for smaller ones, as in
prediction),
``onednn`` (float32, ``knn.OneDnnIndex``), ``faiss`` (exact flat index) and ``torch``
(``nearest_neighbors``). The indexes take turns in blocks, so a slow spell of a shared machine
falls on all of them alike. Prints the median per image and how far each index's image scores
and maps lie from the torch search's (they must agree to float32 rounding).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import flawscope.models.knn as knn
from flawscope.data.io import read_image
from flawscope.data.transforms import normalize
from flawscope.inference.predictor import Predictor

INDEXES = {"int8": (True, True), "onednn": (True, False), "faiss": (False, False), "torch": (False, False)}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("image_dir", help="images to take the features of (searched recursively)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    predictor = Predictor.from_dir(args.model_dir)
    model, info = predictor.model, predictor.info
    paths = sorted(p for p in Path(args.image_dir).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    paths = paths[:: max(1, len(paths) // args.images)][:args.images]
    inputs = np.stack([predictor.resizer.to_input(read_image(p)) for p in paths])  # as the Predictor resizes
    batch = normalize(torch.from_numpy(inputs), info.mean, info.std).contiguous(memory_format=torch.channels_last)
    features = [model.features(batch[i:i + 1]) for i in range(len(batch))]
    size = tuple(batch.shape[-2:])
    available = {"int8": knn.onednn_available() and knn.int8_available(), "onednn": knn.onednn_available(),
                 "faiss": knn.faiss is not None, "torch": True}
    kinds = [k for k in INDEXES if available[k]]
    real = {"onednn": knn.onednn_available, "int8": knn.int8_available, "faiss": knn.faiss}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    outputs: dict[str, list] = {}
    for block in range(args.blocks):
        for kind in kinds:
            onednn, int8 = INDEXES[kind]
            knn.onednn_available = real["onednn"] if onednn else (lambda: False)
            knn.int8_available = real["int8"] if int8 else (lambda: False)
            knn.faiss = real["faiss"] if kind == "faiss" else None
            model.drop_indexes()
            outputs[kind] = [model.score_features(emb, descriptor, size) for emb, descriptor in features]  # warm
            for emb, descriptor in features:
                start = time.perf_counter()
                model.score_features(emb, descriptor, size)
                times[kind].append(time.perf_counter() - start)
    reference = outputs["torch"]
    report = {"model_dir": args.model_dir, "bank": len(model.memory_bank), "images": len(paths),
              "threads": args.threads, "scoring_ms": {k: round(float(np.median(t)) * 1e3, 2) for k, t in times.items()},
              "largest_score_difference": {k: float(max((a[1] - b[1]).abs().max() for a, b in zip(o, reference)))
                                           for k, o in outputs.items()},
              "largest_map_difference": {k: float(max((a[0] - b[0]).abs().max() for a, b in zip(o, reference)))
                                         for k, o in outputs.items()}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
