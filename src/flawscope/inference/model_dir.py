"""The inference model directory: everything prediction, evaluation and export need, nothing else.

    inference.yml        model name and config, input size, resize mode, normalisation,
                         calibrated thresholds and score normalisation, provenance
    model.safetensors    the weights (no pickle: safe to load from anyone)

``Global.mode=export`` writes the same ``inference.yml`` beside ``model.onnx`` or ``model.xml``;
``inference/backends.py`` runs those.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save
from torch import nn

from flawscope import __version__
from flawscope.errors import FlawscopeError, first_line
from flawscope.models import build_model

META_FILE = "inference.yml"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Calibration:
    """Thresholds on the raw scores, and the map to normalised scores where 0.5 is the threshold.

    With ``r = max(v - low, 0) / (threshold - low)``, ``normalize(v) = r / (1 + r)``: ``low`` (the
    lowest good image score; the typical good pixel for maps) maps to 0, the threshold to 0.5, a
    score twice as far above ``low`` to 0.67, and nothing saturates, so a gross defect still ranks
    above a slight one. ``low`` removes the offset that distance-based scores (PatchCore) carry.
    """

    image_threshold: float
    image_low: float
    pixel_threshold: float
    pixel_low: float
    source: str = "normal"  # what the thresholds were fitted on
    details: dict = field(default_factory=dict)

    @staticmethod
    def _normalize(values: np.ndarray, threshold: float, low: float) -> np.ndarray:
        dtype = values.dtype.type
        ratio = np.maximum(values - dtype(low), 0) / dtype(max(threshold - low, 1e-12))
        return ratio / (1 + ratio)

    def image_score(self, raw: float) -> float:
        return float(self._normalize(np.float64(raw), self.image_threshold, self.image_low))

    def pixel_map(self, raw: np.ndarray) -> np.ndarray:
        """In float32, the map's own precision: float64 took twice as long (0.5 ms at 512x512)."""
        return self._normalize(np.asarray(raw, dtype=np.float32), self.pixel_threshold, self.pixel_low)


@dataclass
class ModelInfo:
    model: str
    model_config: dict
    input_size: int
    resize_mode: str
    mean: list[float]
    std: list[float]
    calibration: Calibration
    provenance: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelInfo":
        data = dict(data)
        data["calibration"] = Calibration(**data["calibration"])
        data.pop("flawscope_version", None)
        return cls(**data)


def save_model_dir(path: str | Path, model: nn.Module, info: ModelInfo) -> Path:
    """Write the directory atomically: a half-written model directory never appears at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's is private: a service under another account must read the model
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        write_safetensors(tensors, tmp / WEIGHTS_FILE)
        meta = {"flawscope_version": __version__, **asdict(info)}
        (tmp / META_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file``, but with the permissions the umask gives (its own are 0600)."""
    path.write_bytes(save(tensors))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_model_info(path: str | Path) -> ModelInfo:
    """The ``inference.yml`` of a model directory, trained (safetensors) or exported (ONNX, OpenVINO)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise FlawscopeError(f"{path}: model directory does not exist")
    if not meta_path.is_file():
        raise FlawscopeError(f"{path}: not an inference model directory (missing {META_FILE})")
    try:
        return ModelInfo.from_dict(yaml.safe_load(meta_path.read_text()))
    except (yaml.YAMLError, TypeError, KeyError) as exc:
        raise FlawscopeError(f"{meta_path}: unreadable model description ({exc.__class__.__name__})") from None


def load_model_dir(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Rebuild the model from ``inference.yml`` and load its weights, ready for inference."""
    info = read_model_info(path)
    weights_path = Path(path) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FlawscopeError(f"{path}: not an inference model directory (missing {WEIGHTS_FILE})")
    model = build_model(info.model, info.model_config, pretrained=False)
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except Exception as exc:  # safetensors raises its own error types
        raise FlawscopeError(f"{weights_path}: weights do not fit model {info.model} ({first_line(exc)})") from None
    return model.to(device).eval(), info
