"""``Global.mode`` dispatch: each mode is one function from a validated config to its outputs."""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flawscope.data.io import check_local
from flawscope.device import check_device_spec, one_device, parse_device
from flawscope.errors import FlawscopeError, check_output_dir, one_line
from flawscope.inference.inputs import RECURSIVE_HINT, glob_start
from flawscope.inference.result import AnomalyResult, fit_name
from flawscope.logs import log


def inference_dir(cfg: dict, key: str) -> Path | None:
    """The model directory a mode reads: the given one, else the one training wrote, else None.
    The directory says which model it is; a config naming another is told so."""
    section, name = key.split(".")
    given = cfg[section][name]
    found = Path(given) if given else _trained_dir(cfg, key)
    if found is not None:
        from flawscope.inference.model_dir import read_model_info

        try:
            model = read_model_info(given or found).model  # as given: Path() would make "https://" "https:/"
        except FlawscopeError as exc:
            raise FlawscopeError(f"{key}: {exc}" if given else str(exc)) from None
        if model != cfg["Global"]["model"]:
            log.warning("%s holds a %s model: it is used as it is (Global.model %s does not apply to %s)", found,
                        model, cfg["Global"]["model"], cfg["Global"]["mode"])
    return found


def _trained_dir(cfg: dict, key: str) -> Path | None:
    """``Global.output/best_model/inference``, but not while ``train_result.json`` says a later
    run there did not finish: that one is an earlier run's, and taking it for the new one would
    be silent."""
    output = Path(cfg["Global"]["output"])
    trained = output / "best_model" / "inference"
    try:
        done = json.loads((output / "train_result.json").read_text(encoding="utf-8")).get("done_flag", True)
    except (OSError, ValueError, AttributeError):  # none (a model put there by hand), or unreadable
        done = True
    if done is False:  # and with no model left, predict would silently take the bundled one
        left = f"so {trained} is an earlier run's model" if trained.is_dir() else "and left no model"
        raise FlawscopeError(f"{output / 'train_result.json'}: the last training in {output} did not finish "
                             f"(done_flag false), {left}; give {key} or train again")
    return trained if trained.is_dir() else None


def check_dataset(cfg: dict) -> dict:
    from flawscope.data.check import run_check_dataset

    return run_check_dataset(cfg)


def train(cfg: dict) -> dict:
    """Train on one device, or on several GPUs through torchrun (see ``training.distributed``)."""
    from flawscope.training import distributed
    from flawscope.training.runner import train as run_training

    devices = parse_device(cfg["Global"]["device"])
    if distributed.under_torchrun():
        world = distributed.join(devices)
        if not world.is_main:
            log.setLevel(logging.WARNING)
        try:
            result = run_training(cfg, world)
        except BaseException:
            distributed.leave(failed=True)
            raise
        distributed.leave()
        return result
    if len(devices) > 1:
        if cfg["Global"]["model"] != "STFPM":
            log.warning("Global.device lists %d GPUs: %s fits on the first, %s", len(devices),
                        cfg["Global"]["model"], devices[0])
        else:
            return distributed.relaunch(cfg, devices)
    return run_training(cfg, distributed.World(device=devices[0]))


def evaluate(cfg: dict) -> dict:
    """Metrics, thresholds and counts to ``evaluate_result.json``; plots to ``evaluate_report/``."""
    from flawscope.data.layouts import load_dataset
    from flawscope.evaluation.evaluate import evaluate_model
    from flawscope.inference.predictor import Predictor

    device = one_device(cfg["Global"]["device"])
    model_dir = inference_dir(cfg, "Evaluate.weight_path")
    if model_dir is None:
        raise FlawscopeError("Evaluate.weight_path: no model given and none trained under "
                             f"{cfg['Global']['output']}/best_model/inference")
    if not cfg["Global"]["dataset_dir"]:
        raise FlawscopeError("Global.dataset_dir: required for evaluation (-o Global.dataset_dir=PATH)")
    # the model is trained already: a labelled set of test images alone (test/ and ground_truth/) will do
    dataset = load_dataset(cfg["Global"]["dataset_dir"], cfg["CheckDataset"]["dataset_type"], require_train=False)
    if not dataset.val:
        raise FlawscopeError(f"{dataset.root}: no validation/test images to evaluate on")
    predictor = Predictor.from_dir(model_dir, device, cfg["Evaluate"]["backend"])
    return evaluate_model(predictor, dataset, Path(cfg["Global"]["output"]), model_dir)


