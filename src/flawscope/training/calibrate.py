"""Thresholds from good images only: what a line has when it starts inspecting.

The image threshold is the ``1 - image_fpr`` quantile of the raw scores of good images held out of
training, so about ``image_fpr`` of good parts get flagged; the pixel threshold likewise over the
good pixels. Images the model was fitted on score lower than new good images, so calibrating on
them (the fallback when nothing is held out) gives thresholds that flag too much: the log says so.
"""

from __future__ import annotations

import logging

import numpy as np

from flawscope.data.io import read_image
from flawscope.data.layouts import Sample
from flawscope.inference.model_dir import Calibration
from flawscope.inference.predictor import Predictor

log = logging.getLogger("flawscope")

_PIXELS_PER_IMAGE = 65536  # subsample of each good map kept for the pixel quantile


def split_calibration(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of the good training images (at least one, if there are two or more)."""
    if fraction <= 0 or len(samples) < 2:
        return list(samples), []
    count = min(max(1, round(len(samples) * fraction)), len(samples) - 1)
    order = np.random.default_rng(seed).permutation(len(samples))
    held = set(order[:count].tolist())
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


def calibrate(predictor: Predictor, samples: list[Sample], image_fpr: float, pixel_fpr: float,
              source: str, batch_size: int = 8) -> Calibration:
    """Fit image and pixel thresholds on the raw maps of good ``samples``."""
    scores, pixels = [], []
    rng = np.random.default_rng(0)
    for i in range(0, len(samples), batch_size):
        images = [read_image(s.image) for s in samples[i:i + batch_size]]
        for amap in predictor.raw_maps(images):
            scores.append(float(amap.max()))
            flat = amap.ravel()
            pixels.append(flat if flat.size <= _PIXELS_PER_IMAGE else rng.choice(flat, _PIXELS_PER_IMAGE, replace=False))
    all_pixels = np.concatenate(pixels)
    if source == "training images":
        log.warning("no good images held out: thresholds fitted on training images will flag too many parts")
    cal = Calibration(image_threshold=float(np.quantile(scores, 1 - image_fpr)),
                      pixel_threshold=float(np.quantile(all_pixels, 1 - pixel_fpr)), source=source,
                      details={"num_images": len(scores), "image_fpr": image_fpr, "pixel_fpr": pixel_fpr})
    log.info("calibrated on %d %s: image threshold %.5g, pixel threshold %.5g",
             len(scores), source, cal.image_threshold, cal.pixel_threshold)
    return cal
