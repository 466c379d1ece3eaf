"""convert_dataset: LabelMe, VOC and MVTec -> SegDataset lists, source files untouched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flawscope.config import load_config
from flawscope.data.check import run_check_dataset
from flawscope.data.convert import MASK_DIR, convert_dataset
from flawscope.data.layouts import load_dataset
from flawscope.errors import FlawscopeError


def _image(path: Path, value: int = 0, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8)).convert(mode).save(path)
    return path


def _labelme(path: Path, image_path: str, shapes: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": "5.2.1", "shapes": shapes, "imagePath": image_path, "imageData": None,
            "imageHeight": 16, "imageWidth": 16}
    path.write_text(json.dumps(data))
    return path


def _shape(kind: str, points: list[list[float]], label: str = "scratch") -> dict:
    return {"label": label, "points": points, "shape_type": kind, "group_id": None, "flags": {}}


def _snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _converted_mask(root: Path, line: str) -> np.ndarray:
    image, mask = line.split()
    assert mask.startswith(f"{MASK_DIR}/")
    return np.asarray(Image.open(root / mask))


def test_labelme_polygons_and_rectangles(tmp_path):
    root = tmp_path / "data"
    for i, name in enumerate(("poly", "rect", "unannotated", "empty", "erased")):
        _image(root / "images" / f"{name}.png", value=10 * i)
    _labelme(root / "images" / "poly.json", "poly.png", [_shape("polygon", [[2, 2], [12, 2], [2, 12]])])
    # rectangle corners in either order; LabelMe on Windows writes backslashes
    _labelme(root / "ann" / "rect.json", "..\\images\\rect.png", [_shape("rectangle", [[9, 9], [4, 4]])])
    _labelme(root / "images" / "empty.json", "empty.png", [])
    _labelme(root / "images" / "erased.json", "erased.png", [
        _shape("rectangle", [[0, 0], [5, 5]]), _shape("rectangle", [[0, 0], [15, 15]], "_background_"),
    ])
    (root / "notes.json").write_text('{"not": "labelme"}')
    before = _snapshot(root)

    assert convert_dataset(root, "LabelMe") is None  # no split asked, none reported

    assert all(p.read_bytes() == data for p, data in before.items())  # nothing touched
    assert _lines(root / "train.txt") == ["images/empty.png", "images/erased.png", "images/unannotated.png"]
    poly, rect = sorted(_lines(root / "val.txt"))
    assert poly.startswith("images/poly.png ") and rect.startswith("images/rect.png ")
    poly_mask, rect_mask = _converted_mask(root, poly), _converted_mask(root, rect)
    assert set(np.unique(poly_mask)) == {0, 255}
    assert poly_mask[3, 3] == 255 and poly_mask[11, 11] == 0  # inside / outside the triangle
    expected = np.zeros((16, 16), dtype=np.uint8)
    expected[4:10, 4:10] = 255
    np.testing.assert_array_equal(rect_mask, expected)


def test_labelme_paddlex_anno_lists(tmp_path):
    root = tmp_path / "data"
    for name, value in (("a", 1), ("b", 2), ("c", 3)):
        _image(root / "images" / f"{name}.png", value=value)
    _labelme(root / "annotations" / "a.json", "../images/a.png", [])
    _labelme(root / "annotations" / "b.json", "../images/b.png", [_shape("polygon", [[1, 1], [8, 1], [1, 8]])])
    _labelme(root / "annotations" / "c.json", "../images/c.png", [])
    (root / "train_anno_list.txt").write_text("annotations/a.json\nannotations/c.json\n")
    (root / "val_anno_list.txt").write_text("annotations/b.json\n")

    convert_dataset(root, "LabelMe")

    assert _lines(root / "train.txt") == ["images/a.png", "images/c.png"]
    assert _lines(root / "val.txt") == [f"images/b.png {MASK_DIR}/annotations/b.png"]


def test_labelme_errors_name_the_file(tmp_path):
    root = tmp_path / "data"
    _image(root / "a.png")
    line = _labelme(root / "a.json", "a.png", [_shape("line", [[1, 1], [5, 5]])])
    with pytest.raises(FlawscopeError, match=f"{line}: shape 0 \\('line'"):
        convert_dataset(root, "LabelMe")
    _labelme(root / "a.json", "gone.png", [])
    with pytest.raises(FlawscopeError, match="gone.png.*does not exist"):
        convert_dataset(root, "LabelMe")


def test_labelme_without_labelme_files_is_refused(tmp_path):
    """An MVTec folder converted as LabelMe: not every image and mask listed as a good image."""
    root = tmp_path / "data"
    _image(root / "train" / "good" / "a.png")
    _image(root / "ground_truth" / "crack" / "b_mask.png")
    with pytest.raises(FlawscopeError, match=f"{root}: no LabelMe annotation files"):
        convert_dataset(root, "LabelMe")
    assert not (root / "train.txt").exists() and not (root / "val.txt").exists()


def test_labelme_skips_prediction_results_saved_into_the_dataset(tmp_path, caplog):
    """A prediction saved into a folder of the dataset leaves no marker: its heat-map pictures (a
    defect drawn on them) are no good images, wherever they are."""
    root = tmp_path / "data"
    _image(root / "a.png", value=1)
    _image(root / "b.png", value=2)
    _labelme(root / "b.json", "b.png", [_shape("rectangle", [[2, 2], [8, 8]])])
    for folder in (root, root / "output"):
        (folder / "b_res.json").parent.mkdir(exist_ok=True)
        (folder / "b_res.json").write_text("{}")
        _image(folder / "b_res.png", mode="RGB")
        _image(folder / "b_map.png", mode="RGB")
    _image(root / "output" / "c_res.png", value=3)  # no JSON beside it: a part's photo may be named so
    convert_dataset(root, "LabelMe")
    assert _lines(root / "train.txt") == ["a.png", "output/c_res.png"]
    assert f"{root / 'output'}: holds 3 file(s) of flawscope's prediction results (e.g. b_map.png)" in caplog.text


def _voc(root: Path) -> Path:
    for i, stem in enumerate(("a", "b", "c")):
        _image(root / "JPEGImages" / f"{stem}.jpg", value=40 * i, mode="RGB")
    palette_mask = np.zeros((16, 16), dtype=np.uint8)
    palette_mask[2:6, 2:6] = 1  # class index 1
    palette_mask[6, 2:6] = 255  # VOC's void border
    mask = Image.fromarray(palette_mask, mode="P")
    mask.putpalette([0, 0, 0, 128, 0, 0] + [224, 224, 192] * 254)
    (root / "SegmentationClass").mkdir(parents=True)
    mask.save(root / "SegmentationClass" / "a.png")
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8), mode="P").save(root / "SegmentationClass" / "b.png")
    return root


def test_voc_with_image_sets(tmp_path):
    root = _voc(tmp_path / "data")
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("b\nc\n")
    (sets / "val.txt").write_text("a\n")
    before = _snapshot(root)

    convert_dataset(root, "VOC")

    assert all(p.read_bytes() == data for p, data in before.items())
    assert _lines(root / "train.txt") == ["JPEGImages/b.jpg", "JPEGImages/c.jpg"]
    (line,) = _lines(root / "val.txt")
    expected = np.zeros((16, 16), dtype=np.uint8)
    expected[2:7, 2:6] = 255
    np.testing.assert_array_equal(_converted_mask(root, line), expected)


def test_voc_without_image_sets_and_check(tmp_path):
    root = _voc(tmp_path / "data")
    for folder in ("JPEGImages/._a.jpg", "SegmentationClass/._a.png"):  # macOS's AppleDouble files, no images
        (root / folder).write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    cfg = load_config("STFPM", [
        "Global.mode=check_dataset", f"Global.dataset_dir={root}", f"Global.output={tmp_path / 'out'}",
        "CheckDataset.convert.enable=true", "CheckDataset.convert.src_dataset_type=VOC",
    ])

    result = run_check_dataset(cfg)

    assert result["check_pass"], result["problems"]
    assert result["dataset_type"] == "SegDataset" and result["convert"] == {"src_dataset_type": "VOC"}
    assert result["attributes"]["defect_types"] == {"train": {"good": 2}, "val": {"defect": 1}}


def test_mvtec_to_segdataset_lists(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        _image(root / "train" / "good" / f"{i}.png", value=i)
    _image(root / "test" / "good" / "0.png", value=50)
    _image(root / "test" / "crack" / "0.png", value=60)
    _image(root / "ground_truth" / "crack" / "0_mask.png", value=255)
    (root / "train.txt").write_text("old list\n")
    before = load_dataset(root, "MVTec")

    convert_dataset(root, "MVTec")

    assert (root / "train.txt.bak").read_text() == "old list\n"
    assert _lines(root / "val.txt") == ["test/crack/0.png ground_truth/crack/0_mask.png", "test/good/0.png"]
    after = load_dataset(root)
    assert after.layout == "SegDataset"
    assert [s.image for s in after.train] == [s.image for s in before.train]
    assert [(s.image, s.label) for s in after.val] == [(s.image, s.label) for s in before.val]


@pytest.mark.parametrize("empty_mask", [False, True])
def test_mvtec_defect_without_mask_or_with_an_empty_one_is_refused(tmp_path, empty_mask):
    """In the lists an image without a defect pixel is a good one: an empty mask turned the
    defect into one (magnetic_tile has four), where the check before the conversion had warned."""
    root = tmp_path / "data"
    _image(root / "train" / "good" / "0.png")
    _image(root / "test" / "crack" / "7.png")
    if empty_mask:
        _image(root / "ground_truth" / "crack" / "7_mask.png", value=0)
    problem = "have a mask that marks no pixel" if empty_mask else "have no mask"
    with pytest.raises(FlawscopeError, match=f"7.png: 1 defect image\\(s\\) {problem}"):
        convert_dataset(root, "MVTec")
    assert not (root / "train.txt").exists()


def test_voc_masks_of_dotted_names_and_upper_case_png(tmp_path):
    """part.1 and part.2 get a mask each (not both part.png); SCRATCH.PNG is found as a mask."""
    root = tmp_path / "data"
    for i, stem in enumerate(("part.1", "part.2", "scratch", "good")):
        _image(root / "JPEGImages" / f"{stem}.jpg", value=40 * i, mode="RGB")
    corners = {"part.1": (slice(0, 4), slice(0, 4)), "part.2": (slice(12, 16), slice(12, 16)),
               "scratch": (slice(5, 9), slice(5, 9))}
    (root / "SegmentationClass").mkdir(parents=True)
    for stem, where in corners.items():
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[where] = 1
        Image.fromarray(mask).save(root / "SegmentationClass" / f"{stem}{'.PNG' if stem == 'scratch' else '.png'}")

    convert_dataset(root, "VOC")

    assert _lines(root / "train.txt") == ["JPEGImages/good.jpg"]
    val = _lines(root / "val.txt")
    assert len(val) == 3
    for line in val:
        stem = Path(line.split()[0]).stem
        expected = np.zeros((16, 16), dtype=np.uint8)
        expected[corners[stem]] = 255
        np.testing.assert_array_equal(_converted_mask(root, line), expected)


def test_a_refused_conversion_leaves_the_dataset_as_it_was(tmp_path):
    """The first file's mask is drawn before the second file is refused: none of it stays."""
    root = tmp_path / "data"
    _image(root / "a.png")
    _image(root / "b.png")
    _labelme(root / "a.json", "a.png", [_shape("rectangle", [[2, 2], [8, 8]])])
    _labelme(root / "b.json", "b.png", [_shape("line", [[1, 1], [5, 5]])])
    (root / "train.txt").write_text("a.png\n")
    before = _snapshot(root)

    with pytest.raises(FlawscopeError, match="b.json: shape 0"):
        convert_dataset(root, "LabelMe")

    assert _snapshot(root) == before
    assert sorted(p.name for p in root.iterdir()) == ["a.json", "a.png", "b.json", "b.png", "train.txt"]