def predict(cfg: dict) -> dict:
    from flawscope.inference.predictor import Predictor

    p = cfg["Predict"]
    if not p["input"]:
        raise FlawscopeError("Predict.input: required for prediction (-o Predict.input=IMG_OR_DIR)")
    model_dir = inference_dir(cfg, "Predict.model_dir")
    if model_dir is None:
        log.warning("no Predict.model_dir and no trained model in %s/best_model/inference: predicting with the "
                    "bundled default model (STFPM, hazelnuts only)", cfg["Global"]["output"])
    predictor = Predictor.from_dir(model_dir, one_device(cfg["Global"]["device"]), p["backend"],
                                   batch_size=p["batch_size"], threshold=p["threshold"],
                                   min_region_area=p["min_region_area"], outline_ok_images=p["outline_ok_images"])
    warn_if_saved_among_inputs(p["input"], Path(cfg["Global"]["output"]), p["recursive"])
    results = predictor.predict(p["input"], recursive=p["recursive"])
    return save_results(_module_hints(results), Path(cfg["Global"]["output"]))


def _module_hints(results: Iterable[AnomalyResult]) -> Iterator[AnomalyResult]:
    """-c takes no --recursive: a folder holding only folders is told its config key instead."""
    for res in results:
        if res.error and RECURSIVE_HINT in res.error:
            res.error = res.error.replace(RECURSIVE_HINT, "-o Predict.recursive=true")
        yield res


def save_results(results: Iterable[AnomalyResult], save_path: Path) -> dict:
    """Save each result's JSON and pictures (as its ``json_arrays``/``save_extra`` say), print
    one line each, and count the outcomes.

    Two inputs with the same file name (from different folders) get distinct output names, also
    where the file system does not tell upper from lower case.
    """
    counts = {"images": 0, "anomalous": 0, "errors": 0}
    used: set[str] = set()
    for res in results:
        counts["images"] += 1
        if res.error:
            counts["errors"] += 1
            counts["error"] = res.error  # the last one's message
            print(f"{one_line(str(res.input_path))}\terror: {one_line(res.error.removeprefix(f'{res.input_path}: '))}")
            continue
        name = res.stem
        if name.casefold() in used and res.input_path:
            name = fit_name(f"{Path(res.input_path).parent.name}_{name}")
        while name.casefold() in used:
            name += "_"
        used.add(name.casefold())
        res.save_all(save_path, name)
        counts["anomalous"] += int(res.is_anomaly)
        # Rounded as the picture's label is: 0.49996 must not print "0.500" beside is_anomaly=False.
        print(f"{one_line(str(res.input_path))}\tscore={res.score_text(3)}\tis_anomaly={res.is_anomaly}")
    return counts


def warn_if_saved_among_inputs(inputs: Any, save_path: Path, recursive: bool = False) -> None:
    """Say when a later run over the same input would read the results as inputs, as PaddleX's
    would (names are not skipped: a part's photo may well end in _res.png): they go into a
    folder given as input (or below it, when the run descends), or where a glob of pictures looks."""
    target = save_path.resolve()
    for source in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
        if not isinstance(source, (str, os.PathLike)):
            continue
        text = os.fspath(source)
        if glob.has_magic(text):
            parts, start, folder = glob_start(text)
            descends = "**" in parts[start:]
            if not fnmatch.fnmatch("part_res.png", parts[-1]):
                continue
        elif os.path.isdir(text):
            folder, descends = Path(text), recursive
        else:
            continue
        folder = folder.resolve()
        if target == folder or descends and target.is_relative_to(folder):
            log.warning("%s: results saved where a later run over %s will read them as inputs", save_path, text)
            return


def export(cfg: dict) -> dict:
    from flawscope.inference.export import export_model

    model_dir = inference_dir(cfg, "Export.weight_path")
    if model_dir is None:
        raise FlawscopeError("Export.weight_path: no model given and none trained under "
                             f"{cfg['Global']['output']}/best_model/inference")
    return export_model(model_dir, Path(cfg["Global"]["output"]) / "export", cfg["Export"]["format"])


MODES = {"check_dataset": check_dataset, "train": train, "evaluate": evaluate, "predict": predict, "export": export}


def run(cfg: dict) -> dict:
    check_device_spec(cfg["Global"]["device"])
    if cfg["Global"]["dataset_dir"]:  # as given: the modes resolve it, which makes "https://" "https:/"
        check_local(cfg["Global"]["dataset_dir"], "a dataset directory")
    check_output_dir(Path(cfg["Global"]["output"]), "Global.output")
    return MODES[cfg["Global"]["mode"]](cfg)
