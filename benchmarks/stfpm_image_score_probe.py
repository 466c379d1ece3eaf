"""Would PatchCore's image-level score lift a trained STFPM model's image AUROC? The probe that led to
``Model.global_score`` for STFPM (now built: ``flawscope.models.image_bank``); docs/benchmarks.md
cites its numbers, and its per-level scores are how ``Model.score_levels`` was chosen.

    python benchmarks/stfpm_image_score_probe.py DATASET STFPM_MODEL_DIR [--grid 4] [--seed 42]

STFPM's teacher is the frozen backbone whose stride-32 features give PatchCore its image
descriptors (``PatchCore.describe``: mean and unit-length spread over a grid of cells). This
scores the test split with the model's own image score (``map_and_score``), with each
descriptor's distance to the nearest training image's, and with their combination as PatchCore
makes it: the largest of the three in standard deviations of a reference. The descriptors'
reference is their leave-one-out distances over the training images. The student was trained
on those images, so its own score's reference is the images the train mode held out for
calibration (the same split: ``Train.calibration_fraction`` 0.1 and ``--seed``, the config's
``Global.seed``). The model must have a stride-32 level (the shipped STFPM config's 8/16/32).

Last, it scores the test split from each level alone and from the deepest k levels, which is how
``Model.score_levels`` was chosen.
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


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("model_dir")
    ap.add_argument("--grid", type=int, default=4, help="cells per side of the descriptors' grid")
    ap.add_argument("--seed", type=int, default=42, help="Global.seed of the training run")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, info = load_model_dir(args.model_dir)
    if 32 not in model.strides:
        raise SystemExit(f"{args.model_dir}: no stride-32 level (strides {list(model.strides)})")
    dataset = load_dataset(args.dataset, "auto")
    fit, held = split_calibration(unique_images(dataset.train)[0], 0.1, args.seed)
    resizer = Resizer(info.input_size, info.resize_mode)

    def scores(samples: list[Sample]) -> tuple[np.ndarray, list[torch.Tensor], dict[str, np.ndarray]]:
        """STFPM's image scores, the mean and spread descriptors, and ``level_scores``, of ``samples``."""
        own, descriptors, columns = [], [], {}
        for sample in samples:
            x = normalize(torch.from_numpy(resizer.to_input(read_image(sample.image))[None]), info.mean, info.std)
            teacher = model.teacher(x)
            levels = model.level_maps(teacher, model.student(x), x.shape[-2:])
            own.append(float(model.image_score(levels, model.combine(levels))))
            descriptors.append(PatchCore.describe(teacher[model.strides.index(32)], args.grid))
            for name, value in level_scores(model, levels).items():
                columns.setdefault(name, []).append(value)
        return (np.array(own), list(torch.cat(descriptors).chunk(2, dim=1)),
                {name: np.array(values) for name, values in columns.items()})

    _, fit_descriptors, _ = scores(fit)
    held_scores, _, _ = scores(held)
    test_scores, test_descriptors, test_levels = scores(dataset.val)
    labels = np.array([s.label for s in dataset.val])
    print(f"{args.dataset}: {len(fit)} training images, {len(held)} held out, {len(dataset.val)} test images")
    standardised = [(test_scores - held_scores.mean()) / held_scores.std()]
    print(f"STFPM's own score: image AUROC {roc_auc_score(labels, test_scores):.3f}")
    for name, bank, queries in zip(("mean", "spread"), fit_descriptors, test_descriptors):
        loo = torch.cdist(bank, bank).fill_diagonal_(torch.inf).amin(1).numpy()
        distance = torch.cdist(queries, bank).amin(1).numpy()
        standardised.append((distance - loo.mean()) / loo.std())
        print(f"{name} descriptor alone: {roc_auc_score(labels, distance):.3f}")
    print(f"largest of the three: {roc_auc_score(labels, np.max(standardised, axis=0)):.3f}")
    for name, column in test_levels.items():
        print(f"the image score from {name}: image AUROC {roc_auc_score(labels, column):.3f}")
    good = standardised[0][labels == 0]
    print(f"STFPM's score of the good test images in held-out standard deviations: mean {good.mean():.2f}, "
          f"max {good.max():.2f}")


def level_scores(model: torch.nn.Module, levels: list[torch.Tensor]) -> dict[str, float]:
    """One image's scores from each level alone and from the deepest k levels (``Model.score_levels``:
    k), the levels combined and smoothed as the map is."""
    scores = {f"stride {stride} alone": float(model.combine([level]).amax())
              for stride, level in zip(model.strides, levels)}
    for k in range(2, len(levels) + 1):
        strides = "/".join(map(str, model.strides[-k:]))
        scores[f"strides {strides} (score_levels {k})"] = float(model.combine(levels[-k:]).amax())
    return scores


if __name__ == "__main__":
    main()
