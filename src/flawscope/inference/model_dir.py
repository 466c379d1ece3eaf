"""The inference model directory: everything prediction, evaluation and export need, nothing else.

    inference.yml        model name and config, input size, resize mode, normalisation,
                         calibrated thresholds and score normalisation, provenance, and the
                         SHA-256 of each model file beside it (``files``)
    model.safetensors    the weights (no pickle: safe to load from anyone), a digest of each
                         image the model was fitted on (``fitted_images``, not a weight), and in
                         its metadata the input the weights were fitted on (``FITTED_WITH``)

A file of another model (a folder put together from two) or a damaged one is refused on loading,
as is an ``inference.yml`` edited to another input than the weights were fitted on; the
thresholds, ``num_neighbors`` and the search may be edited. Folders written before the digests
load unchecked.

``Global.mode=export`` writes the same ``inference.yml`` beside ``model.onnx`` or ``model.xml``;
``inference/backends.py`` runs those.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from flawscope import __version__
from flawscope.atomic import staging_path, swap_in
from flawscope.config import MAX_INPUT_SIZE, MODELS, SCHEMA, check_value, load_yaml, yaml_problem
from flawscope.data.io import PADDLE_SUFFIXES, check_local, file_sha256
from flawscope.data.transforms import RESIZE_MODES
from flawscope.errors import FlawscopeError, first_line
from flawscope.models import build_model
from flawscope.models.image_bank import grid_splits

META_FILE = "inference.yml"
FITTED_IMAGES = "fitted_images"  # the tensor of image digests in the weights file
WEIGHTS_FILE = "model.safetensors"
FITTED_WITH = "flawscope.fitted_with"  # the weights file's metadata: the input its weights were fitted on
_FITTED_KEYS = ("model", "input_size", "resize_mode", "mean", "std")


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
        """In one new array besides a temporary: a camera-sized map is 100-300 MB in float32."""
        dtype = values.dtype.type
        ratio = values - dtype(low)
        np.maximum(ratio, 0, out=ratio)
        ratio /= dtype(max(threshold - low, 1e-12))
        return np.divide(ratio, 1 + ratio, out=ratio)

    def image_score(self, raw: float) -> float:
        return float(self._normalize(np.array([raw], dtype=np.float64), self.image_threshold, self.image_low)[0])

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
    files: dict = field(default_factory=dict)  # file name -> "sha256:<hex>" of each model file written with it

    @classmethod
    def from_dict(cls, data: dict) -> "ModelInfo":
        """From ``inference.yml``'s content; ValueError names the first key that is missing,
        unknown or of the wrong kind (an edited or damaged file)."""
        if not isinstance(data, dict):
            raise ValueError("not a mapping of keys")
        data = {k: v for k, v in data.items() if k != "flawscope_version"}
        _check_keys(data, cls, "")
        checks = {"model": (lambda v: v in MODELS, f"one of {', '.join(MODELS)}"),
                  "model_config": (lambda v: isinstance(v, dict), "a mapping"),
                  "input_size": (lambda v: type(v) is int and 32 <= v <= MAX_INPUT_SIZE and v % 32 == 0,
                                 f"a multiple of 32 from 32 to {MAX_INPUT_SIZE}"),
                  "resize_mode": (lambda v: v in RESIZE_MODES, f"one of {', '.join(RESIZE_MODES)}"),
                  "mean": (_three_numbers, "three finite numbers"),
                  "std": (lambda v: _three_numbers(v) and min(v) > 0, "three finite numbers above 0"),
                  "provenance": (lambda v: isinstance(v, dict), "a mapping"),
                  "files": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(d, str)
                                                                  and d.startswith("sha256:") for k, d in v.items()),
                            "a mapping of file names to sha256: digests"),
                  # a saved model is calibrated: null here means an edited file
                  "calibration": (lambda v: isinstance(v, dict), "a mapping of the calibrated thresholds")}
        for key, (ok, allowed) in checks.items():
            if key in data and not ok(data[key]):
                raise ValueError(f"{key} must be {allowed}, not {data[key]!r}")
        cal = data["calibration"]
        _check_keys(cal, Calibration, "calibration.")
        for key in ("image_threshold", "image_low", "pixel_threshold", "pixel_low"):
            if not _number(cal[key]):
                raise ValueError(f"calibration.{key} must be a finite number, not {cal[key]!r}")
        data["calibration"] = Calibration(**cal)
        return cls(**data)


def _check_keys(data: dict, kind: type, prefix: str) -> None:
    """Every field of the dataclass ``kind`` without a default is in ``data``, and nothing else."""
    fields = {f.name: f for f in dataclass_fields(kind)}
    for name in data:
        if name not in fields:
            raise ValueError(f"unknown key {prefix}{name}")
    for name, f in fields.items():
        if name not in data and f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"missing key {prefix}{name}")


def _number(value: object) -> bool:
    """A finite int or float: NaN or infinity would make every score NaN, which JSON cannot hold."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _three_numbers(value: object) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_number(v) for v in value)


@contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """A folder to fill that then replaces ``path`` whole: a half-written folder never appears
    there, and an interrupted write leaves the earlier one as it was (it is moved aside, not
    deleted, until the new one is in place)."""
    if path.exists() and not path.is_dir():
        raise FlawscopeError(f"{path}: a file, not a folder: move it away or choose another output")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir, not mkdtemp (whose folder is private): a service under another account must read the model.
    tmp = staging_path(path)
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model_dir(path: str | Path, model: nn.Module, info: ModelInfo,
                   fitted_images: torch.Tensor | None = None) -> Path:
    """Write the directory atomically (``staged_dir``), with the ``image_digests`` of the images
    the model was fitted on when given."""
    path = Path(path)
    with staged_dir(path) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if fitted_images is not None:
            tensors[FITTED_IMAGES] = fitted_images.contiguous()
        fitted = json.dumps({key: getattr(info, key) for key in _FITTED_KEYS})
        weights = write_safetensors(tensors, tmp / WEIGHTS_FILE, {FITTED_WITH: fitted})
        meta = {"flawscope_version": __version__, **asdict(info), "files": {WEIGHTS_FILE: weights}}
        (tmp / META_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
    return path


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    """``safetensors.torch.save_file``, but with the permissions the umask gives (its own are
    0600); returns the file's ``file_digest``."""
    data = save(tensors, metadata)
    path.write_bytes(data)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    """``sha256:`` and the file's SHA-256, as ``inference.yml``'s ``files`` lists them."""
    return "sha256:" + file_sha256(path)


def check_files(model_dir: Path, info: ModelInfo, names: list[str]) -> None:
    """Refuse model files that are not those ``inference.yml`` was written with (nothing is
    checked in a folder written before ``files``)."""
    for name in names if info.files else []:
        path = model_dir / name
        if name not in info.files:
            raise FlawscopeError(f"{path}: not one of the files {META_FILE} beside it was written with "
                                 f"({', '.join(info.files)}): another model's; copy model folders whole")
        if file_digest(path) != info.files[name]:
            raise FlawscopeError(f"{path}: not the file {META_FILE} beside it was written with (its SHA-256 differs): "
                                 "another model's, or damaged; copy model folders whole, or train or export again")


def image_digests(images: torch.Tensor) -> torch.Tensor:
    """Nx8 uint8: a 64-bit BLAKE2b digest of each model input (NxSxSx3 uint8). A model directory
    keeps those of the images it was fitted on, so that ``Train.add_normals`` knows the images it
    holds whatever its banks keep of them (a capped image bank, or none)."""
    digests = [list(hashlib.blake2b(image.numpy().tobytes(), digest_size=8).digest()) for image in images.cpu()]
    return torch.tensor(digests, dtype=torch.uint8).reshape(-1, 8)


def read_fitted_images(path: str | Path) -> torch.Tensor:
    """The ``image_digests`` a model directory keeps (none, 0x8, in one saved before them)."""
    with safe_open(str(Path(path) / WEIGHTS_FILE), "pt") as weights:
        return weights.get_tensor(FITTED_IMAGES) if FITTED_IMAGES in weights.keys() else \
            torch.empty(0, 8, dtype=torch.uint8)


def among(digests: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Which rows of ``digests`` are rows of ``known`` (bool, one per row)."""
    known_set = {bytes(row) for row in known.tolist()}
    return torch.tensor([bytes(row) in known_set for row in digests.tolist()], dtype=torch.bool)


CHECKPOINT_FILES = ("checkpoint.safetensors", "checkpoint.json")  # an STFPM training's iter_N/ (stfpm_trainer)


def _inside_hint(folder: Path) -> str:
    """"; give FOLDER/inference" where ``folder`` holds a model directory there (a training's
    ``best_model``, given as PaddleX's ``best_model/model.pdparams`` would be); for a training
    checkpoint ``iter_N``, what it is and where its training's model is."""
    if all((folder / name).is_file() for name in CHECKPOINT_FILES):
        trained = folder.parent / "best_model" / "inference"
        where = f"; the training's model is {trained}" if (trained / META_FILE).is_file() else ""
        return f"; it is a training checkpoint, which Train.resume_path takes{where}"
    inner = folder / "inference"
    return f"; give {inner}" if (inner / META_FILE).is_file() else ""


def read_model_info(path: str | Path) -> ModelInfo:
    """The ``inference.yml`` of a model directory, trained (safetensors) or exported (ONNX, OpenVINO)."""
    check_local(path, "a model directory")
    path = Path(path)
    meta_path = path / META_FILE
    if path.suffix.lower() in PADDLE_SUFFIXES:
        raise FlawscopeError(f"{path}: a Paddle model file; flawscope reads an inference model directory (a "
                             f"folder of {META_FILE} and {WEIGHTS_FILE}, such as output/best_model/inference)"
                             + _inside_hint(path.parent))
    if path.is_file():
        raise FlawscopeError(f"{path}: a file, not a model directory: give the folder that holds it ({path.parent})")
    if not path.is_dir():
        raise FlawscopeError(f"{path}: model directory does not exist")
    if not meta_path.is_file():
        raise FlawscopeError(f"{path}: not an inference model directory (missing {META_FILE})" + _inside_hint(path))
    try:
        return ModelInfo.from_dict(load_yaml(meta_path.read_text(encoding="utf-8")))
    except yaml.YAMLError as exc:
        raise FlawscopeError(f"{meta_path}: unreadable model description (YAML {yaml_problem(exc)})") from None
    except ValueError as exc:
        raise FlawscopeError(f"{meta_path}: damaged model description: {exc}") from None


def load_model_dir(path: str | Path, device: torch.device | str = "cpu",
                   exact_search: bool = False) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the model from ``inference.yml`` and load its weights, ready for inference.
    ``exact_search``: build a PatchCore of approximate search as an exact one, as its exported
    graph searches (which then needs no faiss)."""
    info = read_model_info(path)
    weights_path = Path(path) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FlawscopeError(f"{path}: not an inference model directory (missing {WEIGHTS_FILE})")
    meta_path = Path(path) / META_FILE
    config = dict(info.model_config)
    for key, value in config.items():  # NaN, infinity or 2.5 for an integer would fail in the model with a traceback
        spec = SCHEMA["Model"].get(key)
        if spec is not None and spec.kind in (int, float):
            config[key] = check_value(f"model_config {key}", spec, value, str(meta_path))
    sigma = config.get("smooth_sigma")
    if isinstance(sigma, float) and math.ceil(4 * sigma) >= info.input_size:  # as the config refuses it
        raise FlawscopeError(f"{meta_path}: model_config smooth_sigma {sigma:g} blurs over the whole "
                             f"{info.input_size}-pixel input: it must be at most {(info.input_size - 1) / 4:g}")
    if exact_search and config.get("search") == "approximate":
        config["search"] = "exact"
    try:
        model = build_model(info.model, config, pretrained=False)
    except FlawscopeError as exc:  # a setting this machine cannot run (approximate search without faiss)
        raise FlawscopeError(f"{meta_path}: {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise FlawscopeError(f"{meta_path}: model_config does not fit model {info.model} "
                             f"({first_line(exc)})") from None
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types
        raise FlawscopeError(f"{weights_path}: not a readable safetensors file, truncated or damaged "
                             f"({first_line(exc)})") from None
    tensors.pop(FITTED_IMAGES, None)  # a record, not a weight
    _check_fitted_with(weights_path, info, meta_path)
    _check_grid(config, info.input_size, meta_path)
    try:
        model.load_state_dict(tensors)
    except (RuntimeError, ValueError, TypeError) as exc:  # TypeError: len() of a 0-d tensor where a bank goes
        # torch's message opens with "Error(s) in loading state_dict for X:"; the next line says which
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else first_line(exc)
        detail = detail if len(detail) <= 200 else detail[:200] + "..."
        raise FlawscopeError(f"{weights_path}: weights do not fit model {info.model} ({detail})") from None
    check_files(Path(path), info, [WEIGHTS_FILE])
    return model.to(device).eval(), info


def _check_fitted_with(weights_path: Path, info: ModelInfo, meta_path: Path) -> None:
    """Refuse an ``inference.yml`` whose input differs from the one the weights were fitted on:
    a PatchCore bank of 256-pixel features searched with 512-pixel ones flags good parts."""
    with safe_open(str(weights_path), "pt") as weights:
        fitted = (weights.metadata() or {}).get(FITTED_WITH)
    for key, value in (json.loads(fitted) if fitted else {}).items():
        if key in _FITTED_KEYS and getattr(info, key) != value:
            raise FlawscopeError(f"{meta_path}: {key} {getattr(info, key)} is not the {value} that {WEIGHTS_FILE} "
                                 "was fitted on: set it back, or train a model with it")


def _check_grid(config: dict, input_size: int, meta_path: Path) -> None:
    """Refuse an image-level score's grid that does not split the input (an edited ``input_size``
    in a folder written before ``FITTED_WITH``): a traceback on the first image otherwise."""
    side, grid = input_size // 32, config.get("global_grid", 1)
    if config.get("global_score") and not grid_splits(side, grid):
        raise FlawscopeError(f"{meta_path}: model_config global_grid {grid} does not split the {side}x{side} map of "
                             f"stride-32 features of input_size {input_size} into cells of 2x2 or more")
