"""Score a model on a labelled split: image and pixel metrics, overall and per defect type."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from flawscope.data.io import read_image, read_mask
from flawscope.data.layouts import Sample
from flawscope.evaluation import metrics
from flawscope.inference.predictor import Predictor


def raw_predictions(predictor: Predictor, samples: Sequence[Sample], batch_size: int = 8,
                    desc: str = "evaluate") -> Iterator[tuple[Sample, np.ndarray, np.ndarray | None]]:
    """Yield (sample, raw map at the image's size, ground-truth mask or None) for each sample."""
    for i in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False, unit="batch"):
        chunk = samples[i:i + batch_size]
        images = [read_image(s.image) for s in chunk]
        maps = predictor.raw_maps(images)
        for sample, image, amap in zip(chunk, images, maps):
            size = (image.shape[1], image.shape[0])
            if sample.mask is not None:
                mask = read_mask(sample.mask, size)
            elif sample.label == 0:
                mask = np.zeros(image.shape[:2], dtype=bool)
            else:
                mask = None  # a defect image without ground truth counts for image metrics only
            yield sample, amap, mask


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def evaluate_samples(predictor: Predictor, samples: Sequence[Sample], batch_size: int = 8) -> dict:
    """Image AUROC and pixel AUROC on ``samples`` (raw scores: calibration does not change a ranking)."""
    labels, scores, types, masks, maps = [], [], [], [], []
    for sample, amap, mask in raw_predictions(predictor, samples, batch_size):
        labels.append(sample.label)
        scores.append(float(amap.max()))
        types.append(sample.defect_type)
        if mask is not None:
            masks.append(mask)
            maps.append(amap)
    labels_arr, scores_arr = np.array(labels), np.array(scores)
    result = {
        "image_auroc": _round(metrics.image_auroc(labels_arr, scores_arr)),
        "pixel_auroc": _round(metrics.pixel_auroc(masks, maps)),
        "num_images": len(samples),
        "num_good": int((labels_arr == 0).sum()),
        "num_defect": int((labels_arr == 1).sum()),
        "num_with_masks": len(masks),
    }
    good = labels_arr == 0
    per_type = {}
    for defect_type in sorted(set(types) - {"good"}):
        chosen = good | (np.array(types) == defect_type)
        per_type[defect_type] = {"count": int((np.array(types) == defect_type).sum()),
                                 "image_auroc": _round(metrics.image_auroc(labels_arr[chosen], scores_arr[chosen]))}
    result["per_defect_type"] = per_type
    return result
