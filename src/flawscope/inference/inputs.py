"""Turn whatever a user passes to ``predict`` into (name, image or error) items, lazily.

Accepted: a file path, a directory (sorted; ``recursive`` to descend), a glob pattern, an http(s)
URL, a numpy array (HxW, HxWx1, HxWx3 RGB or HxWx4 RGBA; uint8 or uint16), a PIL image, or a list mixing them.
A bad item becomes an error string carried to its result; it never stops the other items.
Hidden files and folders (".git", macOS "._x.jpg") are left out of a directory, as a glob leaves them.
"""

from __future__ import annotations

import base64
import fnmatch
import glob
import http.client
import os
import re
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from flawscope.data.io import MAX_PIXELS, image_to_rgb, is_image_file, is_listed_file, is_url, read_image
from flawscope.errors import FlawscopeError, first_line

URL_TIMEOUT_S = 20
URL_MAX_BYTES = 50 << 20
_CHUNK = 1 << 16

RECURSIVE_HINT = "predict with recursive=True, --recursive"
"""Told for a directory holding only sub-directories; ``engine`` tells the module CLI its own way."""


def shown_url(url: str) -> str:
    """``url`` as it may be printed and saved: an IP camera's password masked (in a malformed
    URL, whatever stands before an ``@``)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # "http://[::1/x.jpg": Invalid IPv6 URL
        return re.sub(r"(://)[^/@]*@", r"\1***@", url, count=1)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}").geturl()


def _request(url: str) -> urllib.request.Request:
    """The request for ``url`` as a browser's address bar sends it: its path and query
    percent-encoded (a space, non-ASCII), and credentials in it sent as basic authentication
    (urllib would take them for the host name)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    encoded = parts._replace(netloc=host, path=urllib.parse.quote(parts.path, safe="/%:@!$&'()*+,;=~"),
                             query=urllib.parse.quote(parts.query, safe="=&%/:?@!$'()*+,;~")).geturl()
    request = urllib.request.Request(encoded)
    if parts.username is not None:
        user = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(user.encode()).decode())
    return request


