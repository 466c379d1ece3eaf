"""Dataset layouts on disk -> lists of samples (paths and labels, no pixels).

Three layouts are understood, tried in this order by ``layout="auto"``:

* ``SegDataset`` (PaddleX): ``train.txt`` / ``val.txt`` listing ``image_path [mask_path]``.
* ``MVTec``: ``train/good/``, ``test/<defect_type>/``, ``ground_truth/<defect_type>/``.
* ``Folder`` (anomalib): ``good/`` (or ``normal/``, ``ok/``), optional ``abnormal/`` (``defect/``,
  ``bad/``, ``ng/``) and ``mask/`` (``masks/``, ``ground_truth/``); or just a directory of images.

Loading only lists paths (images are not opened; SegDataset masks are, to know the label), so
a dataset of 10,000 images loads in well under a second. All lists are sorted, so the same
directory always gives the same splits.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image

from flawscope.data.io import check_local, check_mask_format, file_sha256, is_image_file, is_listed_file, read_mask
from flawscope.errors import FlawscopeError, first_line

log = logging.getLogger("flawscope")

GOOD = "good"
DEFECT = "defect"
# What to do where the evaluation split holds defect images only (a conversion's lists, by design).
VAL_WITHOUT_GOOD_FIX = ("move some good images there: -o CheckDataset.split.enable=true -o "
                        "CheckDataset.split.train_percent=80 -o CheckDataset.split.val_percent=20 in the "
                        "check_dataset mode (defect images stay in val)")

_NORMAL_DIRS = ("good", "normal", "ok")
_ABNORMAL_DIRS = ("abnormal", "defect", "bad", "ng")  # NG: "no good", as factory lines sort parts
_MASK_DIRS = ("mask", "masks", "ground_truth")
_VAL_EVERY = 5  # Folder layout: every 5th normal image (sorted) goes to val, i.e. 80/20
# written by check_dataset, train and evaluate at the top of Global.output (train and evaluate from
# their start): a folder holding one is an earlier run's output, its pictures no good images; where
# the dataset folder itself was the output, the folders of pictures those modes write are skipped
_OUTPUT_MARKERS = ("check_dataset_result.json", "train_result.json", "evaluate_result.json")
_OUTPUT_PICTURES = ("check_dataset", "evaluate_report")  # check.CHECK_DIR, evaluate.REPORT_DIR


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, with its ground truth."""

    image: Path
    mask: Path | None  # pixel-level ground truth; None when there is none (or the image is good)
    label: int  # 0 good, 1 defect
    defect_type: str  # "good" for normal images


@dataclass
class Dataset:
    """The samples of a dataset, split into train (normal images) and val."""

    root: Path
    layout: str
    train: list[Sample]
    val: list[Sample]


Splits = tuple[list[Sample], list[Sample]]  # (train, val)


def _images(directory: Path) -> list[Path]:
    """Sorted image files directly in ``directory``, skipping hidden files (e.g. macOS ``._x.png``)."""
    if not directory.is_dir():
        return []
    return sorted(
        p for p in directory.iterdir()
        if not p.name.startswith(".") and is_image_file(p) and is_listed_file(p)
    )


