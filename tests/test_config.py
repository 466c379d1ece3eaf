"""Config loading, overrides and schema errors: each error names its key and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from flawscope.config import (
    CONFIG_DIR,
    SCHEMA,
    dump_config,
    load_config,
    resolve_config_path,
    shipped_configs,
)
from flawscope.errors import FlawscopeError
from flawscope.inference.result import THRESHOLD
from flawscope.training.runner import model_config_from

REPO_ROOT = Path(__file__).resolve().parents[1]


def shipped() -> dict:
    """The shipped STFPM config as raw YAML, to derive test configs from."""
    return yaml.safe_load((CONFIG_DIR / "STFPM.yaml").read_text())


def write(tmp_path: Path, data: object, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error(*args: object) -> str:
    """The message of the FlawscopeError that load_config raises; it must be one line."""
    with pytest.raises(FlawscopeError) as info:
        load_config(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the shipped config ---------------------------------------------------------------------


def test_shipped_config_loads_with_documented_defaults() -> None:
    cfg = load_config("STFPM")
    assert cfg["Global"] == {
        "model": "STFPM", "mode": "check_dataset", "dataset_dir": None,
        "device": "cpu", "output": "output", "seed": 42,
    }
    assert cfg["CheckDataset"] == {
        "dataset_type": "auto",
        "convert": {"enable": False, "src_dataset_type": None},
        "split": {"enable": False, "train_percent": None, "val_percent": None, "seed": 42},
    }
    assert cfg["Model"]["strides"] == [8, 16, 32]
    assert cfg["Model"]["smooth_sigma"] == 4.0
    assert set(cfg["Train"]) == {name for name, key in SCHEMA["Train"].items() if "STFPM" in key.used_by}
    assert cfg["Export"] == {"weight_path": None, "format": "onnx"}
    assert cfg["Predict"] == {"model_dir": None, "input": None, "batch_size": 1, "backend": "auto", "recursive": False,
                              "threshold": THRESHOLD, "min_region_area": 0, "outline_ok_images": False}
    # PatchCore-only keys stay absent from an STFPM config, defaults or not.
    assert "coreset_ratio" not in cfg["Model"] and "search" not in cfg["Model"] and "add_normals" not in cfg["Train"]


def test_a_training_config_that_leaves_out_newer_keys_is_told_what_it_gets(caplog, tmp_path) -> None:
    """Left-out keys keep older configs as they were; a config written from scratch hears so."""
    shipped = yaml.safe_load(Path(resolve_config_path("STFPM")).read_text())
    for key in ("score_levels", "global_score"):
        del shipped["Model"][key]
    del shipped["Train"]["hard_fraction"]
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(shipped))
    cfg = load_config(mine, ["Global.mode=train", "Model.score_levels=2"])
    assert cfg["Train"]["hard_fraction"] is None and "global_score" not in cfg["Model"]
    (warning,) = [r.getMessage() for r in caplog.records if "leaves out" in r.getMessage()]
    assert "Model.global_score (unset; shipped: true), Train.hard_fraction (null; shipped: 0.1):" in warning
    assert "score_levels" not in warning  # given by the override
    caplog.clear()
    load_config("STFPM", ["Global.mode=train"])
    load_config(mine, ["Global.mode=predict"])  # only training reads them
    assert not [r for r in caplog.records if "leaves out" in r.getMessage()]
    # A PatchCore config of the first releases: it was refused (global_score "required") right after this warning.
    shipped = yaml.safe_load(Path(resolve_config_path("PatchCore")).read_text())
    for key in ("global_score", "global_grid", "global_strides"):
        del shipped["Model"][key]
    mine.write_text(yaml.safe_dump(shipped))
    cfg = load_config(mine, ["Global.mode=train"])
    assert "global_score" not in cfg["Model"] and not model_config_from("PatchCore", cfg["Model"]).get("global_score")
    (warning,) = [r.getMessage() for r in caplog.records if "leaves out" in r.getMessage()]
    assert "Model.global_score (unset; shipped: true), Model.global_grid (1; shipped: 4)" in warning


def test_growing_a_bank_with_an_stfpm_config_is_refused_rather_than_ignored(caplog) -> None:
    """Ignored as other models' keys are, Train.add_normals would train a new STFPM from scratch
    (minutes) where the user asked to grow a PatchCore model."""
    with pytest.raises(FlawscopeError, match="Train.add_normals grows a PatchCore model's memory bank, but this "
                                             "config trains STFPM: use -c PatchCore"):
        load_config("STFPM", ["Global.mode=train", "Train.add_normals=output/best_model/inference"])
    assert load_config("STFPM", ["Global.mode=predict", "Train.add_normals=output/best_model/inference"])  # not training
    assert load_config("PatchCore", ["Global.mode=train", "Train.add_normals=output/best_model/inference"])


def test_a_key_of_the_other_model_is_ignored_with_a_warning(caplog, tmp_path) -> None:
    """Set on the command line or in a file, it does not reach the run, and the user is told."""
    cfg = load_config("PatchCore", ["Train.epochs_iters=5000", "Model.map_combine=sum"])
    assert "epochs_iters" not in cfg["Train"] and "map_combine" not in cfg["Model"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("Train.epochs_iters is not used by PatchCore (a key of STFPM): ignored" in w for w in warned)
    assert any("Model.map_combine is not used by PatchCore" in w for w in warned)
    caplog.clear()
    dumped = dump_config(load_config("PatchCore"), tmp_path / "config.yaml")  # what a run records reloads quietly
    assert load_config(dumped) == load_config("PatchCore") and not caplog.records
    assert "log_interval" not in dumped.read_text()


def test_repo_root_configs_link_to_the_shipped_config() -> None:
    link = REPO_ROOT / "configs" / "STFPM.yaml"
    assert link.is_symlink()
    assert link.resolve() == (CONFIG_DIR / "STFPM.yaml").resolve()
    assert load_config(link) == load_config("STFPM")


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config("STFPM", ["Model.strides=[8, 16]"])
    path = dump_config(cfg, tmp_path / "out" / "config.yaml")
    assert "strides: [8, 16]" in path.read_text()
    assert load_config(path) == cfg


# --- finding configs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["STFPM", "STFPM.yaml", "stfpm"])
def test_bare_names_resolve_to_shipped_configs(name: str) -> None:
    assert resolve_config_path(name) == CONFIG_DIR / "STFPM.yaml"
    assert "STFPM" in shipped_configs()


def test_existing_file_wins(tmp_path: Path) -> None:
    path = write(tmp_path, shipped(), "STFPM.yaml")
    assert resolve_config_path(path) == path


def test_missing_config_names_path_and_shipped_configs(tmp_path: Path) -> None:
    message = error(tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "shipped configs: " in message and "STFPM" in message
    assert "NoSuchModel" in error("NoSuchModel")


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    assert "is a directory" in error(tmp_path)


# --- overrides ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("Train.batch_size=4", ["Train", "batch_size"], 4),
        ("Train.learning_rate=0.01", ["Train", "learning_rate"], 0.01),
        ("Train.select_best=true", ["Train", "select_best"], True),
        ("Global.dataset_dir=null", ["Global", "dataset_dir"], None),
        ("Model.strides=[4,8]", ["Model", "strides"], [4, 8]),
        (" Global.device = gpu:0,1 ", ["Global", "device"], "gpu:0,1"),
        ("Global.output=a=b", ["Global", "output"], "a=b"),
    ],
)
def test_overrides_type_values_like_yaml(text: str, path: list[str], value: object) -> None:
    cfg = load_config("STFPM", [text])
    for key in path:
        cfg = cfg[key]
    assert cfg == value and type(cfg) is type(value)


def test_overrides_of_every_type_apply_in_order() -> None:
    cfg = load_config(
        "STFPM",
        [
            "Train.epochs_iters=10",
            "Train.epochs_iters=20",  # the later one wins
            "Train.learning_rate=1",  # an int is accepted for a float key, stored as float
            "Train.weight_decay=1e-4",  # YAML 1.1 reads this as a string; still a float
            "Global.dataset_dir=/data/bottle",
            "Global.dataset_dir=null",
            "Model.strides=[8,16,32]",
            "CheckDataset.split.enable=true",
            "CheckDataset.split.train_percent=80",
            "CheckDataset.split.val_percent=20",
            "Model.score_levels=null",
        ],
    )
    assert cfg["Train"]["epochs_iters"] == 20
    assert cfg["Train"]["learning_rate"] == 1.0 and isinstance(cfg["Train"]["learning_rate"], float)
    assert cfg["Train"]["weight_decay"] == 1e-4
    assert cfg["Global"]["dataset_dir"] is None
    assert cfg["Model"]["strides"] == [8, 16, 32]
    assert cfg["CheckDataset"]["split"] == {
        "enable": True, "train_percent": 80, "val_percent": 20, "seed": 42,
    }
    assert cfg["Model"]["score_levels"] is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Train.batch_size", "expected Section.key=value"),
        ("=4", "expected Section.key=value"),
        ("Train..batch_size=4", "expected Section.key=value"),
        ("Train.batch_size=", "empty value"),
        ("Model.strides=[4,8", "not valid YAML"),
        ("Model.strides={a: 1}", "not a mapping"),
    ],
)
def test_malformed_overrides(text: str, expected: str) -> None:
    message = error("STFPM", [text])
    assert message.startswith(f"override {text!r}: ") and expected in message


PADDLEX_STFPM_YAML = """\
Global:
  model: STFPM
  mode: check_dataset # check_dataset/train/evaluate/predict
  dataset_dir: "./dataset/mvtec_examples"
  device: gpu:0
  output: "output"