def _fetch(url: str) -> bytes:
    """The body, within URL_TIMEOUT_S in all: urlopen's timeout bounds each socket read only, and
    ``read(n)`` waits for all n bytes, so a server trickling bytes would stall the prediction for
    hours. ``read1`` returns what has come, and each wait is cut to the time left. (The status
    line and headers, read inside urlopen, are bounded per read only: a server trickling those
    holds the item longer.) A body shorter than its Content-Length is refused as incomplete."""
    deadline = time.monotonic() + URL_TIMEOUT_S
    late = FlawscopeError(f"{shown_url(url)}: download failed (not complete after {URL_TIMEOUT_S} s)")
    chunks: list[bytes] = []
    size = 0
    with urllib.request.urlopen(_request(url), timeout=URL_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
        expected = response.headers.get("Content-Length", "")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if expected.isdigit() and int(expected) > URL_MAX_BYTES:  # said before a byte is read
            raise FlawscopeError(f"{shown_url(url)}: larger than {URL_MAX_BYTES >> 20} MB")
        sock = getattr(getattr(response.fp, "raw", None), "_sock", None)  # where http.client keeps it
        while not response.isclosed():  # closed once the body's Content-Length is read (and its socket with it)
            left = deadline - time.monotonic()
            if left <= 0:
                raise late
            if sock is not None:
                sock.settimeout(left)
            try:
                chunk = response.read1(_CHUNK)
            except TimeoutError:
                raise late from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > URL_MAX_BYTES:
                raise FlawscopeError(f"{shown_url(url)}: larger than {URL_MAX_BYTES >> 20} MB")
    if expected.isdigit() and size < int(expected):  # the connection closed early: the download's fault, not the image's
        raise FlawscopeError(f"{shown_url(url)}: download incomplete (got {size} of {expected} bytes)")
    return _decoded(b"".join(chunks), encoding, url)


def _decoded(body: bytes, encoding: str, url: str) -> bytes:
    """The body without its HTTP content encoding (a bucket serving gzip-stored objects)."""
    if encoding in ("identity", ""):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise FlawscopeError(f"{shown_url(url)}: download failed (content encoding {encoding!r} is not supported)")
    try:  # wbits 32 + 15: a gzip or a zlib header; deflate: zlib's format, or raw deflate from some servers
        return zlib.decompress(body, 47) if encoding != "deflate" else _inflate(body)
    except zlib.error as exc:
        raise FlawscopeError(f"{shown_url(url)}: download failed ({encoding} body does not decode: {exc})") from None


def _inflate(body: bytes) -> bytes:
    try:
        return zlib.decompress(body)
    except zlib.error:
        return zlib.decompress(body, -15)


def _check_size(height: int, width: int, name: str) -> None:
    """The same limit as for files: a 30000x30000 frame would take tens of GB to score."""
    if height * width > MAX_PIXELS:
        raise FlawscopeError(f"{name}: image is too large ({width}x{height} = {width * height} pixels, "
                             f"limit {MAX_PIXELS})")


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """A copy in HxWx3 RGB: the caller may refill its buffer for the next frame. A camera's mono
    frame may come as HxWx1; a 16-bit one is scaled by its range (65535 -> 255), as a 16-bit file is."""
    if array.ndim not in (2, 3) or array.ndim == 3 and array.shape[2] not in (1, 3, 4) or not array.size:
        raise FlawscopeError(f"{name}: array must be HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA, alpha ignored), "
                             f"not empty, got shape {array.shape}")
    if array.dtype not in (np.uint8, np.uint16):
        raise FlawscopeError(f"{name}: array must be uint8 or uint16, got {array.dtype}")
    _check_size(array.shape[0], array.shape[1], name)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype == np.uint16:
        array = np.rint(array * (255.0 / 65535.0)).astype(np.uint8)
    return np.repeat(np.asarray(array)[:, :, None], 3, axis=2) if array.ndim == 2 else np.array(array[:, :, :3])


# A PIL image opened but not loaded decodes its file on first use, unguarded: two threads predicting
# on the same image object decoded it at once (a blank image's score without an error, or crashes).
_PIL_LOCK = threading.Lock()


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    """As a file of that mode is read: 16-bit and float images scaled by their range, not clipped."""
    if not image.width or not image.height:
        raise FlawscopeError(f"{name}: the image is empty ({image.width}x{image.height})")
    if image.mode == "I" and image.format is None:  # a file says its depth; convert("I") keeps 8-bit values
        raise FlawscopeError(f"{name}: a 32-bit integer (mode I) image made in memory does not say its bit depth "
                             "(read as 16-bit, 8-bit values come out nearly black): convert it to L or RGB for 8-bit "
                             "values, I;16 for 16-bit ones")
    _check_size(image.height, image.width, name)
    try:
        with _PIL_LOCK:
            if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # upright, as the same file read by path
                image = ImageOps.exif_transpose(image)  # a copy: the caller's image stays as it is
            return image_to_rgb(image)
    except (ValueError, OSError) as exc:
        if str(exc) == "Operation on closed image":
            raise FlawscopeError(f"{name}: the image was closed (PIL's Image.close()) before predicting") from None
        if isinstance(exc, OSError):  # its pixels are read now: a file opened with Image.open and cut short
            raise FlawscopeError(f"{name}: corrupt or truncated image ({first_line(exc)})") from None
        raise FlawscopeError(f"{name}: cannot convert a {image.mode} image to RGB ({first_line(exc)})") from None


def _unlisted(exc: OSError) -> tuple[str, FlawscopeError]:
    """The error item of a directory that could not be listed, named in its place."""
    name = os.path.normpath(exc.filename)
    return name, FlawscopeError(f"{name}: cannot list this directory ({exc.strerror or exc})")


def _list_directory(path: Path, recursive: bool) -> tuple[list[tuple[str, Any]], bool]:
    """(the images, sorted, with an error in the place of each directory that could not be
    listed, which Path.glob would skip silently; whether ``path`` has sub-directories)."""
    found: list[tuple[str, Any]] = []
    nested = False
    seen = {os.path.realpath(path)}
    # Linked sub-folders are followed, as a ** glob follows them; each folder once (a link back up loops).
    for root, dirs, files in os.walk(path, onerror=lambda exc: found.append(_unlisted(exc)), followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".") and _first_visit(os.path.join(root, d), seen)]
        nested = nested or bool(dirs)
        found += [(str(f), str(f)) for f in (Path(root, name) for name in files if not name.startswith("."))
                  if is_image_file(f) and is_listed_file(f)]
        if not recursive:
            break
    return sorted(found, key=lambda item: Path(item[0])), nested


def _first_visit(folder: str, seen: set[str]) -> bool:
    real = os.path.realpath(folder)
    if real in seen:
        return False
    seen.add(real)
    return True


def glob_start(pattern: str) -> tuple[tuple[str, ...], int, Path]:
    """A glob's path parts, the index of the first with a wildcard, and the folder before it,
    where the search starts."""
    parts = Path(pattern).parts
    start = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return parts, start, Path(*parts[:start]) if start else Path(os.curdir)


def _glob(pattern: str) -> list[tuple[str, Any]]:
    """The images matching ``pattern``, sorted; for a recursive one (a ``**`` part) also an error
    in the place of each directory it would search but could not list, which glob skips silently."""
    found: list[tuple[str, Any]] = [(f, f) for f in glob.glob(pattern, recursive=True) if is_image_file(f)]
    parts, start, top = glob_start(pattern)
    if "**" in parts:
        recursive_from = parts.index("**")
        # a folder that is not there: "no images match", as a pattern without ** says
        for root, dirs, _ in os.walk(top, onerror=lambda exc: found.append(_unlisted(exc))) if top.is_dir() else ():
            depth = start + len(Path(root).relative_to(top).parts)  # the pattern part of root's sub-directories
            part = parts[depth] if depth < recursive_from else "*"
            dirs[:] = [d for d in dirs if fnmatch.fnmatchcase(d, part) and (part[0] == "." or d[0] != ".")]
    return sorted(found, key=lambda item: item[0])