@pytest.mark.parametrize("output", ["output", "."])
def test_labelme_skips_the_checks_own_output_inside_the_dataset(tmp_path, output):
    """Run from inside the dataset folder with the default Global.output, or with the dataset
    folder as the output, twice: the check's demo images and histogram never become training images."""
    root = tmp_path / "data"
    for value, name in enumerate(("a", "b", "c")):
        _image(root / f"{name}.png", value=10 * value)
    _labelme(root / "c.json", "c.png", [_shape("rectangle", [[2, 2], [8, 8]])])
    cfg = load_config("STFPM", [
        "Global.mode=check_dataset", f"Global.dataset_dir={root}", f"Global.output={root / output}",
        "CheckDataset.convert.enable=true", "CheckDataset.convert.src_dataset_type=LabelMe",
    ])
    for _ in range(2):
        result = run_check_dataset(cfg)
        assert result["check_pass"], result["problems"]
        assert _lines(root / "train.txt") == ["a.png", "b.png"]
    assert list((root / output / "check_dataset" / "demo_img").iterdir())


@pytest.mark.parametrize(("train", "val", "where", "first"), [
    ("b\nc\nb\n", "a\n", "train.txt:3", "train.txt:1"),  # a good image twice
    ("b\nc\n", "a\nc\n", "val.txt:2", "train.txt:2"),  # in both splits: the test would score a training image
    ("b\n", "a\na\n", "val.txt:2", "val.txt:1"),  # a defect image twice
])
def test_voc_image_listed_twice_is_refused_naming_both_lines(tmp_path, train, val, where, first):
    root = _voc(tmp_path / "data")
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text(train)
    (sets / "val.txt").write_text(val)
    before = _snapshot(root)
    with pytest.raises(FlawscopeError, match=rf"{where}: \w is listed again \(first at .*{first}\)"):
        convert_dataset(root, "VOC")
    assert _snapshot(root) == before


