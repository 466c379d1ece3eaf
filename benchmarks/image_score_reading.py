"""A model's image score read two ways: its parts as plain standard scores, and through Student's t
for the size of each part's reference sample (``image_bank.normal_deviates``, what models score
with since 2026-11-29). The numbers of docs/benchmarks.md "A part measured on few images counts less".

    python benchmarks/image_score_reading.py MODEL_DIR DATASET

For a model with an image bank (PatchCore or STFPM with ``Model.global_score``), scores the
dataset's evaluation split and prints each part's image AUROC alone (the model's own score, then
each descriptor), the reference sample each part was measured on, and the AUROC of the largest
part read either way, with the mean reading of the good and the defective images' own part. The
model's banks and references are used as saved; only the reading changes.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from flawscope.data.io import read_image
from flawscope.data.layouts import load_dataset
from flawscope.data.transforms import normalize
from flawscope.inference.predictor import Predictor
from flawscope.models.image_bank import normal_deviates


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("dataset")
    args = ap.parse_args()
    torch.set_num_threads(2)
    predictor = Predictor.from_dir(args.model_dir)
    model, info = predictor.model, predictor.info
    if not getattr(model, "global_score", False) or len(model.image_bank) == 0:
        raise SystemExit(f"{args.model_dir}: no image bank, so no parts to read")
    counts = model.reference_counts
    if len(counts) == 0:  # saved before the counts: the sizes of the samples as the bank holds them
        counts = torch.tensor([len(model.reference_scores)] + [len(model.image_bank)] * (len(model.score_reference) // 2 - 1))
    samples = load_dataset(args.dataset).val
    labels = np.array([s.label for s in samples])
    plain = []
    for sample in samples:
        x = normalize(torch.from_numpy(predictor.resizer.to_input(read_image(sample.image))[None]), info.mean, info.std)
        own, descriptor = own_score(model, x)
        scores = torch.cat([own[:, None], model.descriptor_distances(descriptor)], dim=1)
        mean, std = model.score_reference.view(-1, 2).unbind(1)
        plain.append(((scores - mean) / std)[0])
    z = torch.stack(plain)
    t = normal_deviates(z, counts.to(z.dtype))
    auroc = lambda s: round(float(roc_auc_score(labels, s.numpy())), 4)  # noqa: E731
    print(json.dumps({
        "model_dir": args.model_dir, "dataset": args.dataset, "images": len(samples),
        "reference_sizes": [int(c) for c in counts],
        "part_auroc": [auroc(z[:, i]) for i in range(z.shape[1])],
        "largest_part_auroc": {"plain": auroc(z.amax(1)), "student_t": auroc(t.amax(1))},
        "own_part_mean": {reading: {"good": round(float(v[labels == 0, 0].mean()), 2),
                                    "defective": round(float(v[labels == 1, 0].mean()), 2)}
                          for reading, v in (("plain", z), ("student_t", t))},
    }, indent=1))


def own_score(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own image score (before the image bank) and the image's descriptors."""
    if hasattr(model, "student"):  # STFPM
        teacher = model.teacher(x)
        levels = model.level_maps(teacher, model.student(x), x.shape[-2:])
        return model.image_score(levels, model.combine(levels)), model.teacher_descriptors(teacher)
    emb, descriptor = model.features(x)
    return model.image_score(emb, model.patch_scores(emb)), descriptor


if __name__ == "__main__":
    main()
