"""Converting LabelMe, VOC and MVTec datasets to a SegDataset (PaddleX's ``CheckDataset.convert``).

The lists are written into the dataset folder and point at the source images where they are;
masks that must be drawn (LabelMe) or binarised (VOC) go to ``converted_masks/``. Source files
are never modified, and lists already there are kept as ``*.bak`` (``split.write_lists``).
When the source has no train/val lists of its own, good images go to train and defect images to
val, the only split anomaly detection can train on; ``CheckDataset.split`` can then move some
good images to val.
"""

from __future__ import annotations

import functools
import json
import math
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from flawscope.atomic import staging_path, swap_in
from flawscope.data.io import is_image_file, read_mask
from flawscope.data.layouts import DEFECT, GOOD, Sample, header_size, load_dataset, read_lines, visible_files
from flawscope.data.split import check_defect_masks, check_percentages, sample_lines, split_samples, write_lists
from flawscope.errors import FlawscopeError

log = logging.getLogger("flawscope")

MASK_DIR = "converted_masks"
LABELME_BACKGROUND = "_background_"  # LabelMe's label for areas that are explicitly not defect
# labelme_json_to_dataset writes img.png, label.png, label_viz.png and this beside them: no good images
_LABELME_EXPORT = "label_names.txt"
_SPLITS = ("train", "val")

Splits = dict[str, list[Sample]]


def convert_dataset(root: str | os.PathLike[str], src_type: str,
                    skip: str | os.PathLike[str] | None = None,
                    split: tuple[int, int, int] | None = None) -> dict[str, Any] | None:
    """Write a SegDataset layout (train.txt, val.txt, converted_masks/) into ``root`` from its
    ``src_type`` annotations ("LabelMe", "VOC" or "MVTec"). ``skip``: a folder under ``root``
    whose files are not the dataset's (the check's own output). ``split``: (train_percent,
    val_percent, seed) to re-split the converted images before the lists are written (see
    ``split.split_samples``, whose report is returned).

    Masks are drawn into a hidden folder first, which replaces ``converted_masks/`` only once
    every list line is known to be writable and the split done: a refused conversion or split
    leaves the dataset as it was.
    """
    root = Path(os.path.abspath(root))  # normalised: list lines are compared with it as text
    if not root.is_dir():
        raise FlawscopeError(f"{root}: dataset directory does not exist")
    converters: dict[str, Callable[[Path, _Masks], Splits]] = {
        "LabelMe": _from_labelme,
        "VOC": _from_voc,
        "MVTec": _from_mvtec,
    }
    if src_type not in converters:
        raise FlawscopeError(
            f"unknown src_dataset_type {src_type!r}: expected {', '.join(converters)}"
        )
    skip = Path(os.path.abspath(skip)) if skip is not None else None
    # only an output inside the dataset holds files to skip; one above it holds the dataset itself
    masks = _Masks(root, skip if skip is not None and skip != root and skip.is_relative_to(root) else None)
    report = None
    try:
        splits = converters[src_type](root, masks)
        if split is not None:
            check_percentages(*split[:2])
            splits["train"], splits["val"], report = split_samples(root, splits["train"] + splits["val"], *split)
        # a split's lists are sorted, as split_dataset writes them: the order decides the held-out images
        lists = {name: (sorted if split else list)(sample_lines(root, splits[name])) for name in _SPLITS}
        backups = write_lists(root, lists, masks.commit)  # the masks first: the new lists name them
    finally:
        shutil.rmtree(masks.staging, ignore_errors=True)
    log.info(
        "Converted %s dataset %s to SegDataset lists: train %d, val %d images",
        src_type, root, len(splits["train"]), len(splits["val"]),
    )
    return None if report is None else report | {"backups": [str(path) for path in backups]}