CheckDataset:
  convert:
    enable: False
    src_dataset_type: null
  split:
    enable: False
    train_percent: null
    val_percent: null
Train:
  num_classes: 1
  epochs_iters: 4000
  batch_size: 1
  learning_rate: 0.4
  pretrain_weight_path: null
  warmup_steps: 50
  resume_path: null
  log_interval: 10
  eval_interval: 4000
  save_interval: 4000
Evaluate:
  weight_path: "output/best_model/model.pdparams"
  log_interval: 10
Export:
  weight_path: https://paddle-model-ecology.bj.bcebos.com/paddlex/official_pretrained_model/STFPM_pretrained.pdparams
Predict:
  batch_size: 1
  model_dir: "output/best_model/inference"
  input: "https://paddle-model-ecology.bj.bcebos.com/paddlex/imgs/demo_image/uad_grid.png"
  kernel_option:
    run_mode: paddle
"""


def test_paddlexs_own_stfpm_config_loads_with_a_warning_for_each_key_it_has_no_use_for(caplog, tmp_path) -> None:
    """PaddleX's STFPM.yaml, as it ships: it failed on its first key without a use here."""
    path = tmp_path / "STFPM.yaml"
    path.write_text(PADDLEX_STFPM_YAML)
    cfg = load_config(path, ["Global.device=cpu", "Predict.kernel_option.run_mode=paddle"])
    assert cfg["Train"]["epochs_iters"] == 4000 and "num_classes" not in cfg["Train"]
    # It has no Model section: training takes the shipped STFPM.yaml's, in one warning (an error a key at a time).
    trained = load_config(path, ["Global.device=cpu", "Global.mode=train"])
    assert trained["Model"] == load_config("STFPM", ["Global.mode=train"])["Model"]
    assert trained["Train"]["batch_size"] == 1 and trained["Train"]["momentum"] == 0.9  # its own, then the shipped
    (filled,) = [r.getMessage() for r in caplog.records if "shipped STFPM.yaml's values" in r.getMessage()]
    assert filled.startswith(f"{path} (with overrides) leaves out Model.backbone, Model.input_size,")
    assert "Train.momentum" in filled and "Train.batch_size" not in filled
    assert not [r for r in caplog.records if "keep configs written before them" in r.getMessage()]
    assert "kernel_option" not in cfg["Predict"] and "log_interval" not in cfg["Evaluate"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for key in ("Train.num_classes", "Train.warmup_steps", "Evaluate.log_interval", "Predict.kernel_option"):
        assert any(f"{path}: {key} is a PaddleX setting flawscope has no use for (" in w for w in warned), key
    assert any(w.startswith("override 'Predict.kernel_option.run_mode=paddle': Predict.kernel_option is a PaddleX")
               for w in warned)


def test_an_empty_override_suggests_null_only_where_the_key_takes_it() -> None:
    """``Global.device=`` was told to write ``Global.device=null``, which is then refused."""
    assert error("STFPM", ["Global.device="]) == "override 'Global.device=': empty value"
    assert error("STFPM", ["Train.calibration_dir="]).endswith("empty value; write Train.calibration_dir=null to clear it")


def test_unknown_key_in_override_names_key_and_allowed_keys() -> None:
    message = error("STFPM", ["Train.epoch_iters=5"])
    assert "unknown key Train.epoch_iters" in message
    assert "did you mean Train.epochs_iters?" in message
    assert "allowed keys in Train: epochs_iters, batch_size, learning_rate" in message


def test_override_must_reach_a_value() -> None:
    assert "Train is a section; set one of its keys: epochs_iters" in error("STFPM", ["Train=1"])
    assert "Train.batch_size is a value, not a section" in error("STFPM", ["Train.batch_size.x=1"])
    assert "unknown section train; did you mean Train?" in error("STFPM", ["train.batch_size=1"])


# --- errors in files ------------------------------------------------------------------------


def test_unknown_key_in_file_names_file_key_and_allowed_keys(tmp_path: Path) -> None:
    data = shipped()
    data["CheckDataset"]["split"]["train_percnt"] = 80
    path = write(tmp_path, data)
    message = error(path)
    assert message.startswith(f"{path}: unknown key CheckDataset.split.train_percnt")
    assert "did you mean CheckDataset.split.train_percent?" in message
    assert "allowed keys in CheckDataset.split: enable, train_percent, val_percent, seed" in message


def test_unknown_section_in_file(tmp_path: Path) -> None:
    data = shipped()
    data["Trian"] = {}
    assert "unknown section Trian; did you mean Train?" in error(write(tmp_path, data))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("Train.batch_size=8.5", "Train.batch_size must be an integer >= 1, got 8.5"),
        ("Train.batch_size=true", "Train.batch_size must be an integer >= 1, got true"),
        ("Train.learning_rate=fast", 'Train.learning_rate must be a number > 0, got "fast"'),
        ("CheckDataset.convert.enable=1", "convert.enable must be true or false, got 1"),
        ("Global.output=null", "Global.output must be a string, got null"),
        ("Model.strides=4", "Model.strides must be a non-empty list of distinct integers"),
    ],
)
def test_wrong_type(override: str, expected: str) -> None:
    assert expected in error("STFPM", [override])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("Global.mode=trian", 'one of check_dataset, train, evaluate, predict, export, got "trian"'
                              ' (did you mean "train"?)'),
        ("Global.model=PaDiM", "Global.model must be one of STFPM, PatchCore"),
        ("Model.resize_mode=pad", "Model.resize_mode must be one of resize, letterbox"),
        ("Model.map_combine=max", "Model.map_combine must be one of product, sum"),
        ("CheckDataset.dataset_type=mvtec", 'got "mvtec" (did you mean "MVTec"?)'),
        ("CheckDataset.convert.src_dataset_type=COCO", "one of LabelMe, VOC, MVTec or null"),
        ("Export.format=tensorrt", "Export.format must be one of onnx, openvino"),
    ],
)
def test_bad_choice(override: str, expected: str) -> None:
    assert expected in error("STFPM", [override])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("Train.epochs_iters=0", "Train.epochs_iters must be an integer >= 1, got 0"),
        ("Train.learning_rate=0", "Train.learning_rate must be a number > 0, got 0"),
        ("Train.calibration_fraction=1", "must be a number >= 0 and < 1, got 1"),
        ("Train.image_fpr=-0.1", "Train.image_fpr must be a number >= 0 and < 1"),
        ("Model.input_size=100", "must be an integer >= 64 and <= 4096 and a multiple of 32, got 100"),
        ("Model.input_size=8192", "must be an integer >= 64 and <= 4096 and a multiple of 32, got 8192"),
        ("Model.input_size=32", "must be an integer >= 64 and <= 4096 and a multiple of 32, got 32"),
        ("Model.strides=[4,64]", "distinct integers from 4, 8, 16, 32, got [4, 64]"),
        ("Model.strides=[4,4]", "got [4, 4]"),
        ("Model.strides=[]", "got []"),
        ("Model.coreset_ratio=0", "Model.coreset_ratio must be a number > 0 and <= 1, got 0"),
        ("Model.num_neighbors=0", "Model.num_neighbors must be an integer >= 1, got 0"),
        ("Model.projection_dim=0", "Model.projection_dim must be an integer >= 1 or null, got 0"),
        ("Model.score_levels=0", "Model.score_levels must be an integer >= 1 or null, got 0"),
        ("Train.hard_fraction=0", "Train.hard_fraction must be a number > 0 and <= 1 or null, got 0"),
        ("Train.hard_fraction=1.5", "Train.hard_fraction must be a number > 0 and <= 1 or null, got 1.5"),
    ],
)
def test_out_of_range(override: str, expected: str) -> None:
    assert expected in error("STFPM", [override])


