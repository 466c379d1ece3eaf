"""Re-splitting a dataset into train.txt / val.txt, as PaddleX's ``CheckDataset.split`` does.

Anomaly detection learns from normal images only, so the percentages share out the good
images; every defect image goes to val whatever the percentages say. The lists also serve
``convert``, so list writing (with the ``*.bak`` backups) lives here once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flawscope.atomic import deferred_signals, staging_path
from flawscope.data.io import read_mask
from flawscope.data.layouts import Sample, load_dataset
from flawscope.errors import FlawscopeError

log = logging.getLogger("flawscope")


def sample_lines(root: Path, samples: Iterable[Sample]) -> list[str]:
    """SegDataset list lines ``image [mask]``, paths relative to ``root`` with ``/``.

    A defect image without a mask cannot be written: in a SegDataset the mask is what marks an
    image defective, so it would silently become a good one (and could land in train). Nor can a
    path with whitespace (it would split the line) or a name that is not UTF-8 (the lists are).
    """
    lines, unmasked = [], []
    for sample in samples:
        if sample.label and sample.mask is None:
            unmasked.append(sample.image)
            continue
        paths = [sample.image] + ([sample.mask] if sample.mask is not None else [])
        fields = [Path(os.path.relpath(path, root)).as_posix() for path in paths]
        for field in fields:
            if any(c.isspace() for c in field):
                raise FlawscopeError(
                    f"{root / field}: path contains whitespace, which SegDataset list lines"
                    " ('image_path mask_path') cannot hold; rename it"
                )
            try:
                field.encode("utf-8")
            except UnicodeEncodeError:
                raise FlawscopeError(f"{root / field}: file name is not UTF-8, which SegDataset list "
                                     "files are; rename it") from None
        lines.append(" ".join(fields))
    _refuse_defects(unmasked, "have no mask", "a SegDataset needs a mask to mark an image defective")
    return lines


def check_defect_masks(samples: Iterable[Sample]) -> None:
    """Refuse defect images (by their folder) whose masks mark no pixel: in a SegDataset the mask
    is what marks an image defective, so the lists would turn them into good images."""
    empty = [s.image for s in samples if s.label and s.mask is not None and not read_mask(s.mask).any()]
    _refuse_defects(empty, "have a mask that marks no pixel", "in SegDataset lists an empty mask marks a good "
                    "image: draw their defects into the masks, or move the images out of the defect folders")


def _refuse_defects(images: list[Path], problem: str, why: str) -> None:
    """One error line for the defect ``images`` the lists cannot hold, the first three named."""
    if images:
        shown = ", ".join(str(path) for path in images[:3]) + (", ..." if len(images) > 3 else "")
        raise FlawscopeError(f"{images[0]}: {len(images)} defect image(s) {problem} ({shown}); {why}")


def write_lists(root: Path, lists: dict[str, list[str]], commit_first: Callable[[], None] | None = None) -> list[Path]:
    """Write ``<split>.txt`` for each split (lines from ``sample_lines``), keeping an existing one
    as the first free name of ``*.bak``, ``*.bak2``, ...: a second split or conversion must not
    overwrite the user's own lists, backed up by the first. Returns the backups made.

    The lists change together or not at all: the new ones are written whole beside the old ones
    first (a full disk fails there, with nothing changed), then, with Ctrl-C and SIGTERM held off,
    ``commit_first`` runs (a conversion's masks, which the new lists name), the old lists are kept
    (hard links: each stays in place until its replacement lands) and the new ones replace them.
    """
    staged: dict[Path, Path] = {}
    try:
        for split, lines in lists.items():
            path = root / f"{split}.txt"
            staged[path] = staging_path(path)
            try:
                staged[path].write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
            except OSError as exc:  # a full disk's error names no file
                raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        backups = []
        with deferred_signals():
            if commit_first is not None:
                commit_first()
            for path in staged:
                if path.exists():
                    backup = next(candidate for n in itertools.count(1)
                                  if not (candidate := path.with_name(f"{path.name}.bak{n if n > 1 else ''}")).exists())
                    _keep(path, backup)
                    log.info("%s: the list there before kept as %s", path, backup.name)
                    backups.append(backup)
            for path, new in staged.items():
                os.replace(new, path)
        return backups
    finally:
        for new in staged.values():
            with contextlib.suppress(OSError):  # a read-only folder refuses even this: its own error stays
                new.unlink(missing_ok=True)


def _keep(path: Path, backup: Path) -> None:
    """``backup`` holds ``path``'s contents, ``path`` staying in place: a hard link, or a copy
    where the file system has none."""
    try:
        os.link(path, backup)
    except OSError:
        try:
            shutil.copy2(path, backup)
        except BaseException:  # a full disk: no half backup left to take the name
            backup.unlink(missing_ok=True)
            raise


def _one_per_image(samples: list[Sample]) -> list[Sample]:
    """Each image once: an image listed twice (in train and val, or with two masks) is a defect
    image if any of its entries says so, and an entry with a mask wins over one without, so that
    no defect image is drawn into train. Two defect masks are refused: keeping one loses the other."""
    kept: dict[str, Sample] = {}
    for sample in samples:
        image = os.path.abspath(sample.image)  # img/a.png, /data/img/a.png and img/../img/a.png alike
        first = kept.get(image)
        if (first is not None and first.label and sample.label and first.mask is not None
                and sample.mask is not None and os.path.abspath(first.mask) != os.path.abspath(sample.mask)):
            raise FlawscopeError(f"{sample.image}: listed with two defect masks, {first.mask} and {sample.mask}; "
                                 "a split lists each image once: merge them into one mask")
        if first is None or (sample.label, sample.mask is not None) > (first.label, first.mask is not None):
            kept[image] = sample
    return list(kept.values())


def split_dataset(
    root: str | os.PathLike[str], train_percent: int, val_percent: int, seed: int = 42,
    layout: str = "auto",
) -> dict[str, Any]:
    """Re-split the dataset at ``root`` (any layout; ``layout`` as for ``load_dataset``) into
    train.txt / val.txt (``split_samples``). Returns what was done, for the check report."""
    root = Path(root)
    check_percentages(train_percent, val_percent)
    dataset = load_dataset(root, layout)
    if dataset.layout != "SegDataset":  # whose labels come from the masks already
        check_defect_masks(dataset.val + dataset.train)
    train, val, report = split_samples(root, dataset.train + dataset.val, train_percent, val_percent, seed)
    backups = write_lists(
        root, {"train": sorted(sample_lines(root, train)), "val": sorted(sample_lines(root, val))}
    )
    return report | {"backups": [str(path) for path in backups]}


def check_percentages(train_percent: int, val_percent: int) -> None:
    if train_percent <= 0 or val_percent <= 0 or train_percent + val_percent != 100:
        raise FlawscopeError(
            f"split: train_percent and val_percent must both be above 0 and add up to 100,"
            f" got {train_percent} and {val_percent}"
        )


def split_samples(root: Path, samples: list[Sample], train_percent: int, val_percent: int,
                  seed: int) -> tuple[list[Sample], list[Sample], dict[str, Any]]:
    """(train, val, report): ``train_percent`` of the good images (rounded), drawn with
    ``random.Random(seed)`` from the sorted list so a seed always gives the same split, go to
    train; the other good images and all defect images go to val."""
    samples = sorted(_one_per_image(samples), key=lambda s: s.image)
    good = [s for s in samples if not s.label]
    defects = [s for s in samples if s.label]
    random.Random(seed).shuffle(good)
    n_train = round(len(good) * train_percent / 100)
    if n_train == 0:
        raise FlawscopeError(f"{root}: split: {train_percent}% of its {len(good)} good images is none; "
                             "training needs at least one (raise train_percent)")
    if n_train == len(good):
        raise FlawscopeError(f"{root}: split: {val_percent}% of its {len(good)} good images is none; "
                             "validation needs at least one (raise val_percent)")
    train, val = good[:n_train], good[n_train:] + defects
    log.info(
        "Split %s: %d of %d good images to train (%d%%, seed %d); val gets the other %d and all"
        " %d defect images (anomaly detection trains on good images only)",
        root, n_train, len(good), train_percent, seed, len(good) - n_train, len(defects),
    )
    return train, val, {
        "train_percent": train_percent,
        "val_percent": val_percent,
        "seed": seed,
        "train_samples": len(train),
        "val_samples": len(val),
        "good_images": len(good),
        "defect_images_kept_in_val": len(defects),
        "note": "percentages apply to the good images; defect images never go to train",
    }
