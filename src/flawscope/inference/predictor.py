"""Run an inference model directory on images and produce ``AnomalyResult`` objects."""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, closing, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flawscope.data.io import read_ahead
from flawscope.data.transforms import Resizer, normalize
from flawscope.device import one_device
from flawscope.errors import FlawscopeError
from flawscope.inference.backends import ExportedModel, load_backend, one_torch_thread
from flawscope.inference.inputs import expand_inputs, load_input
from flawscope.inference.model_dir import ModelInfo
from flawscope.inference.result import THRESHOLD, AnomalyResult


_forked_on_one_thread = False


def _one_thread_in_forked_children() -> None:
    """Once torch has predicted, a process forked from this one (multiprocessing's default on
    Linux, a server's preloaded workers) hung in its first prediction: GNU OpenMP's threads do
    not survive a fork. Its children run torch on one thread, as torch's own DataLoader workers do."""
    global _forked_on_one_thread
    if not _forked_on_one_thread and hasattr(os, "register_at_fork"):
        _forked_on_one_thread = True
        os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))


def default_model_dir() -> Path:
    """The bundled default model (STFPM on the CC-BY-4.0 hazelnut images), used when none is given."""
    return Path(__file__).resolve().parent.parent / "assets" / "default_model"


class Predictor:
    """Batched prediction with one model; ``predict`` accepts every input type of ``expand_inputs``."""

    def __init__(self, model: nn.Module | ExportedModel, info: ModelInfo, device: torch.device | str = "cpu",
                 batch_size: int = 1, min_region_area: int = 0, threshold: float = THRESHOLD,
                 outline_ok_images: bool = False) -> None:
        if batch_size < 1:
            raise FlawscopeError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 < threshold < 1:
            raise FlawscopeError(f"threshold must be between 0 and 1 (normalised; 0.5 = calibrated), got {threshold}")
        self.threshold, self.outline_ok_images = threshold, outline_ok_images
        self.device = torch.device(device)
        if isinstance(model, nn.Module):
            # NHWC runs the backbones' depthwise convolutions 1.5-2.5x faster on CPU (same maths, rounding aside).
            model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.model, self.info = model, info
        self.batch_size, self.min_region_area = batch_size, min_region_area
        self.resizer = Resizer(info.input_size, info.resize_mode)
        self.source: str | None = None  # the model directory, where it was loaded from one

    @classmethod
    def from_dir(cls, model_dir: str | Path | None = None, device: torch.device | str = "cpu",
                 backend: str = "auto", **kwargs: Any) -> "Predictor":
        """The model of a trained or exported directory on ``backend`` (see ``inference.backends``);
        ``device`` as ``Global.device`` takes it ("cpu", "gpu:0"...)."""
        device = one_device(device, "device") if isinstance(device, str) else device
        model, info = load_backend(model_dir or default_model_dir(), device, backend)
        if isinstance(model, nn.Module):
            for module in model.modules():  # a loaded model only predicts: fold its BatchNorms
                if hasattr(module, "fuse_batchnorm"):
                    module.fuse_batchnorm()
        predictor = cls(model, info, device, **kwargs)
        predictor.source = str(model_dir or default_model_dir())
        return predictor

    @torch.no_grad()
    def raw_outputs(self, images: Sequence[np.ndarray],
                    inputs: Sequence[np.ndarray] | None = None) -> list[tuple[np.ndarray, float]]:
        """(raw map at the image's own size, raw image score) per image, in one forward pass.

        The image score comes from the model (``map_and_score``): for STFPM the maximum of its
        deepest levels' map, for PatchCore the largest of the patch and image-level distances
        (``combined_score``). ``inputs``: the images resized already (``resizer.to_input``), where
        the caller needed them too.
        """
        if isinstance(self.model, nn.Module):
            _one_thread_in_forked_children()
        with self.torch_threads():
            batch = np.stack([self.resizer.to_input(image) for image in images] if inputs is None else inputs)
            x = normalize(torch.from_numpy(batch).to(self.device), self.info.mean, self.info.std)
            maps, scores = self.model.map_and_score(x)
            maps, scores = maps[:, 0].float().cpu().numpy(), scores.float().cpu().numpy()
            if not (np.isfinite(scores).all() and np.isfinite(maps).all()):  # at the input size: cheap
                raise FlawscopeError(f"{self.source or self.info.model}: the model's output ({self.info.model}) is NaN "
                                     "or infinite: its weights are damaged, or its training diverged")
            return [(self.resizer.to_original(m, (img.shape[1], img.shape[0])), float(s))
                    for m, s, img in zip(maps, scores, images)]

    def torch_threads(self) -> AbstractContextManager:
        """``backends.one_torch_thread`` while an exported graph predicts; nothing for torch models."""
        return nullcontext() if isinstance(self.model, nn.Module) else one_torch_thread()

    def result(self, image: np.ndarray, raw_map: np.ndarray, raw_score: float,
               name: str | None = None) -> AnomalyResult:
        """The calibrated decision for one image from its raw outputs."""
        cal = self.info.calibration
        return AnomalyResult.from_map(image, cal.pixel_map(raw_map), raw_score, cal.image_score(raw_score),
                                      self.info.model, name, self.min_region_area, self.outline_ok_images,
                                      self.threshold)

    def _results(self, items: list[tuple[str | None, np.ndarray]]) -> list[AnomalyResult]:
        outputs = self.raw_outputs([image for _, image in items])
        return [self.result(image, raw_map, raw_score, name)
                for (name, image), (raw_map, raw_score) in zip(items, outputs)]

    def predict(self, inputs: Any, recursive: bool = False, on_error: str = "result",
                batch_size: int | None = None) -> Iterator[AnomalyResult]:
        """Yield one result per input image, in order, ``batch_size`` images per forward pass
        (this call's, or the Predictor's).

        From a path, folder, glob or list, the next two batches are read in a background thread
        meanwhile (over a folder of PNGs on 2 cores, OpenVINO took 13.4 ms per image instead of
        18.8; torch gained little); any other iterable is read as it is consumed.

        An input that cannot be read yields a result with ``error`` set (``on_error="result"``) or
        raises FlawscopeError (``on_error="raise"``) once the images before it have their results.
        """
        if on_error not in ("result", "raise"):
            raise FlawscopeError(f"on_error must be 'result' or 'raise', not {on_error!r}")
        if not isinstance(recursive, bool):  # "no" would be true
            raise FlawscopeError(f"recursive must be true or false, not {recursive!r}")
        batch_size = self.batch_size if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise FlawscopeError(f"batch_size must be a whole number >= 1, not {batch_size!r}")
        return self._predict(inputs, recursive, on_error, int(batch_size))  # checked now, not on the first next()

    def _predict(self, inputs: Any, recursive: bool, on_error: str, batch_size: int) -> Iterator[AnomalyResult]:
        pending: list[tuple[str | None, np.ndarray]] = []
        # Only inputs known up front are read ahead. Any other iterable is read as it is consumed:
        # a camera loop may refill its buffer for the next frame, or wait for a result before
        # producing one (at batch size 1).
        depth = 2 * batch_size if isinstance(inputs, (str, os.PathLike, list, tuple)) else 0
        items = read_ahead(lambda item: load_input(*item), expand_inputs(inputs, recursive), depth)
        with closing(items):
            while True:
                try:
                    (name, _), loading = next(items)
                except StopIteration:
                    break
                except Exception:  # the inputs failed: first the results of those read before
                    yield from self._flush(pending)
                    raise
                # Raised here only when it must be: its traceback would tie this frame into a cycle.
                error = loading.exception()
                if error is None:
                    pending.append((name, loading.result()))
                    if len(pending) == batch_size:
                        yield from self._flush(pending)
                    continue
                yield from self._flush(pending)  # the images read before it keep their results, raised or not
                if on_error == "raise" or not isinstance(error, FlawscopeError):
                    raise error
                yield AnomalyResult.from_error(name, str(error), self.info.model, self.threshold)
            yield from self._flush(pending)

    def _flush(self, pending: list[tuple[str | None, np.ndarray]]) -> Iterator[AnomalyResult]:
        if pending:
            results = self._results(pending)
            pending.clear()
            yield from results
