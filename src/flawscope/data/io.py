"""Reading images and defect masks from disk, whatever the file's mode (and files' digests).

Everything downstream (transforms, models, metrics) assumes HxWx3 uint8 RGB images and HxW
bool masks, so every conversion from what real inspection cameras and annotation tools write
(grayscale, 16-bit, palette, alpha, float TIFF, EXIF-rotated JPEG) happens here, once.
Every problem with a file becomes one ``FlawscopeError("<path>: <problem>")``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import re
import threading
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flawscope.errors import FlawscopeError

T = TypeVar("T")
R = TypeVar("R")

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".tif", ".tiff",
                                              ".webp", ".gif", ".pbm", ".pgm", ".ppm", ".pnm"})
"""Lower-case file suffixes (with the dot) treated as images; compare ``Path.suffix.lower()``. What a
folder lists is what a path reads (a GIF: its first frame). The netpbm ones are industrial cameras'
(16-bit too), ``.jfif`` and ``.jpe`` JPEGs as Windows names them."""

UNREADABLE_MASK_EXTENSIONS: frozenset[str] = frozenset({".gif", ".webp"})
"""Images that cannot be masks: a GIF is a palette image whose indices follow the order colours
appear in (index 0 may be white: ``read_mask`` takes the index as the label), and WebP is
usually lossy (its noise would count as defect)."""

PADDLE_SUFFIXES = (".pdparams", ".pdiparams", ".pdmodel", ".pdopt", ".pdstates")  # PaddlePaddle's weights and graphs
MAX_PIXELS: int = 100_000_000
"""Largest image (width x height) we agree to decode; the check reads only the header.

