"""The ``flawscope`` command: a thin layer over the Python API.

    flawscope -c configs/STFPM.yaml -o Global.mode=train -o Global.dataset_dir=DATA
    flawscope --pipeline anomaly_detection --input IMG|URL|DIR --save_path output [--device cpu]
    flawscope --get_pipeline_config anomaly_detection --save_path ./my_path [--yes]   (--save_path -: print it)
    flawscope benchmark --datasets DIR [DIR ...] [--models STFPM ...] [-o Section.key=value] [--output DIR]

Exit status: 0 success, 1 a dataset check that did not pass (or a benchmark run that failed), 2 a
user error (one line on stderr), also when prediction could not read some of its inputs; 130
Ctrl-C, 143 SIGTERM, 141 a reader that closed the pipe (``| head``).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import yaml
from PIL import Image

from flawscope.config import BACKENDS, TRAIN_ONLY_SECTIONS, shipped_configs
from flawscope.errors import FlawscopeError, Terminated, check_output_dir, one_line
from flawscope.logs import log, setup_console


class _Flag(NamedTuple):
    dest: str  # the argparse attribute
    key: str  # what -c takes instead


_PIPELINE_FLAGS = {
    "--input": _Flag("input", "-o Predict.input=..."),
    "--save_path": _Flag("save_path", "-o Global.output=..."),
    "--device": _Flag("device", "-o Global.device=..."),
    "--batch_size": _Flag("batch_size", "-o Predict.batch_size=..."),
    "--backend": _Flag("backend", "-o Predict.backend=..."),
    "--model_dir": _Flag("model_dir", "-o Predict.model_dir=..."),
    "--recursive": _Flag("recursive", "-o 'Predict.input=DIR/**/*' (a recursive glob)"),
    "--use_hpip": _Flag("use_hpip", "-o Predict.backend=openvino"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flawscope", description="Visual anomaly detection for industrial inspection.",
                                epilog="flawscope benchmark -h: train, evaluate and time models on datasets")
    p.add_argument("-c", "--config", help=f"module config: a YAML path or a shipped name ({', '.join(shipped_configs())})")
    p.add_argument("-o", "--override", action="append", default=[], metavar="Section.key=value",
                   help="override a config value (repeatable); values parse as YAML scalars, "
                   "text keys (paths) take the text as typed")
    p.add_argument("--pipeline", help="pipeline name (anomaly_detection) or pipeline YAML file")
    p.add_argument("--input", help="image file, URL, directory or glob to predict on")
    p.add_argument("--save_path", help="where to save results (or the pipeline config)")
    p.add_argument("--device", help="cpu | gpu | gpu:0 | gpu:0,1")
    p.add_argument("--batch_size", type=int, help="images per forward pass")
    p.add_argument("--backend", choices=BACKENDS, help="torch, onnxruntime or openvino (faster on a CPU); "
                   "default auto: what the model directory holds")
    p.add_argument("--model_dir", help="inference model directory (default: the bundled model)")
    p.add_argument("--recursive", action="store_true", help="descend into sub-directories of --input")
    p.add_argument("--use_hpip", action="store_true", help="PaddleX's high-performance inference: --backend openvino")
    p.add_argument("--get_pipeline_config", metavar="NAME",
                   help="write the config of pipeline NAME to --save_path (- prints it)")
    p.add_argument("--yes", action="store_true", help="overwrite an existing pipeline config without asking")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def _write_pipeline_config(name: str, save_path: str | None, yes: bool) -> Path | None:
    """Write pipeline ``name``'s config into folder or file ``save_path``; ``-`` prints it (None)."""
    from flawscope.pipeline import get_pipeline_config

    config = get_pipeline_config(name)
    if save_path == "-":
        sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
        return None
    target = Path(save_path or ".").expanduser()
    if target.suffix.lower() not in (".yaml", ".yml"):
        target = target / f"{name}.yaml"
    check_output_dir(target.parent, "--save_path")
    if target.exists() and not yes:
        if not sys.stdin.isatty():
            raise FlawscopeError(f"{target}: already exists (use --yes to overwrite)")
        try:
            answer = input(f"{target} exists. Overwrite? [y/N] ")
        except EOFError:  # Ctrl-D: no answer, so no
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise FlawscopeError(f"{target}: not overwritten")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def _benchmark_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flawscope benchmark",
                                description="Train, evaluate and time models on datasets; writes "
                                            "benchmark.md and benchmark.json.")
    p.add_argument("--datasets", nargs="+", required=True, metavar="DIR", help="dataset directories")
    p.add_argument("--models", nargs="+", default=["STFPM"], metavar="MODEL",
                   help="shipped model configs (default: STFPM)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="Section.key=value",
                   help="override applied to every run's config (repeatable), e.g. Global.device=gpu")
    p.add_argument("--output", default="output/benchmark", help="where runs and the table go")
    p.add_argument("--batch_size", type=int, default=8, help="batch N of the latency/throughput timing")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per batch size")
    return p