class _Masks:
    """Where a conversion's masks go: drawn into a hidden staging folder under their final
    names in ``converted_masks/``, which ``commit`` replaces with it."""

    def __init__(self, root: Path, skip: Path | None) -> None:
        self.final = root / MASK_DIR
        self.staging = staging_path(self.final)
        self.skip = skip  # a folder of files that are not the dataset's
        self.owners: dict[Path, Path] = {}  # each mask drawn, by name: its image

    def sample(self, image: Path, mask: np.ndarray, name: Path) -> Sample:
        """A sample for ``image``; a mask with defect pixels is saved as 0/255 PNG ``name``
        (relative to converted_masks/), an empty one means a good image and is not written."""
        if not mask.any():
            return Sample(image, None, 0, GOOD)
        path = self.staging / name
        if path.exists():
            if self.owners[name] == image:
                raise FlawscopeError(f"{image}: its annotation {name.with_suffix('.json')} is listed twice (in one "
                                     "anno list, or in both): list it once")
            raise FlawscopeError(f"{image}: its mask would be {self.final / name}, as another image's: "
                                 "rename one of them")
        self.owners[name] = image
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        return Sample(image, self.final / name, 1, DEFECT)

    def commit(self) -> None:
        """The staged masks become ``converted_masks/``, an earlier conversion's masks gone;
        without any (no defect drawn, or MVTec's own masks), the folder stays as it was."""
        if self.staging.exists():
            swap_in(self.staging, self.final)


def _by_label(samples: list[Sample]) -> Splits:
    """The split for sources without lists: good images train, defect images validate."""
    return {
        "train": [s for s in samples if not s.label],
        "val": [s for s in samples if s.label],
    }


def _from_mvtec(root: Path, masks: _Masks) -> Splits:
    """MVTec's own masks are already 0/255, so the lists point at them directly."""
    dataset = load_dataset(root, "MVTec")
    check_defect_masks(dataset.val + dataset.train)
    return {"train": dataset.train, "val": dataset.val}


def _from_voc(root: Path, masks: _Masks) -> Splits:
    """JPEGImages/ + SegmentationClass/<stem>.png (+ ImageSets/Segmentation/{train,val}.txt).

    Any nonzero class index is defect, VOC's 255 "void" border included: it outlines the
    annotated object. An image without a class PNG, or with an all-zero one, is good.
    """
    image_dir, class_dir = root / "JPEGImages", root / "SegmentationClass"
    if not image_dir.is_dir():
        raise FlawscopeError(
            f"{root}: not a VOC layout (expected JPEGImages/ and SegmentationClass/)"
        )
    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if is_image_file(path) and path.is_file() and not path.name.startswith("."):  # macOS's ._a.jpg
            if path.stem in images:  # VOC names images by stem: a.jpg and a.png are ambiguous
                raise FlawscopeError(f"{path}: same name as {images[path.stem].name}; VOC lists and masks name "
                                     "images without extension, so rename one of them")
            images[path.stem] = path
    class_masks = ({p.stem: p for p in sorted(class_dir.iterdir())
                    if p.suffix.lower() == ".png" and p.is_file() and not p.name.startswith(".")}
                   if class_dir.is_dir() else {})
    listed: dict[str, str] = {}

    def sample(stem: str, where: str) -> Sample:
        image = images.get(stem)
        if image is None:
            raise FlawscopeError(f"{where}: no image named {stem}.* in {image_dir}")
        if stem in listed:
            raise FlawscopeError(f"{where}: {stem} is listed again (first at {listed[stem]})")
        listed[stem] = where
        mask = class_masks.get(stem)
        if mask is None:
            return Sample(image, None, 0, GOOD)
        return masks.sample(image, read_mask(mask), Path("SegmentationClass", f"{stem}.png"))

    orphans = sorted(set(class_masks) - set(images))
    if orphans:
        log.warning("%s: %d class PNG(s) have no image in %s and are not used (e.g. %s.png)",
                    class_dir, len(orphans), image_dir, orphans[0])
    set_dir = root / "ImageSets" / "Segmentation"
    if not (set_dir / "train.txt").is_file():
        return _by_label([sample(stem, str(image_dir)) for stem in images])
    splits: Splits = {split: [] for split in _SPLITS}
    for split in _SPLITS:
        list_file = set_dir / f"{split}.txt"
        if list_file.is_file():
            for lineno, line in enumerate(read_lines(list_file), 1):
                stem = line.strip()
                if any(c.isspace() for c in stem):  # a name, not "name label": taking "a" for "a b" loses "a b"
                    raise FlawscopeError(f"{list_file}:{lineno}: {stem!r} contains whitespace, which SegDataset "
                                         "list lines ('image_path mask_path') cannot hold; rename it")
                if stem:
                    splits[split].append(sample(stem, f"{list_file}:{lineno}"))
    return splits