def test_voc_images_sharing_a_stem_are_refused(tmp_path):
    root = _voc(tmp_path / "data")
    _image(root / "JPEGImages" / "a.png", mode="RGB")
    with pytest.raises(FlawscopeError, match=r"a\.png: same name as a\.jpg"):
        convert_dataset(root, "VOC")
    assert not (root / "train.txt").exists()


def test_labelme_anno_list_outside_the_dataset_is_refused_and_writes_nothing(tmp_path):
    """A list line leading out of the dataset once drew its mask over the source image itself."""
    root = tmp_path / "ds"
    photo = _image(tmp_path / "0.png", value=7)
    _labelme(tmp_path / "0.json", "0.png", [_shape("rectangle", [[1, 1], [8, 8]])])
    (root / "train_anno_list.txt").parent.mkdir(parents=True)
    (root / "train_anno_list.txt").write_text("../0.json\n")
    before = photo.read_bytes()
    with pytest.raises(FlawscopeError, match=r"train_anno_list.txt:1: \.\./0\.json is outside the dataset folder"):
        convert_dataset(root, "LabelMe")
    assert photo.read_bytes() == before and sorted(p.name for p in root.iterdir()) == ["train_anno_list.txt"]


def test_a_labelme_file_annotated_on_an_image_of_another_size_is_refused(tmp_path):
    """Its mask was drawn at the recorded size and written; only the check after it found the mismatch."""
    root = tmp_path / "data"
    _image(root / "a.png")  # 16x16
    _labelme(root / "a.json", "a.png", [{"label": "crack", "shape_type": "rectangle", "points": [[2, 2], [8, 8]]}])
    data = json.loads((root / "a.json").read_text())
    (root / "a.json").write_text(json.dumps({**data, "imageWidth": 32}))
    with pytest.raises(FlawscopeError, match=r"a\.json: annotated on a 32x16 image, but its image .*a\.png is 16x16"):
        convert_dataset(root, "LabelMe")
    assert sorted(p.name for p in root.iterdir()) == ["a.json", "a.png"]