def test_patchcore_keys_accepted() -> None:
    cfg = load_config("PatchCore", ["Model.coreset_ratio=1", "Model.num_neighbors=9"])
    assert cfg["Model"]["coreset_ratio"] == 1.0 and cfg["Model"]["num_neighbors"] == 9
    assert "select_best" not in cfg["Train"] and cfg["Model"]["search"] == "exact"  # defaults: its own keys only


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("Global:\n  model: STFPM\n  mode: [train\nTrain:\n  batch_size: 8\n")
    message = error(path)
    assert message.startswith(f"{path}: invalid YAML at line ")


@pytest.mark.parametrize("text, at, key", [
    ("Train:\n  epochs_iters: 5\nGlobal:\n  mode: train\nTrain:\n  batch_size: 2\n", "line 5, column 1", "Train"),
    ("Train:\n  batch_size: 2\n  batch_size: 4\n", "line 3, column 3", "batch_size"),
])
def test_a_key_given_twice_is_an_error_not_the_last_one_kept(tmp_path: Path, text: str, at: str, key: str) -> None:
    """Plain YAML keeps the last of two equal keys: a second Train section would drop the first silently."""
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    assert error(path) == f"{path}: invalid YAML at {at}: '{key}' appears twice in one mapping"


def test_yaml_merge_keys_still_merge_and_an_unhashable_key_is_one_error_line(tmp_path: Path) -> None:
    data = shipped()
    path = tmp_path / "merged.yaml"
    del data["Train"]["batch_size"]
    path.write_text(yaml.safe_dump(data, sort_keys=False).replace("Train:\n", "Train:\n  <<: {batch_size: 3}\n", 1))
    assert "<<: {batch_size: 3}" in path.read_text()
    assert load_config(path)["Train"]["batch_size"] == 3
    path.write_text("Global:\n  ? [a]\n  : 1\n")
    assert error(path) == f"{path}: invalid YAML at line 2, column 5: found unhashable key"


