"""Converting LabelMe, VOC and MVTec datasets to a SegDataset (PaddleX's ``CheckDataset.convert``).

The lists are written into the dataset folder and point at the source images where they are;
masks that must be drawn (LabelMe) or binarised (VOC) go to ``converted_masks/``. Source files
are never modified, and lists already there are kept as ``*.bak``. When the source has no
train/val lists of its own, good images go to train and defect images to val, the only split
anomaly detection can train on; ``CheckDataset.split`` can then move some good images to val.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from flawscope.data.io import is_image_file, read_mask
from flawscope.data.layouts import DEFECT, GOOD, Sample, load_dataset
from flawscope.data.split import sample_lines, write_lists
from flawscope.errors import FlawscopeError

log = logging.getLogger("flawscope")

MASK_DIR = "converted_masks"
LABELME_BACKGROUND = "_background_"  # LabelMe's label for areas that are explicitly not defect
_SPLITS = ("train", "val")

Splits = dict[str, list[Sample]]


def convert_dataset(root: str | os.PathLike[str], src_type: str) -> Path:
    """Write a SegDataset layout (train.txt, val.txt, converted_masks/) into ``root`` from its
    ``src_type`` annotations ("LabelMe", "VOC" or "MVTec") and return ``root``."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise FlawscopeError(f"{root}: dataset directory does not exist")
    converters: dict[str, Callable[[Path], Splits]] = {
        "LabelMe": _from_labelme,
        "VOC": _from_voc,
        "MVTec": _from_mvtec,
    }
    if src_type not in converters:
        raise FlawscopeError(
            f"unknown src_dataset_type {src_type!r}: expected {', '.join(converters)}"
        )
    splits = converters[src_type](root)
    write_lists(root, {split: sample_lines(root, splits[split]) for split in _SPLITS})
    log.info(
        "Converted %s dataset %s to SegDataset lists: train %d, val %d images",
        src_type, root, len(splits["train"]), len(splits["val"]),
    )
    return root


def _by_label(samples: list[Sample]) -> Splits:
    """The split for sources without lists: good images train, defect images validate."""
    return {
        "train": [s for s in samples if not s.label],
        "val": [s for s in samples if s.label],
    }


def _with_mask(root: Path, image: Path, mask: np.ndarray, name: Path) -> Sample:
    """A sample for ``image``; a mask with defect pixels is saved as 0/255 PNG under
    converted_masks/``name``, an empty one means a good image and is not written."""
    if not mask.any():
        return Sample(image, None, 0, GOOD)
    path = (root / MASK_DIR / name).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return Sample(image, path, 1, DEFECT)


def _from_mvtec(root: Path) -> Splits:
    """MVTec's own masks are already 0/255, so the lists point at them directly."""
    dataset = load_dataset(root, "MVTec")
    return {"train": dataset.train, "val": dataset.val}


def _from_voc(root: Path) -> Splits:
    """JPEGImages/ + SegmentationClass/<stem>.png (+ ImageSets/Segmentation/{train,val}.txt).

    Any nonzero class index is defect, VOC's 255 "void" border included: it outlines the
    annotated object. An image without a class PNG, or with an all-zero one, is good.
    """
    image_dir, class_dir = root / "JPEGImages", root / "SegmentationClass"
    if not image_dir.is_dir():
        raise FlawscopeError(
            f"{root}: not a VOC layout (expected JPEGImages/ and SegmentationClass/)"
        )
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if is_image_file(p) and p.is_file()}

    def sample(stem: str, where: str) -> Sample:
        image = images.get(stem)
        if image is None:
            raise FlawscopeError(f"{where}: no image named {stem}.* in {image_dir}")
        mask = class_dir / f"{stem}.png"
        if not mask.is_file():
            return Sample(image, None, 0, GOOD)
        return _with_mask(root, image, read_mask(mask), Path("SegmentationClass", stem))

    set_dir = root / "ImageSets" / "Segmentation"
    if not (set_dir / "train.txt").is_file():
        return _by_label([sample(stem, str(image_dir)) for stem in images])
    splits: Splits = {split: [] for split in _SPLITS}
    for split in _SPLITS:
        list_file = set_dir / f"{split}.txt"
        if list_file.is_file():
            for lineno, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    splits[split].append(sample(line.split()[0], f"{list_file}:{lineno}"))
    return splits