@pytest.mark.parametrize("data, fragment", [
    ({"shapes": None}, "'shapes' is not a list"),
    ({"shapes": [{"label": "x", "points": None}]}, "shape 0 is not a LabelMe shape"),
    ({"shapes": [{"label": "x", "points": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]}]}, "shape 0 is not a LabelMe shape"),
    ({"shapes": [], "imageWidth": None, "imagePath": "corrupt.png"}, "corrupt.png: not a readable image"),
])
def test_malformed_labelme_files_are_one_error_naming_the_file(tmp_path, data, fragment):
    root = tmp_path / "data"
    _image(root / "a.png")
    (root / "corrupt.png").write_bytes(b"not a png")
    (root / "a.json").write_text(json.dumps({"imagePath": "a.png", "imageWidth": 16, "imageHeight": 16, **data}))
    with pytest.raises(FlawscopeError, match=fragment):
        convert_dataset(root, "LabelMe")
    assert not (root / "train.txt").exists()


def test_labelme_circles_and_exif_rotated_images_without_a_size(tmp_path):
    """A circle is its centre and a point on it; without imageWidth/imageHeight the mask takes the
    size the image is read at, turned upright as its EXIF says (LabelMe records that size)."""
    root = tmp_path / "data"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: stored 24 wide, 16 high, read 16 wide, 24 high
    root.mkdir()
    Image.new("RGB", (24, 16), (90, 90, 90)).save(root / "a.jpg", exif=exif)
    (root / "a.json").write_text(json.dumps({"imagePath": "a.jpg", "shapes": [_shape("circle", [[8, 12], [8, 16]])]}))
    convert_dataset(root, "LabelMe")
    mask = _converted_mask(root, _lines(root / "val.txt")[0]) > 0
    assert mask.shape == (24, 16) and mask[12, 8] and mask[9, 8] and not mask[12, 3] and not mask[2, 8]
    assert 45 <= mask.sum() <= 65  # pi * 4**2 = 50, the edge pixels included as LabelMe draws it
    # Recorded at its stored size, it was annotated on an image that was not turned upright: its
    # mask would be drawn turned against the image (it was, and only reading it failed).
    (root / "a.json").write_text(json.dumps({"imagePath": "a.jpg", "imageWidth": 24, "imageHeight": 16,
                                             "shapes": [_shape("circle", [[8, 12], [8, 16]])]}))
    with pytest.raises(FlawscopeError, match=r"a\.json: annotated on a 24x16 image, but its image .*a\.jpg is 16x24"):
        convert_dataset(root, "LabelMe")