def test_file_must_be_a_mapping(tmp_path: Path) -> None:
    assert "expected a mapping of sections" in error(write(tmp_path, [1, 2]))
    assert "Model must be a section" in error(write(tmp_path, {**shipped(), "Model": 3}))


def test_defaults_fill_missing_keys_and_required_keys_are_enforced(tmp_path: Path) -> None:
    data = shipped()
    del data["Export"], data["Train"]["log_interval"], data["CheckDataset"]["split"]
    cfg = load_config(write(tmp_path, data))
    assert cfg["Export"] == {"weight_path": None, "format": "onnx"}
    assert cfg["Train"]["log_interval"] == 10
    assert cfg["CheckDataset"]["split"]["enable"] is False

    del data["Train"]["learning_rate"]
    data["Global"]["mode"] = "train"  # the one mode that reads it: the shipped config's value, and a warning
    path = write(tmp_path, data)
    assert load_config(path)["Train"]["learning_rate"] == shipped()["Train"]["learning_rate"]
    # An override can supply what the file leaves out.
    assert load_config(path, ["Train.learning_rate=0.1"])["Train"]["learning_rate"] == 0.1
    assert "missing required key Global.model" in error(write(tmp_path, {}))


@pytest.mark.parametrize("mode", ["check_dataset", "evaluate", "predict", "export"])
def test_only_train_needs_the_model_and_train_sections(tmp_path: Path, mode: str) -> None:
    """The other modes read the model from its inference directory: a config for them may leave
    out the backbone and the hyperparameters, but what it gives is still checked."""
    short = write(tmp_path, {"Global": {"model": "STFPM", "mode": mode}})
    cfg = load_config(short)
    assert "backbone" not in cfg["Model"] and "learning_rate" not in cfg["Train"]  # keys without defaults
    assert "Train.batch_size must be an integer >= 1, got 0" in error(short, ["Train.batch_size=0"])
    # Training takes what it leaves out from the shipped config, as -c STFPM does (an error a key at a time before).
    assert load_config(short, ["Global.mode=train"])["Model"] == load_config("STFPM", ["Global.mode=train"])["Model"]


