"""The pipeline API, as in PaddleX: ``create_pipeline("anomaly_detection").predict(inputs)``.

A pipeline config is a small YAML file::

    pipeline_name: anomaly_detection
    SubModules:
      AnomalyDetection:
        module_name: anomaly_detection
        model_name: STFPM
        model_dir: null        # null = the bundled default model
        batch_size: 1
        device: cpu
        backend: auto          # torch | onnxruntime | openvino (CPU) | auto: what model_dir holds
        min_region_area: 0     # drop predicted defect regions smaller than this (pixels)
        threshold: 0.5         # normalised decision threshold; 0.5 = the calibrated one
        outline_ok_images: false  # also outline regions on images judged OK
        recursive: false       # descend into sub-directories of a directory input
        on_error: result       # a bad input item: "result" (carries the error) or "raise"
        json_arrays: rle       # how save_to_json writes pred/map: rle | list | png | none
        save_extra: false      # save_to_img also writes <name>_map.png and <name>_pred.png
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from flawscope.config import BACKENDS
from flawscope.device import parse_device
from flawscope.errors import FlawscopeError, first_line
from flawscope.inference.predictor import Predictor
from flawscope.inference.result import THRESHOLD, AnomalyResult

PIPELINES: dict[str, dict[str, Any]] = {
    "anomaly_detection": {
        "pipeline_name": "anomaly_detection",
        "SubModules": {
            "AnomalyDetection": {
                "module_name": "anomaly_detection",
                "model_name": "STFPM",
                "model_dir": None,
                "batch_size": 1,
                "device": "cpu",
                "backend": "auto",
                "min_region_area": 0,
                "threshold": THRESHOLD,
                "outline_ok_images": False,
                "recursive": False,
                "on_error": "result",
                "json_arrays": "rle",
                "save_extra": False,
            }
        },
    }
}


def get_pipeline_config(name: str) -> dict[str, Any]:
    """A copy of the default config of pipeline ``name``."""
    if name not in PIPELINES:
        raise FlawscopeError(f"unknown pipeline '{name}'; available: {', '.join(PIPELINES)}")
    return copy.deepcopy(PIPELINES[name])


def load_pipeline_config(pipeline: str | Path) -> dict[str, Any]:
    """A pipeline name, or a YAML file written by ``--get_pipeline_config`` (validated)."""
    if str(pipeline) in PIPELINES:
        return get_pipeline_config(str(pipeline))
    path = Path(pipeline)
    if not path.is_file():
        raise FlawscopeError(f"{pipeline}: neither a pipeline name ({', '.join(PIPELINES)}) nor a config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FlawscopeError(f"{path}: invalid YAML ({first_line(exc)})") from None
    name = data.get("pipeline_name") if isinstance(data, dict) else None
    if name not in PIPELINES:
        raise FlawscopeError(f"{path}: pipeline_name must be one of {', '.join(PIPELINES)}, got {name!r}")
    merged = get_pipeline_config(name)
    _merge(merged, data, str(path))
    return merged


def _merge(base: dict, update: dict, where: str, prefix: str = "") -> None:
    for key, value in update.items():
        full = f"{prefix}{key}"
        if key not in base:
            raise FlawscopeError(f"{where}: unknown key {full} (allowed: {', '.join(base)})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise FlawscopeError(f"{where}: {full} must be a mapping")
            _merge(base[key], value, where, f"{full}.")
        else:
            base[key] = value


class AnomalyDetectionPipeline:
    """Image(s) in, ``AnomalyResult`` out; see ``Predictor.predict`` for the accepted inputs."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        sub = config["SubModules"]["AnomalyDetection"]
        device = parse_device(str(sub["device"]))[0]
        if sub["backend"] not in BACKENDS:
            raise FlawscopeError(f"pipeline setting backend: unknown backend {sub['backend']!r}; "
                                 f"available: {', '.join(BACKENDS)}")
        self.predictor = Predictor.from_dir(sub["model_dir"], device, str(sub["backend"]),
                                            batch_size=int(sub["batch_size"]),
                                            min_region_area=int(sub["min_region_area"]),
                                            threshold=float(sub["threshold"]),
                                            outline_ok_images=bool(sub["outline_ok_images"]))
        self.recursive, self.on_error = bool(sub["recursive"]), str(sub["on_error"])
        self.json_arrays, self.save_extra = str(sub["json_arrays"]), bool(sub["save_extra"])

    def predict(self, input: Any, **kwargs: Any) -> Iterator[AnomalyResult]:  # noqa: A002 - PaddleX's name
        """Results in input order; ``recursive``/``on_error`` default to the config's."""
        kwargs.setdefault("recursive", self.recursive)
        kwargs.setdefault("on_error", self.on_error)
        return self.predictor.predict(input, **kwargs)

    __call__ = predict


def create_pipeline(pipeline: str | Path = "anomaly_detection", config: dict[str, Any] | None = None,
                    device: str | None = None, **overrides: Any) -> AnomalyDetectionPipeline:
    """Build a pipeline from a name or YAML path; ``config`` replaces the file, ``device`` and
    keyword overrides (``model_dir=...``, ``batch_size=...``) update its module settings."""
    cfg = copy.deepcopy(config) if config is not None else load_pipeline_config(pipeline)
    sub = cfg["SubModules"]["AnomalyDetection"]
    for key, value in {**overrides, **({"device": device} if device else {})}.items():
        if key not in sub:
            raise FlawscopeError(f"unknown pipeline setting '{key}' (allowed: {', '.join(sub)})")
        sub[key] = value
    return AnomalyDetectionPipeline(cfg)
