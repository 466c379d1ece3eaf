"""split_dataset: seeded re-split of the good images, defects always in val, *.bak backups."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flawscope.config import load_config
from flawscope.data.check import run_check_dataset
from flawscope.data.split import split_dataset
from flawscope.errors import FlawscopeError


def _image(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8)).save(path)
    return path


def _segdataset(root: Path, n_good: int = 10, n_defect: int = 3) -> Path:
    """Goods all in train.txt, defects in val.txt, each with its mask."""
    lines: dict[str, list[str]] = {"train": [], "val": []}
    for i in range(n_good + n_defect):
        defect = i >= n_good
        _image(root / "img" / f"{i:02d}.png", value=i)
        _image(root / "mask" / f"{i:02d}.png", value=255 if defect else 0)
        lines["val" if defect else "train"].append(f"img/{i:02d}.png mask/{i:02d}.png")
    for split, entries in lines.items():
        (root / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return root


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_split_good_images_only_and_back_up(tmp_path):
    root = _segdataset(tmp_path / "data")
    original = {name: (root / name).read_text() for name in ("train.txt", "val.txt")}

    report = split_dataset(root, 80, 20, seed=1)

    train, val = _lines(root / "train.txt"), _lines(root / "val.txt")
    assert len(train) == 8 and len(val) == 5
    assert sorted(train + val) == sorted(original["train.txt"].splitlines() + original["val.txt"].splitlines())
    assert all(int(line[4:6]) < 10 for line in train)  # no defect image in train
    assert sum(int(line[4:6]) >= 10 for line in val) == 3
    for name, text in original.items():
        assert (root / f"{name}.bak").read_text() == text
    assert report["train_samples"] == 8 and report["val_samples"] == 5
    assert report["defect_images_kept_in_val"] == 3 and report["good_images"] == 10
    assert report["backups"] == [str(root / "train.txt.bak"), str(root / "val.txt.bak")]


def test_split_is_fixed_by_its_seed(tmp_path):
    root = _segdataset(tmp_path / "data")
    split_dataset(root, 50, 50, seed=7)
    first = _lines(root / "train.txt")
    split_dataset(root, 50, 50, seed=7)
    assert _lines(root / "train.txt") == first
    split_dataset(root, 50, 50, seed=8)
    assert _lines(root / "train.txt") != first


@pytest.mark.parametrize("train, val", [(70, 20), (0, 100), (100, 0)])
def test_percentages_are_validated(tmp_path, train, val):
    root = _segdataset(tmp_path / "data")
    with pytest.raises(FlawscopeError, match="add up to 100"):
        split_dataset(root, train, val)
    assert not (root / "train.txt.bak").exists()


def test_config_refuses_percentages_not_adding_to_100():
    with pytest.raises(FlawscopeError, match="add up to 100"):
        load_config("STFPM", ["CheckDataset.split.enable=true", "CheckDataset.split.train_percent=70",
                              "CheckDataset.split.val_percent=20"])


def _mvtec_with_one_crack(root: Path, mask_value: int) -> Path:
    for i in range(4):
        _image(root / "train" / "good" / f"{i}.png", value=i)
    _image(root / "test" / "crack" / "0.png", value=99)
    _image(root / "ground_truth" / "crack" / "0_mask.png", value=mask_value)
    return root


def test_split_an_mvtec_folder(tmp_path):
    root = _mvtec_with_one_crack(tmp_path / "data", mask_value=255)

    split_dataset(root, 75, 25, seed=0)

    assert len(_lines(root / "train.txt")) == 3
    assert "test/crack/0.png ground_truth/crack/0_mask.png" in _lines(root / "val.txt")


def test_splitting_an_mvtec_defect_whose_mask_marks_nothing_is_refused(tmp_path):
    """The split said all defect images go to val, but the list made the empty-masked one good."""
    root = _mvtec_with_one_crack(tmp_path / "data", mask_value=0)
    with pytest.raises(FlawscopeError, match="0.png: 1 defect image\\(s\\) have a mask that marks no pixel"):
        split_dataset(root, 75, 25, seed=0)
    assert not (root / "train.txt").exists() and not (root / "val.txt").exists()


def test_convert_and_split_together_then_check(tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    for i in range(5):
        _image(root / "images" / f"{i}.png", value=i)
    (root / "images" / "4.json").write_text(json.dumps({
        "shapes": [{"label": "dent", "points": [[2, 2], [9, 9]], "shape_type": "rectangle"}],
        "imagePath": "4.png", "imageHeight": 16, "imageWidth": 16,
    }))
    cfg = load_config("STFPM", [
        "Global.mode=check_dataset", f"Global.dataset_dir={root}", f"Global.output={out}",
        "CheckDataset.convert.enable=true", "CheckDataset.convert.src_dataset_type=LabelMe",
        "CheckDataset.split.enable=true", "CheckDataset.split.train_percent=50",
        "CheckDataset.split.val_percent=50", "CheckDataset.split.seed=3",
    ])

    result = run_check_dataset(cfg)

    assert result["check_pass"], result["problems"]
    assert result["dataset_type"] == "SegDataset"
    assert result["attributes"]["defect_types"] == {"train": {"good": 2}, "val": {"defect": 1, "good": 2}}
    assert result["split"]["defect_images_kept_in_val"] == 1 and result["split"]["seed"] == 3
    assert "defect images never go to train" in result["split"]["note"]
    assert json.loads((out / "check_dataset_result.json").read_text())["split"] == result["split"]


def test_a_second_split_keeps_the_first_backup(tmp_path):
    """The user's own lists, backed up by the first split, survive every later one."""
    root = _segdataset(tmp_path / "data")
    original = (root / "train.txt").read_text()
    split_dataset(root, 80, 20, seed=1)
    first = (root / "train.txt").read_text()

    report = split_dataset(root, 60, 40, seed=2)

    assert (root / "train.txt.bak").read_text() == original
    assert (root / "train.txt.bak2").read_text() == first
    assert report["backups"] == [str(root / "train.txt.bak2"), str(root / "val.txt.bak2")]


