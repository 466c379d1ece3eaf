"""The one result type that flows from prediction to JSON, images and the metrics.

Conventions (relied on by every consumer, so they live here and nowhere else):

- ``map`` is the *normalised* anomaly map: float32, HxW at the input image's own size, clipped
  to [0, 1], where 0.5 is the calibrated pixel threshold. ``score`` is normalised the same way.
- A pixel is defective when ``map >= 0.5`` and an image is anomalous when ``score >= 0.5``
  (``>=`` in both places, the same rule as ``f1_at``/``best_f1`` in the metrics).
- Regions are 8-connected components of ``pred`` (the 3x3 structure MVTec's PRO uses), so a
  diagonal chain of pixels is one defect, not many.
- ``bbox`` is ``[x0, y0, x1, y1]`` in pixels, inclusive-exclusive like Python slices:
  width = x1 - x0, and ``pred[y0:y1, x0:x1]`` crops the region.
- RLE is COCO's uncompressed RLE: ``{"size": [h, w], "counts": [...]}``, column-major
  (Fortran) order, counts alternate runs of False/True starting with False (a leading 0 when
  the first pixel is True), so pycocotools can read it as is.
"""

from __future__ import annotations

import io
import json
import math
import os
import pprint
import re
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from flawscope.atomic import write_atomic
from flawscope.data.io import IMAGE_EXTENSIONS, is_url
from flawscope.errors import FlawscopeError

THRESHOLD = 0.5
"""Normalised decision threshold for both the image score and the map's pixels."""

CONNECTIVITY = np.ones((3, 3), dtype=bool)
"""8-connectivity, as in MVTec AD's reference PRO code; shared with the metrics."""

ArrayMode = Literal["rle", "list", "png", "none"]

_HEAT_FIFTHS = 2  # the heat map's share of the overlay picture, in fifths: 40%
_OUTLINE_WIDTH = 2
_STEM_BYTES = 200  # of a file name's 255: room for "_res.map.png" and a folder's name before it
_SURROGATES = re.compile("[\ud800-\udfff]")  # how Python keeps a file name's bytes that are not UTF-8
_RED = (255, 0, 0)
_GREEN = (0, 160, 0)


@dataclass
class Region:
    """One connected defect in ``pred``; bbox is [x0, y0, x1, y1], end-exclusive."""

    bbox: list[int]
    area: int
    max_score: float


# What ``res[key]`` reads: the JSON's fields, then the arrays.
_FIELDS = ("input_path", "size", "model_name", "score", "raw_score", "is_anomaly", "threshold", "regions", "error",
           "image", "map", "pred")