def _from_labelme(root: Path, masks: _Masks) -> Splits:
    """LabelMe JSON files (polygons, rectangles, circles) next to their images, anywhere under ``root``.

    PaddleX's ``train_anno_list.txt`` / ``val_anno_list.txt`` (JSON paths relative to
    ``root``), when present, say which file goes where and nothing else is used. Otherwise
    every LabelMe file under ``root`` is used, and images without one are good images, except
    in the folders ``labelme_json_to_dataset`` writes (a mask and its overlay among them).
    """
    anno_lists = {split: root / f"{split}_anno_list.txt" for split in _SPLITS}
    sources: dict[Path, Path] = {}  # shared by the splits: one image annotated in both is refused too
    if anno_lists["train"].is_file():
        return {split: _labelme_samples(root, _listed_files(root, path) if path.is_file() else [], masks, sources)
                for split, path in anno_lists.items()}
    files = visible_files(root, masks.skip)
    samples = _labelme_samples(root, [path for path in files if path.suffix.lower() == ".json"], masks, sources)
    if not samples:
        raise FlawscopeError(f"{root}: no LabelMe annotation files (*.json) found; "
                             "CheckDataset.convert.src_dataset_type names the layout to convert from")
    annotated = {s.image for s in samples}
    samples += [
        Sample(path, None, 0, GOOD)
        for path in files
        if is_image_file(path) and path not in annotated and MASK_DIR not in path.relative_to(root).parts
        and not _labelme_export(path.parent)
    ]
    return _by_label(samples)


@functools.cache  # asked for each image of the folder: said once
def _labelme_export(folder: Path) -> bool:
    """Whether ``folder`` is one that ``labelme_json_to_dataset`` wrote: its images are an
    annotated image's copy, mask and overlay, not good images."""
    if (folder / _LABELME_EXPORT).is_file() and (folder / "label.png").is_file():
        log.info("%s: written by labelme_json_to_dataset, its images are not used", folder)
        return True
    return False


def _listed_files(root: Path, list_file: Path) -> list[Path]:
    """The files an anno list names, relative to ``root``; one outside ``root`` is refused, as
    its mask would be drawn outside ``converted_masks/``."""
    files = []
    for lineno, line in enumerate(read_lines(list_file), 1):
        if line.strip():  # LabelMe on Windows writes backslashes, as in imagePath
            path = Path(os.path.normpath(root / line.strip().replace("\\", "/")))
            if not path.is_relative_to(root):
                raise FlawscopeError(f"{list_file}:{lineno}: {line.strip()} is outside the dataset folder {root}; "
                                     "LabelMe files must be in it")
            files.append(path)
    return files


def _labelme_samples(root: Path, json_paths: list[Path], masks: _Masks, sources: dict[Path, Path]) -> list[Sample]:
    """The samples of the LabelMe files among ``json_paths``; ``sources``: the file each image
    was annotated in so far. Two files for one image would list it twice with two masks, or,
    re-split, keep only one of them."""
    samples = []
    for path in json_paths:
        sample = _labelme_sample(root, path, masks)
        if sample is None:
            continue
        first = sources.setdefault(sample.image, path)
        if first != path:
            raise FlawscopeError(f"{sample.image}: annotated in two LabelMe files, {first} and {path}: "
                                 "merge them into one")
        samples.append(sample)
    return samples


