"""Which grid of the stride-16 features' descriptors, beside the stride-32 ones, lifts PatchCore's
image AUROC? The probe that led to ``Model.global_strides: [16, 32]`` (a grid twice as fine as
stride 32's at stride 16: g = 8 below).

    python benchmarks/patchcore_stride16_descriptor_probe.py DATASET PATCHCORE_MODEL_DIR [--seed 42]

The model must have been trained on DATASET with ``Model.global_score: true`` and
``Model.global_strides: [32]`` (its train mode holds ``Train.calibration_fraction`` 0.1 of the
good images out with ``Global.seed``; ``--seed`` repeats that split). For each grid of the
stride-16 feature map it pools the features as ``PatchCore.describe`` pools the stride-32 ones
(each cell's mean, and each cell's spread at unit length), measures each test image's distance to
the nearest training image's, puts it in leave-one-out standard deviations over the training
images, and reports the image AUROC of that part alone and of its largest with the model's own
score parts (the patch score and the stride-32 descriptors, on the model's own scales); for each
grid, also on each half of the test split (every other image), to see whether a grid picked on
one half holds on the other.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from flawscope.data.io import read_image
from flawscope.data.layouts import Sample, load_dataset, unique_images
from flawscope.data.transforms import Resizer, normalize
from flawscope.inference.model_dir import load_model_dir
from flawscope.models.patchcore import PatchCore
from flawscope.training.calibrate import split_calibration

GRIDS = (2, 4, 8)  # a 256 input gives a 16x16 map at stride 16: cells of 8x8, 4x4 and 2x2 features


def grid_descriptors(features: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cell's mean, and each cell's spread at unit length, of a BxCxhxw map (``PatchCore.describe``)."""
    return PatchCore.describe(features, grid).chunk(2, dim=1)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("model_dir")
    ap.add_argument("--seed", type=int, default=42, help="Global.seed of the training run")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, info = load_model_dir(args.model_dir)
    if not model.global_score or 16 not in model.extractor.strides or model.global_strides != (32,):
        raise SystemExit(f"{args.model_dir}: needs global_score, global_strides [32] and a stride-16 level")
    dataset = load_dataset(args.dataset, "auto")
    fit, _ = split_calibration(unique_images(dataset.train)[0], 0.1, args.seed)
    resizer = Resizer(info.input_size, info.resize_mode)
    level = list(model.extractor.strides).index(16)

    def describe(samples: list[Sample], own_parts: bool) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        """The model's score parts in its own standard deviations (if ``own_parts``), and the
        stride-16 descriptors by name."""
        parts, descriptors = [], {}
        for sample in samples:
            x = normalize(torch.from_numpy(resizer.to_input(read_image(sample.image))[None]), info.mean, info.std)
            if own_parts:
                emb, descriptor = model.features(x)
                parts.append(model.score_parts(model.image_score(emb, model.patch_scores(emb)), descriptor)[0].numpy())
            features = model.extractor(x)[level]
            for grid in GRIDS:
                for kind, value in zip(("mean", "spread"), grid_descriptors(features, grid)):
                    descriptors.setdefault(f"grid {grid} {kind}", []).append(value[0])
        return np.array(parts), {name: torch.stack(rows) for name, rows in descriptors.items()}

    _, bank = describe(fit, own_parts=False)
    own, test = describe(dataset.val, own_parts=True)
    labels = np.array([s.label for s in dataset.val])
    shipped = own.max(1)

    def halves(scores: np.ndarray) -> str:
        return " / ".join(f"{roc_auc_score(labels[h::2], scores[h::2]):.3f}" for h in (0, 1))

    print(f"{args.dataset}: {len(fit)} training images, {len(dataset.val)} test images")
    print(f"the model's own score: image AUROC {roc_auc_score(labels, shipped):.3f} (halves {halves(shipped)})")
    standardised = {}
    for name, rows in bank.items():
        loo = torch.cdist(rows, rows).fill_diagonal_(torch.inf).amin(1)
        z = ((torch.cdist(test[name], rows).amin(1) - loo.mean()) / loo.std()).numpy()
        standardised[name] = z
        print(f"stride 16, {name}: alone {roc_auc_score(labels, z):.3f}, "
              f"largest with the model's parts {roc_auc_score(labels, np.maximum(shipped, z)):.3f}")
    for grid in GRIDS:
        z = np.maximum(standardised[f"grid {grid} mean"], standardised[f"grid {grid} spread"])
        combined = np.maximum(shipped, z)
        print(f"stride 16, grid {grid}, mean and spread: largest with the model's parts "
              f"{roc_auc_score(labels, combined):.3f} (halves {halves(combined)})")


if __name__ == "__main__":
    main()
