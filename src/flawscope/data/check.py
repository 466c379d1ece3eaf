"""``Global.mode=check_dataset``: is a dataset usable for training, and what is in it?

Mirrors PaddleX: optional conversion and re-split first, then a check that writes
``check_dataset_result.json``, demo images with their masks overlaid and a histogram. Every
image and mask is decoded once, one at a time: a truncated file only shows when decoded, and
holding decoded images would not scale to large datasets. Problems are collected, not raised,
so one run lists everything to fix; only what makes a report impossible (no dataset directory,
no recognisable layout) raises ``FlawscopeError``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageFilter
from tqdm import tqdm

from flawscope.atomic import write_atomic
from flawscope.data.convert import convert_dataset
from flawscope.data.io import file_sha256, is_image_file, read_image, read_mask_values
from flawscope.data.layouts import (DEFECT, GOOD, VAL_WITHOUT_GOOD_FIX, annotation_source, detect_layout, header_size,
                                    load_dataset, mask_dirs, mvtec_train_dir, read_lines, unread_images)
from flawscope.data.split import split_dataset
from flawscope.errors import FlawscopeError, printable

log = logging.getLogger("flawscope")

SPLITS = ("train", "val")
RESULT_FILE = "check_dataset_result.json"
CHECK_DIR = "check_dataset"  # under Global.output: demo_img/ and histogram.png
SAMPLE_NUM = 10  # demo images per split, as in PaddleX
NUM_CLASSES = 2  # good and defect
UNKNOWN = "unknown"  # defect type of a list entry whose mask cannot be read
OVERLAY_COLOR = (255, 0, 0)
FEW_GOOD_IMAGES = 3  # training holds out 2 good images to calibrate on and keeps 1 (calibrate.split_calibration)


@dataclass(frozen=True)
class _Item:
    """One image to check. ``defect_type`` None: its mask decides (SegDataset lists)."""

    image: Path
    mask: Path | None
    defect_type: str | None
    where: str = ""  # "train.txt:3" for list entries, so problems point at the line too


@dataclass
class _Findings:
    """Everything learnt while streaming over the images; no pixels are kept."""

    problems: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    counts: dict[str, Counter[str]] = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    modes: Counter[str] = field(default_factory=Counter)
    widths: list[int] = field(default_factory=list)  # [min, max]
    heights: list[int] = field(default_factory=list)
    without_masks: list[str] = field(default_factory=list)
    used_masks: set[Path] = field(default_factory=set)
    by_digest: dict[str, list[tuple[str, str, Path]]] = field(default_factory=dict)

    def problem(self, path: Path, text: str) -> None:
        self.problems.append({"file": str(path), "problem": text})

    def warning(self, path: Path, text: str) -> None:
        self.warnings.append({"file": str(path), "problem": text})

    def add_size(self, width: int, height: int) -> None:
        for extent, value in ((self.widths, width), (self.heights, height)):
            extent[:] = [min(extent[0], value), max(extent[1], value)] if extent else [value, value]


def run_check_dataset(cfg: dict[str, Any]) -> dict[str, Any]:
    """Convert and re-split when the config asks (first, as PaddleX does), check the result and
    write ``check_dataset_result.json``. The caller decides what a failed check means (the
    engine exits 1 when ``check_pass`` is false)."""
    dataset_dir = cfg["Global"]["dataset_dir"]
    if dataset_dir is None:
        raise FlawscopeError("Global.dataset_dir is not set: add -o Global.dataset_dir=PATH")
    options = cfg["CheckDataset"]
    layout = options["dataset_type"]
    done: dict[str, Any] = {}
    output = Path(cfg["Global"]["output"])
    result_path = output / RESULT_FILE
    if result_path.is_file():  # until this check ends, an earlier one's result must not pass for it
        write_atomic(result_path, json.dumps({"done_flag": False}).encode())
    split = options["split"]
    split_args = (split["train_percent"], split["val_percent"], split["seed"]) if split["enable"] else None
    if options["convert"]["enable"]:  # and the split with it, so that a refused split writes nothing
        # the check writes under the output: to be skipped, its own folder where that is the dataset's
        skip = output / CHECK_DIR if os.path.abspath(output) == os.path.abspath(dataset_dir) else output
        split_report = convert_dataset(dataset_dir, options["convert"]["src_dataset_type"], skip, split_args)
        done["convert"] = {"src_dataset_type": options["convert"]["src_dataset_type"]}
        if split_report is not None:
            done["split"] = split_report
        layout = "SegDataset"
    elif split_args is not None:
        done["split"] = split_dataset(dataset_dir, *split_args, layout)
        layout = "SegDataset"
    result = check_dataset(dataset_dir, output, layout) | done
    # A file name that is not UTF-8 is written as the escape Python reads back (os.fsencode).
    write_atomic(result_path, json.dumps(result, indent=2, ensure_ascii=False).encode("utf-8", "backslashreplace"))
    for entry in result["warnings"]:
        log.warning("%s: %s", entry["file"], entry["problem"])
    for entry in result["problems"]:
        log.error("%s: %s", entry["file"], entry["problem"])
    if result["check_pass"]:
        log.info("Check dataset passed !")
    else:
        count = len(result["problems"])
        log.error("Check dataset failed: %d problem(s), listed in %s", count, result_path)
    return result


def check_dataset(
    dataset_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    dataset_type: str = "auto",
    sample_num: int = SAMPLE_NUM,
) -> dict[str, Any]:
    """Check every image and mask of the dataset; write demo images and the histogram under
    ``output/check_dataset/`` and return the result (PaddleX's fields plus ours)."""
    root = Path(dataset_dir).absolute()
    layout = detect_layout(root, dataset_type)
    found = _Findings()
    splits = _list_items(root, layout, found)
    demo_dir = Path(output) / CHECK_DIR / "demo_img"
    shutil.rmtree(demo_dir, ignore_errors=True)  # demos of an earlier run would mislead
    demo_dir.mkdir(parents=True)
    sample_paths: dict[str, list[str]] = {}
    for split, items in splits.items():
        picks = _demo_picks(items, sample_num)
        sample_paths[split] = []
        for index, item in enumerate(tqdm(items, desc=f"check {split}", unit="img", disable=None)):
            image, mask, defect_type = _check_item(split, item, found)
            if index in picks and image is not None:
                name = f"{split}_{len(sample_paths[split]):02d}_{defect_type}_{item.image.stem}.jpg"
                _overlay(image, mask).save(demo_dir / name, quality=90)
                sample_paths[split].append(f"{CHECK_DIR}/demo_img/{name}")
    duplicates = _duplicates(found)
    good = found.counts["train"][GOOD]
    if 0 < good < FEW_GOOD_IMAGES:
        found.warning(root, f"only {good} good training image(s): none can be held out to calibrate the thresholds, "
                      "which are then set on the images trained on and flag new good parts; a model learns 'good' "
                      "from tens to hundreds of images")
    if sum(found.counts["val"].values()) and not found.counts["val"][GOOD]:  # as a conversion leaves it
        found.warning(root, "the val split holds no good images: evaluation would measure no image AUROC, AP or "
                      "false-positive rate; " + VAL_WITHOUT_GOOD_FIX)
    if found.without_masks:  # allowed, but a user who meant to give every mask should hear of it
        count = len(found.without_masks)
        found.warning(Path(found.without_masks[0]), f"{count} defect image(s) have no mask (this one, "
                      "and the others in images_without_masks): evaluation leaves them out of the pixel metrics")
    if layout == "Folder" and annotation_source(root) == "LabelMe":  # its defects would train as good images
        found.warning(root, "LabelMe files named after the images: a Folder dataset does not read LabelMe annotations, "
                      "so their images count as good; convert them with -o CheckDataset.convert.enable=true "
                      "-o CheckDataset.convert.src_dataset_type=LabelMe")
    images = {item.image for items in splits.values() for item in items}
    orphans = _masks_without_images(root, layout, found.used_masks, images)
    if orphans:  # often a mask named unlike its image, which then counts as having none
        found.warning(orphans[0], f"{len(orphans)} mask file(s) belong to no image read (this one, and the others "
                      "in masks_without_images): a misnamed mask leaves its image without one, and an image in no "
                      "split (images_not_read) is not read with its mask")
    unread = _unread(root, layout, Path(output).absolute(), found)
    histogram = Path(output) / CHECK_DIR / "histogram.png"
    _histogram(found.counts, histogram, f"{root.name} ({layout})")
    log.info(
        "%s dataset %s: train %d images %s, val %d images %s",
        layout, root, sum(found.counts["train"].values()), dict(found.counts["train"]),
        sum(found.counts["val"].values()), dict(found.counts["val"]),
    )
    return {
        "done_flag": True,
        "check_pass": not found.problems,
        "attributes": {
            "train_samples": len(splits["train"]),
            "train_sample_paths": sample_paths["train"],
            "val_samples": len(splits["val"]),
            "val_sample_paths": sample_paths["val"],
            "num_classes": NUM_CLASSES,
            "defect_types": {split: dict(sorted(found.counts[split].items())) for split in SPLITS},
            "image_size": (
                {"width": found.widths, "height": found.heights} if found.widths else None
            ),
            "image_modes": dict(sorted(found.modes.items())),
            "images_without_masks": found.without_masks,
            "masks_without_images": [str(path) for path in orphans],
            "images_not_read": [str(path) for path in unread],
            "duplicate_files": duplicates,
        },
        "analysis": {"histogram": f"{CHECK_DIR}/histogram.png"},
        "dataset_path": str(root),
        "show_type": "image",
        "dataset_type": layout,
        "problems": found.problems,
        "warnings": found.warnings,
    }


_READS = {"MVTec": "images directly in train/good/ and test/<type>/, masks in ground_truth/<type>/",
          "Folder": "images directly in good/ (normal/, ok/) and abnormal/ (defect/, bad/, ng/), masks in mask/"}


def _unread(root: Path, layout: str, output: Path, found: _Findings) -> list[Path]:
    """The image files of an MVTec or Folder dataset that no split reads (``layouts.unread_images``),
    warned of by folder: a subfolder of lots, a folder of defects named NG/ were left out silently."""
    if layout == "SegDataset":
        return []
    skip = output / CHECK_DIR if output == root else output  # the check's own pictures
    reported = {entry["file"] for entry in found.problems}  # defect folders under train/ are problems already
    unread = [path for path in unread_images(load_dataset(root, layout, require_train=False), skip)
              if str(path) not in reported]
    if unread:
        folders = Counter(os.path.relpath(path.parent, root) for path in unread)
        shown = ", ".join(f"{folder}/ {count}" for folder, count in sorted(folders.items())[:5])
        more = f" and {len(folders) - 5} more folders" if len(folders) > 5 else ""
        found.warning(unread[0], f"{len(unread)} image file(s) in no split, which training and evaluation leave "
                      f"out (this one, and the others in images_not_read; by folder: {shown}{more}): the {layout} "
                      f"layout reads {_READS[layout]}")
    return unread


def _list_items(root: Path, layout: str, found: _Findings) -> dict[str, list[_Item]]:
    """The images of each split, without opening them; empty splits are recorded here, since
    only the layout knows whether a split was meant to exist."""
    if layout == "SegDataset":
        splits = {}
        for split in SPLITS:
            list_file = root / f"{split}.txt"
            if list_file.is_file():
                entries = _list_entries(root, list_file, found)
                splits[split] = entries or []
                if entries == []:
                    found.problem(list_file, "empty split: the list names no images")
            else:  # train.txt exists, or the layout would not have been recognised
                splits[split] = []
                found.warning(list_file, "no val.txt: the dataset has no validation split")
        return splits
    dataset = load_dataset(root, layout, require_train=False)
    splits = {
        split: [_Item(s.image, s.mask, s.defect_type) for s in samples]
        for split, samples in (("train", dataset.train), ("val", dataset.val))
    }
    if not splits["train"]:
        train_dir = mvtec_train_dir(root) if layout == "MVTec" else root
        found.problem(train_dir, "empty split: no training images")
    if layout == "MVTec":
        _check_mvtec_dirs(root, splits, found)
    elif not splits["val"]:
        found.warning(
            root, "no abnormal images: every normal image is for training, no validation split"
        )
    return splits


def _check_mvtec_dirs(root: Path, splits: dict[str, list[_Item]], found: _Findings) -> None:
    """MVTec trains on train/good/ only, so defect folders under train/ would be ignored."""
    train = root / "train"
    for directory in sorted(train.iterdir()) if train.is_dir() else []:
        if directory.is_dir() and directory != mvtec_train_dir(root):
            for path in sorted(p for p in directory.iterdir() if is_image_file(p)):
                found.problem(
                    path, f"defect image in the training split ({directory.name}/ under train/)"
                )
    if not (root / "test").is_dir():
        found.warning(root / "test", "no test/ directory: the dataset has no validation split")
    elif not splits["val"]:
        found.problem(root / "test", "empty split: no images in test/")


def _list_entries(root: Path, list_file: Path, found: _Findings) -> list[_Item] | None:
    """The entries of a PaddleX list, None when it cannot be read; a malformed line is a
    problem, not the end of the check."""
    try:
        lines = read_lines(list_file)
    except FlawscopeError as exc:
        found.problem(list_file, _reason(exc, list_file))
        return None
    items = []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            found.problem(
                list_file,
                f"line {lineno}: expected 'image_path [mask_path]', got {len(fields)} fields",
            )
            continue
        image, *mask = [root / f for f in fields]  # as the loader reads them (symlinks kept)
        where = f"{list_file.name}:{lineno}"
        if "\\" in line and not all(path.exists() for path in (image, *mask)):  # as the loader's hint says
            where += "; the list separates folders with backslashes: write /"
        # a line without a mask is a good image; with one, the mask tells
        items.append(_Item(image, mask[0] if mask else None, None if mask else GOOD, where))
    return items


def _demo_picks(items: list[_Item], count: int) -> set[int]:
    """Indices of the demo images: round-robin over defect types, so each type is shown."""
    groups: dict[str | None, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.defect_type, []).append(index)
    order = [i for row in itertools.zip_longest(*groups.values()) for i in row if i is not None]
    return set(order[:count])


def _check_item(
    split: str, item: _Item, found: _Findings
) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Decode and check one image and its mask; returns both (for a demo) and the defect type."""
    at = f" (listed in {item.where})" if item.where else ""
    try:
        image = read_image(item.image)
    except FlawscopeError as exc:
        found.problem(item.image, _reason(exc, item.image) + at)
        image = None
    else:
        height, width = image.shape[:2]
        found.add_size(width, height)
        with Image.open(item.image) as header:
            found.modes[header.mode] += 1
    mask = _check_mask(item.mask, item.image, image, found, at) if item.mask is not None else None
    defect_type = item.defect_type
    if defect_type is None:
        defect_type = UNKNOWN if mask is None else DEFECT if mask.any() else GOOD
    elif defect_type != GOOD and item.mask is None:
        found.without_masks.append(str(item.image))
    elif defect_type != GOOD and mask is not None and not mask.any():
        found.warning(
            item.mask,
            f"mask marks no defect pixels, though its image {item.image.name} is a"
            f" {defect_type!r} defect",
        )
    if split == "train" and defect_type not in (GOOD, UNKNOWN):
        found.problem(
            item.image,
            f"defect image in the training split: its mask {item.mask} marks defect pixels{at}",
        )
    found.counts[split][defect_type] += 1
    if image is not None:
        found.by_digest.setdefault(file_sha256(item.image), []).append((split, defect_type, item.image))
    return image, mask, defect_type


def _check_mask(
    path: Path, image_path: Path, image: np.ndarray | None, found: _Findings, at: str
) -> np.ndarray | None:
    """The mask as bool, or None when it cannot be read; size and values are checked."""
    found.used_masks.add(path)
    try:
        mask, value_problem = read_mask_values(path)
    except FlawscopeError as exc:
        found.problem(path, _reason(exc, path) + at)
        return None
    if image is not None and mask.shape != image.shape[:2]:
        stored = header_size(image_path)
        turned = (f" as shown (its EXIF orientation turns the {stored[0]}x{stored[1]} pixels it stores)"
                  if stored != (image.shape[1], image.shape[0]) else "")
        found.problem(
            path,
            f"mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} is"
            f" {image.shape[1]}x{image.shape[0]}{turned}{at}",
        )
    elif mask.mean() > 0.5:  # a defect smaller than the part, drawn as 0 on 255
        found.warning(path, f"mask marks {mask.mean():.0%} of its image as defect: inverted? (defect pixels must "
                      f"be nonzero, the rest 0){at}")
    if value_problem:
        found.problem(path, value_problem + at)
    return mask


def _reason(exc: FlawscopeError, path: Path) -> str:
    """The message of an io error without its leading path, which the report names apart."""
    return str(exc).removeprefix(f"{path}: ")


def _duplicates(found: _Findings) -> list[list[str]]:
    """Groups of identical image files. A training image identical to a defect image is a
    defect image in the training split; other copies only inflate or leak, so they warn."""
    groups = []
    for entries in found.by_digest.values():
        by_path: dict[Path, list[tuple[str, str, Path]]] = {}
        for entry in entries:
            by_path.setdefault(entry[2], []).append(entry)
        for path, listed in by_path.items():  # one file listed more than once: no copy of another
            splits = [split for split, _, _ in listed]
            as_defect = [split for split, kind, _ in listed if kind not in (GOOD, UNKNOWN)]
            if as_defect and ("train", GOOD) in {(split, kind) for split, kind, _ in listed}:
                found.problem(path, f"defect image in the training split: listed as good in train and as a defect "
                                    f"in {as_defect[0]}")
            elif len(set(splits)) > 1:
                found.warning(path, f"listed in both {' and '.join(sorted(set(splits)))}: evaluated on an image "
                                    "that is trained on")
            elif len(splits) > 1:
                found.warning(path, f"listed {len(splits)} times in {splits[0]}")
        if len(by_path) > 1:
            groups.append([listed[0] for listed in by_path.values()])
    for entries in groups:
        defects = [path for _, kind, path in entries if kind not in (GOOD, UNKNOWN)]
        for split, kind, path in entries:
            if split == "train" and kind == GOOD and defects:
                found.problem(
                    path, f"defect image in the training split: same bytes as {defects[0]}"
                )
        first, *others = (path for _, _, path in entries)
        leak = {"train", "val"} <= {split for split, _, _ in entries}  # the metrics are optimistic
        found.warning(first, f"duplicate file: same bytes as {', '.join(map(str, others))}"
                             + (": a copy of a training image is evaluated on" if leak else ""))
    return [[str(path) for _, _, path in entries] for entries in groups]


def _masks_without_images(root: Path, layout: str, used: set[Path], images: set[Path]) -> list[Path]:
    """Mask files in the mask folders that no image uses (often a naming mismatch); the images
    themselves may share a folder with their masks."""
    folders = set(mask_dirs(root, layout)) | {path.parent for path in used}
    return sorted(
        path
        for folder in folders if folder.is_dir()
        for path in folder.iterdir()
        if path not in used and path not in images
        and path.is_file() and is_image_file(path) and not path.name.startswith(".")
    )


def _overlay(image: np.ndarray, mask: np.ndarray | None) -> Image.Image:
    """The image with its defect area tinted and outlined, so a wrong mask is seen at once."""
    shown = Image.fromarray(image)
    if mask is None or mask.shape != image.shape[:2] or not mask.any():
        return shown
    region = Image.fromarray(mask.astype(np.uint8) * 255)
    color = Image.new("RGB", shown.size, OVERLAY_COLOR)
    shown = Image.composite(color, shown, region.point(lambda v: v * 2 // 5))  # 40 % tint
    outline = region.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(3))
    shown.paste(color, mask=outline)
    return shown


def _histogram(counts: dict[str, Counter[str]], path: Path, title: str) -> None:
    """Bars of images per defect type, one per split, with the counts written on them."""
    kinds = sorted(set().union(*counts.values()), key=lambda kind: (kind != GOOD, kind))
    positions = np.arange(len(kinds))
    width = 0.8 / len(counts)
    figure = Figure(figsize=(max(6.0, 1.1 * len(kinds) + 2), 4.5), layout="constrained")
    axes = figure.add_subplot()
    for offset, (split, counter) in enumerate(counts.items()):
        values = [counter[kind] for kind in kinds]
        bars = axes.bar(
            positions + (offset - (len(counts) - 1) / 2) * width, values, width,
            label=f"{split} ({sum(values)} images)",
        )
        axes.bar_label(bars, labels=[str(v) if v else "" for v in values], padding=2)
    rotate = {"rotation": 30, "ha": "right"} if len(kinds) > 5 else {}
    # names as written, not as formulas ("cost_$5_$10" failed as mathtext)
    axes.set_xticks(positions, [printable(kind) for kind in kinds], parse_math=False, **rotate)
    axes.set_xlabel("defect type")
    axes.set_ylabel("images")
    axes.set_title(printable(f"Samples per split and defect type: {title}"), parse_math=False)
    axes.margins(y=0.12)
    axes.legend()
    figure.savefig(path, dpi=100)