def test_a_split_that_cannot_write_its_second_list_changes_nothing(tmp_path, monkeypatch):
    """A full disk while writing val.txt left a new train.txt beside no val.txt (and a later split
    of that took the listed images for the whole dataset)."""
    root = _segdataset(tmp_path / "data")
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    real_write = Path.write_text

    def full_disk(self, *args, **kwargs):
        if "val.txt" in self.name:
            raise OSError(28, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError) as failed:
        split_dataset(root, 80, 20, seed=1)
    assert failed.value.filename == str(root / "val.txt")  # the CLI's one line names it
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before  # no .bak, no hidden .tmp


def test_a_read_only_dataset_folder_is_named_not_a_hidden_file(tmp_path, monkeypatch):
    """On a read-only file system, removing the list that could not be written fails too (EROFS,
    though it does not exist): that error named the hidden staging file instead of train.txt."""
    root = _segdataset(tmp_path / "data")

    def read_only(self, *args, **kwargs):
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError) as failed:
        split_dataset(root, 80, 20, seed=1)
    assert failed.value.filename == str(root / "train.txt")


def test_ctrl_c_while_the_lists_are_swapped_waits_for_both(tmp_path, monkeypatch):
    """An interruption that arrives while the lists are swapped in is held off until both are."""
    root = _segdataset(tmp_path / "data")
    real_replace = os.replace

    def interrupted(src, dst):
        real_replace(src, dst)
        if Path(dst).name == "train.txt":  # between the two lists
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        split_dataset(root, 80, 20, seed=1)
    monkeypatch.undo()
    train, val = _lines(root / "train.txt"), _lines(root / "val.txt")
    assert (len(train), len(val)) == (8, 5) and not set(train) & set(val)  # both new, none twice
    assert (root / "train.txt.bak").exists() and (root / "val.txt.bak").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("n_good, train, val, message", [
    (3, 10, 90, "10% of its 3 good images is none; training needs at least one"),
    (4, 90, 10, "10% of its 4 good images is none; validation needs at least one"),
])
def test_too_few_good_images_for_a_percentage_is_refused(tmp_path, n_good, train, val, message):
    """A percentage that rounds to no good image for train or for val is refused before any list
    is written."""
    root = _segdataset(tmp_path / "data", n_good=n_good)
    before = {p.name: p.read_bytes() for p in root.glob("*.txt*")}
    with pytest.raises(FlawscopeError, match=message):
        split_dataset(root, train, val)
    assert {p.name: p.read_bytes() for p in root.glob("*.txt*")} == before


