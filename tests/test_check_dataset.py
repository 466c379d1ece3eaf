"""check_dataset: the report of each layout, every bad case named by file, bounded memory."""

from __future__ import annotations

import json
import logging
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flawscope.config import load_config
from flawscope.data.check import run_check_dataset
from flawscope.data.layouts import load_dataset, warn_before_training
from flawscope.errors import FlawscopeError
from flawscope.logs import log_to_file, setup_console


def _image(path: Path, value: int = 0, size: tuple[int, int] = (16, 16), mode: str = "L") -> Path:
    """A flat image (or mask) of ``size`` (w, h); ``mode`` "RGB"/"RGBA" repeat the value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0]), value, dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def _mask(path: Path, defect_value: int = 255, size: tuple[int, int] = (16, 16)) -> Path:
    """A mask with a 4x4 defect square of ``defect_value`` (0 gives an empty mask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    pixels[4:8, 4:8] = defect_value
    Image.fromarray(pixels).save(path)
    return path


def _run(root: Path, output: Path, *overrides: str) -> dict:
    cfg = load_config(
        "STFPM",
        ["Global.mode=check_dataset", f"Global.dataset_dir={root}", f"Global.output={output}", *overrides],
    )
    return run_check_dataset(cfg)


def _problems(result: dict) -> dict[str, str]:
    """Problem text by file name (the last path component)."""
    return {Path(p["file"]).name: p["problem"] for p in result["problems"]}


def _mvtec(root: Path, n_train: int = 3) -> Path:
    for i in range(n_train):
        _image(root / "train" / "good" / f"{i:03d}.png", value=i)
    _image(root / "test" / "good" / "000.png", value=100)
    for i, kind in enumerate(("crack", "crack", "scratch")):
        _image(root / "test" / kind / f"{i:03d}.png", value=200 + i)
    _mask(root / "ground_truth" / "crack" / "000_mask.png")
    _mask(root / "ground_truth" / "crack" / "001.png")  # MVTec-style name without _mask
    _mask(root / "ground_truth" / "scratch" / "002_mask.png")
    return root


def test_segdataset_report(tmp_path, caplog):
    root, out = tmp_path / "data", tmp_path / "out"
    lines = {"train": [], "val": []}
    for i in range(4):
        _image(root / "images" / f"good{i}.png", value=i)
        _mask(root / "masks" / f"good{i}.png", defect_value=0)
        lines["train" if i < 3 else "val"].append(f"images/good{i}.png masks/good{i}.png")
    _image(root / "images" / "nomask.png", value=9)
    lines["train"].append("images/nomask.png")  # a good image may come without a mask
    for i, value in enumerate((255, 1)):  # 255 and 1 both mean defect
        _image(root / "images" / f"bad{i}.png", value=50 + i)
        _mask(root / "masks" / f"bad{i}.png", defect_value=value)
        lines["val"].append(f"images/bad{i}.png masks/bad{i}.png")
    for split, entries in lines.items():
        (root / f"{split}.txt").write_text("\n".join(entries) + "\n")
    caplog.set_level(logging.INFO, logger="flawscope")

    result = _run(root, out)

    assert json.loads((out / "check_dataset_result.json").read_text()) == result
    assert result["done_flag"] and result["check_pass"] and result["problems"] == []
    assert "Check dataset passed !" in caplog.text
    assert (result["show_type"], result["dataset_type"]) == ("image", "SegDataset")
    assert result["dataset_path"] == str(root)
    attrs = result["attributes"]
    assert (attrs["train_samples"], attrs["val_samples"], attrs["num_classes"]) == (4, 3, 2)
    assert attrs["defect_types"] == {"train": {"good": 4}, "val": {"defect": 2, "good": 1}}
    assert attrs["image_size"] == {"width": [16, 16], "height": [16, 16]}
    assert attrs["image_modes"] == {"L": 7}
    assert len(attrs["train_sample_paths"]) == 4 and len(attrs["val_sample_paths"]) == 3
    for split in ("train", "val"):
        for rel in attrs[f"{split}_sample_paths"]:
            assert rel.startswith(f"check_dataset/demo_img/{split}_") and (out / rel).is_file()
    histogram = Image.open(out / result["analysis"]["histogram"])
    assert histogram.width > 300 and histogram.height > 200


def test_mvtec_report_and_demo_names(tmp_path):
    root, out = _mvtec(tmp_path / "data", n_train=12), tmp_path / "out"
    (out / "check_dataset" / "demo_img").mkdir(parents=True)
    (out / "check_dataset" / "demo_img" / "stale.jpg").write_bytes(b"from an earlier run")

    result = _run(root, out)

    assert result["check_pass"], result["problems"]
    attrs = result["attributes"]
    assert result["dataset_type"] == "MVTec"
    assert attrs["defect_types"] == {"train": {"good": 12}, "val": {"crack": 2, "good": 1, "scratch": 1}}
    assert len(attrs["train_sample_paths"]) == 10  # PaddleX's 10 per split
    demos = sorted(p.name for p in (out / "check_dataset" / "demo_img").iterdir())
    # train/good/000.png, test/good/000.png and test/crack/000.png share a stem: no collision
    assert len(demos) == 14 and "stale.jpg" not in demos
    assert {d.split("_")[0] for d in demos} == {"train", "val"}
    assert any("crack" in d for d in demos) and any("scratch" in d for d in demos)


def test_an_interrupted_check_leaves_no_earlier_result_looking_current(tmp_path, monkeypatch):
    """Ctrl-C during a second check into the same output left the first dataset's passing result."""
    out = tmp_path / "out"
    assert _run(_mvtec(tmp_path / "first"), out)["check_pass"]

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("flawscope.data.check.check_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(_mvtec(tmp_path / "second"), out)
    assert json.loads((out / "check_dataset_result.json").read_text()) == {"done_flag": False}


def test_a_defect_type_named_like_a_formula_or_not_in_utf8_is_drawn_as_written(tmp_path):
    """Matplotlib read "cost_$5_$10" as mathtext (a traceback, no report) and could not draw a
    name whose bytes are not UTF-8."""
    root = tmp_path / "data"
    _image(root / "train" / "good" / "0.png")
    for kind in ("cost_$5_$10", os.fsdecode(b"caf\xe9")):
        _image(root / "test" / kind / "0.png", 200)
        _mask(root / "ground_truth" / kind / "0_mask.png")
    result = _run(root, tmp_path / "out")
    assert result["check_pass"] and (tmp_path / "out" / "check_dataset" / "histogram.png").is_file()


def test_mvtec_masks_images_and_duplicates(tmp_path):
    root = _mvtec(tmp_path / "data")
    (root / "ground_truth" / "crack" / "000_mask.png").rename(root / "ground_truth" / "crack" / "000_gt.png")
    (root / "test" / "good" / "000.png").write_bytes((root / "train" / "good" / "001.png").read_bytes())

    result = _run(root, tmp_path / "out")

    attrs = result["attributes"]
    assert result["check_pass"], result["problems"]  # these are warnings, not failures
    assert attrs["images_without_masks"] == [str(root / "test" / "crack" / "000.png")]
    assert attrs["masks_without_images"] == [str(root / "ground_truth" / "crack" / "000_gt.png")]
    orphan = next(w for w in result["warnings"] if w["file"] == attrs["masks_without_images"][0])
    assert orphan["problem"].startswith("1 mask file(s) belong to no image read")  # it was in the attributes alone
    assert attrs["duplicate_files"] == [
        [str(root / "train" / "good" / "001.png"), str(root / "test" / "good" / "000.png")]
    ]
    assert any(w["problem"].startswith("duplicate file") and w["problem"].endswith("a copy of a training image is "
               "evaluated on") for w in result["warnings"])


def test_a_folder_of_labelme_annotated_images_is_told_to_convert_them(tmp_path):
    """Checked without the conversion, the annotated defects passed as good training images."""
    root = tmp_path / "data"
    for i in range(3):
        _image(root / f"{i}.png", value=i)
    (root / "2.json").write_text('{"shapes": []}')
    result = _run(root, tmp_path / "out")
    assert result["dataset_type"] == "Folder"
    (warning,) = [w for w in result["warnings"] if "LabelMe" in w["problem"]]
    assert warning["file"] == str(root) and "src_dataset_type=LabelMe" in warning["problem"]
    (root / "2.json").rename(root / "results.json")  # a JSON file named after no image is no annotation
    _image(root / "predictions" / "2_res.png", value=2)  # nor a result saved beside its picture
    (root / "predictions" / "2_res.json").write_text('{"score": 0.3, "is_anomaly": false}')
    assert not [w for w in _run(root, tmp_path / "out2")["warnings"] if "LabelMe" in w["problem"]]


def test_folder_normals_only(tmp_path):
    for i in range(3):
        _image(tmp_path / "data" / f"{i}.png", value=i)

    result = _run(tmp_path / "data", tmp_path / "out")

    assert result["check_pass"] and result["dataset_type"] == "Folder"
    assert (result["attributes"]["train_samples"], result["attributes"]["val_samples"]) == (3, 0)
    assert "no validation split" in result["warnings"][0]["problem"]


def test_folder_with_abnormal_and_masks(tmp_path):
    root = tmp_path / "data"
    for i in range(5):
        _image(root / "good" / f"{i}.png", value=i)
    _image(root / "abnormal" / "a.png", value=99)
    _mask(root / "mask" / "a.png")

    result = _run(root, tmp_path / "out", "CheckDataset.dataset_type=Folder")

    assert result["check_pass"], result["problems"]
    assert result["attributes"]["defect_types"] == {"train": {"good": 4}, "val": {"defect": 1, "good": 1}}


@pytest.mark.parametrize("defect_value, passes", [(65535, True), (1, True), (1000, False)])
def test_16_bit_masks_pass_with_the_values_training_reads(tmp_path, defect_value, passes):
    """Training reads any nonzero mask pixel as defect; the check accepts a 16-bit mask's full
    scale as it accepts 255, and still names values that look like a resampled mask."""
    root = tmp_path / "data"
    for i in range(3):
        _image(root / "good" / f"{i}.png", value=i)
    _image(root / "abnormal" / "a.png", value=99)
    pixels = np.zeros((16, 16), dtype=np.uint16)
    pixels[4:8, 4:8] = defect_value
    (root / "mask").mkdir(parents=True)
    Image.fromarray(pixels).save(root / "mask" / "a.png")

    result = _run(root, tmp_path / "out", "CheckDataset.dataset_type=Folder")

    assert result["check_pass"] == passes, result["problems"]
    if not passes:
        assert "mask has values 0, 1000" in _problems(result)["a.png"]


def test_image_formats_depths_and_modes(tmp_path):
    good = tmp_path / "data" / "good"
    _image(good / "gray.png")
    _image(good / "rgb.jpg", mode="RGB")
    _image(good / "rgb.bmp", mode="RGB")
    _image(good / "rgba.png", mode="RGBA")
    _image(good / "rgb.tiff", mode="RGB")
    good.joinpath("gray16.png").parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(good / "gray16.png")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(good / "gray16.tif")

    result = _run(tmp_path / "data", tmp_path / "out")

    assert result["check_pass"], result["problems"]
    assert result["attributes"]["train_samples"] == 7
    modes = result["attributes"]["image_modes"]
    assert modes["L"] == 1 and modes["RGB"] == 3 and modes["RGBA"] == 1
    assert sum(n for mode, n in modes.items() if mode.startswith("I")) == 2  # 16-bit


def test_every_problem_is_listed_with_its_file(tmp_path, caplog):
    root = tmp_path / "data"
    _image(root / "img" / "ok.png", value=1)  # distinct values: no duplicate files
    truncated = _image(root / "img" / "truncated.png", size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:-40])
    (root / "img" / "garbage.png").write_bytes(b"this is not an image")
    _image(root / "img" / "small_mask.png", value=2)
    _mask(root / "msk" / "small_mask.png", size=(8, 8))
    _image(root / "img" / "jpeg_mask.png", value=3)
    _mask(root / "msk" / "jpeg_mask.png", defect_value=128)
    _image(root / "img" / "no_mask_file.png", value=4)
    _image(root / "img" / "defect_in_train.png", value=5)
    _mask(root / "msk" / "defect_in_train.png")
    (root / "train.txt").write_text(
        "img/ok.png\n"
        "img/truncated.png\n"
        "img/defect_in_train.png msk/defect_in_train.png\n"
        "img/ok.png too many fields\n"
    )
    (root / "val.txt").write_text(
        "img/garbage.png\n"
        "img/small_mask.png msk/small_mask.png\n"
        "img/jpeg_mask.png msk/jpeg_mask.png\n"
        "img/missing.png\n"
        "img/no_mask_file.png msk/no_mask_file.png\n"
        "img\\ok.png\n"  # written on Windows
    )
    caplog.set_level(logging.INFO, logger="flawscope")

    result = _run(root, tmp_path / "out")

    assert result["done_flag"] and not result["check_pass"]
    problems = _problems(result)
    assert "truncated" in problems["truncated.png"]
    assert "not an image" in problems["garbage.png"]
    assert "mask is 8x8 but its image small_mask.png is 16x16" in problems["small_mask.png"]
    assert "values 0, 128" in problems["jpeg_mask.png"]
    assert "does not exist" in problems["missing.png"] and "val.txt:4" in problems["missing.png"]
    assert "does not exist" in problems["no_mask_file.png"]
    assert "defect image in the training split" in problems["defect_in_train.png"]
    assert "line 4" in problems["train.txt"]
    assert problems["img\\ok.png"] == ("file does not exist (listed in val.txt:6; the list separates folders with "
                                        "backslashes: write /)")
    assert len(result["problems"]) == 9
    assert "Check dataset passed" not in caplog.text
    assert "Check dataset failed: 9 problem(s)" in caplog.text
    assert all(p["file"] in caplog.text for p in result["problems"])


def test_empty_splits(tmp_path):
    seg = tmp_path / "seg"
    _image(seg / "a.png")
    (seg / "train.txt").write_text("a.png\n")
    (seg / "val.txt").write_text("\n")
    assert "empty split" in _problems(_run(seg, tmp_path / "out"))["val.txt"]

    mvtec = _mvtec(tmp_path / "mvtec", n_train=0)
    (mvtec / "train" / "good").mkdir(parents=True)
    assert "empty split" in _problems(_run(mvtec, tmp_path / "out"))["good"]

    for path in sorted((mvtec / "test").rglob("*.png")):
        path.unlink()
    _image(mvtec / "train" / "good" / "000.png")
    assert "empty split" in _problems(_run(mvtec, tmp_path / "out"))["test"]


def test_defect_images_in_mvtec_train(tmp_path):
    root = _mvtec(tmp_path / "data")
    _image(root / "train" / "crack" / "x.png")
    (root / "train" / "good" / "copy.png").write_bytes((root / "test" / "scratch" / "002.png").read_bytes())

    result = _run(root, tmp_path / "out")

    problems = _problems(result)
    assert not result["check_pass"]
    assert "defect image in the training split" in problems["x.png"]
    assert "same bytes as" in problems["copy.png"] and "002.png" in problems["copy.png"]


def test_images_no_split_reads_are_listed_and_warned_of(tmp_path, caplog):
    """Subfolders of lots, a folder of defects the layout does not know: left out without a word."""
    root = _mvtec(tmp_path / "data")
    _image(root / "train" / "good" / "batch1" / "b.png", value=7)
    _image(root / "test" / "crack" / "lot2" / "c.png", value=8)
    _mask(root / "ground_truth" / "crack" / "lot2" / "c.png")  # masks are not images to train on
    _image(root / "test" / "good" / "photo.JFIF", value=9)  # read: a JPEG as Windows names it
    _image(root / "train" / "crack" / "x.png")  # a problem already, not listed twice
    predictions = root / "test" / "good" / "preds"  # a prediction's results saved into the dataset
    predictions.mkdir()
    for name in ("000_res.json", "000_res.png", "000_map.png"):
        _image(predictions / name) if name.endswith(".png") else (predictions / name).write_text("{}")

    result = _run(root, root / "output")  # the output inside the dataset: its pictures are no images either

    attributes = result["attributes"]
    assert attributes["images_not_read"] == [str(root / "test/crack/lot2/c.png"), str(root / "train/good/batch1/b.png")]
    assert attributes["defect_types"]["val"]["good"] == 2  # 000.png and photo.JFIF
    warning = next(w["problem"] for w in result["warnings"] if "in no split" in w["problem"])
    assert "2 image file(s) in no split" in warning and "by folder: test/crack/lot2/ 1, train/good/batch1/ 1" in warning
    folder = tmp_path / "folder"
    for i in range(5):
        _image(folder / "good" / f"{i}.png", value=i)
    _image(folder / "rejects" / "n.png", value=99)
    result = _run(folder, tmp_path / "out")
    assert result["attributes"]["images_not_read"] == [str(folder / "rejects/n.png")]
    caplog.clear()
    dataset = load_dataset(folder)
    warn_before_training(dataset, tmp_path / "out")
    unread = folder / "rejects/n.png"
    assert f"1 image file(s) under {folder} are in no split and not read (e.g. {unread})" in caplog.text


def test_unusable_dataset_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FlawscopeError, match="does not exist"):
        _run(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(FlawscopeError, match="Global.dataset_dir is not set"):
        run_check_dataset(load_config("STFPM", ["Global.mode=check_dataset"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlawscopeError, match="no known dataset layout"):
        _run(tmp_path / "empty", tmp_path / "out")


def test_ten_thousand_images_stream_in_bounded_memory(tmp_path):
    good = tmp_path / "data" / "good"
    good.mkdir(parents=True)
    for i in range(10_000):  # distinct 8x8 images, so no duplicate groups
        Image.fromarray(np.array([[i % 256, i // 256]] * 8, dtype=np.uint8).repeat(4, axis=1)).save(
            good / f"{i:05d}.png"
        )
    tracemalloc.start()
    try:
        result = _run(tmp_path / "data", tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert result["check_pass"] and result["attributes"]["train_samples"] == 10_000
    assert result["attributes"]["defect_types"]["train"] == {"good": 10_000}
    assert result["attributes"]["duplicate_files"] == []
    assert peak < 40e6, f"peak traced memory {peak / 1e6:.1f} MB"


def test_a_file_name_that_is_not_utf8_is_reported_not_a_crash(tmp_path):
    """The report names it as Python reads it back (``os.fsencode`` of the JSON string)."""
    root = _mvtec(tmp_path / "data")
    odd = _image(root / "train" / "good" / os.fsdecode(b"caf\xe9.png"), value=99)

    result = _run(root, tmp_path / "out")

    saved = json.loads((tmp_path / "out" / "check_dataset_result.json").read_bytes())
    assert saved["attributes"]["train_samples"] == result["attributes"]["train_samples"] == 4
    demos = [tmp_path / "out" / path for path in saved["attributes"]["train_sample_paths"]]
    assert all(demo.is_file() for demo in demos)  # demo images are named after theirs
    assert any(os.fsencode(odd.stem) in os.fsencode(demo.name) for demo in demos)


def test_list_paths_through_a_linked_dataset_folder_are_read_as_training_reads_them(tmp_path):
    """``..`` in a list line, the dataset folder a symbolic link: the check finds what training finds."""
    real = tmp_path / "real"
    for i in range(3):
        _image(real / "images" / f"{i}.png", value=i)
    (real / "ds").mkdir()
    (real / "ds" / "train.txt").write_text("".join(f"../images/{i}.png\n" for i in range(3)))
    link = tmp_path / "link"
    link.symlink_to(real / "ds")

    result = _run(link, tmp_path / "out")

    assert not result["problems"], result["problems"]
    assert result["attributes"]["train_samples"] == len(load_dataset(link).train) == 3


def test_masks_beside_their_images_and_masks_with_alpha(tmp_path):
    """Images and masks in one folder are no orphan masks; a mask's alpha band is not a label."""
    root = tmp_path / "data"
    for i in range(3):
        _image(root / "all" / f"{i}.png", value=i)
    _image(root / "all" / "3.png", value=50)
    pixels = np.zeros((16, 16, 2), dtype=np.uint8)
    pixels[4:8, 4:8, 0] = 1  # label 1 in the grey band
    pixels[..., 1] = 255  # opaque
    Image.fromarray(pixels, "LA").save(root / "all" / "3_mask.png")
    _image(root / "all" / "stray_mask.png")
    (root / "train.txt").write_text("all/0.png\nall/1.png\nall/2.png\n")
    (root / "val.txt").write_text("all/3.png all/3_mask.png\n")

    result = _run(root, tmp_path / "out")

    assert not result["problems"], result["problems"]
    assert result["attributes"]["defect_types"]["val"] == {"defect": 1}
    assert result["attributes"]["masks_without_images"] == [str(root / "all" / "stray_mask.png")]


def test_a_broken_link_in_a_folder_is_reported_not_skipped(tmp_path):
    """A dataset linked from a share that is not mounted: the link is a problem named with its
    target, not an image that quietly drops out of training."""
    root = _mvtec(tmp_path / "data")
    link = root / "train" / "good" / "003.png"
    link.symlink_to(tmp_path / "share" / "003.png")

    result = _run(root, tmp_path / "out")

    assert not result["check_pass"]
    assert result["attributes"]["defect_types"]["train"] == {"good": 4}
    assert _problems(result) == {"003.png": f"a broken symbolic link (to {tmp_path / 'share' / '003.png'}, "
                                            "which does not exist)"}


def test_a_file_listed_twice_is_named_for_what_it_is_not_a_copy_of_itself(tmp_path):
    root = tmp_path / "seg"
    for i in range(4):
        _image(root / "img" / f"{i}.png", value=10 * i)
    _mask(root / "mask" / "3.png")
    (root / "train.txt").write_text("img/0.png\nimg/1.png\nimg/1.png\nimg/2.png\n")
    (root / "val.txt").write_text("img/2.png\nimg/3.png mask/3.png\n")
    result = _run(root, tmp_path / "out")
    warnings = {Path(w["file"]).name: w["problem"] for w in result["warnings"]}
    assert warnings["1.png"] == "listed 2 times in train"
    assert warnings["2.png"] == "listed in both train and val: evaluated on an image that is trained on"
    assert result["attributes"]["duplicate_files"] == []


def test_an_image_listed_good_in_train_and_defective_in_val_is_a_problem(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        _image(root / "img" / f"{i}.png", value=i)
    _mask(root / "msk" / "2.png")
    (root / "train.txt").write_text("img/0.png\nimg/1.png\nimg/2.png\n")
    (root / "val.txt").write_text("img/2.png msk/2.png\n")
    result = _run(root, tmp_path / "out")
    assert not result["check_pass"]
    assert _problems(result)["2.png"] == ("defect image in the training split: listed as good in train and as a "
                                          "defect in val")


def test_mvtec_without_train_is_reported_not_stopped(tmp_path):
    root = _mvtec(tmp_path / "data", n_train=0)
    result = _run(root, tmp_path / "out")
    assert not result["check_pass"] and "empty split: no training images" in _problems(result)["good"]


def test_an_unreadable_list_is_one_problem(tmp_path):
    root = tmp_path / "data"
    _image(root / "a.png")
    (root / "train.txt").write_text("a.png\n")
    (root / "val.txt").write_bytes("é.png\n".encode("latin-1"))
    problems = [p for p in _run(root, tmp_path / "out")["problems"] if p["file"].endswith("val.txt")]
    assert len(problems) == 1 and "empty split" not in problems[0]["problem"]


def test_defect_images_without_masks_are_a_warning(tmp_path):
    root = _mvtec(tmp_path / "data")
    (root / "ground_truth" / "scratch" / "002_mask.png").unlink()
    result = _run(root, tmp_path / "out")
    assert result["check_pass"] and result["attributes"]["images_without_masks"] == [str(root / "test/scratch/002.png")]
    warning, = [w for w in result["warnings"] if "have no mask" in w["problem"]]
    assert warning["file"] == str(root / "test/scratch/002.png") and warning["problem"].startswith("1 defect image(s)")


def test_mvtec_folder_names_in_any_case_and_normal_test_images(tmp_path):
    """Ground_Truth/ and Crack/ lost every mask, test/normal/ counted as a defect type."""
    root = _mvtec(tmp_path / "data")
    (root / "ground_truth").rename(root / "Ground_Truth")
    (root / "Ground_Truth" / "crack").rename(root / "Ground_Truth" / "Crack")
    (root / "test" / "good").rename(root / "test" / "normal")
    _image(root / "test" / "OK" / "001.png", value=101)
    _image(root / "Ground_Truth" / "good" / "000_mask.png")  # an empty mask for a good image is no orphan

    result = _run(root, tmp_path / "out")

    assert result["check_pass"], result["problems"]
    assert result["attributes"]["defect_types"]["val"] == {"crack": 2, "good": 2, "scratch": 1}
    assert result["attributes"]["images_without_masks"] == []
    assert result["attributes"]["masks_without_images"] == []


def test_an_inverted_mask_is_warned_of_and_an_exif_turned_image_says_so(tmp_path):
    root = _mvtec(tmp_path / "data")
    inverted = np.full((16, 16), 255, np.uint8)
    inverted[4:8, 4:8] = 0  # the defect drawn black on white
    Image.fromarray(inverted).save(root / "ground_truth" / "scratch" / "002_mask.png")
    turned = Image.fromarray(np.full((16, 24), 200, np.uint8))  # stored 24x16, shown 16x24
    exif = turned.getexif()
    exif[0x0112] = 6
    turned.save(root / "test" / "crack" / "000.png", exif=exif)
    _mask(root / "ground_truth" / "crack" / "000_mask.png", size=(24, 16))  # drawn on the stored pixels

    result = _run(root, tmp_path / "out")

    warnings = {Path(w["file"]).name: w["problem"] for w in result["warnings"]}
    assert warnings["002_mask.png"].startswith("mask marks 94% of its image as defect: inverted?")
    assert _problems(result)["000_mask.png"] == ("mask is 24x16 but its image 000.png is 16x24 as shown (its EXIF "
                                                 "orientation turns the 24x16 pixels it stores)")


def test_too_few_good_training_images_are_warned_of(tmp_path):
    root = _mvtec(tmp_path / "data", n_train=2)
    warnings = {w["problem"] for w in _run(root, tmp_path / "out")["warnings"]}
    assert any(w.startswith("only 2 good training image(s): none can be held out") for w in warnings)
    _image(root / "train" / "good" / "002.png", value=2)
    assert not any("good training image(s)" in w["problem"] for w in _run(root, tmp_path / "out")["warnings"])


def test_a_val_split_of_defect_images_only_is_warned_of(tmp_path):
    """A conversion puts every good image in train: evaluation then measures no image AUROC."""
    root = _mvtec(tmp_path / "data")
    (root / "test" / "good" / "000.png").unlink()
    warnings = {w["problem"] for w in _run(root, tmp_path / "out")["warnings"]}
    assert any(w.startswith("the val split holds no good images: evaluation would measure no image AUROC") for w in warnings)
    _image(root / "test" / "good" / "000.png", value=100)
    assert not any("no good images" in w["problem"] for w in _run(root, tmp_path / "out")["warnings"])


def test_a_line_break_in_a_file_name_keeps_each_log_record_on_one_line(tmp_path, capsys):
    """The check's warnings name files: a name holding a line break split a record in two, on the
    console and in the log file alike."""
    root = _mvtec(tmp_path / "data")
    _image(root / "test" / "crack" / "lot\n2" / "c.png", value=8)
    setup_console()
    with log_to_file(tmp_path / "check.log"):
        _run(root, tmp_path / "out")
    err = capsys.readouterr().err
    assert f"{root}/test/crack/lot\\n2/c.png: 1 image file(s) in no split" in err
    records = (tmp_path / "check.log").read_text().splitlines()
    assert any("lot\\n2/c.png: 1 image file(s) in no split" in line for line in records)
    assert not any(line.startswith("2/c.png") for line in [*records, *err.splitlines()])
