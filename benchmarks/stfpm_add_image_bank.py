"""Give a trained STFPM model the image-level score without training it again, for the benchmarks.

    python benchmarks/stfpm_add_image_bank.py DATASET STFPM_MODEL_DIR OUT_DIR [--seed 42] [--no-add-calibration-images]
    flawscope -c STFPM -o Global.mode=evaluate -o Global.dataset_dir=DATASET -o Evaluate.weight_path=OUT_DIR

A model trained before ``Model.global_score`` (or with it off) keeps its student; this does what
the train mode now does after training: the teacher describes the training images, the student
is measured on the good images held out of its training (the same split: ``Train.calibration_fraction``
0.1 and ``--seed``, the training run's ``Global.seed``), the thresholds are calibrated again on
them, and then they join the image bank (``Train.add_calibration_images``). The student being the
same, OUT_DIR is what training with the shipped config gives.
"""

from __future__ import annotations

import argparse

import torch

from flawscope.data.layouts import load_dataset, unique_images
from flawscope.data.transforms import Resizer, normalize
from flawscope.inference.model_dir import load_model_dir, save_model_dir
from flawscope.inference.predictor import Predictor
from flawscope.models import build_model
from flawscope.training.calibrate import calibrate, calibration_set, split_calibration
from flawscope.training.runner import load_training_images
from flawscope.training.stfpm_trainer import fit_image_bank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=42, help="Global.seed of the training run")
    ap.add_argument("--grid", type=int, default=4, help="Model.global_grid")
    ap.add_argument("--strides", type=int, nargs="+", default=[16, 32], help="Model.global_strides")
    ap.add_argument("--add-calibration-images", action=argparse.BooleanOptionalAction, default=True,
                    help="Train.add_calibration_images")
    args = ap.parse_args()
    torch.set_num_threads(2)
    trained, info = load_model_dir(args.model_dir)
    info.model_config.update(global_score=True, global_grid=args.grid, global_strides=args.strides)
    model = build_model(info.model, info.model_config, pretrained=False).eval()
    model.load_state_dict(trained.state_dict(), strict=False)  # teacher and student; the bank is new
    dataset = load_dataset(args.dataset, "auto")
    fit, held = split_calibration(unique_images(dataset.train)[0], 0.1, args.seed)
    resizer = Resizer(info.input_size, info.resize_mode)
    normalizer = lambda batch: normalize(batch, info.mean, info.std)  # noqa: E731
    fit_images, held_images = load_training_images(fit, resizer), load_training_images(held, resizer)
    fit_image_bank(model, fit_images, held_images, torch.device("cpu"), normalizer)
    cal_set = calibration_set({"calibration_dir": None, "threshold_method": "fpr"}, dataset, held, fit)
    info.calibration = calibrate(Predictor(model, info, torch.device("cpu")), cal_set, 0.01, 0.01)
    if args.add_calibration_images:
        fit_image_bank(model, torch.cat([fit_images, held_images]), held_images, torch.device("cpu"), normalizer)
    print(f"{save_model_dir(args.out_dir, model, info)}: {len(model.image_bank)} training images in the image bank, "
          f"the student measured on {len(held)} held-out ones")


if __name__ == "__main__":
    main()