def test_a_name_that_is_not_utf8_is_refused_before_anything_is_written(tmp_path):
    """An MVTec folder with a Latin-1 file name (as older Windows tools write): list files are
    UTF-8, so the split names the file instead of failing halfway through writing."""
    root = tmp_path / "data"
    for name in ("a.png", "b.png", os.fsdecode(b"caf\xe9.png")):
        _image(root / "train" / "good" / name)
    _image(root / "test" / "good" / "c.png")

    with pytest.raises(FlawscopeError, match="file name is not UTF-8") as error:
        split_dataset(root, 50, 50)

    assert "\n" not in str(error.value)
    assert not list(root.glob("*.txt*"))


def test_unreadable_list_is_one_error_line(tmp_path):
    root = _segdataset(tmp_path / "data")
    (root / "train.txt").write_text("img/00.png mask/00.png\n", encoding="utf-16")  # Notepad's "Unicode"
    with pytest.raises(FlawscopeError, match=f"{root / 'train.txt'}: cannot read the list"):
        split_dataset(root, 80, 20)


def test_an_image_listed_as_good_and_as_a_defect_stays_out_of_train(tmp_path):
    """Listed twice, once without a mask in train and once with its defect mask in val: a defect
    image, which no seed draws into train, and the same lists at every run of a seed."""
    root = _segdataset(tmp_path / "data", n_good=6, n_defect=2)
    with (root / "train.txt").open("a") as lists:
        lists.write("img/06.png\n")  # 06 is a defect image (val.txt lists its mask)
    with (root / "train.txt").open("a") as lists:  # and by its absolute path, and another spelling
        lists.write(f"{root}/img/06.png\nimg/../img/07.png\n")
    results = set()
    for seed in range(4):
        split_dataset(root, 50, 50, seed=seed)
        train = _lines(root / "train.txt")
        assert not any(line.startswith(("img/06.png", "img/07.png")) for line in train), (seed, train)
        assert _lines(root / "val.txt").count("img/06.png mask/06.png") == 1
        results.add((seed, tuple(train)))
    split_dataset(root, 50, 50, seed=0)
    assert (0, tuple(_lines(root / "train.txt"))) in results


def test_a_refused_split_after_a_conversion_leaves_the_dataset_as_it_was(tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    cfg = load_config("STFPM", [
        "Global.mode=check_dataset", f"Global.dataset_dir={root}", f"Global.output={out}",
        "CheckDataset.convert.enable=true", "CheckDataset.convert.src_dataset_type=MVTec",
        "CheckDataset.split.enable=true", "CheckDataset.split.train_percent=10", "CheckDataset.split.val_percent=90",
    ])
    for i in range(2):
        _image(root / "train" / "good" / f"{i}.png", value=i)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(FlawscopeError, match="10% of its 2 good images is none"):
        run_check_dataset(cfg)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_an_image_listed_with_two_defect_masks_is_refused(tmp_path):
    """A split lists each image once: keeping one of its masks would drop the other's defect."""
    root = _segdataset(tmp_path / "data", n_good=4, n_defect=2)
    with (root / "val.txt").open("a") as lists:
        lists.write("img/04.png mask/05.png\n")
    before = {p.name: p.read_bytes() for p in root.glob("*.txt*")}
    with pytest.raises(FlawscopeError, match=r"04.png: listed with two defect masks, .*mask/04.png and .*mask/05.png"):
        split_dataset(root, 50, 50)
    assert {p.name: p.read_bytes() for p in root.glob("*.txt*")} == before