def test_voc_class_pngs_without_an_image_are_named(tmp_path, caplog):
    root = _voc(tmp_path / "data")
    _image(root / "SegmentationClass" / "zz_orphan.png", value=1)
    convert_dataset(root, "VOC")
    assert "have no image" in caplog.text and "zz_orphan.png" in caplog.text


def test_labelme_json_to_dataset_folders_are_no_good_images(tmp_path):
    root = tmp_path / "data"
    _image(root / "a.png", value=1)
    _image(root / "b.png", value=2)
    _labelme(root / "b.json", "b.png", [_shape("rectangle", [[2, 2], [8, 8]])])
    for name in ("img.png", "label.png", "label_viz.png"):  # what labelme_json_to_dataset b.json writes
        _image(root / "b_json" / name, value=3)
    (root / "b_json" / "label_names.txt").write_text("_background_\nscratch\n")
    convert_dataset(root, "LabelMe")
    assert _lines(root / "train.txt") == ["a.png"] and len(_lines(root / "val.txt")) == 1


def test_labelme_anno_lists_of_a_dataset_named_through_dot_dot(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    _image(root / "images" / "a.png", value=1)
    _image(root / "images" / "b.png", value=2)
    _labelme(root / "annotations" / "a.json", "../images/a.png", [])
    _labelme(root / "annotations" / "b.json", "..\\images\\b.png", [_shape("rectangle", [[2, 2], [8, 8]])])
    (root / "train_anno_list.txt").write_text("annotations/a.json\n")
    (root / "val_anno_list.txt").write_text("annotations\\b.json\n")  # written on Windows
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    convert_dataset("../ds", "LabelMe")
    assert _lines(root / "train.txt") == ["images/a.png"]
    assert _lines(root / "val.txt") == [f"images/b.png {MASK_DIR}/annotations/b.png"]


def test_labelme_file_listed_twice_says_so(tmp_path):
    root = tmp_path / "data"
    _image(root / "a.png")
    _labelme(root / "a.json", "a.png", [_shape("rectangle", [[2, 2], [8, 8]])])
    (root / "train_anno_list.txt").write_text("a.json\n")
    (root / "val_anno_list.txt").write_text("a.json\n")
    with pytest.raises(FlawscopeError, match=r"a.png: its annotation a.json is listed twice"):
        convert_dataset(root, "LabelMe")


@pytest.mark.parametrize("shape, fragment", [
    (_shape("rectangle", [[20, 20], [30, 30]]), "shape 0 ('rectangle') covers no pixel of the 16x16 image"),
    (_shape("polygon", [[1, 1], [float("nan"), 2], [3, 9]]), "shape 0 is not a LabelMe shape"),
])
def test_labelme_shapes_that_mark_nothing_are_refused(tmp_path, shape, fragment):
    """An annotation lost silently would make a defect image a good training image."""
    root = tmp_path / "data"
    _image(root / "a.png")
    (root / "a.json").write_text(json.dumps({"imagePath": "a.png", "imageWidth": 16, "imageHeight": 16,
                                             "shapes": [shape]}))
    with pytest.raises(FlawscopeError, match=re.escape(fragment)):
        convert_dataset(root, "LabelMe")


def test_a_label_names_file_alone_does_not_hide_good_images(tmp_path):
    root = tmp_path / "data"
    _image(root / "good" / "a.png", value=1)
    (root / "good" / "label_names.txt").write_text("scratch\n")  # not labelme_json_to_dataset's folder
    _image(root / "b.png", value=2)
    _labelme(root / "b.json", "b.png", [_shape("rectangle", [[2, 2], [8, 8]])])
    convert_dataset(root, "LabelMe")
    assert _lines(root / "train.txt") == ["good/a.png"]


def test_convert_and_split_write_sorted_lists_as_the_split_alone_does(tmp_path):
    root = tmp_path / "data"
    for i in range(8):
        _image(root / f"{i}.png", value=i)
    _labelme(root / "7.json", "7.png", [_shape("rectangle", [[2, 2], [8, 8]])])
    report = convert_dataset(root, "LabelMe", split=(50, 50, 3))
    assert report["train_samples"] == 4 and report["defect_images_kept_in_val"] == 1
    for name in ("train.txt", "val.txt"):
        assert _lines(root / name) == sorted(_lines(root / name))


@pytest.mark.parametrize("marker", ["check_dataset_result.json", "train_result.json", "evaluate_result.json"])
def test_labelme_skips_an_earlier_runs_output_inside_the_dataset(tmp_path, caplog, marker):
    """An output left in the dataset by a run with another Global.output: its demo pictures (a
    defect drawn on them) and histogram are no good images."""
    root = tmp_path / "data"
    _image(root / "a.png", value=1)
    _image(root / "b.png", value=2)
    _labelme(root / "b.json", "b.png", [_shape("rectangle", [[2, 2], [8, 8]])])
    old = root / "output"
    (old / marker).parent.mkdir(parents=True)
    (old / marker).write_text("{}")
    _image(old / "check_dataset" / "demo_img" / "val_00_defect_b.jpg", mode="RGB")
    _image(old / "check_dataset" / "histogram.png")
    convert_dataset(root, "LabelMe")
    assert _lines(root / "train.txt") == ["a.png"]
    assert f"{old}: holds the output of an earlier flawscope run ({marker})" in caplog.text


def test_labelme_skips_the_pictures_of_a_run_whose_output_was_the_dataset(tmp_path, caplog):
    """Global.output set to the dataset itself: evaluate's plots and check_dataset's demo pictures
    land beside the images; they are no good images either."""
    root = tmp_path / "data"
    _image(root / "a.png", value=1)
    _image(root / "b.png", value=2)
    _labelme(root / "b.json", "b.png", [_shape("rectangle", [[2, 2], [8, 8]])])
    (root / "evaluate_result.json").write_text("{}")
    _image(root / "evaluate_report" / "roc_curve.png")
    _image(root / "check_dataset" / "histogram.png")
    _image(root / "lot2" / "c.png", value=3)
    convert_dataset(root, "LabelMe")
    assert _lines(root / "train.txt") == ["a.png", "lot2/c.png"]
    assert f"{root / 'evaluate_report'}: holds the output of an earlier flawscope run" in caplog.text


def test_labelme_annotations_with_an_upper_case_suffix_are_read(tmp_path):
    """B.JSON, as Windows tools may name it: its image is a defect, not a good training image."""
    root = tmp_path / "data"
    _image(root / "a.png", value=1)
    _image(root / "B.PNG", value=2)
    _labelme(root / "B.JSON", "B.PNG", [_shape("rectangle", [[2, 2], [8, 8]])])
    convert_dataset(root, "LabelMe")
    assert _lines(root / "train.txt") == ["a.png"]
    assert _lines(root / "val.txt") == [f"B.PNG {MASK_DIR}/B.png"]


def test_voc_image_sets_line_with_whitespace_is_refused(tmp_path):
    """"a b" is one image's name, not image "a": taking the first word would lose "a b.jpg"."""
    root = _voc(tmp_path / "data")
    _image(root / "JPEGImages" / "a b.jpg", mode="RGB")
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("b\nc\n")
    (sets / "val.txt").write_text("a b\n")
    before = _snapshot(root)
    with pytest.raises(FlawscopeError, match=re.escape(f"{sets / 'val.txt'}:1: 'a b' contains whitespace")):
        convert_dataset(root, "VOC")
    assert _snapshot(root) == before


def test_labelme_follows_folder_links_once(tmp_path, caplog):
    """Good images on another disk, linked in, are read as the other layouts read them; a link
    back up to the dataset ends instead of looping."""
    root = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    _image(elsewhere / "g.png", value=1)
    _image(root / "b.png", value=2)
    _labelme(root / "b.json", "b.png", [_shape("rectangle", [[2, 2], [8, 8]])])
    (root / "good").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "up").symlink_to(root, target_is_directory=True)
    (root / "parent").symlink_to(tmp_path, target_is_directory=True)  # up to the folder holding the dataset
    _image(tmp_path / "other_project" / "defect.png", value=3)
    convert_dataset(root, "LabelMe")
    assert _lines(root / "train.txt") == ["good/g.png"]
    assert f"{root / 'good' / 'up'}: a link to {root}, which holds the dataset or was read already" in caplog.text
    assert f"{root / 'parent'}: a link to {tmp_path}, which holds the dataset" in caplog.text