@dataclass(eq=False, repr=False)  # eq/repr on numpy arrays would be ambiguous or huge
class AnomalyResult:
    """Prediction for one image. A bad input item has ``error`` set, no arrays and no scores.

    ``score``, ``raw_score`` and ``is_anomaly`` are None only when ``error`` is set, so a failed
    item can never be mistaken for an OK one.
    """

    input_path: str | None
    image: np.ndarray | None
    score: float | None
    raw_score: float | None
    is_anomaly: bool | None
    threshold: float
    map: np.ndarray | None
    pred: np.ndarray | None
    model_name: str
    regions: list[Region] = field(default_factory=list)
    error: str | None = None
    # How save_to_json / save_to_img write when not told: a pipeline sets its json_arrays and
    # save_extra here, so its settings hold for results saved through the Python API too.
    json_arrays: ArrayMode = "rle"
    save_extra: bool = False

    @classmethod
    def from_map(
        cls,
        image: np.ndarray,
        amap: np.ndarray,
        raw_score: float,
        score: float,
        model_name: str,
        input_path: str | None = None,
        min_region_area: int = 0,
        outline_ok_images: bool = False,
        threshold: float = THRESHOLD,
    ) -> AnomalyResult:
        """Build the result from a normalised map; derives ``pred`` and ``regions``.

        An image judged OK (``score`` below the threshold) gets an empty ``pred`` and no regions
        unless ``outline_ok_images``: an inspector should never see a part marked OK with a
        defect outlined on it. Its heat map still shows where it came closest. ``threshold``
        (normalised; the calibrated one is 0.5) lets a user be stricter or looser without
        recalibrating: it applies to the image score and the map alike.

        Components smaller than ``min_region_area`` pixels are removed from ``pred`` as well as
        from ``regions``, so outlines, masks and region lists always agree. Regions are sorted by
        ``max_score``, highest first, so the worst defect leads any truncated listing.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be HxWx3 uint8, got {image.shape} {image.dtype}")
        if amap.shape != image.shape[:2]:
            raise ValueError(f"map shape {amap.shape} != image size {image.shape[:2]}")
        norm = np.clip(np.asarray(amap, dtype=np.float32), 0.0, 1.0)  # one copy: 324 MB at 81 MP
        candidate = norm >= threshold
        if not outline_ok_images and score < threshold:
            candidate = np.zeros_like(candidate)
        pred, regions, dropped = candidate, [], []
        if candidate.any():  # most parts on a line are good: they need no labelling
            labels, _ = ndimage.label(candidate, structure=CONNECTIVITY)
            for index, window in enumerate(ndimage.find_objects(labels), start=1):
                own = labels[window] == index  # within its bounding box: no pass over the image
                area = int(own.sum())
                if area < min_region_area:
                    dropped.append(index)
                    continue
                ys, xs = window
                regions.append(Region(bbox=[xs.start, ys.start, xs.stop, ys.stop], area=area,
                                      max_score=float(norm[window][own].max())))
            if dropped:
                pred = candidate & ~np.isin(labels, dropped)
        regions.sort(key=lambda r: r.max_score, reverse=True)  # stable: raster order on ties
        return cls(
            input_path=input_path,
            image=image,
            score=float(score),
            raw_score=float(raw_score),
            is_anomaly=bool(score >= threshold),
            threshold=float(threshold),
            map=norm,
            pred=pred,
            model_name=model_name,
            regions=regions,
        )

    @classmethod
    def from_error(cls, input_path: str | None, error: str, model_name: str = "",
                   threshold: float = THRESHOLD) -> AnomalyResult:
        """A result for an input that could not be processed, so batches report it, not crash."""
        return cls(
            input_path=input_path,
            image=None,
            score=None,
            raw_score=None,
            is_anomaly=None,
            threshold=float(threshold),
            map=None,
            pred=None,
            model_name=model_name,
            error=error,
        )

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) of the input image; None for an error result."""
        if self.map is None:
            return None
        height, width = self.map.shape
        return width, height

    @property
    def stem(self) -> str:
        """File-name stem for outputs: the input's stem, or "result" when there is no path; cut
        to leave room for the suffixes within a file name's 255 bytes."""
        return fit_name(_input_stem(self.input_path)) if self.input_path else "result"

    # ---------------------------------------------------------------- JSON

    @property
    def json(self) -> dict[str, Any]:
        """The dict ``save_to_json`` writes, arrays as ``json_arrays`` says; with "png" no arrays,
        as the PNG files (and so the names the file gives for them) exist only once saved."""
        return self.to_json("none" if self.json_arrays == "png" else self.json_arrays)

    def to_json(self, arrays: Literal["rle", "list", "none"] = "rle") -> dict[str, Any]:
        """JSON-ready dict. ``arrays``: "rle" (pred only), "list" (map rounded to 4 decimals and
        pred as 0/1, nested rows), "none". PNG arrays need files: use ``save_to_json``."""
        out = self._json_fields()
        if self.error is not None or arrays == "none":
            return out
        if arrays == "rle":
            out["pred"] = rle_encode(self.pred)
        elif arrays == "list":
            out["map"] = np.round(self.map.astype(np.float64), 4).tolist()
            out["pred"] = self.pred.astype(np.uint8).tolist()
        else:
            raise ValueError(f"arrays must be 'rle', 'list' or 'none' here, got {arrays!r}")
        return out

    def _json_fields(self) -> dict[str, Any]:
        return {
            "input_path": self.input_path,
            "size": list(self.size) if self.size else None,
            "model_name": self.model_name,
            "score": self.score,
            "raw_score": self.raw_score,
            "is_anomaly": self.is_anomaly,
            "threshold": self.threshold,
            "regions": [asdict(r) for r in self.regions],
            "error": self.error,
        }

    def save_to_json(self, save_path: str | os.PathLike, arrays: ArrayMode | None = None,
                     indent: int | None = None, ensure_ascii: bool = False) -> Path:
        """Write the JSON; a ``.json`` path is the file, anything else a directory that gets
        ``<stem>_res.json``. ``arrays`` defaults to ``json_arrays``. With ``"png"`` the map
        (16-bit, map*65535) and pred (8-bit, 0/255) go next to it as ``<json stem>.map.png`` /
        ``<json stem>.pred.png``, referenced by file name: the dot keeps them apart from
        ``save_to_img``'s ``_map.png`` / ``_pred.png`` pictures, whatever the names. Returns the
        JSON's path (``save_all`` returns the PNGs too). ``save_path``, ``indent`` and
        ``ensure_ascii`` as PaddleX's results take them (compact by default: an RLE's counts
        would take a line each)."""
        return self._write_json(save_path, arrays, indent, ensure_ascii)[0]

    def _write_json(self, save_path: str | os.PathLike, arrays: ArrayMode | None,
                    indent: int | None = None, ensure_ascii: bool = False) -> list[Path]:
        """``save_to_json``'s files, the JSON first, then any array PNGs."""
        arrays = self.json_arrays if arrays is None else arrays
        path = _output_path(save_path, ".json", lambda: f"{self.stem}_res.json")
        written = [path]
        if arrays != "png" or self.error is not None:
            data = self.to_json("none" if arrays == "png" else arrays)
        else:
            data = self.to_json("none")
            for key, picture in (("map", self._map16()), ("pred", self._pred_image())):
                png = _array_png(path, key)
                write_atomic(png, _png_bytes(picture))
                data[key] = png.name
                written.append(png)
        write_atomic(path, _json_text(data, indent, ensure_ascii).encode())
        return written

    # ---------------------------------------------------------------- images

    @property
    def img(self) -> dict[str, Image.Image]:
        """``res``: image + jet heat map + red defect outlines + score label; ``map``: the map
        in jet colours; ``pred``: the mask as an L image (0/255). Empty for an error result."""
        if self.error is not None:
            return {}
        heat = _jet(self.map)
        return {"res": self._res_picture(heat), "map": Image.fromarray(heat), "pred": self._pred_image()}

    def _res_picture(self, heat: np.ndarray) -> Image.Image:
        res = _blend(self.image, heat)
        _draw_outline(res, self.pred, _OUTLINE_WIDTH)
        picture = Image.fromarray(res)
        self._draw_label(picture)
        return picture

    def score_text(self, decimals: int = 2) -> str:
        """The score to ``decimals`` decimals, rounded unless that would cross the threshold
        (0.4996 would read "0.50" and OK at 0.5: it reads "0.49"), so it never contradicts
        ``is_anomaly``."""
        scale = 10**decimals
        shown = round(self.score, decimals)
        if self.is_anomaly and shown < self.threshold:
            shown = math.ceil(self.score * scale - 1e-9) / scale
        elif not self.is_anomaly and shown >= self.threshold:
            shown = math.floor(self.score * scale + 1e-9) / scale
        return f"{shown:.{decimals}f}"

    def _label_text(self) -> str:
        """"score 0.73 ANOMALY" or "score 0.12 OK" (see ``score_text``)."""
        return f"score {self.score_text(2)} {'ANOMALY' if self.is_anomaly else 'OK'}"

    def _draw_label(self, picture: Image.Image) -> None:
        """Write the label top-left on a red (anomaly) or green (OK) box."""
        text = self._label_text()
        font = ImageFont.load_default(size=max(10, min(picture.size) // 25))
        draw = ImageDraw.Draw(picture)
        _, _, right, bottom = draw.textbbox((3, 2), text, font=font)
        draw.rectangle((0, 0, right + 3, bottom + 3), fill=_RED if self.is_anomaly else _GREEN)
        draw.text((3, 2), text, fill=(255, 255, 255), font=font)

    def save_to_img(self, save_path: str | os.PathLike, extra: bool | None = None) -> list[Path]:
        """Write ``<stem>_res.png`` into a directory, or to the given ``.png`` file; with
        ``extra`` (default: ``save_extra``) also ``<stem>_map.png`` and ``<stem>_pred.png``.
        Nothing for an error result."""
        if Path(save_path).suffix.lower() in IMAGE_EXTENSIONS - {".png"}:  # meant as a file, not a folder
            raise FlawscopeError(f"{save_path}: save_to_img writes PNG files: give a .png file or a directory")
        path = _output_path(save_path, ".png", lambda: f"{self.stem}_res.png")
        extra = self.save_extra if extra is None else extra
        if self.error is not None:
            return []
        # Only the pictures it writes: at 20 MP the map picture alone is 80 MB in Pillow.
        pictures = self.img if extra else {"res": self._res_picture(_jet(self.map))}
        targets = {"res": path}
        if extra:
            targets |= {key: _extra_png(path, key) for key in ("map", "pred")}
        for key, target in targets.items():
            write_atomic(target, _png_bytes(pictures[key]))
        return list(targets.values())

    def save_all(self, directory: str | os.PathLike, name: str | None = None) -> list[Path]:
        """JSON and pictures into ``directory`` as ``<name>_res.json``, ``<name>_res.png``...
        (``name``: the input's stem by default), as ``json_arrays`` and ``save_extra`` say; returns
        the paths written. All or none: where one cannot be written (a full disk), the others
        are removed, so that no JSON is left without its picture."""
        json_path = Path(directory) / f"{name or self.stem}_res.json"
        picture = json_path.with_suffix(".png")
        try:
            return [*self._write_json(json_path, None), *self.save_to_img(picture)]
        except BaseException:
            for path in (json_path, picture, *(_array_png(json_path, k) for k in ("map", "pred")),
                         *(_extra_png(picture, k) for k in ("map", "pred"))):
                path.unlink(missing_ok=True)
            raise

    def _map16(self) -> Image.Image:
        return Image.fromarray(np.round(self.map * 65535).astype(np.uint16))

    def _pred_image(self) -> Image.Image:
        return Image.fromarray(self.pred.astype(np.uint8) * 255)

    # ---------------------------------------------------------------- printing

    def summary(self, max_regions: int = 3) -> dict[str, Any]:
        """Readable dict: numbers rounded, arrays described (shape, dtype, range), not dumped."""
        out = self._json_fields()
        for key in ("score", "raw_score"):
            if out[key] is not None:
                out[key] = round(out[key], 4)
        regions = [
            {"bbox": r.bbox, "area": r.area, "max_score": round(r.max_score, 4)}
            for r in self.regions[:max_regions]
        ]
        if len(self.regions) > max_regions:
            regions.append(f"... {len(self.regions) - max_regions} more")
        out["regions"] = regions
        for key in ("image", "map", "pred"):
            out[key] = _describe(getattr(self, key))
        return out

    def __str__(self) -> str:
        return pprint.pformat({"res": self.summary()}, sort_dicts=False)

    def __repr__(self) -> str:
        return (
            f"AnomalyResult(input_path={self.input_path!r}, score={self.score!r}, "
            f"is_anomaly={self.is_anomaly!r}, regions={len(self.regions)}, error={self.error!r})"
        )

    def print(self, format_json: bool = True, indent: int = 4, ensure_ascii: bool = False) -> None:
        """Print the compact summary (see ``summary``) as ``{"res": ...}``, as PaddleX's results
        print: JSON, or ``str()``'s Python dict with ``format_json=False``."""
        if format_json:
            print(_json_text({"res": self.summary()}, indent, ensure_ascii))
        else:
            print(str(self))

    # Read as a dict, as PaddleX's results are (code written for them reads res["pred"], "pred" in res,
    # res.items()): the fields below, the arrays as they are. Not a Mapping: equality stays identity; and
    # no len(), with which numpy would take a list of results for a table of their keys.
    def keys(self) -> list[str]:
        return list(_FIELDS)

    def __getitem__(self, key: str) -> Any:
        if key not in _FIELDS:
            raise KeyError(f"{key!r}: a result holds {', '.join(_FIELDS)}")
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in _FIELDS else default

    def __contains__(self, key: object) -> bool:
        return key in _FIELDS

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELDS)

    def items(self) -> list[tuple[str, Any]]:
        return [(key, getattr(self, key)) for key in _FIELDS]

    def values(self) -> list[Any]:
        return [getattr(self, key) for key in _FIELDS]


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a bool HxW mask (column-major, first run counts False)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    return {"size": list(mask.shape), "counts": counts}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of ``rle_encode``: the HxW bool mask."""
    height, width = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    flat = np.repeat(values, rle["counts"])
    return flat.reshape((height, width), order="F")


def _input_stem(input_path: str) -> str:
    """The file-name stem of an input: a URL's from its path's last segment, decoded, without its
    query (``snap.jpg?t=1.5`` is ``snap``, ``%E9%83%A8.jpg`` is ``部``), "download" where it has none."""
    if not is_url(input_path):
        return Path(input_path).stem
    segment = urllib.parse.unquote(urllib.parse.urlsplit(input_path).path).rstrip("/").rpartition("/")[2]
    return Path(segment).stem if segment.strip(".") else "download"


def fit_name(stem: str, limit: int = _STEM_BYTES) -> str:
    """``stem`` cut to ``limit`` bytes of UTF-8 at a character boundary. A file name's bytes that
    are not UTF-8 (Latin-1 ``b"caf\\xe9.jpg"``) become U+FFFD: they cannot be encoded as they are."""
    return _SURROGATES.sub("\ufffd", stem).encode()[:limit].decode(errors="ignore") or "result"


def _array_png(json_path: Path, key: str) -> Path:
    """Where ``save_to_json`` with ``arrays="png"`` puts the ``key`` array ("map" or "pred")."""
    return json_path.with_name(f"{json_path.stem}.{key}.png")


def _extra_png(picture: Path, key: str) -> Path:
    """Where ``save_to_img`` with ``extra`` puts the ``key`` picture ("map" or "pred")."""
    return picture.with_name(f"{picture.stem.removesuffix('_res')}_{key}.png")


def _json_text(data: dict[str, Any], indent: int | None, ensure_ascii: bool) -> str:
    """JSON text; NaN and Infinity fail here rather than in a client (they are not JSON). A file
    name that is not UTF-8 reaches Python as lone surrogates, which stay escaped (``\\udce9``)
    where ``ensure_ascii=False`` would write them as they are: no UTF-8 can hold them."""
    text = json.dumps(data, allow_nan=False, indent=indent, ensure_ascii=ensure_ascii)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _output_path(dir_or_file: str | os.PathLike, suffix: str, default_name: Callable[[], str]) -> Path:
    """A path ending in ``suffix`` is the file; anything else is a directory for
    ``default_name()``, only then asked for."""
    path = Path(dir_or_file)
    return path if path.suffix.lower() == suffix else path / default_name()


def _png_bytes(picture: Image.Image) -> bytes:
    """PNG at zlib level 1 (OpenCV's default): at 512x512 a result picture takes 34 ms instead of
    154 at Pillow's default 6, at 5472x3648 1.2 s instead of 2.7, for files 12-42% larger."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


_JET_LUT = matplotlib.colormaps["jet"](np.arange(256), bytes=True)[:, :3]

_ROWS_PER_CHUNK = 256
"""Rows of a picture computed at a time, so that a camera-sized image needs no full-size temporaries."""


def _jet(amap: np.ndarray) -> np.ndarray:
    """HxW map in [0, 1] -> HxWx3 uint8 in matplotlib's jet colours: its 256-entry table, indexed as
    matplotlib indexes a float32 map, without its full-size int64 and float temporaries."""
    heat = np.empty((*amap.shape, 3), dtype=np.uint8)
    for start in range(0, amap.shape[0], _ROWS_PER_CHUNK):
        rows = amap[start : start + _ROWS_PER_CHUNK]
        index = np.minimum(rows * np.float32(_JET_LUT.shape[0]), _JET_LUT.shape[0] - 1).astype(np.uint8)
        heat[start : start + _ROWS_PER_CHUNK] = _JET_LUT[index]
    return heat


def _blend(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``round((1 - k/5) * image + k/5 * heat)`` for the heat map's share k/5, in 16-bit integers.

    A sum of integers over 5 never ends in .5, so ``(2 * sum + 5) // 10`` rounds it exactly as
    float64 arithmetic would, without float64 temporaries 24 bytes a pixel.
    """
    out = np.empty_like(image)
    for start in range(0, image.shape[0], _ROWS_PER_CHUNK):
        rows = slice(start, start + _ROWS_PER_CHUNK)
        total = image[rows].astype(np.uint16) * (5 - _HEAT_FIFTHS)
        total += heat[rows].astype(np.uint16) * _HEAT_FIFTHS
        out[rows] = (total * 2 + 5) // 10
    return out


def _draw_outline(picture: np.ndarray, mask: np.ndarray, width: int) -> None:
    """Paint the inner boundary band of ``mask``, ``width`` pixels thick, red into ``picture``; the
    image edge counts as outside, so a defect touching the border is closed there too.

    The erosion runs on the mask's bounding box only: outside it the mask is empty, as the
    erosion's border value assumes, so the band is the same as on the whole image.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    inner = ndimage.binary_erosion(mask[box], structure=CONNECTIVITY, iterations=width, border_value=0)
    picture[box][mask[box] & ~inner] = _RED


def _describe(array: np.ndarray | None) -> str | None:
    if array is None:
        return None
    shape = "x".join(map(str, array.shape))
    if array.dtype == bool:
        return f"array({shape}, bool, {int(array.sum())} true)"
    return f"array({shape}, {array.dtype}, min={array.min():.4g}, max={array.max():.4g})"
