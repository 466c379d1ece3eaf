"""PatchCore on a real MVTec-layout dataset: accuracy, bank build time, scoring latency, peak memory.

    OMP_NUM_THREADS=1 python benchmarks/patchcore_probe.py ../shared/data/mvtec_transistor
    OMP_NUM_THREADS=1 python benchmarks/patchcore_probe.py ../shared/data/magnetic_tile --bank-images 1000 --fit-only

Image AUROC is reported for the model's image score (with ``--global-score``, combined with the
image descriptors' distances), for each descriptor's distance alone, for the paper's reweighted
score, for the largest patch distance (the same without reweighting) and for the max of the
smoothed map; pixel AUROC at the original image size (what ``flawscope evaluate`` reports) and
at the 256 model input (what anomalib reports). ``--bank-images`` pads the training set with
mirrored and flipped copies to time a bank of that many images. On a CPU shared with other jobs,
one thread gives steadier timings: two OpenMP threads stall whenever one of them is descheduled.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial

import numpy as np
import torch

from flawscope.backbones import backbone_spec
from flawscope.data.io import read_image, read_mask
from flawscope.data.layouts import load_dataset
from flawscope.data.transforms import Resizer, normalize
from flawscope.evaluation.metrics import PixelScores, image_auroc, pixel_auroc
from flawscope.models.patchcore import PatchCore
from flawscope.training.patchcore_fit import fit_patchcore


def reset_peak_rss() -> None:
    """Linux: restart the VmHWM high-water mark, so the next reading is the peak of one phase."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def load_images(paths, resizer: Resizer) -> torch.Tensor:
    return torch.stack([torch.from_numpy(resizer.to_input(read_image(p))) for p in paths])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--resize-mode", default="resize", choices=["resize", "letterbox"])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--search", default="exact", choices=["exact", "approximate"])
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--coreset-ratio", type=float, default=0.01)
    ap.add_argument("--projection-dim", type=int, default=64)
    ap.add_argument("--max-patches", type=int, default=1 << 20)
    ap.add_argument("--feature-dim", type=int, default=None)
    ap.add_argument("--global-score", action="store_true", help="the shipped config's Model.global_score")
    ap.add_argument("--global-grid", type=int, default=1, help="Model.global_grid (shipped: 4; 1: the whole image)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bank-images", type=int, default=0, help="pad the training set to this many images")
    ap.add_argument("--fit-only", action="store_true")
    ap.add_argument("--latency-images", type=int, default=20, help="images scored one at a time (median latency)")
    args = ap.parse_args()

    dataset = load_dataset(args.dataset)
    resizer = Resizer(args.size, args.resize_mode)
    spec = backbone_spec(args.backbone)
    norm = partial(normalize, mean=spec.mean, std=spec.std)
    t = time.perf_counter()
    train = load_images([s.image for s in dataset.train], resizer)
    if args.bank_images > len(train):
        padded = torch.empty((args.bank_images, *train.shape[1:]), dtype=torch.uint8)
        for i in range(args.bank_images):  # originals, then mirrored, then flipped upside down, ...
            image = train[i % len(train)]
            padded[i] = image.flip(1 - (i // len(train) - 1) % 2) if i >= len(train) else image
        train = padded
    report = {"dataset": args.dataset, "train_images": len(train), "load_seconds": time.perf_counter() - t,
              "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rss_before_fit_mb": rss_mb("VmRSS")}
    reset_peak_rss()

    model = PatchCore(args.backbone, strides=tuple(args.strides), feature_dim=args.feature_dim, search=args.search,
                      search_nprobe=args.nprobe, global_score=args.global_score,
                      global_grid=args.global_grid)
    report["fit"] = fit_patchcore(model, train, norm, "cpu", args.coreset_ratio, args.seed, args.batch_size,
                                  args.projection_dim, args.max_patches)
    report["fit_peak_rss_mb"] = rss_mb("VmHWM")
    del train
    if not args.fit_only:
        reset_peak_rss()
        report.update(evaluate(model, dataset.val, resizer, norm, args))
        report["evaluate_peak_rss_mb"] = rss_mb("VmHWM")
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))


@torch.no_grad()
def evaluate(model: PatchCore, samples, resizer: Resizer, norm, args) -> dict:
    labels, combined, reweighted, patch_max, map_max, embed_s, score_s = [], [], [], [], [], 0.0, 0.0
    descriptor_distances = []  # with --global-score: each descriptor's distance to the nearest training image
    masks, maps, masks_in, maps_in = [], [], [], []
    for i in range(0, len(samples), args.batch_size):
        chunk = samples[i:i + args.batch_size]
        images = [read_image(s.image) for s in chunk]
        x = norm(torch.from_numpy(np.stack([resizer.to_input(im) for im in images])))
        t0 = time.perf_counter()
        emb, descriptor = model.features(x)
        t1 = time.perf_counter()
        scores = model.patch_scores(emb)
        amap, image_score = model.anomaly_map(scores, x.shape[-2:]), model.image_score(emb, scores)
        score = model.combined_score(image_score, descriptor)
        score_s += time.perf_counter() - t1
        if descriptor is not None and len(model.image_bank):
            descriptor_distances.append(model.descriptor_distances(descriptor))
        embed_s += t1 - t0
        for sample, image, m, c, s, p in zip(chunk, images, amap[:, 0].numpy(), score.tolist(), image_score.tolist(),
                                             scores.flatten(1).amax(1).tolist()):
            labels.append(sample.label)
            combined.append(c)
            reweighted.append(s)
            patch_max.append(p)
            map_max.append(float(m.max()))
            size = (image.shape[1], image.shape[0])
            mask = read_mask(sample.mask, size) if sample.mask else np.zeros(image.shape[:2], bool)
            masks.append(mask)
            maps.append(resizer.to_original(m, size))
            masks_in.append(resizer.mask_to_input(mask))
            maps_in.append(m)
    n = len(samples)
    latency = []
    for sample in samples[:args.latency_images]:
        x = norm(torch.from_numpy(resizer.to_input(read_image(sample.image))[None]))
        t0 = time.perf_counter()
        emb, descriptor = model.features(x)
        t1 = time.perf_counter()
        model.score_features(emb, descriptor, x.shape[-2:])
        latency.append((t1 - t0, time.perf_counter() - t1))
    lat = np.array(latency).reshape(-1, 2) * 1e3
    alone = torch.cat(descriptor_distances).T.tolist() if descriptor_distances else []
    return {
        "test_images": n,
        "image_auroc": image_auroc(labels, combined),
        "image_auroc_reweighted": image_auroc(labels, reweighted),
        "image_auroc_map_max": image_auroc(labels, map_max),
        "image_auroc_patch_max": image_auroc(labels, patch_max),
        **{f"image_auroc_{name}_descriptor_alone": image_auroc(labels, d) for name, d in zip(("mean", "spread"), alone)},
        "pixel_auroc_original_size": pixel_auroc(PixelScores.of(masks, maps)),
        "pixel_auroc_input_size": pixel_auroc(PixelScores.of(masks_in, maps_in)),
        f"batch{args.batch_size}_ms_per_image": {"backbone_embed": embed_s / n * 1e3, "scoring": score_s / n * 1e3},
        "batch1_ms_per_image_median": {"backbone_embed": float(np.median(lat[:, 0])) if len(lat) else None,
                                       "scoring": float(np.median(lat[:, 1])) if len(lat) else None},
    }


if __name__ == "__main__":
    main()