class Positioned(NamedTuple):
    """An array or PIL image from a list of inputs, with its place there (``inputs[3]``), which
    its errors name: it has no name of its own."""

    source: np.ndarray | Image.Image
    where: str


def expand_inputs(inputs: Any, recursive: bool = False, where: str = "inputs") -> Iterator[tuple[str | None, Any]]:
    """Yield (name, source) pairs; a source is a path, URL, array or PIL image (``Positioned``
    within a list), or an error. ``where``: the place of ``inputs`` in the caller's inputs."""
    if isinstance(inputs, (str, os.PathLike)):
        text = str(inputs)
        path = Path(text)
        if not text.strip():
            yield text, FlawscopeError("an empty path: give an image file, directory, glob or URL")
            return
        if is_url(text):
            shown = shown_url(text)
            try:
                urllib.parse.urlsplit(text)
            except ValueError as exc:  # one input, not the whole prediction: the others go on
                yield shown, FlawscopeError(f"{shown}: not a valid URL ({exc})")
            else:
                yield shown, text
            return
        try:
            is_file, is_dir = path.is_file(), path.is_dir()
        except OSError as exc:  # e.g. a name too long for the file system
            yield text, FlawscopeError(f"{text}: cannot be opened ({exc.strerror or exc})")
            return
        if is_file:
            yield text, text
        elif is_dir:
            files, nested = _list_directory(path, recursive)
            if not files:
                hint = f" (it has sub-directories: {RECURSIVE_HINT})" if nested and not recursive else ""
                yield text, FlawscopeError(f"{text}: no images in this directory{hint}")
            yield from files
        elif glob.has_magic(text):
            files = _glob(text)
            if not files:
                yield text, FlawscopeError(f"{text}: no images match this pattern")
            yield from files
        elif path.exists():
            yield text, FlawscopeError(f"{text}: not a regular file (a pipe or a device): save the image to a file")
        else:
            yield text, FlawscopeError(f"{text}: no such file or directory")
    elif isinstance(inputs, (np.ndarray, Image.Image)):
        yield None, inputs if where == "inputs" else Positioned(inputs, where)
    elif isinstance(inputs, torch.Tensor):  # iterable, but over its first axis, down to 0-d tensors
        yield None, _unnamed_error(where, "cannot predict on a torch.Tensor: give an HxWx3 uint8 RGB numpy array "
                                          "(tensor.cpu().numpy(); a 3xHxW float one in [0, 1]: "
                                          "tensor.permute(1, 2, 0).mul(255).round().byte().cpu().numpy())")
    elif isinstance(inputs, (bytes, bytearray, memoryview, dict)):  # iterable, but not of images
        yield None, _unnamed_error(where, f"cannot predict on an object of type {type(inputs).__name__}: give a "
                                          "path, URL, numpy array or PIL image (a path as bytes: os.fsdecode(path); "
                                          "an encoded image: PIL.Image.open(io.BytesIO(data)))")
    elif isinstance(inputs, Iterable):
        for index, item in enumerate(inputs):
            yield from expand_inputs(item, recursive, f"{where}[{index}]")
    else:
        yield None, _unnamed_error(where, f"cannot predict on an object of type {type(inputs).__name__}")


def _unnamed_error(where: str, message: str) -> FlawscopeError:
    """An input that is no image, named by its place in a list of inputs (``inputs[3]: ...``)."""
    return FlawscopeError(message if where == "inputs" else f"{where}: {message}")


def load_input(name: str | None, source: Any) -> np.ndarray:
    """Decode one source to HxWx3 uint8 RGB; raises FlawscopeError naming the item."""
    if isinstance(source, Exception):
        raise source
    source, where = source if isinstance(source, Positioned) else (source, None)
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, name or (f"{where} (PIL image)" if where else "PIL image"))
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name or (f"{where} (array)" if where else "array"))
    if is_url(source):
        shown = shown_url(source)
        try:
            data = _fetch(source)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # ValueError: a malformed URL
            raise FlawscopeError(f"{shown}: download failed ({first_line(exc)})") from None
        with tempfile.TemporaryDirectory() as tmp:
            # A fixed name: the URL's last segment may be "..", or longer than a file name may be.
            path = Path(tmp) / "download"
            path.write_bytes(data)
            try:
                return read_image(path)
            except FlawscopeError as exc:
                raise FlawscopeError(str(exc).replace(str(path), shown)) from None
    return read_image(source)
