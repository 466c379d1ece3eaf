"""Where PatchCore's scoring time goes, the backbone excluded: each part of ``score_features`` timed
alone in torch, at batch 1, on one random input.

    python benchmarks/patchcore_scoring_parts.py MODEL_DIR [MODEL_DIR ...] [--threads 2] [--calls 20]

The parts: the patch search (every patch against the memory bank), the paper's image score (the
worst patch's neighbourhood), the image descriptors' search (each descriptor against the image
bank, with ``Model.global_score``) and the map; then ``score_features`` whole. Several model
directories are timed in turns, so a slow spell of a shared machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from flawscope.inference.model_dir import load_model_dir


def _ms(run: Callable[[], object], calls: int) -> float:
    for _ in range(3):
        run()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls * 1000


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dirs", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for round_ in range(args.rounds):
        for model_dir in args.model_dirs:
            model, info = load_model_dir(model_dir)
            size = (info.input_size, info.input_size)
            x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
            emb, descriptor = model.features(x)
            scores = model.patch_scores(emb)
            parts = {"patch search": lambda: model.patch_scores(emb),
                     "image score": lambda: model.image_score(emb, scores)}
            if descriptor is not None and len(model.image_bank):
                parts["descriptor search"] = lambda: model.descriptor_distances(descriptor)
            parts["map"] = lambda: model.anomaly_map(scores, size)
            parts["whole"] = lambda: model.score_features(emb, descriptor, size)
            times = ", ".join(f"{name} {_ms(run, args.calls):.1f}" for name, run in parts.items())
            print(f"round {round_ + 1}, {model_dir} (bank {len(model.memory_bank)}, image bank "
                  f"{tuple(model.image_bank.shape)}): {times} ms", flush=True)


if __name__ == "__main__":
    main()
