"""Time of the evaluate mode's metrics alone, on one model's outputs for a dataset's test split.

The model runs once over the split (``collect``, which also counts each image's pixel scores
into the metrics' bins as it goes); then ``compute_metrics`` (overall and per defect type) is
timed ``--repeats`` times on what it collected, and a digest of its JSON is printed, so that two
versions of the metrics code can be compared on identical inputs
(``PYTHONPATH=WORKTREE/src python benchmarks/metrics_time.py ...`` for the other one).

    python benchmarks/metrics_time.py ../shared/data/magnetic_tile [--model_dir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

from flawscope.data.layouts import load_dataset
from flawscope.evaluation.evaluate import collect, compute_metrics
from flawscope.inference.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir")
    parser.add_argument("--model_dir", help="an inference model directory (default: the bundled model)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    samples = load_dataset(args.dataset_dir).val
    start = time.perf_counter()
    collected = collect(Predictor.from_dir(args.model_dir), samples)
    print(f"{len(samples)} images predicted and collected in {time.perf_counter() - start:.1f} s")
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = compute_metrics(collected)
        seconds = time.perf_counter() - start
        digest = hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest()[:12]
        print(f"compute_metrics: {seconds:.2f} s  (result sha256 {digest}, image AUROC {result['image_auroc']}, "
              f"AUPRO {result['aupro']})")


if __name__ == "__main__":
    main()
