"""Shared fixtures: a small synthetic MVTec-style dataset and a trained tiny model.

Good images are a smooth random texture; defect images add a bright square, and their masks mark it.
Everything is generated here so the suite needs no downloaded data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from flawscope.config import load_config
from flawscope.engine import run

SIZE = 64


def texture(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A smooth random RGB texture: upsampled noise, so neighbouring pixels agree like real surfaces."""
    small = rng.integers(80, 176, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((size, size), Image.BILINEAR))


def make_mvtec(root: Path, n_train: int = 8, n_good: int = 2, n_defect: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture(rng)).save(root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        (root / "test" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture(rng)).save(root / "test" / "good" / f"{i:03d}.png")
    for i in range(n_defect):
        image, mask = texture(rng), np.zeros((SIZE, SIZE), np.uint8)
        y, x = rng.integers(8, SIZE - 24, 2)
        image[y:y + 16, x:x + 16] = (250, 30, 30)
        mask[y:y + 16, x:x + 16] = 255
        for sub, arr, name in (("test/scratch", image, f"{i:03d}.png"), ("ground_truth/scratch", mask, f"{i:03d}_mask.png")):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / sub / name)
    return root


@pytest.fixture
def mvtec_dir(tmp_path: Path) -> Path:
    return make_mvtec(tmp_path / "data")


def written_before_digests(model_dir: Path) -> None:
    """Make ``model_dir`` a folder written before ``inference.yml`` listed its files' digests, whose
    weights load unchecked: as the tests that rewrite the weights the way older versions saved them need."""
    meta = model_dir / "inference.yml"
    info = yaml.safe_load(meta.read_text())
    del info["files"]
    meta.write_text(yaml.safe_dump(info, sort_keys=False))


def tiny_overrides(dataset: Path, output: Path, iters: int = 6) -> list[str]:
    """A config small enough to train in seconds on a CPU. At 64x64 and a few iterations the deep
    levels (4x4 and 2x2 maps) tell nothing yet, so STFPM scores images on every level, and trains
    on the paper's loss: the hardest 10% of a 2x2 level's 16 positions in a batch is one. A 2x2
    stride-32 map holds one cell of image descriptors, not the shipped 4x4 grid."""
    return [f"Global.dataset_dir={dataset}", f"Global.output={output}", "Model.input_size=64", "Model.score_levels=null",
            "Model.global_grid=1",
            "Train.hard_fraction=null",
            f"Train.epochs_iters={iters}", "Train.batch_size=4", "Train.eval_interval=1000",
            "Train.save_interval=3", "Train.log_interval=2", "Train.calibration_fraction=0.25"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset, output) of one tiny STFPM training run shared by the tests that need a model."""
    base = tmp_path_factory.mktemp("trained")
    dataset, output = make_mvtec(base / "data"), base / "out"
    run(load_config("STFPM", ["Global.mode=train", *tiny_overrides(dataset, output)]))
    return dataset, output