def test_split_and_convert_must_be_complete_when_enabled() -> None:
    split = ["CheckDataset.split.enable=true", "CheckDataset.split.train_percent=80"]
    message = error("STFPM", split)
    assert "must both be set and add up to 100, got 80 and null" in message
    message = error("STFPM", ["CheckDataset.convert.enable=true"])
    assert "convert.src_dataset_type is null" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("runs #3", "runs #3"),  # not a YAML comment
        ("0755", "0755"),  # not an octal number
        ("2024", "2024"),
        ("*.png", "*.png"),  # not a YAML alias
        ("@line/cam 1", "@line/cam 1"),
        ("'quoted'", "quoted"),
        ("null", None),
    ],
)
def test_text_keys_take_the_value_as_typed(value: str, expected: object) -> None:
    cfg = load_config("STFPM", [f"Predict.input={value}", "Train.batch_size=16"])
    assert cfg["Predict"]["input"] == expected
    assert cfg["Train"]["batch_size"] == 16  # other keys still read as YAML


def test_a_text_key_that_cannot_be_null_refuses_null() -> None:
    with pytest.raises(FlawscopeError, match="Global.output must be"):
        load_config("STFPM", ["Global.output=null"])


def test_text_values_with_control_characters_are_refused_quoted_backslashes_kept() -> None:
    """A Windows path in double quotes reads "\\n" as a newline in YAML: refused, with the way out."""
    with pytest.raises(FlawscopeError, match=r'Global.output holds a control character, got "C:\\new".*single quotes'):
        load_config("STFPM", ['Global.output="C:\\new"'])
    for typed in ("C:\\new", "'C:\\new'"):
        assert load_config("STFPM", [f"Global.output={typed}"])["Global"]["output"] == "C:\\new"