def _benchmark(argv: list[str]) -> int:
    from flawscope.benchmark import markdown_table, run_benchmark

    args = _benchmark_parser().parse_args(argv)
    report = run_benchmark(args.datasets, args.models, args.override, args.output, args.batch_size, args.repeats)
    print(markdown_table(report))
    print(f"benchmark table written to {Path(args.output) / 'benchmark.md'}")
    return 0 if all(run["status"] == "ok" for run in report["runs"]) else 1


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["benchmark"]:
        setup_console()
        return _benchmark(argv[1:])
    args = _parser().parse_args(argv)
    if args.version:
        from flawscope import __version__

        print(f"flawscope {__version__}")
        return 0
    setup_console()
    if args.get_pipeline_config:
        written = _write_pipeline_config(args.get_pipeline_config, args.save_path, args.yes)
        if written is not None:
            print(f"pipeline config written to {written}")
        return 0
    if args.pipeline and (args.config or args.override):
        raise FlawscopeError("--pipeline runs a pipeline config, -c/-o a module config: give one of them "
                             "(pipeline settings: --device, --batch_size, --backend, --model_dir, or its YAML)")
    if args.pipeline:
        from flawscope.data.io import IMAGE_EXTENSIONS
        from flawscope.device import parse_device
        from flawscope.engine import save_results, warn_if_saved_among_inputs
        from flawscope.pipeline import create_pipeline

        if not args.input:
            raise FlawscopeError("--input: required with --pipeline (an image, URL, directory or glob)")
        settings = {k: v for k, v in (("batch_size", args.batch_size), ("model_dir", args.model_dir),
                                      ("backend", args.backend), ("recursive", args.recursive or None),
                                      ("use_hpip", args.use_hpip or None))
                    if v is not None}
        save_path = Path(args.save_path or "output").expanduser()  # as -o paths are: a launcher without a shell
        check_output_dir(save_path, "--save_path")
        if save_path.suffix.lower() in IMAGE_EXTENSIONS | {".json"} and not save_path.is_dir():
            raise FlawscopeError(f"--save_path: {save_path} names a file; give a folder to save each image's "
                                 "<name>_res.json and <name>_res.png into")
        if args.device is not None:  # named as the user typed it, before the pipeline's own check names its setting
            parse_device(args.device, "--device")
        pipeline = create_pipeline(args.pipeline, device=args.device, **settings)
        inputs = os.path.expanduser(args.input)
        warn_if_saved_among_inputs(inputs, save_path, pipeline.recursive)
        counts = save_results(pipeline.predict(inputs), save_path)
        return _prediction_status(counts)
    if args.config:
        from flawscope.config import load_config
        from flawscope.engine import run as run_mode

        given = [flag for flag, value in _PIPELINE_FLAGS.items()
                 if getattr(args, value.dest) is not None and getattr(args, value.dest) is not False]
        if given:
            raise FlawscopeError(f"{', '.join(given)}: options of --pipeline, which -c ignores; with -c set "
                                 + ", ".join(_PIPELINE_FLAGS[flag].key for flag in given))

        cfg = load_config(args.config, args.override)
        mode = cfg["Global"]["mode"]
        _warn_training_overrides(args.override, mode)
        result = run_mode(cfg)
        if mode == "predict":
            return _prediction_status(result)
        return 1 if mode == "check_dataset" and not result.get("check_pass", False) else 0
    _parser().print_usage(sys.stderr)
    raise FlawscopeError("nothing to do: give -c CONFIG, --pipeline NAME --input IMG, or --get_pipeline_config NAME")


def _warn_training_overrides(overrides: list[str], mode: str) -> None:
    """Model and Train keys describe how a model is trained: the other modes take a model's
    settings from its directory, so ``-o Model.resize_mode=letterbox`` would change nothing there."""
    keys = [text.split("=", 1)[0].strip() for text in overrides]
    ignored = [key for key in keys if key.split(".", 1)[0] in TRAIN_ONLY_SECTIONS]
    if mode != "train" and ignored:
        why = "uses no model" if mode == "check_dataset" else "takes the model's own settings from its directory"
        log.warning("%s: used when training only; the %s mode %s: ignored", ", ".join(ignored), mode, why)


def _prediction_status(counts: dict) -> int:
    """2 when an input could not be read: the others' results are saved and each failure has its
    own line, but a script must not take a folder with a corrupt image for a clean run. stderr's
    line names the input when it is the only one that failed."""
    if not counts["errors"]:
        return 0
    if counts["errors"] == 1:
        of = f" (1 of {counts['images']} inputs could not be read)" if counts["images"] > 1 else ""
        print(f"error: {one_line(counts['error'])}{of}", file=sys.stderr)
    else:
        print(f"error: {counts['errors']} of {counts['images']} inputs could not be read (listed above)",
              file=sys.stderr)
    return 2


# Errors of the storage itself: a write or close that fails this way names no file.
_STORAGE_ERRORS = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EIO", "EFBIG") if hasattr(errno, name)}


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    # flawscope's own limit (data.io.MAX_PIXELS) decides which images are too large: Pillow's warning
    # for images over its lower one would only precede that decision. The command owns its process.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    # Only the main thread may set handlers; a SIGTERM the parent ignores (trap '' TERM) stays ignored.
    on_term = threading.current_thread() is threading.main_thread() \
        and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_term else None
    try:
        return run(argv)
    except FlawscopeError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped (| head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail
        return 141  # 128 + SIGPIPE, what a shell reports for a tool that stopped this way
    except OSError as exc:  # the file system refused (full disk, permissions, a file in the way)
        if exc.filename is None and exc.errno not in _STORAGE_ERRORS:
            raise
        where = f"{exc.filename}: " if exc.filename is not None else "writing the output: "
        print(f"error: {one_line(f'{where}{exc.strerror or exc}')}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if on_term:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