@pytest.mark.parametrize("split", [None, (50, 50, 0)])
def test_labelme_two_files_for_one_image_are_refused(tmp_path, split):
    """Unsplit the image would be listed twice with two masks; re-split, one mask would be dropped."""
    root = tmp_path / "data"
    for i in range(4):
        _image(root / f"g{i}.png", value=i)
    _image(root / "b.png", value=9)
    first = _labelme(root / "b.json", "b.png", [_shape("rectangle", [[2, 2], [5, 5]])])
    second = _labelme(root / "b_v2.json", "b.png", [_shape("rectangle", [[9, 9], [14, 14]])])
    before = _snapshot(root)
    with pytest.raises(FlawscopeError, match=re.escape(f"{root / 'b.png'}: annotated in two LabelMe files, "
                                                       f"{first} and {second}")):
        convert_dataset(root, "LabelMe", split=split)
    assert _snapshot(root) == before


def test_labelme_anno_lists_naming_two_files_for_one_image_are_refused(tmp_path):
    root = tmp_path / "data"
    _image(root / "a.png")
    first = _labelme(root / "a.json", "a.png", [])
    second = _labelme(root / "a_v2.json", "a.png", [_shape("rectangle", [[2, 2], [8, 8]])])
    (root / "train_anno_list.txt").write_text("a.json\n")
    (root / "val_anno_list.txt").write_text("a_v2.json\n")
    with pytest.raises(FlawscopeError, match=re.escape(f"annotated in two LabelMe files, {first} and {second}")):
        convert_dataset(root, "LabelMe")
    assert not (root / "train.txt").exists()