def _subdirs(directory: Path) -> list[Path]:
    """Sorted visible subdirectories of ``directory`` (none if it is not a directory)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _first(directory: Path, names: Iterable[str]) -> Path | None:
    """The first subdirectory of ``directory`` named one of ``names``, any case (``Good/`` too)."""
    by_name = {p.name.lower(): p for p in _subdirs(directory)}
    return next((by_name[name] for name in names if name in by_name), None)


def _masks_by_stem(directory: Path | None) -> dict[str, Path]:
    """Mask files of ``directory`` by stem; of two with one stem, the first sorted wins."""
    masks: dict[str, Path] = {}
    for path in _images(directory) if directory is not None else []:
        check_mask_format(path)  # refused when the dataset is listed, not halfway through an evaluation
        masks.setdefault(path.stem, path)
    return masks


def _find_mask(image: Path, masks: dict[str, Path]) -> Path | None:
    """The mask of ``image``: ``<stem>_mask.*`` (MVTec's naming) first, then ``<stem>.*``."""
    return masks.get(f"{image.stem}_mask") or masks.get(image.stem)


def _load_segdataset(root: Path) -> Splits:
    """train.txt is required; a missing val.txt means no validation split."""
    val_list = root / "val.txt"
    train = _read_list(root, root / "train.txt")
    return train, _read_list(root, val_list) if val_list.is_file() else []


def read_lines(list_file: Path) -> list[str]:
    """The lines of a list file (UTF-8, a BOM allowed), or one error line naming it."""
    try:
        return list_file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FlawscopeError(f"{list_file}: cannot read the list ({first_line(exc)})") from exc


def _read_list(root: Path, list_file: Path) -> list[Sample]:
    """Samples of a PaddleX list file; the label says whether the mask has any defect pixel."""
    samples = []
    for lineno, line in enumerate(read_lines(list_file), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise FlawscopeError(
                f"{list_file}:{lineno}: expected 'image_path [mask_path]', got {len(fields)} fields"
            )
        image, mask = [root / field for field in fields] + [None] * (2 - len(fields))
        for path in (image, mask):
            if path is not None and not path.is_file():
                hint = " (the list separates folders with backslashes: write /)" if "\\" in line else ""
                raise FlawscopeError(f"{list_file}:{lineno}: {path} does not exist{hint}")
        label = int(mask is not None and bool(read_mask(mask).any()))
        samples.append(Sample(image, mask, label, DEFECT if label else GOOD))
    return samples


def mvtec_train_dir(root: Path) -> Path:
    """An MVTec dataset's folder of training images: train/good/, any case (``train/Good/``, as
    test/Good/ is read)."""
    return _first(root / "train", (GOOD,)) or root / "train" / GOOD


def mvtec_ground_truth(root: Path) -> Path | None:
    """An MVTec dataset's folder of masks: ground_truth/, any case (``Ground_Truth/``)."""
    return _first(root, ("ground_truth",))


def _load_mvtec(root: Path) -> Splits:
    """Test images are the val split; test/good/ (normal/, ok/, any case, as the Folder layout
    reads them) has no masks; a defect type's masks are in its ground_truth/ folder, any case."""
    train = [Sample(p, None, 0, GOOD) for p in _images(mvtec_train_dir(root))]
    ground_truth = mvtec_ground_truth(root)
    val = []
    for directory in _subdirs(root / "test"):
        if directory.name.lower() in _NORMAL_DIRS:
            val += [Sample(p, None, 0, GOOD) for p in _images(directory)]
        else:
            masks = _masks_by_stem(_first(ground_truth, (directory.name.lower(),)) if ground_truth else None)
            val += [Sample(p, _find_mask(p, masks), 1, directory.name) for p in _images(directory)]
    return train, val


def _load_folder(root: Path) -> Splits:
    """Good images in good/ (or the folder itself); with abnormal images, every 5th sorted good
    image is held out for val (80/20). Masks in mask/, or in mask/<abnormal folder>/ apart."""
    normal_dir = _first(root, _NORMAL_DIRS)
    normals = [Sample(p, None, 0, GOOD) for p in _images(normal_dir or root)]
    mask_dir = _first(root, _MASK_DIRS)
    shared = _masks_by_stem(mask_dir)  # listed once, whichever folders use it
    abnormals = []
    for directory in (d for d in _subdirs(root) if d.name.lower() in _ABNORMAL_DIRS):
        own = _first(mask_dir, (directory.name.lower(),)) if mask_dir else None
        masks = _masks_by_stem(own) if own else shared
        abnormals += [Sample(p, _find_mask(p, masks), 1, DEFECT) for p in _images(directory)]
    owners: dict[Path, Path] = {}
    for sample in abnormals:  # bad/00.png and ng/00.png would take mask/00.png both, one of them wrongly
        if sample.mask is not None and owners.setdefault(sample.mask, sample.image) != sample.image:
            raise FlawscopeError(f"{sample.mask}: the mask of two images, {owners[sample.mask]} and {sample.image} "
                                 f"(one name in two defect folders): put each folder's masks in a folder of its "
                                 f"name in {mask_dir.name}/ ({mask_dir.name}/{sample.image.parent.name}/...), "
                                 "or give the images distinct names")
    if not abnormals:
        return normals, []
    train = [s for i, s in enumerate(normals) if (i + 1) % _VAL_EVERY]
    return train, normals[_VAL_EVERY - 1 :: _VAL_EVERY] + abnormals


def _is_segdataset(root: Path) -> bool:
    return (root / "train.txt").is_file()


def _is_mvtec(root: Path) -> bool:
    """train/good/, or test/ with ground_truth/: a labelled set without training images, such as
    a Train.calibration_dir of defects (training still needs train/good/), or test/good/ alone
    (today's good parts, to count the false alarms on) where the folder is no Folder layout."""
    return mvtec_train_dir(root).is_dir() or (root / "test").is_dir() and mvtec_ground_truth(root) is not None \
        or (root / "test" / GOOD).is_dir() and not _is_folder(root)


def _is_folder(root: Path) -> bool:
    return _first(root, _NORMAL_DIRS) is not None or bool(_images(root))


# name -> (recogniser, loader, what the layout needs), tried in this order by "auto"
_LAYOUTS: dict[str, tuple[Callable[[Path], bool], Callable[[Path], Splits], str]] = {
    "SegDataset": (_is_segdataset, _load_segdataset, "train.txt listing 'image_path [mask_path]'"),
    "MVTec": (_is_mvtec, _load_mvtec, "images in train/good/"),
    "Folder": (_is_folder, _load_folder, "images in good/ or normal/, or in the directory itself"),
}


def detect_layout(root: str | os.PathLike[str], layout: str = "auto") -> str:
    """The canonical name of the layout of ``root``, checked against what is on disk.

    ``layout`` is "auto" (recognise it, trying SegDataset, MVTec, then Folder) or one of
    "SegDataset", "MVTec", "Folder" (any case) to skip recognition.
    """
    root = Path(root)
    if not root.exists():
        raise FlawscopeError(f"{root}: dataset directory does not exist")
    if not root.is_dir():
        raise FlawscopeError(f"{root}: dataset path is not a directory")
    if layout.lower() == "auto":
        name = next((name for name, (is_it, _, _) in _LAYOUTS.items() if is_it(root)), None)
        if name is None:
            raise FlawscopeError(f"{root}: no known dataset layout found ({_expected(root)})")
    else:
        name = next((name for name in _LAYOUTS if name.lower() == layout.lower()), None)
        if name is None:
            raise FlawscopeError(
                f"unknown dataset layout {layout!r}: expected auto, {', '.join(_LAYOUTS)}"
            )
    is_it, _, needs = _LAYOUTS[name]
    if not is_it(root):
        raise FlawscopeError(f"{root}: does not match the {name} layout (expected {needs})")
    return name


def unique_images(samples: list[Sample]) -> tuple[list[Sample], list[tuple[Sample, Sample]]]:
    """(the samples whose image file is no byte-for-byte copy of an earlier one's, (copy,
    original) pairs). Reads every file: a copy trained on twice, or held out for calibration while
    its original is trained on, would make new good images look more anomalous than they are."""
    first: dict[str, Sample] = {}
    unique, copies = [], []
    for sample in samples:
        try:
            digest = file_sha256(sample.image)
        except OSError as exc:
            raise FlawscopeError(f"{sample.image}: cannot read file ({exc.strerror or exc})") from None
        if digest in first:
            copies.append((sample, first[digest]))
        else:
            first[digest] = sample
            unique.append(sample)
    return unique, copies


def load_dataset(
    root: str | os.PathLike[str], layout: str = "auto", *, require_train: bool = True
) -> Dataset:
    """List the samples of the dataset at ``root``; ``layout`` as for ``detect_layout``.

    ``require_train=False`` returns an empty training split instead of refusing it: check_dataset
    reports it together with every other problem; evaluation and calibration need no training images.
    """
    check_local(root, "a dataset directory")  # before Path() makes its "https://" "https:/"
    root = Path(root)
    name = detect_layout(root, layout)
    _, load, needs = _LAYOUTS[name]
    train, val = load(root)
    if require_train and not train:
        raise FlawscopeError(f"{root}: no training images found ({name} layout expects {needs})")
    return Dataset(root, name, train, val)


def mask_dirs(root: str | os.PathLike[str], layout: str) -> list[Path]:
    """Where the MVTec and Folder layouts look for masks (SegDataset lists name their own), so
    check_dataset can report the masks there that belong to no image."""
    root = Path(root)
    if layout == "MVTec":
        ground_truth = mvtec_ground_truth(root)  # ground_truth/good/: the empty masks of good images, not used
        return [d for d in _subdirs(ground_truth) if d.name.lower() not in _NORMAL_DIRS] if ground_truth else []
    mask_dir = _first(root, _MASK_DIRS) if layout == "Folder" else None
    return [mask_dir, *(d for d in _subdirs(mask_dir) if d.name.lower() in _ABNORMAL_DIRS)] if mask_dir else []


def _expected(root: Path) -> str:
    """What the layouts look for, with a hint when ``root`` holds several MVTec categories."""
    expected = (
        "expected train.txt and val.txt (SegDataset), train/good/ and test/ (MVTec), good/, normal/ or ok/ "
        "beside abnormal/, defect/, bad/ or ng/ and mask/ (Folder; these names, in any case), or image files "
        "in the directory"
    )
    categories = [d.name for d in _subdirs(root) if _is_mvtec(d)]
    if categories:
        expected += f"; it holds MVTec categories ({', '.join(categories)}): point at one of them"
    source = annotation_source(root)
    if source:
        expected += (f"; it looks like {source} annotations: convert them with -o CheckDataset.convert.enable=true "
                     f"-o CheckDataset.convert.src_dataset_type={source}")
    return expected


def annotation_source(root: Path) -> str | None:
    """"VOC" or "LabelMe" where ``root`` holds their annotations (VOC's two folders; LabelMe's JSON
    files, with their ``shapes``, named after their images, in it or in a folder below, beside
    them or in a folder of their own such as ``annotations/``), which the layouts do not read
    without a conversion. Other JSON files (a run's results) are no hint."""
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return "VOC"
    files = []
    for folder in (root, *_subdirs(root)):
        try:
            files += list(folder.iterdir())
        except OSError:  # an unreadable folder holds no hint
            continue
    images = {path.stem for path in files if is_image_file(path)}
    named = [path for path in files if path.suffix.lower() == ".json" and path.stem in images]
    return "LabelMe" if any(_has_shapes(path) for path in named[:3]) else None


def _has_shapes(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and "shapes" in data


def visible_files(root: Path, skip: Path | None = None, say: bool = True) -> list[Path]:
    """Files under ``root``, sorted, none in hidden folders or hidden, none under ``skip``, in
    an earlier flawscope run's output or a prediction's result (``_result_files``). Folder links
    are followed, as the layouts' readers follow them; each real folder is read once, so a link
    back up ends. ``say``: log the folders left out."""
    files: list[Path] = []
    root_real = Path(os.path.realpath(root))
    walked = {str(root_real)}  # the real path of each folder read
    root_output = next((m for m in _OUTPUT_MARKERS if (root / m).is_file()), None)
    for top, dirs, names in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(dirs):
            folder = Path(top, name)
            if name.startswith(".") or folder == skip:
                continue
            marker = next((m for m in _OUTPUT_MARKERS if (folder / m).is_file()), None)
            if marker or (root_output and top == str(root) and name in _OUTPUT_PICTURES):
                if say:
                    log.warning("%s: holds the output of an earlier flawscope run (%s), its files are not used",
                                folder, marker or root / root_output)
                continue
            real = os.path.realpath(folder)
            if real in walked or root_real.is_relative_to(real):  # a link back up would read the dataset's parents
                if say:
                    log.warning("%s: a link to %s, which holds the dataset or was read already: not read",
                                folder, real)
                continue
            walked.add(real)
            kept.append(name)
        dirs[:] = kept
        visible = {name for name in names if not name.startswith(".")}
        results = _result_files(visible)
        if results and say:
            log.warning("%s: holds %d file(s) of flawscope's prediction results (e.g. %s), not used", top,
                        len(results), min(results))
        files += [path for path in (Path(top, name) for name in visible - results) if path.is_file()]
    return sorted(files)


def _result_files(names: set[str]) -> set[str]:
    """The files of flawscope's prediction results among one folder's ``names``: each
    ``<x>_res.json`` and the pictures saved beside it (``AnomalyResult.save_all``), a heat map
    and a mask that no dataset should take for a part's photo."""
    found = set()
    for name in names:
        if name.endswith("_res.json"):
            x = name.removesuffix("_res.json")
            found |= {name, f"{x}_res.png", f"{x}_res.map.png", f"{x}_res.pred.png", f"{x}_map.png",
                      f"{x}_pred.png"} & names
    return found


def unread_images(dataset: Dataset, skip: Path | None = None) -> list[Path]:
    """Image files under an MVTec or Folder dataset's root that none of its splits or mask folders
    reads (in a subfolder of a defect type, in a folder the layout does not know, such as NG/),
    so that they are not left out without a word. ``skip``: a folder of the run's own output
    (absolute). A SegDataset's lists say what it holds: none."""
    if dataset.layout == "SegDataset":
        return []
    read = {os.path.abspath(s.image) for s in dataset.train + dataset.val}
    mask_roots = ([mvtec_ground_truth(dataset.root)] if dataset.layout == "MVTec"
                  else mask_dirs(dataset.root, "Folder"))
    masks = tuple(os.path.abspath(d) + os.sep for d in mask_roots if d is not None)
    root = Path(os.path.abspath(dataset.root))  # as absolute as skip is
    return [path for path in visible_files(root, skip, say=False) if is_image_file(path)
            and str(path) not in read and not str(path).startswith(masks)]


def warn_before_training(dataset: Dataset, output: Path) -> None:
    """Say in one line each what training will not see (images in no split: check_dataset lists
    them) or will take for what it is not (a Folder dataset named as a folder of defects)."""
    if dataset.layout == "Folder" and dataset.root.resolve().name.lower() in _ABNORMAL_DIRS:
        log.warning("%s: a folder named %s read as a dataset of good images: its images train as good parts (point "
                    "Global.dataset_dir at the folder holding it)", dataset.root, dataset.root.resolve().name)
    unread = unread_images(dataset, Path(os.path.abspath(output)))
    if unread:
        log.warning("%d image file(s) under %s are in no split and not read (e.g. %s); check_dataset lists them",
                    len(unread), dataset.root, unread[0])


def check_headers(samples: list[Sample]) -> None:
    """Open every image's and mask's header and compare their sizes: a file that is no image, or
    a mask of another size, then fails before training or evaluation writes anything, rather than
    midway. (Only a full decode finds a truncated file; that stays where it is read.)"""
    for sample in samples:
        image_size = header_size(sample.image)
        mask_size = header_size(sample.mask) if sample.mask is not None else None
        if mask_size is not None and image_size != mask_size:  # stored sizes: an EXIF rotation may explain it
            read_mask(sample.mask, header_size(sample.image, shown=True))


def header_size(path: Path, shown: bool = False) -> tuple[int, int]:
    """(width, height) from the file's header: as stored, or ``shown``, as ``read_image`` gives it
    (an EXIF rotation by 90 or 270 degrees swaps them; Pillow decodes a PNG to look for an EXIF
    chunk after its pixels)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = shown and image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    except Image.DecompressionBombError as exc:  # over twice Pillow's pixel limit: no OSError
        raise FlawscopeError(f"{path}: image is too large ({first_line(exc)})") from None
    except (OSError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise FlawscopeError(f"{path}: not a readable image ({first_line(exc)})") from None
    return (height, width) if turned else (width, height)
