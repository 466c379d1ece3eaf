"""Module configs: YAML files plus ``-o Section.key=value`` overrides, checked against one schema.

``SCHEMA`` is the only list of keys that exist. Anything a file or an override sets that is not in
it is rejected with the allowed keys, so a typo fails at load time instead of being ignored while
training runs with the default. To support a new key, add one ``Key(...)`` line to its section.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import numbers
import os
import re
from collections.abc import Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from flawscope.errors import FlawscopeError
from flawscope.logs import log

CONFIG_DIR = Path(__file__).parent / "configs"
MODELS = ("STFPM", "PatchCore")
# backbones.BACKBONES' names, here so that every mode checks Model.backbone without importing torch
BACKBONE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "wide_resnet50_2")
MAX_INPUT_SIZE = 4096  # Model.input_size: a 4096x4096 input already needs a GPU
MODES = ("check_dataset", "train", "evaluate", "predict", "export")
# Read by train alone: the other modes take the model from its inference directory, so a config
# for them need not spell out a backbone or a learning rate.
TRAIN_ONLY_SECTIONS = ("Model", "Train")
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")  # where prediction runs: flawscope.inference.backends

_NO_DEFAULT = object()
_YAML_NULLS = ("null", "Null", "NULL", "~")


@dataclass(frozen=True)
class Key:
    """What one config key accepts, and what happens when a config leaves it out.

    A missing key gets ``default`` when there is one; otherwise it is an error for the models in
    ``required_for`` and simply absent for the others (model-specific keys). Hyperparameters carry
    no default here so that the shipped YAML stays their one source. A key that only some models
    read (``used_by``) is left out of the configs of the others.
    """

    kind: Any  # int | float | bool | str | list[int]
    default: Any = _NO_DEFAULT
    nullable: bool = False
    choices: tuple[Any, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None
    subset_of: tuple[int, ...] = ()  # list[int] only: non-empty, distinct, drawn from these
    required_for: tuple[str, ...] = ()
    used_by: tuple[str, ...] = MODELS  # a key set for another model is ignored, with a warning
    path: bool = False  # a file or folder: a leading ~ is the home folder (no shell expands it after "=")


# Keys of PaddleX's own STFPM.yaml that have no use here: a config copied from PaddleX loads with a
# warning for each, rather than failing on the first.
PADDLEX_ONLY = {
    "Train.num_classes": "anomaly detection has one class",
    "Train.warmup_steps": "STFPM warms up over the first 5% of Train.epochs_iters",
    "Evaluate.log_interval": "evaluation logs once, at its end",
    "Predict.kernel_option": "Paddle's inference options: Predict.backend chooses the runtime",
}

STFPM_ONLY = ("STFPM",)
PATCHCORE_ONLY = ("PatchCore",)

SCHEMA: dict[str, Any] = {
    "Global": {
        "model": Key(str, choices=MODELS, required_for=MODELS),
        "mode": Key(str, choices=MODES, required_for=MODELS),
        "dataset_dir": Key(str, None, nullable=True, path=True),
        "device": Key(str, "cpu"),  # parsed (and checked against the machine) by flawscope.device
        "output": Key(str, "output", path=True),
        "seed": Key(int, 42, ge=0, le=2**32 - 1),
    },
    "CheckDataset": {
        "dataset_type": Key(str, "auto", choices=("auto", "MVTec", "SegDataset", "Folder")),
        "convert": {
            "enable": Key(bool, False),
            "src_dataset_type": Key(str, None, nullable=True, choices=("LabelMe", "VOC", "MVTec")),
        },
        "split": {
            "enable": Key(bool, False),
            "train_percent": Key(int, None, nullable=True, ge=0, le=100),
            "val_percent": Key(int, None, nullable=True, ge=0, le=100),
            "seed": Key(int, 42, ge=0, le=2**32 - 1),
        },
    },
    "Model": {
        "backbone": Key(str, choices=BACKBONE_NAMES, required_for=MODELS),
        "input_size": Key(int, ge=64, le=MAX_INPUT_SIZE, multiple_of=32, required_for=MODELS),
        "resize_mode": Key(str, "resize", choices=("resize", "letterbox")),
        "strides": Key(list[int], subset_of=(4, 8, 16, 32), required_for=MODELS),
        "map_combine": Key(str, choices=("product", "sum"), required_for=STFPM_ONLY, used_by=STFPM_ONLY),
        "smooth_sigma": Key(float, ge=0, required_for=MODELS),
        # null: configs written before it score as they did
        "score_levels": Key(int, None, nullable=True, ge=1, used_by=STFPM_ONLY),
        "coreset_ratio": Key(float, gt=0, le=1, required_for=PATCHCORE_ONLY, used_by=PATCHCORE_ONLY),
        "num_neighbors": Key(int, ge=1, required_for=PATCHCORE_ONLY, used_by=PATCHCORE_ONLY),
        "projection_dim": Key(int, nullable=True, ge=1, required_for=PATCHCORE_ONLY,
                              used_by=PATCHCORE_ONLY),
        "feature_dim": Key(int, None, nullable=True, ge=1, used_by=PATCHCORE_ONLY),
        "search": Key(str, "exact", choices=("exact", "approximate"), used_by=PATCHCORE_ONLY),
        "search_nprobe": Key(int, 8, ge=1, used_by=PATCHCORE_ONLY),
        "global_score": Key(bool),  # unset: the model class's false, as configs written before it
        "global_grid": Key(int, 1, ge=1),  # 1: configs written before the grid train as they did
        "global_strides": Key(list[int], [32], subset_of=(8, 16, 32)),  # [32]: as configs written before it
        "image_bank_size": Key(int, None, nullable=True, ge=2),  # null: every training image, as before it
    },
    "Train": {
        "epochs_iters": Key(int, ge=1, required_for=STFPM_ONLY, used_by=STFPM_ONLY),
        "batch_size": Key(int, ge=1, required_for=MODELS),
        "learning_rate": Key(float, gt=0, required_for=STFPM_ONLY, used_by=STFPM_ONLY),
        "momentum": Key(float, ge=0, lt=1, required_for=STFPM_ONLY, used_by=STFPM_ONLY),
        "weight_decay": Key(float, ge=0, required_for=STFPM_ONLY, used_by=STFPM_ONLY),
        "pretrain_weight_path": Key(str, None, nullable=True, path=True),
        "resume_path": Key(str, None, nullable=True, used_by=STFPM_ONLY, path=True),
        "log_interval": Key(int, 10, ge=1, used_by=STFPM_ONLY),
        "eval_interval": Key(int, 500, ge=1, used_by=STFPM_ONLY),
        "save_interval": Key(int, 500, ge=1, used_by=STFPM_ONLY),
        "select_best": Key(bool, False, used_by=STFPM_ONLY),
        "hard_fraction": Key(float, None, nullable=True, gt=0, le=1, used_by=STFPM_ONLY),
        "calibration_fraction": Key(float, ge=0, lt=1, required_for=MODELS),
        "image_fpr": Key(float, ge=0, lt=1, required_for=MODELS),
        "pixel_fpr": Key(float, ge=0, lt=1, required_for=MODELS),
        "threshold_method": Key(str, "fpr", choices=("fpr", "f1")),
        "calibration_dir": Key(str, None, nullable=True, path=True),
        "add_calibration_images": Key(bool, False),  # False: held out for good, as configs written before it
        "add_normals": Key(str, None, nullable=True, used_by=PATCHCORE_ONLY, path=True),  # a model dir whose bank grows
    },
    "Evaluate": {
        "weight_path": Key(str, None, nullable=True, path=True),
        "backend": Key(str, "auto", choices=BACKENDS),
    },
    "Export": {
        "weight_path": Key(str, None, nullable=True, path=True),
        "format": Key(str, "onnx", choices=("onnx", "openvino")),
    },
    "Predict": {
        "model_dir": Key(str, None, nullable=True, path=True),
        "input": Key(str, None, nullable=True, path=True),
        "batch_size": Key(int, 1, ge=1),
        "backend": Key(str, "auto", choices=BACKENDS),
        "recursive": Key(bool, False),
        # As the pipeline's settings of the same names (``flawscope.pipeline``); 0.5 = the calibrated threshold.
        "threshold": Key(float, 0.5, gt=0, lt=1),
        "min_region_area": Key(int, 0, ge=0),
        "outline_ok_images": Key(bool, False),
    },
}

_KIND_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list[int]: "a list of integers",
}
# PyYAML follows YAML 1.1, which reads 1e-4 (no dot) as a string; accept it for float keys.
_OCTAL = re.compile(r"[-+]?0[0-7_]*[0-7][0-7_]*")  # YAML 1.1's octal: 010 is 8
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # no path, device or name holds one


def shipped_configs() -> list[str]:
    """Names of the configs bundled with the package, usable as bare names (``STFPM``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """Find a config: an existing file wins, else a bare name (``STFPM``, ``stfpm.yaml``) is
    looked up among the shipped configs, so users need not know where the package lives."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    if Path(name).name == name:  # a folder of that name (-o Global.output=STFPM) is no config
        stem = name[: -len(".yaml")] if name.lower().endswith(".yaml") else name
        for shipped in sorted(CONFIG_DIR.glob("*.yaml")):
            if shipped.stem.lower() == stem.lower():
                return shipped
    if path.is_dir():
        raise FlawscopeError(f"{name_or_path}: is a directory, expected a YAML config file")
    raise FlawscopeError(
        f"{name_or_path}: no such config file or shipped config "
        f"(shipped configs: {', '.join(shipped_configs()) or 'none'})"
    )


def _split_override(text: str) -> tuple[list[str], str]:
    """The key path and the value's text of ``Section.key=value``."""
    where = f"override {text!r}"
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(part.strip() for part in path):
        raise FlawscopeError(f"{where}: expected Section.key=value, e.g. Train.batch_size=4")
    path = [part.strip() for part in path]
    if not raw.strip():
        spec: Any = SCHEMA
        for part in path:
            spec = spec.get(part) if isinstance(spec, dict) else None
        clear = f"; write {key.strip()}=null to clear it" if not isinstance(spec, Key) or spec.nullable else ""
        raise FlawscopeError(f"{where}: empty value{clear}")
    return path, raw.strip()


def _yaml_value(raw: str, where: str) -> Any:
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise FlawscopeError(f"{where}: value is not valid YAML: {_one_line(exc)}") from None
    if isinstance(value, dict):
        raise FlawscopeError(f"{where}: value must be a single value or a list, not a mapping")
    return value


def _text_value(raw: str, where: str, path: bool = False) -> Any:
    """A text key's value as typed: a path like ``runs #3``, ``0755`` or ``*.png`` means itself,
    not a YAML comment, number or alias. YAML's null words and quoted strings read as in YAML,
    except a path's ``~``, which is the home folder, as in a shell."""
    if raw == "~" and path:
        return raw
    if raw in _YAML_NULLS or len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return _yaml_value(raw, where)
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: plain YAML
    keeps the last one, so a second ``Train:`` section would silently drop the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged by the base class
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class refuses it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (a ``yaml.YAMLError`` like any other)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line of what is wrong in a YAML text, and where: ``line 5, column 1: 'Train' appears twice ...``."""
    mark = getattr(exc, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {_one_line(exc)}" if mark else _one_line(exc)


def load_config(path_or_name: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a config, apply overrides in order and return the validated, completed nested dict.

    Errors name their source (the file, or the override) so the user knows what to fix.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'Section.key=value' strings, not one string")
    path = resolve_config_path(path_or_name)
    where = str(path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FlawscopeError(f"{where}: invalid YAML at {yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FlawscopeError(f"{where}: cannot read config: {_one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise FlawscopeError(
            f"{where}: expected a mapping of sections ({', '.join(SCHEMA)}), got {_show(raw)}"
        )
    cfg = check_section(raw, SCHEMA, "", where)
    for text in overrides:
        _apply_override(cfg, text)
    if overrides:
        where += " (with overrides)"
    model = cfg.get("Global", {}).get("model")
    training = cfg.get("Global", {}).get("mode") == "train"
    grows = cfg.get("Train", {}).get("add_normals")
    if training and grows is not None and model is not None and model not in PATCHCORE_ONLY:
        # ignored, it would train a new model from scratch where the user asked to grow one
        raise FlawscopeError(f"{where}: Train.add_normals grows a PatchCore model's memory bank, but this config "
                             f"trains {model}: use -c PatchCore")
    for full, spec in _unused_keys(cfg, SCHEMA, "", model):
        log.warning("%s: %s is not used by %s (a key of %s): ignored", where, full, model, ", ".join(spec.used_by))
    shipped = _shipped_config(model) if training else None
    filled = _fill_from_shipped(cfg, model, shipped) if shipped is not None else []
    if filled:
        log.warning("%s leaves out %s: they take the shipped %s.yaml's values", where, ", ".join(filled), model)
    older = _older_defaults(cfg, model, shipped) if shipped is not None else []
    if older:
        log.warning("%s leaves out %s: they take the defaults that keep configs written before them as they were, "
                    "not the shipped %s.yaml's; set them to choose", where, ", ".join(older), model)
    cfg = _complete(cfg, SCHEMA, "", model, where, () if training else TRAIN_ONLY_SECTIONS)
    _check_consistency(cfg, where)
    return cfg


def _shipped_config(model: str | None) -> dict[str, Any] | None:
    """The shipped config of ``model`` (``configs/<model>.yaml``), or None for a model without one."""
    path = CONFIG_DIR / f"{model}.yaml"
    return load_yaml(path.read_text(encoding="utf-8")) if model in MODELS and path.is_file() else None


def _fill_from_shipped(cfg: dict[str, Any], model: str, shipped: dict[str, Any]) -> list[str]:
    """A training config without some hyperparameter (a PaddleX STFPM.yaml has no Model section)
    is no config a run of flawscope wrote, which hold every one: each Model and Train key it
    leaves out takes the ``shipped`` config's value, as ``-c STFPM`` with its keys as overrides
    would. Returns those keys; none where the config holds every hyperparameter (``_older_defaults``)."""
    lacking = [name for section in TRAIN_ONLY_SECTIONS for name, spec in SCHEMA[section].items()
               if model in spec.required_for and spec.default is _NO_DEFAULT and name not in cfg.get(section, {})]
    if not lacking:
        return []
    shipped_path = CONFIG_DIR / f"{model}.yaml"
    filled = []
    for section in TRAIN_ONLY_SECTIONS:
        given = cfg.setdefault(section, {})
        for name, value in shipped.get(section, {}).items():
            if name not in given and model in SCHEMA[section][name].used_by:
                given[name] = check_value(f"{section}.{name}", SCHEMA[section][name], value, str(shipped_path))
                filled.append(f"{section}.{name}")
    return filled


def _older_defaults(cfg: dict[str, Any], model: str, shipped: dict[str, Any]) -> list[str]:
    """The keys ``cfg`` leaves out whose default is not what ``shipped``, the shipped config of
    ``model``, sets (newer settings default to the behaviour before them), as ``Section.key
    (default; shipped)``."""
    older = []
    for section in TRAIN_ONLY_SECTIONS:
        for name, spec in SCHEMA[section].items():
            if name in cfg.get(section, {}) or model not in spec.used_by or name not in shipped.get(section, {}):
                continue
            if spec.default is _NO_DEFAULT and model not in spec.required_for:  # the model class's default
                older.append(f"{section}.{name} (unset; shipped: {_show(shipped[section][name])})")
            elif spec.default is not _NO_DEFAULT and spec.default != shipped[section][name]:
                older.append(f"{section}.{name} ({_show(spec.default)}; shipped: {_show(shipped[section][name])})")
    return older


def _unused_keys(data: dict[str, Any], schema: dict[str, Any], prefix: str,
                 model: str | None) -> Iterable[tuple[str, Key]]:
    """The keys set in ``data`` that ``model`` does not read (none while the model is unknown)."""
    for name, value in data.items():
        spec = schema[name]
        if isinstance(spec, dict):
            yield from _unused_keys(value, spec, f"{prefix}{name}.", model)
        elif model is not None and model not in spec.used_by:
            yield prefix + name, spec


class _Dumper(yaml.SafeDumper):
    """Writes lists inline (``strides: [4, 8, 16]``) as the shipped configs do."""


_Dumper.add_representer(
    list,
    lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
)


def dump_config(cfg: dict[str, Any], path: str | Path) -> Path:
    """Write a config as YAML that ``load_config`` reads back, so a run records what it used."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    return path


def check_section(data: Any, schema: dict[str, Any], prefix: str, where: str) -> dict[str, Any]:
    """Validate what a file gives for one section; a section whose keys are all commented out
    reads as null and counts as empty."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FlawscopeError(
            f"{where}: {prefix[:-1]} must be a section of key: value lines, got {_show(data)}"
        )
    out = {}
    for name, value in data.items():
        spec = schema.get(name)
        full = prefix + str(name)
        if spec is None and full in PADDLEX_ONLY:
            _paddlex_key(where, full)
            continue
        if spec is None:
            _unknown_key(where, prefix, str(name), schema)
        if isinstance(spec, dict):
            out[name] = check_section(value, spec, full + ".", where)
        else:
            out[name] = check_value(full, spec, value, where)
    return out


def _apply_override(cfg: dict[str, Any], text: str) -> None:
    """Check one override against the schema and set it, creating sections the file left out."""
    where = f"override {text!r}"
    path, raw = _split_override(text)
    known = [key for key in PADDLEX_ONLY if path[:key.count(".") + 1] == key.split(".")]
    if known:
        _paddlex_key(where, known[0])
        return
    spec: Any = SCHEMA
    for i, name in enumerate(path):
        prefix = ".".join(path[:i]) + "." if i else ""
        if not isinstance(spec, dict):
            raise FlawscopeError(f"{where}: {prefix[:-1]} is a value, not a section")
        if name not in spec:
            _unknown_key(where, prefix, name, spec)
        spec = spec[name]
    full = ".".join(path)
    if isinstance(spec, dict):
        keys = ", ".join(spec)
        raise FlawscopeError(f"{where}: {full} is a section; set one of its keys: {keys}")
    node = cfg
    for name in path[:-1]:
        node = node.setdefault(name, {})
    if spec.kind in (int, float) and _OCTAL.fullmatch(raw):
        raise FlawscopeError(f"{where}: {full}: YAML reads {raw} as an octal number ({yaml.safe_load(raw)}); "
                             f"write {int(raw.replace('_', ''), 10)}")
    value = _text_value(raw, where, spec.path) if spec.kind is str else _yaml_value(raw, where)
    node[path[-1]] = check_value(full, spec, value, where)


def _complete(
    data: dict[str, Any], schema: dict[str, Any], prefix: str, model: str | None, where: str,
    optional: Collection[str] = (), required: bool = True,
) -> dict[str, Any]:
    """Fill defaults and enforce required keys, in schema order so dumped configs read alike.

    While the model is unknown every key some model requires counts as required, which makes a
    missing ``Global.model`` (the first such key) the error reported. No key of the ``optional``
    sections is required (those given were checked already).
    """
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        full = prefix + name
        if isinstance(spec, dict):
            out[name] = _complete(data.get(name, {}), spec, full + ".", model, where, optional,
                                  required and full not in optional)
        elif model is not None and model not in spec.used_by:
            continue
        elif name in data:
            out[name] = data[name]
        elif spec.default is not _NO_DEFAULT:
            out[name] = copy.deepcopy(spec.default)
        elif required and spec.required_for and (model is None or model in spec.required_for):
            needed_by = model or ", ".join(spec.required_for)
            raise FlawscopeError(f"{where}: missing required key {full} (needed by {needed_by})")
    return out


def _check_consistency(cfg: dict[str, Any], where: str) -> None:
    """Rules that tie keys together, which per-key checks cannot see."""
    model = cfg.get("Model", {})
    if model.get("smooth_sigma") and "input_size" in model and math.ceil(4 * model["smooth_sigma"]) >= model["input_size"]:
        raise FlawscopeError(f"{where}: Model.smooth_sigma {model['smooth_sigma']} blurs over 4 sigma = "
                             f"{math.ceil(4 * model['smooth_sigma'])} pixels, as far as the whole "
                             f"{model['input_size']}-pixel input: it must be at most {(model['input_size'] - 1) / 4:g}")
    convert = cfg["CheckDataset"]["convert"]
    if convert["enable"] and convert["src_dataset_type"] is None:
        raise FlawscopeError(
            f"{where}: CheckDataset.convert.enable is true but convert.src_dataset_type is null"
        )
    split = cfg["CheckDataset"]["split"]
    train, val = split["train_percent"], split["val_percent"]
    if split["enable"] and (train is None or val is None or train + val != 100):
        raise FlawscopeError(
            f"{where}: CheckDataset.split.enable is true, so split.train_percent and"
            f" split.val_percent must both be set and add up to 100,"
            f" got {_show(train)} and {_show(val)}"
        )


def check_value(full: str, spec: Key, value: Any, where: str) -> Any:
    """Return the value in its canonical type (ints become floats for float keys) or raise an
    error saying what the key allows."""
    if value is None and spec.nullable:
        return None
    converted = _convert(spec.kind, value)
    if spec.path and isinstance(converted, str):
        if not converted.strip():
            raise FlawscopeError(f"{where}: {full} must be a path, got an empty one"
                                 + (" (null leaves it unset)" if spec.nullable else ""))
        converted = os.path.expanduser(converted)
    if isinstance(converted, str) and _CONTROL.search(converted):
        raise FlawscopeError(f"{where}: {full} holds a control character, got {_show(value)}; in double quotes "
                             "YAML reads a backslash as an escape (\"C:\\new\" holds a newline): write it unquoted "
                             "or in single quotes")
    if converted is None or not _within(spec, converted):
        close = _closest(value, spec.choices) if isinstance(value, str) else None
        hint = f" (did you mean {_show(close)}?)" if close else ""
        raise FlawscopeError(f"{where}: {full} must be {_describe(spec)}, got {_show(value)}{hint}")
    return converted


def _convert(kind: Any, value: Any) -> Any:
    """The value as ``kind``, or None when it is not one (bools are never numbers)."""
    if isinstance(value, bool):
        return value if kind is bool else None
    if kind is float and isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-4 as text
    if kind is float and isinstance(value, numbers.Real):  # numpy's scalars too
        return float(value) if math.isfinite(value) else None
    if kind == list[int]:
        ints = isinstance(value, list) and all(type(x) is int for x in value)
        return list(value) if ints else None
    if kind is int and isinstance(value, numbers.Integral):
        return int(value)
    return value if kind is str and isinstance(value, str) else None


def _within(spec: Key, value: Any) -> bool:
    """Whether an already type-correct value meets the key's choices, bounds and list rules."""
    if spec.choices:
        return value in spec.choices
    if spec.subset_of:
        return bool(value) and len(set(value)) == len(value) and set(value) <= set(spec.subset_of)
    return (
        (spec.ge is None or value >= spec.ge)
        and (spec.gt is None or value > spec.gt)
        and (spec.le is None or value <= spec.le)
        and (spec.lt is None or value < spec.lt)
        and (spec.multiple_of is None or value % spec.multiple_of == 0)
    )


def _describe(spec: Key) -> str:
    """What a key allows, in words, for error messages."""
    if spec.choices:
        text = "one of " + ", ".join(str(c) for c in spec.choices)
    elif spec.subset_of:
        text = "a non-empty list of distinct integers from " + ", ".join(map(str, spec.subset_of))
    else:
        bounds = [(">=", spec.ge), (">", spec.gt), ("<=", spec.le), ("<", spec.lt)]
        rules = [f"{op} {bound}" for op, bound in bounds if bound is not None]
        if spec.multiple_of is not None:
            rules.append(f"a multiple of {spec.multiple_of}")
        text = " ".join([_KIND_NAMES[spec.kind], " and ".join(rules)]).strip()
    return text + (" or null" if spec.nullable else "")


def _paddlex_key(where: str, full: str) -> None:
    log.warning("%s: %s is a PaddleX setting flawscope has no use for (%s): ignored", where, full, PADDLEX_ONLY[full])


def _unknown_key(where: str, prefix: str, name: str, section: dict[str, Any]) -> NoReturn:
    """Raise the unknown-key error: full key, closest allowed key, and every allowed key."""
    close = _closest(name, section)
    hint = f"; did you mean {prefix}{close}?" if close else ""
    what, scope = ("key", f"keys in {prefix[:-1]}") if prefix else ("section", "sections")
    raise FlawscopeError(
        f"{where}: unknown {what} {prefix}{name}{hint} (allowed {scope}: {', '.join(section)})"
    )


def _closest(word: str, options: Iterable[Any]) -> str | None:
    """The option most like ``word``, ignoring case (``voc`` -> ``VOC``), or None."""
    by_lower = {str(option).lower(): str(option) for option in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


def _show(value: Any) -> str:
    """A value as the user would write it in YAML/JSON (null, true, "text")."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _one_line(exc: BaseException) -> str:
    """Library messages can span lines; FlawscopeError messages must not."""
    text = getattr(exc, "problem", None) or getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split())
