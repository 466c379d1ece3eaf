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
        min_region_area: 0     # drop predicted defect regions smaller than this (pixels); the score still decides is_anomaly
        threshold: 0.5         # normalised decision threshold; 0.5 = the calibrated one
        outline_ok_images: false  # also outline regions on images judged OK
        recursive: false       # descend into sub-directories of a directory input
        on_error: result       # a bad input item: "result" (carries the error) or "raise"
        json_arrays: rle       # how save_to_json writes pred/map: rle | list | png | none
        save_extra: false      # save_to_img also writes <name>_map.png and <name>_pred.png
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from flawscope.config import BACKENDS, MODELS, Key, check_section, check_value, load_yaml, yaml_problem
from flawscope.data.io import is_url
from flawscope.device import check_device_spec, one_device
from flawscope.errors import FlawscopeError, first_line
from flawscope.inference.model_dir import read_model_info
from flawscope.inference.predictor import Predictor, default_model_dir
from flawscope.inference.result import THRESHOLD, AnomalyResult
from flawscope.logs import log

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


# What each module setting accepts (``flawscope.config.Key``): checked in a file, in ``config`` and
# in keyword overrides, so a bad value fails before the model loads, naming the setting.
SETTINGS: dict[str, Key] = {
    "module_name": Key(str, choices=("anomaly_detection",)),
    "model_name": Key(str, choices=MODELS),  # informative, as in PaddleX: the model directory decides
    "model_dir": Key(str, nullable=True, path=True),
    "batch_size": Key(int, ge=1),
    "device": Key(str),  # parsed (and checked against the machine) by flawscope.device
    "backend": Key(str, choices=BACKENDS),
    "min_region_area": Key(int, ge=0),
    "threshold": Key(float, gt=0, lt=1),
    "outline_ok_images": Key(bool),
    "recursive": Key(bool),
    "on_error": Key(str, choices=("result", "raise")),
    "json_arrays": Key(str, choices=("rle", "list", "png", "none")),
    "save_extra": Key(bool),
}
_SETTINGS_PREFIX = "SubModules.AnomalyDetection."


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
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FlawscopeError(f"{path}: invalid YAML at {yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FlawscopeError(f"{path}: cannot read the pipeline config ({first_line(exc)})") from None
    name = data.get("pipeline_name") if isinstance(data, dict) else None
    if not _is_pipeline(name):
        raise FlawscopeError(f"{path}: pipeline_name must be one of {', '.join(PIPELINES)}, got {name!r}")
    merged = get_pipeline_config(name)
    _merge(merged, data, str(path))
    _check_settings(merged, str(path))
    return merged


def _is_pipeline(name: Any) -> bool:
    """Whether ``name`` names a pipeline; an edited YAML may hold a list or mapping there, which
    ``in PIPELINES`` would fail on as unhashable."""
    return isinstance(name, str) and name in PIPELINES


def _check_settings(config: dict[str, Any], where: str, prefix: str = _SETTINGS_PREFIX) -> None:
    sub = config["SubModules"]["AnomalyDetection"]
    sub.update(check_section({k: _plain(v) for k, v in sub.items()}, SETTINGS, prefix, where))
    check_device_spec(sub["device"], f"{where}: {prefix}device")


def _plain(value: Any) -> Any:
    """A path or a torch device as the string a YAML file would hold."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value) if isinstance(value, torch.device) else value


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
        device = one_device(sub["device"], f"{_SETTINGS_PREFIX}device")
        model_dir = sub["model_dir"]
        if model_dir is not None and not is_url(model_dir) and not Path(model_dir).is_absolute() \
                and not Path(model_dir).exists():
            raise FlawscopeError(f"{_SETTINGS_PREFIX}model_dir: {model_dir} does not exist in the working folder "
                                 f"{os.getcwd()}, which relative paths are from (as in PaddleX); give an absolute path")
        self.predictor = Predictor.from_dir(model_dir, device, sub["backend"], batch_size=sub["batch_size"],
                                            min_region_area=sub["min_region_area"], threshold=sub["threshold"],
                                            outline_ok_images=sub["outline_ok_images"])
        if sub["model_dir"] is None and self.predictor.info.model != sub["model_name"]:  # as PaddleX's would
            log.warning("model_dir is null, so the bundled %s model is used: model_name %s chooses nothing, "
                        "model_dir does", self.predictor.info.model, sub["model_name"])
        self.recursive, self.on_error = sub["recursive"], sub["on_error"]
        self.json_arrays, self.save_extra = sub["json_arrays"], sub["save_extra"]

    def predict(self, input: Any, recursive: bool | None = None,  # noqa: A002 - PaddleX's name
                on_error: str | None = None, batch_size: int | None = None) -> Iterator[AnomalyResult]:
        """Results in input order; ``recursive``, ``on_error`` and ``batch_size`` (this call's, as
        PaddleX's model.predict takes it) default to the config's (its other settings are set with
        create_pipeline)."""
        recursive = self.recursive if recursive is None else recursive
        on_error = self.on_error if on_error is None else on_error
        return self._with_settings(self.predictor.predict(input, recursive=recursive, on_error=on_error,
                                                          batch_size=batch_size))

    def _with_settings(self, results: Iterator[AnomalyResult]) -> Iterator[AnomalyResult]:
        """The results, saved as the config's ``json_arrays`` and ``save_extra`` say."""
        for result in results:
            result.json_arrays, result.save_extra = self.json_arrays, self.save_extra
            yield result

    __call__ = predict


def create_model(model_name: str | None = None, model_dir: str | Path | None = None, device: str | None = None,
                 **settings: Any) -> AnomalyDetectionPipeline:
    """PaddleX's module API, ``create_model(model_name="STFPM").predict(input, batch_size=1)``: a
    pipeline of that model. Without ``model_dir``, STFPM is the bundled model; PatchCore has none
    to fall back to (PaddleX downloads its pretrained one; no such model would know your parts).
    A ``model_dir`` decides the model: a ``model_name`` naming another is warned of."""
    if model_name is not None:
        check_section({"model_name": model_name}, SETTINGS, "", "create_model")
    held = read_model_info(default_model_dir() if model_dir is None else model_dir).model
    if model_dir is None and model_name not in (None, held):
        raise FlawscopeError(f"create_model: no bundled {model_name} model; give model_dir, a trained one's "
                             "inference model directory (output/best_model/inference)")
    if model_name not in (None, held):
        log.warning("%s holds a %s model: it is used as it is (model_name %s)", model_dir, held, model_name)
    return create_pipeline(device=device, model_name=held, model_dir=model_dir, **settings)


def create_pipeline(pipeline: str | Path = "anomaly_detection", config: dict[str, Any] | None = None,
                    device: str | None = None, **overrides: Any) -> AnomalyDetectionPipeline:
    """Build a pipeline from a name or YAML path; ``config`` (a dict shaped like the file, the
    keys it leaves out at their defaults) replaces the file; ``device`` and keyword overrides
    (``model_dir=...``, ``batch_size=...``) update its module settings. All are checked against
    ``SETTINGS``. ``use_hpip=True`` (PaddleX's high-performance inference) is ``backend="openvino"``."""
    if config is not None:
        if not isinstance(config, dict):
            raise FlawscopeError(f"config: must be a dict shaped like the pipeline's YAML, not {type(config).__name__}")
        if not _is_pipeline(config.get("pipeline_name", "anomaly_detection")):
            raise FlawscopeError(f"config: pipeline_name must be one of {', '.join(PIPELINES)}, "
                                 f"got {config['pipeline_name']!r}")
        cfg = get_pipeline_config("anomaly_detection")
        _merge(cfg, config, "config")
        _check_settings(cfg, "config")
    else:
        cfg = load_pipeline_config(pipeline)
    if check_value("use_hpip", Key(bool), overrides.pop("use_hpip", False), "pipeline setting"):
        # PaddleX's high-performance inference: OpenVINO here
        if overrides.get("backend", "openvino") != "openvino":
            raise FlawscopeError(f"use_hpip runs the model on OpenVINO, but backend is {overrides['backend']!r}: "
                                 "give one of them")
        overrides["backend"] = "openvino"
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise FlawscopeError(f"unknown pipeline setting '{unknown[0]}' (allowed: {', '.join(SETTINGS)})")
    cfg["SubModules"]["AnomalyDetection"].update(overrides, **({"device": device} if device is not None else {}))
    _check_settings(cfg, "pipeline setting", prefix="")
    return AnomalyDetectionPipeline(cfg)