def _from_labelme(root: Path) -> Splits:
    """LabelMe JSON files (polygons, rectangles) next to their images, anywhere under ``root``.

    PaddleX's ``train_anno_list.txt`` / ``val_anno_list.txt`` (JSON paths relative to
    ``root``), when present, say which file goes where and nothing else is used. Otherwise
    every LabelMe file under ``root`` is used, and images without one are good images.
    """
    anno_lists = {split: root / f"{split}_anno_list.txt" for split in _SPLITS}
    if anno_lists["train"].is_file():
        return {
            split: _labelme_samples(root, [
                root / line.strip()
                for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            ] if path.is_file() else [])
            for split, path in anno_lists.items()
        }
    samples = _labelme_samples(root, _visible(root, "*.json"))
    if not samples:
        raise FlawscopeError(f"{root}: no LabelMe annotation files (*.json) found; "
                             "CheckDataset.convert.src_dataset_type names the layout to convert from")
    annotated = {s.image for s in samples}
    samples += [
        Sample(path, None, 0, GOOD)
        for path in _visible(root, "*")
        if is_image_file(path) and path not in annotated and MASK_DIR not in path.parts
    ]
    return _by_label(samples)


def _visible(root: Path, pattern: str) -> list[Path]:
    """Files under ``root`` matching ``pattern``, sorted, none in hidden folders or hidden."""
    return sorted(
        path for path in root.rglob(pattern)
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def _labelme_samples(root: Path, json_paths: list[Path]) -> list[Sample]:
    """The samples of the LabelMe files among ``json_paths``."""
    samples = (_labelme_sample(root, path) for path in json_paths)
    return [sample for sample in samples if sample is not None]


def _labelme_sample(root: Path, json_path: Path) -> Sample | None:
    """The sample a LabelMe file describes; None for a JSON file that is not LabelMe's."""
    try:
        data: Any = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlawscopeError(f"{json_path}: cannot read LabelMe JSON ({exc})") from exc
    if not isinstance(data, dict) or "shapes" not in data:
        log.warning("%s: not a LabelMe file (no 'shapes'), skipped", json_path)
        return None
    if not data.get("imagePath"):
        raise FlawscopeError(f"{json_path}: LabelMe file has no imagePath")
    # LabelMe on Windows writes backslashes; the path is relative to the JSON file.
    image = Path(os.path.normpath(json_path.parent / data["imagePath"].replace("\\", "/")))
    if not image.is_file():
        raise FlawscopeError(
            f"{json_path}: its imagePath {data['imagePath']!r} ({image}) does not exist"
        )
    if data.get("imageWidth") and data.get("imageHeight"):
        size = (int(data["imageWidth"]), int(data["imageHeight"]))
    else:
        with Image.open(image) as img:
            size = img.size
    mask = _draw_shapes(json_path, data["shapes"], size)
    return _with_mask(root, image, mask, json_path.relative_to(root))


def _draw_shapes(
    json_path: Path, shapes: list[dict[str, Any]], size: tuple[int, int]
) -> np.ndarray:
    """Fill LabelMe shapes in order (``_background_`` ones erase), as an HxW bool mask.

    Shapes that enclose no area (lines, points) are refused rather than dropped, since
    dropping them would silently lose a defect annotation.
    """
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for index, shape in enumerate(shapes):
        kind = shape.get("shape_type") or "polygon"  # old LabelMe files leave it out
        points = [(float(x), float(y)) for x, y in shape.get("points", [])]
        value = 0 if shape.get("label") == LABELME_BACKGROUND else 255
        if kind == "polygon" and len(points) >= 3:
            draw.polygon(points, fill=value, outline=value)
        elif kind == "rectangle" and len(points) == 2:
            (x0, y0), (x1, y1) = points
            draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=value)
        else:
            raise FlawscopeError(
                f"{json_path}: shape {index} ({kind!r} with {len(points)} points) is not a polygon"
                " (3+ points) or rectangle (2 points), so it marks no defect area"
            )
    return np.asarray(mask) > 0