def test_paths_in_config_keys_start_from_the_home_folder_at_a_tilde(monkeypatch, tmp_path) -> None:
    """No shell expands "~" after "=": -o Global.dataset_dir=~/data would be a folder named "~"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("STFPM", ["Global.dataset_dir=~/data", "Predict.input=http://host/~a.png", "Train.batch_size=8"])
    assert cfg["Global"]["dataset_dir"] == str(tmp_path / "data")
    assert cfg["Predict"]["input"] == "http://host/~a.png"  # not a path at its start: as typed


def test_a_blur_wider_than_the_input_is_refused() -> None:
    """4 sigma of reflect padding must stay inside the map: 15.75 is the most a 64-pixel input takes."""
    assert load_config("STFPM", ["Global.mode=train", "Model.input_size=64", "Model.smooth_sigma=15.75"])
    with pytest.raises(FlawscopeError, match="Model.smooth_sigma 15.8 blurs over 4 sigma = 64 pixels.*at most 15.75"):
        load_config("STFPM", ["Global.mode=train", "Model.input_size=64", "Model.smooth_sigma=15.8"])


@pytest.mark.parametrize("override, fragment", [
    ("Model.smooth_sigma=.inf", "Model.smooth_sigma must be a number >= 0, got Infinity"),
    ("Train.learning_rate=1e400", "Train.learning_rate must be a number > 0"),
    ("Train.weight_decay=.nan", "Train.weight_decay must be a number"),
    ("Global.output=''", "Global.output must be a path, got an empty one"),
])
def test_infinite_numbers_and_empty_paths_are_refused(override, fragment):
    with pytest.raises(FlawscopeError, match=re.escape(fragment)):
        load_config("STFPM", [override])


def test_a_path_of_a_bare_tilde_is_the_home_folder_and_null_still_clears(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = load_config("STFPM", ["Global.dataset_dir=~", "Train.calibration_dir=~"])
    assert cfg["Global"]["dataset_dir"] == cfg["Train"]["calibration_dir"] == "/home/someone"
    assert load_config("STFPM", ["Train.calibration_dir=null"])["Train"]["calibration_dir"] is None


def test_a_folder_named_like_a_shipped_config_does_not_hide_it(tmp_path, monkeypatch):
    """-o Global.output=STFPM makes such a folder in the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "STFPM").mkdir()
    assert load_config("STFPM")["Global"]["model"] == "STFPM"
    (tmp_path / "sub").mkdir()
    with pytest.raises(FlawscopeError, match="sub: is a directory"):
        load_config("sub")


def test_a_predict_config_with_a_model_section_but_no_input_size(tmp_path):
    """Prediction reads no Model section: smooth_sigma alone is not checked against a missing input_size."""
    path = tmp_path / "predict.yaml"
    path.write_text("Global:\n  model: STFPM\n  mode: predict\nModel:\n  smooth_sigma: 2.0\n")
    assert load_config(path)["Model"]["smooth_sigma"] == 2.0


@pytest.mark.parametrize("override, fragment", [
    ("Global.seed=010", "YAML reads 010 as an octal number (8); write 10"),
    ("Train.epochs_iters=0400", "YAML reads 0400 as an octal number (256); write 400"),
])
def test_a_number_with_a_leading_zero_is_refused_not_read_as_octal(override, fragment):
    with pytest.raises(FlawscopeError, match=re.escape(fragment)):
        load_config("STFPM", [override])
    assert load_config("STFPM", ["Global.seed=0"])["Global"]["seed"] == 0
