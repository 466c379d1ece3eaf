"""load_dataset: each layout on disk -> sorted samples with the right labels and masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flawscope.data.layouts import Sample, load_dataset, unique_images
from flawscope.errors import FlawscopeError


def _image(path: Path, defect: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), 255 if defect else 0, dtype=np.uint8)).save(path)
    return path


def _names(samples: list[Sample]) -> list[str]:
    return [s.image.name for s in samples]


def _raises(root, fragment: str, **kwargs) -> str:
    with pytest.raises(FlawscopeError) as info:
        load_dataset(root, **kwargs)
    assert fragment in str(info.value)
    return str(info.value)


@pytest.fixture
def no_image_opening(monkeypatch):
    """Listing a dataset must not decode images: that is what keeps 10,000 images fast."""

    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened while listing the dataset")

    monkeypatch.setattr(Image, "open", refuse)


def test_mvtec(tmp_path, no_image_opening):
    for name in ("001.png", "000.png", ".000.png", "002.PNG"):
        _image(tmp_path / "train" / "good" / name)
    (tmp_path / "train" / "good" / "license.txt").write_text("CC BY-NC-SA")
    (tmp_path / "readme.txt").write_text("")
    _image(tmp_path / "test" / "good" / "000.png")
    for name in ("000.png", "001.png", "002.png"):
        _image(tmp_path / "test" / "crack" / name)
    _image(tmp_path / "ground_truth" / "crack" / "000_mask.png", defect=True)
    _image(tmp_path / "ground_truth" / "crack" / "001.png", defect=True)

    ds = load_dataset(tmp_path)

    assert ds.layout == "MVTec" and ds.root == tmp_path
    assert _names(ds.train) == ["000.png", "001.png", "002.PNG"]
    assert all(s.label == 0 and s.mask is None and s.defect_type == "good" for s in ds.train)
    gt = tmp_path / "ground_truth" / "crack"
    assert ds.val == [
        Sample(tmp_path / "test" / "crack" / "000.png", gt / "000_mask.png", 1, "crack"),
        Sample(tmp_path / "test" / "crack" / "001.png", gt / "001.png", 1, "crack"),
        Sample(tmp_path / "test" / "crack" / "002.png", None, 1, "crack"),  # no mask: image-level only
        Sample(tmp_path / "test" / "good" / "000.png", None, 0, "good"),
    ]


def test_segdataset(tmp_path):
    _image(tmp_path / "images" / "a.png")
    _image(tmp_path / "images" / "b.png")
    _image(tmp_path / "images" / "c.png")
    _image(tmp_path / "masks" / "a.png", defect=True)
    _image(tmp_path / "masks" / "b.png")
    (tmp_path / "train.txt").write_text("images/b.png masks/b.png\n\nimages/c.png\n")
    (tmp_path / "val.txt").write_text("images/a.png masks/a.png\nimages/b.png masks/b.png\n")
    _image(tmp_path / "train" / "good" / "x.png")  # also looks like MVTec: SegDataset is tried first

    ds = load_dataset(tmp_path)

    assert ds.layout == "SegDataset"
    assert ds.train == [
        Sample(tmp_path / "images" / "b.png", tmp_path / "masks" / "b.png", 0, "good"),
        Sample(tmp_path / "images" / "c.png", None, 0, "good"),
    ]
    assert [(s.label, s.defect_type) for s in ds.val] == [(1, "defect"), (0, "good")]


def test_segdataset_missing_file_names_list_line_and_path(tmp_path):
    _image(tmp_path / "images" / "a.png")
    (tmp_path / "train.txt").write_text("images/a.png\nimages/a.png masks/gone.png\n")
    message = _raises(tmp_path, "does not exist")
    assert str(tmp_path / "train.txt") in message and ":2:" in message and "masks/gone.png" in message


def test_folder_with_abnormal_and_masks(tmp_path, no_image_opening):
    for i in range(10):
        _image(tmp_path / "good" / f"{i:02d}.png")
    _image(tmp_path / "abnormal" / "x.png")
    _image(tmp_path / "abnormal" / "y.png")
    _image(tmp_path / "abnormal" / "z.png")
    _image(tmp_path / "mask" / "x_mask.png")
    _image(tmp_path / "mask" / "y.png")

    ds = load_dataset(tmp_path)

    assert ds.layout == "Folder"
    assert _names(ds.train) == ["00.png", "01.png", "02.png", "03.png", "05.png", "06.png", "07.png", "08.png"]
    assert _names(ds.val) == ["04.png", "09.png", "x.png", "y.png", "z.png"]
    masks = [s.mask.name if s.mask else None for s in ds.val]
    assert masks == [None, None, "x_mask.png", "y.png", None]
    assert [s.label for s in ds.val] == [0, 0, 1, 1, 1]
    assert load_dataset(tmp_path, layout="folder") == ds


def test_folder_masks_of_two_defect_folders_are_never_swapped(tmp_path):
    """bad/00.png and ng/00.png both took mask/00.png (bad's): ng's pixel metrics were measured
    against another image's defect, and check_dataset passed."""
    for i in range(5):
        _image(tmp_path / "good" / f"{i}.png")
    for folder in ("bad", "NG"):
        _image(tmp_path / folder / "00.png")
    _image(tmp_path / "NG" / "01.png")
    _image(tmp_path / "mask" / "00.png")
    message = _raises(tmp_path, "the mask of two images")
    assert message.startswith(f"{tmp_path / 'mask' / '00.png'}: the mask of two images, {tmp_path / 'NG' / '00.png'} "
                              f"and {tmp_path / 'bad' / '00.png'}")
    assert "in a folder of its name in mask/ (mask/bad/...)" in message
    (tmp_path / "mask" / "00.png").unlink()
    for folder in ("bad", "ng"):  # each folder's own masks, in any case
        _image(tmp_path / "mask" / folder / "00_mask.png")
    masks = {s.image.relative_to(tmp_path).as_posix(): s.mask for s in load_dataset(tmp_path).val if s.label}
    assert masks == {"NG/00.png": tmp_path / "mask/ng/00_mask.png", "NG/01.png": None,
                     "bad/00.png": tmp_path / "mask/bad/00_mask.png"}


def test_folder_only_normal_images_all_train(tmp_path):
    for i in range(6):
        _image(tmp_path / "normal" / f"{i}.png")
    ds = load_dataset(tmp_path)
    assert len(ds.train) == 6 and ds.val == []


def test_plain_directory_of_images(tmp_path):
    _image(tmp_path / "b.jpg")
    _image(tmp_path / "a.bmp")
    (tmp_path / "notes.txt").write_text("")
    ds = load_dataset(tmp_path)
    assert ds.layout == "Folder" and _names(ds.train) == ["a.bmp", "b.jpg"] and ds.val == []


def test_missing_root(tmp_path):
    root = tmp_path / "nowhere"
    assert str(root) in _raises(root, "dataset directory does not exist")


def test_unrecognised_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("")
    message = _raises(tmp_path, "no known dataset layout")
    assert str(tmp_path) in message and "train.txt" in message and "train/good/" in message


def test_collection_of_mvtec_categories_hints_at_one(tmp_path):
    (tmp_path / "bottle" / "train" / "good").mkdir(parents=True)
    assert "bottle" in _raises(tmp_path, "point at one of them")


@pytest.mark.parametrize("source", ["VOC", "LabelMe", "LabelMe apart"])
def test_annotations_of_a_source_format_hint_at_its_conversion(tmp_path, source):
    """A VOC folder, or a folder of LabelMe-annotated images (the annotations beside them or in a
    folder of their own), was only "no known dataset layout"."""
    if source == "VOC":
        _image(tmp_path / "JPEGImages" / "0.jpg")
        (tmp_path / "SegmentationClass").mkdir()
    else:
        _image(tmp_path / "imgs" / "0.png")
        (tmp_path / ("annotations" if source.endswith("apart") else "imgs")).mkdir(exist_ok=True)
        (tmp_path / ("annotations" if source.endswith("apart") else "imgs") / "0.json").write_text('{"shapes": []}')
        source = "LabelMe"
    message = _raises(tmp_path, "no known dataset layout")
    assert message.endswith(f"it looks like {source} annotations: convert them with -o CheckDataset.convert.enable=true "
                            f"-o CheckDataset.convert.src_dataset_type={source})")


def test_empty_train_split(tmp_path):
    (tmp_path / "train" / "good").mkdir(parents=True)
    _image(tmp_path / "test" / "good" / "0.png")
    assert str(tmp_path) in _raises(tmp_path, "no training images found")


def test_named_layout_that_does_not_match(tmp_path):
    _image(tmp_path / "good" / "0.png")
    assert str(tmp_path) in _raises(tmp_path, "does not match the MVTec layout", layout="MVTec")
    _raises(tmp_path, "unknown dataset layout", layout="VOC")


def test_unique_images_keeps_the_first_of_byte_identical_files(tmp_path):
    def sample(name: str, content: bytes) -> Sample:
        (tmp_path / name).write_bytes(content)
        return Sample(tmp_path / name, None, 0, "good")

    a, b, a_copy, c = sample("a.png", b"one"), sample("b.png", b"two"), sample("a2.png", b"one"), sample("c.png", b"onE")
    unique, copies = unique_images([a, b, a_copy, c])
    assert unique == [a, b, c] and copies == [(a_copy, a)]
    with pytest.raises(FlawscopeError, match="missing.png: cannot read file"):
        unique_images([a, Sample(tmp_path / "missing.png", None, 0, "good")])


def test_folder_of_good_images_with_an_abnormal_folder_beside_them(tmp_path):
    for i in range(5):
        _image(tmp_path / f"{i}.png")
    _image(tmp_path / "abnormal" / "d.png", defect=True)
    _image(tmp_path / "mask" / "d.png", defect=True)
    ds = load_dataset(tmp_path)
    assert ds.layout == "Folder" and _names(ds.train) == ["0.png", "1.png", "2.png", "3.png"]
    assert [(s.image.name, s.label, s.mask.name if s.mask else None) for s in ds.val] == [
        ("4.png", 0, None), ("d.png", 1, "d.png")]


def test_mvtec_test_good_in_another_case_is_good(tmp_path):
    _image(tmp_path / "train" / "good" / "0.png")
    _image(tmp_path / "test" / "Good" / "1.png")
    _image(tmp_path / "test" / "crack" / "2.png", defect=True)
    _image(tmp_path / "ground_truth" / "crack" / "2_mask.png", defect=True)
    ds = load_dataset(tmp_path)
    assert [(s.image.name, s.label) for s in ds.val] == [("1.png", 0), ("2.png", 1)]


def test_mvtec_train_good_in_another_case_is_read_and_passes_the_check(tmp_path):
    """train/Good/ (a copy made on Windows or macOS) holds the training images, as test/Good/ is
    read: it was no MVTec dataset at all on a case-sensitive disk, and the check called its
    images defects under train/."""
    from flawscope.data.check import check_dataset

    _image(tmp_path / "train" / "Good" / "0.png")
    _image(tmp_path / "train" / "Good" / "1.png")
    _image(tmp_path / "test" / "good" / "2.png")
    _image(tmp_path / "test" / "crack" / "3.png", defect=True)
    _image(tmp_path / "ground_truth" / "crack" / "3_mask.png", defect=True)
    ds = load_dataset(tmp_path)
    assert ds.layout == "MVTec" and [s.image.name for s in ds.train] == ["0.png", "1.png"]
    report = check_dataset(tmp_path, tmp_path / "check")
    assert report["check_pass"], report


def test_a_list_with_backslashes_says_so(tmp_path):
    _image(tmp_path / "img" / "0.png")
    (tmp_path / "train.txt").write_text("img\\0.png\n")
    _raises(tmp_path, "train.txt:1: " + str(tmp_path / "img\\0.png") + " does not exist (the list separates "
            "folders with backslashes: write /)")


def test_a_gif_mask_is_refused_not_read_by_its_palette_order(tmp_path):
    """GIF files are images now (a path read them, a folder skipped them), but a GIF's palette
    index 0 may be white: read as a mask, a 3x3 defect became 247 of 256 pixels."""
    _image(tmp_path / "train" / "good" / "0.png")
    _image(tmp_path / "test" / "crack" / "000.png")
    _image(tmp_path / "ground_truth" / "crack" / "000_mask.gif", defect=True)
    message = _raises(tmp_path, "000_mask.gif: a GIF file cannot be a mask")
    assert message.endswith("save it as PNG")