Pillow also refuses, on its own, images over ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (about 179 MP),
so raising this above that needs Pillow's limit raised as well.
"""

_TIFF_BITS_PER_SAMPLE = 258
_TIFF_SAMPLE_FORMAT = 339  # 1 unsigned, 2 signed integer, 3 float


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has an image extension (case-insensitive); the file is not opened."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_listed_file(path: Path) -> bool:
    """A file, or a symbolic link to one that is gone: a folder's listing keeps the broken link,
    so that reading it names the link rather than the image silently going missing."""
    return path.is_file() or path.is_symlink() and not path.exists()


def _broken_link(path: Path) -> str:
    """What is wrong with a link that leads to no file. Through a chain of links, the missing
    target is the last link's, so that is the one named, not the next link of the chain."""
    try:
        os.path.realpath(path, strict=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link that loops back on itself"
    return f"a broken symbolic link (to {os.path.realpath(path)}, which does not exist)"


def _decode(path: Path, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Open, fully decode and EXIF-orient ``path``, then ``convert`` it while the file is open.

    Every failure becomes a FlawscopeError naming ``path``. ``load()`` forces the whole file
    to be decoded now, so a truncated or corrupt file fails here rather than later inside a
    batch; truncated files are refused because ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is
    left at its default, False. ``convert`` gets the opened image itself (not a copy), so
    format details such as a TIFF's bits per sample are still there.
    """
    if not path.exists():
        if path.is_symlink():
            raise FlawscopeError(f"{path}: {_broken_link(path)}")
        raise FlawscopeError(f"{path}: file does not exist")
    if path.is_dir():
        raise FlawscopeError(f"{path}: is a directory, not an image file")
    if path.stat().st_size == 0:
        raise FlawscopeError(f"{path}: file is empty (0 bytes)")
    try:
        # Our own MAX_PIXELS check below decides. Pillow warns above its lower limit (89 MP) and
        # raises above twice that; its warning is not silenced here, as ``warnings.catch_warnings``
        # is not thread-safe and images are read in a background thread (the CLI silences it).
        img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise FlawscopeError(f"{path}: image is too large ({_one_line(exc)})") from exc
    except UnidentifiedImageError as exc:
        raise FlawscopeError(f"{path}: not an image, or a corrupt or unsupported image file") from exc
    except OSError as exc:  # Pillow's own (no errno): a header cut short, e.g. "Truncated File Read"
        what = "cannot read file" if exc.errno is not None else "corrupt or truncated image"
        raise FlawscopeError(f"{path}: {what} ({_one_line(exc)})") from exc
    with img:
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise FlawscopeError(
                f"{path}: image is too large ({width}x{height} = {width * height} pixels, "
                f"limit {MAX_PIXELS})"
            )
        try:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
        except (OSError, SyntaxError, EOFError, ValueError) as exc:
            raise FlawscopeError(f"{path}: corrupt or truncated image ({_one_line(exc)})") from exc
        try:
            return convert(img)
        except ValueError as exc:  # pixel values no scale reads (``_to_uint8``), a mode Pillow cannot convert
            raise FlawscopeError(f"{path}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    """An exception's message on a single line, as the CLI's one-line error contract needs."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _to_uint8(img: Image.Image) -> np.ndarray:
    """Pixel values of a single-band high-bit-depth image scaled to 0..255 by its bit depth.

    Scaling by the format's range (e.g. 65535 -> 255, i.e. divide by 257), not by the image's
    own min/max, keeps brightness comparable between images, which anomaly scores rely on.
    Float images are taken to be in [0, 1] when their maximum is at most 1, else in [0, 255];
    values above 255 are refused (ValueError): no scale is known for them, and clipped they were white.
    So are 32-bit integer images of 16-bit values (TIFFs from camera software), black on their scale.
    """
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        values = np.nan_to_num(values)
        peak = values.max(initial=0.0)
        if peak > 255:
            raise ValueError(f"float pixel values up to {peak:g}: float images are read in [0, 1] or [0, 255]; "
                             "scale it to one of them, or save it as 16-bit")
        full_scale = 1.0 if peak <= 1.0 else 255.0
    else:
        # "I;16*" are unsigned 16-bit; "I" is int32 storage whose real depth (and
        # signedness) only TIFF records; elsewhere it holds 16-bit data (e.g. 16-bit PGM).
        tags = getattr(img, "tag_v2", {}) if img.mode == "I" else {}
        bits = int(np.max(tags.get(_TIFF_BITS_PER_SAMPLE, 16)))
        signed = int(np.max(tags.get(_TIFF_SAMPLE_FORMAT, 1)) == 2)
        full_scale = float(2 ** (bits - signed) - 1)
        peak = values.max(initial=0.0)
        if bits > 16 and 0 < peak <= 65535:  # a camera's 16-bit values in a 32-bit file: black on its scale
            raise ValueError(f"{bits}-bit integer pixel values up to {peak:.0f}: on a {bits}-bit scale the image "
                             "reads black; save it as 16-bit")
    return np.rint(np.clip(values, 0.0, full_scale) * (255.0 / full_scale)).astype(np.uint8)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks (``hashlib.file_digest`` needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_url(text: str) -> bool:
    """Whether an input names an http(s) URL (schemes are case-insensitive, RFC 3986)."""
    return text.lower().startswith(("http://", "https://"))


def check_local(path: str | os.PathLike[str], what: str) -> None:
    """Refuse a URL where ``what`` ("a model directory") is read from disk (PaddleX's configs give
    weights and datasets so), before ``Path`` makes its "https://" "https:/", which reads as missing."""
    text = os.fspath(path)
    if re.match(r"https?:/", text, re.IGNORECASE):  # "https:/": a Path made of a URL already
        if urllib.parse.urlsplit(text).path.lower().endswith(PADDLE_SUFFIXES):
            raise FlawscopeError(f"{text}: a URL of Paddle weights, which flawscope cannot read: {what} is a local "
                                 "one that flawscope wrote")
        raise FlawscopeError(f"{text}: a URL; {what} is a local one: download it first")


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read any supported image as an HxWx3 uint8 RGB array, EXIF orientation applied.

    Alpha (RGBA, LA, PA, palette transparency) is dropped, keeping the colour channels as
    stored: inspection images are opaque, and compositing would change the colour of pixels
    that tools leave under zero alpha. Grayscale is repeated over the three channels.
    """
    return _decode(Path(path), image_to_rgb)


def image_to_rgb(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB of an opened image of any mode, as ``read_image`` gives it (a copy)."""
    if img.mode.startswith("I") or img.mode == "F":
        return np.repeat(_to_uint8(img)[:, :, None], 3, axis=2)
    # A writable copy, unlike np.asarray; convert() would copy an RGB image once more (1 ms at 512x512).
    return np.array(img if img.mode == "RGB" else img.convert("RGB"))


def check_mask_format(path: Path) -> None:
    """Refuse a mask file of ``UNREADABLE_MASK_EXTENSIONS``."""
    if path.suffix.lower() in UNREADABLE_MASK_EXTENSIONS:
        raise FlawscopeError(f"{path}: a {path.suffix[1:].upper()} file cannot be a mask (a GIF's palette order or "
                             "WebP's compression would change which pixels are defect): save it as PNG")


def read_mask(path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a defect mask as an HxW bool array: any nonzero pixel is defect.

    Masks come as 0/255 or 0/1 grayscale, 1-bit, palette (the palette index is the label, as
    in PaddleSeg) or colour images; a colour pixel is defect when any colour channel is
    nonzero, because ``convert("L")`` would round a dark label colour such as (1, 0, 0) to 0.
    ``size`` is the (width, height) of the image the mask belongs to; a mask of another size
    cannot be aligned with it, so that is an error rather than a silent resize.
    """
    return read_mask_values(path, size)[0]


def read_mask_values(path: str | os.PathLike[str],
                     size: tuple[int, int] | None = None) -> tuple[np.ndarray, str | None]:
    """``read_mask``, and what is wrong with the mask's values, or None when it holds 0 and one
    defect value (``DEFECT_VALUES``): any other value, such as a JPEG mask's compression noise
    around its edges, still counts as defect, which the caller may warn of."""
    path = Path(path)
    check_mask_format(path)

    def convert(img: Image.Image) -> tuple[np.ndarray, str | None]:
        if size is not None and tuple(img.size) != tuple(size):
            raise FlawscopeError(
                f"{path}: mask is {img.width}x{img.height} but its image is {size[0]}x{size[1]}"
            )
        if len(img.getbands()) == 1:  # 1, L, P, I;16, I, F: the band holds the label itself
            labels = np.asarray(img)
            return labels != 0, _value_problem(labels)
        labels = np.asarray(img.convert("RGB"))  # an alpha band is not a label
        return labels.any(axis=2), _value_problem(labels)

    return _decode(path, convert)


DEFECT_VALUES = (255, 1, 65535)  # a mask's one defect value beside 0 = normal (65535: 16-bit), never mixed


def _value_problem(labels: np.ndarray) -> str | None:
    """What ``read_mask_values`` says of a mask's label values (a pass over the defect pixels
    when they hold one value; sorting them all only to name the others)."""
    defect = labels[labels != 0]
    if not defect.size or (defect.flat[0] in DEFECT_VALUES and bool((defect == defect.flat[0]).all())):
        return None
    values = np.unique(labels)
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
    return f"mask has values {shown}; expected 0 = normal and 255 (or 1, or 65535 in a 16-bit mask) = defect"


def read_ahead(load: Callable[[T], R], items: Iterable[T], depth: int) -> Iterator[tuple[T, Future[R]]]:
    """(item, future of ``load(item)``) for each item, in order, loading up to ``depth`` items
    ahead in one background thread: decoding a file (6 ms for a 512x512 PNG) then overlaps the
    model, which releases the GIL. ``future.result()`` re-raises what ``load`` raised; an error
    while iterating ``items`` is raised after the items loaded before it. ``depth`` 0 loads each
    item in the caller's thread as it is handed out.

    When the caller stops early, loads not started are cancelled and the one running is not
    waited for: the generator may be finalised by the garbage collector in any thread, the
    reader's own included, where waiting for it would deadlock. Nor does the process wait for it
    at exit (a daemon thread, not a ThreadPoolExecutor's): Ctrl-C must not hang on a slow download.
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, not {depth}")
    if depth == 0:
        for item in items:
            yield item, _load_now(load, item)
        return
    jobs: queue.SimpleQueue[tuple[T, Future[R]] | None] = queue.SimpleQueue()
    threading.Thread(target=_load_jobs, args=(load, jobs), name="flawscope-read", daemon=True).start()
    ahead: deque[tuple[T, Future[R]]] = deque()
    iterator = iter(items)
    try:
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                break
            except Exception:  # the listing failed: what was loaded before it comes first
                while ahead:
                    yield ahead.popleft()
                raise
            ahead.append((item, Future()))
            jobs.put(ahead[-1])
            if len(ahead) > depth:
                yield ahead.popleft()
        while ahead:
            yield ahead.popleft()
    finally:
        for _, future in ahead:  # never handed out: a caller who stopped early will not ask for them
            future.cancel()
        jobs.put(None)  # the reader ends after the load it is in, if any


def _load_jobs(load: Callable[[T], R], jobs: queue.SimpleQueue[tuple[T, Future[R]] | None]) -> None:
    """The reader thread: loads each job not cancelled, until the None that ends them."""
    while (job := jobs.get()) is not None:
        item, future = job
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(load(item))
            except BaseException as exc:  # whatever it is, the caller waiting for it gets it
                future.set_exception(exc)


def _load_now(load: Callable[[T], R], item: T) -> Future[R]:
    future: Future[R] = Future()
    try:
        future.set_result(load(item))
    except Exception as exc:  # handed over like a background load's, at its own item
        future.set_exception(exc)
    return future