def _labelme_sample(root: Path, json_path: Path, masks: _Masks) -> Sample | None:
    """The sample a LabelMe file describes; None for a JSON file that is not LabelMe's."""
    try:
        data: Any = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlawscopeError(f"{json_path}: cannot read LabelMe JSON ({exc})") from exc
    if not isinstance(data, dict) or "shapes" not in data:
        log.warning("%s: not a LabelMe file (no 'shapes'), skipped", json_path)
        return None
    if not isinstance(data.get("imagePath"), str) or not data["imagePath"]:
        raise FlawscopeError(f"{json_path}: LabelMe file has no imagePath")
    # LabelMe on Windows writes backslashes; the path is relative to the JSON file.
    image = Path(os.path.normpath(json_path.parent / data["imagePath"].replace("\\", "/")))
    if not image.is_file():
        raise FlawscopeError(
            f"{json_path}: its imagePath {data['imagePath']!r} ({image}) does not exist"
        )
    width, height = data.get("imageWidth"), data.get("imageHeight")
    size = header_size(image, shown=True)  # LabelMe records the size as shown: EXIF rotation applied
    if isinstance(width, int) and isinstance(height, int) and (width, height) != size:  # drawn on another image
        raise FlawscopeError(f"{json_path}: annotated on a {width}x{height} image, but its image {image} is "
                             f"{size[0]}x{size[1]}: annotate that image again")
    mask = _draw_shapes(json_path, data["shapes"], size)
    return masks.sample(image, mask, json_path.relative_to(root).with_suffix(".png"))


def _draw_shapes(
    json_path: Path, shapes: list[dict[str, Any]], size: tuple[int, int]
) -> np.ndarray:
    """Fill LabelMe shapes in order (``_background_`` ones erase), as an HxW bool mask.

    Shapes that enclose no area (lines, points) or cover no pixel of the image are refused
    rather than dropped, since dropping them would silently lose a defect annotation.
    """
    if not isinstance(shapes, list):
        raise FlawscopeError(f"{json_path}: 'shapes' is not a list of LabelMe shapes")
    mask = Image.new("L", size, 0)
    for index, shape in enumerate(shapes):
        points = _points(shape)
        if points is None:
            raise FlawscopeError(f"{json_path}: shape {index} is not a LabelMe shape with 'points' as [x, y] pairs")
        kind = shape.get("shape_type") or "polygon"  # old LabelMe files leave it out
        erase = shape.get("label") == LABELME_BACKGROUND
        drawn = Image.new("1", size, 0)
        if not _draw(ImageDraw.Draw(drawn), kind, points):
            raise FlawscopeError(
                f"{json_path}: shape {index} ({kind!r} with {len(points)} points) is not a polygon"
                " (3+ points), rectangle or circle (2 points), so it marks no defect area"
            )
        if drawn.getbbox() is None and not erase:  # outside the image, or of no size: a lost annotation
            raise FlawscopeError(f"{json_path}: shape {index} ({kind!r}) covers no pixel of the "
                                 f"{size[0]}x{size[1]} image")
        mask.paste(0 if erase else 255, mask=drawn)
    return np.asarray(mask) > 0


def _draw(draw: ImageDraw.ImageDraw, kind: str, points: list[tuple[float, float]]) -> bool:
    """Fill one LabelMe shape; False for a kind or number of points that encloses no area."""
    if kind == "polygon" and len(points) >= 3:
        draw.polygon(points, fill=1, outline=1)
    elif kind == "rectangle" and len(points) == 2:
        (x0, y0), (x1, y1) = points
        draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=1)
    elif kind == "circle" and len(points) == 2:  # LabelMe's circle: its centre, then a point on it
        (cx, cy), (x, y) = points
        r = float(np.hypot(x - cx, y - cy))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
    else:
        return False
    return True


def _points(shape: Any) -> list[tuple[float, float]] | None:
    """A shape's points as (x, y) floats; None when they are not a list of number pairs."""
    points = shape.get("points") if isinstance(shape, dict) else None
    if not isinstance(points, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)
            for p in points):
        return None
    return [(float(x), float(y)) for x, y in points]
