"""read_image / read_mask: every file mode becomes RGB uint8 or bool, every bad file one error."""

from __future__ import annotations

import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

import flawscope.data.io as fio
from flawscope.data.io import is_image_file, read_ahead, read_image, read_mask
from flawscope.data.layouts import Sample, check_headers
from flawscope.errors import FlawscopeError


def _save(img: Image.Image, path: Path, **params) -> Path:
    img.save(path, **params)
    return path


def _png_with_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height, without pixel data (Pillow cannot write it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _error(path: Path, fragment: str, read=read_image) -> None:
    with pytest.raises(FlawscopeError) as info:
        read(path)
    message = str(info.value)
    assert str(path) in message and fragment in message and "\n" not in message


def test_rgb_roundtrip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = read_image(_save(Image.fromarray(pixels), tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, pixels)
    assert out.flags.writeable  # callers may draw on it


@pytest.mark.parametrize(
    ("img", "rgb"),
    [
        (Image.new("L", (4, 3), 77), (77, 77, 77)),
        (Image.new("1", (4, 3), 1), (255, 255, 255)),
        (Image.new("RGBA", (4, 3), (10, 20, 30, 0)), (10, 20, 30)),  # alpha dropped, not composited
        (Image.new("LA", (4, 3), (40, 128)), (40, 40, 40)),
    ],
    ids=["L", "1", "RGBA", "LA"],
)
def test_modes_become_rgb(tmp_path, img, rgb):
    out = read_image(_save(img, tmp_path / "m.png"))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert (out == rgb).all()


def test_palette(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 200, 100, 50])
    img.putpixel((1, 0), 1)
    out = read_image(_save(img, tmp_path / "p.png"))
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [200, 100, 50]])


@pytest.mark.parametrize(("dtype", "suffix"), [("<u2", ".png"), (">u2", ".tif")], ids=["I;16", "I;16B"])
def test_16bit_scaled_by_bit_depth(tmp_path, dtype, suffix):
    values = np.array([[0, 257, 32896, 65535]], dtype=dtype)
    out = read_image(_save(Image.fromarray(values), tmp_path / f"g{suffix}"))
    np.testing.assert_array_equal(out[..., 0], [[0, 1, 128, 255]])
    assert (out[..., 0] == out[..., 2]).all()


def test_signed_32bit_tiff_scaled_by_its_bits_per_sample(tmp_path):
    values = np.array([[-5, 0, 2**30, 2**31 - 1]], dtype=np.int32)
    out = read_image(_save(Image.fromarray(values), tmp_path / "i.tif"))
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 128, 255]])


def test_a_32bit_tiff_of_16bit_values_is_refused_not_black(tmp_path):
    """Camera software writes 16-bit values into 32-bit TIFFs: on the 32-bit scale they all read 0."""
    path = _save(Image.fromarray(np.array([[0, 300, 65535]], dtype=np.int32)), tmp_path / "cam.tif")
    with pytest.raises(FlawscopeError, match=r"cam\.tif: 32-bit integer pixel values up to 65535: on a 32-bit scale "
                                             "the image reads black; save it as 16-bit"):
        read_image(path)


def test_float_tiff(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = read_image(_save(Image.fromarray(values), tmp_path / "f.tiff"))
    np.testing.assert_array_equal(out[..., 1], [[0, 128, 255]])


def test_a_float_tiff_beyond_255_is_refused_not_white(tmp_path):
    path = _save(Image.fromarray(np.array([[0.0, 300.0, 65535.0]], dtype=np.float32)), tmp_path / "f.tiff")
    with pytest.raises(FlawscopeError, match=r"f\.tiff: float pixel values up to 65535: float images are read in "
                                             r"\[0, 1\] or \[0, 255\]"):
        read_image(path)


def test_cmyk(tmp_path):
    out = read_image(_save(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), tmp_path / "c.jpg"))
    assert out.shape == (4, 4, 3) and (out > 250).all()


# EXIF Orientation (tag 0x0112): 6 = the stored picture must be turned 90 degrees clockwise to be
# shown upright, 8 = 90 degrees counter-clockwise. np.rot90 turns counter-clockwise for k > 0.
_EXIF_TURNS = {6: -1, 8: 1}


def _with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_turns_the_picture_the_right_way(tmp_path, orientation):
    """Every pixel lands where the EXIF spec (and Pillow's exif_transpose) put it, lossless PNG."""
    stored = np.random.default_rng(orientation).integers(0, 256, (4, 6, 3), dtype=np.uint8)  # 6 wide, 4 high
    path = _save(Image.fromarray(stored), tmp_path / "o.png", exif=_with_orientation(orientation))
    out = read_image(path)
    assert out.shape == (6, 4, 3)
    np.testing.assert_array_equal(out, np.rot90(stored, _EXIF_TURNS[orientation]))
    with Image.open(path) as img:
        assert img.getexif()[0x0112] == orientation  # the tag did reach the file
        np.testing.assert_array_equal(out, np.asarray(ImageOps.exif_transpose(img)))


@pytest.mark.parametrize(
    ("orientation", "marker_rows", "marker_cols"),
    [(6, slice(0, 8), slice(16, 24)),  # clockwise: the top-left corner goes to the top right
     (8, slice(32, 40), slice(0, 8))],  # counter-clockwise: it goes to the bottom left
)
def test_exif_orientation_moves_a_corner_marker_in_a_jpeg(tmp_path, orientation, marker_rows, marker_cols):
    stored = np.full((24, 40, 3), 255, np.uint8)  # 40 wide, 24 high, white
    stored[:8, :8] = (255, 0, 0)  # red marker in the top-left corner
    out = read_image(_save(Image.fromarray(stored), tmp_path / "o.jpg", exif=_with_orientation(orientation),
                           quality=95))
    assert out.shape == (40, 24, 3)  # 24 wide, 40 high once upright
    corners = {"top left": (slice(0, 8), slice(0, 8)), "top right": (slice(0, 8), slice(16, 24)),
               "bottom left": (slice(32, 40), slice(0, 8)), "bottom right": (slice(32, 40), slice(16, 24))}
    means = {name: out[rows, cols].reshape(-1, 3).mean(axis=0) for name, (rows, cols) in corners.items()}
    red = {name: bool(r > 200 and g < 60 and b < 60) for name, (r, g, b) in means.items()}  # JPEG: near red
    expected = next(name for name, box in corners.items() if box == (marker_rows, marker_cols))
    assert red == {name: name == expected for name in corners}


def test_missing_file(tmp_path):
    _error(tmp_path / "nope.png", "does not exist")


def test_broken_links_name_the_missing_file_through_a_chain_and_loops(tmp_path):
    (tmp_path / "middle.png").symlink_to("gone.png")  # relative, as links inside a dataset are
    (tmp_path / "first.png").symlink_to(tmp_path / "middle.png")
    for link in ("first.png", "middle.png"):
        with pytest.raises(FlawscopeError, match=rf"^{tmp_path / link}: a broken symbolic link "
                                                 rf"\(to {tmp_path / 'gone.png'}, which does not exist\)$"):
            read_image(tmp_path / link)
    (tmp_path / "a.png").symlink_to("b.png")
    (tmp_path / "b.png").symlink_to("a.png")
    with pytest.raises(FlawscopeError, match=rf"^{tmp_path / 'a.png'}: a symbolic link that loops back on itself$"):
        read_image(tmp_path / "a.png")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    _error(path, "not an image")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    _error(path, "empty")


def test_zero_size_header(tmp_path):
    _error(_png_with_header(tmp_path / "zero.png", 0, 5), "not an image")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated(tmp_path, suffix):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = _save(Image.fromarray(pixels), tmp_path / f"full{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _error(path, "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    path.write_bytes(data[:100])  # cut inside its header: Pillow fails to open it, not to decode it
    _error(path, "corrupt or truncated image (")  # no "cannot read file", which reads like permissions


def test_over_max_pixels(tmp_path, monkeypatch):
    monkeypatch.setattr(fio, "MAX_PIXELS", 100)
    _error(_save(Image.new("RGB", (20, 20)), tmp_path / "big.png"), "too large")


def test_decompression_bomb_header(tmp_path):
    bomb = _png_with_header(tmp_path / "bomb.png", 100_000, 100_000)
    _error(bomb, "too large")
    # the header check before training or evaluation: Pillow's error there is no OSError (it was a traceback)
    with pytest.raises(FlawscopeError, match=f"{bomb}: image is too large"):
        check_headers([Sample(bomb, None, 0, "good")])


def test_directory(tmp_path):
    _error(tmp_path, "directory")


def test_is_image_file():
    assert is_image_file("a.PNG") and is_image_file(Path("x/b.tiff")) and is_image_file("c.JpEg")
    assert is_image_file("d.webp") and is_image_file("e.GIF")  # read by path, so listed in folders too
    assert not is_image_file("license.txt") and not is_image_file("png") and not is_image_file(".png")


@pytest.mark.parametrize(
    "img",
    [
        Image.fromarray(np.array([[0, 255], [0, 0]], dtype=np.uint8)),
        Image.fromarray(np.array([[0, 1], [0, 0]], dtype=np.uint8)),
        Image.fromarray(np.array([[False, True], [False, False]])),
        Image.fromarray(np.array([[0, 1], [0, 0]], dtype=np.uint16)),
        Image.fromarray(np.array([[[0, 0, 0], [1, 0, 0]], [[0, 0, 0], [0, 0, 0]]], dtype=np.uint8)),
    ],
    ids=["L-255", "L-1", "1-bit", "I;16", "RGB-dark-red"],
)
def test_mask_any_nonzero_is_defect(tmp_path, img):
    out = read_mask(_save(img, tmp_path / "m.png"), size=(2, 2))
    np.testing.assert_array_equal(out, [[False, True], [False, False]])


def test_palette_mask_uses_index(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 255, 255, 0, 0, 0])  # index 0 shown white: still "normal"
    img.putpixel((1, 0), 1)
    np.testing.assert_array_equal(read_mask(_save(img, tmp_path / "p.png")), [[False, True]])


def test_mask_size_mismatch(tmp_path):
    path = _save(Image.new("L", (4, 3)), tmp_path / "m.png")
    with pytest.raises(FlawscopeError) as info:
        read_mask(path, size=(8, 6))
    assert str(path) in str(info.value) and "4x3" in str(info.value) and "8x6" in str(info.value)


def test_mask_errors_name_path(tmp_path):
    _error(tmp_path / "missing_mask.png", "does not exist", read=read_mask)


def test_read_ahead_keeps_order_and_loads_in_the_background():
    loaders, started = [], []

    def load(i: int) -> int:
        started.append(i)
        loaders.append(threading.get_ident())
        time.sleep(0.002 * (i % 3))  # uneven load times must not reorder the items
        if i == 3:
            raise FlawscopeError(f"item {i}: broken")
        return i * i

    seen = []
    for k, (item, loading) in enumerate(read_ahead(load, range(8), depth=2)):
        assert item == k
        assert len(started) <= k + 3  # never more than ``depth`` items beyond the one handed out
        if item == 3:
            with pytest.raises(FlawscopeError, match="item 3"):
                loading.result()
        else:
            seen.append(loading.result())
    assert seen == [i * i for i in range(8) if i != 3]
    assert threading.get_ident() not in loaders


_DEADLOCK_GUARD_S = 60  # only bounds a hang if the behaviour breaks; never reached when it works


def test_read_ahead_stops_loading_when_the_caller_stops():
    """Closing the generator returns while a load is still running (it does not wait for it), and
    the loads that had not started are cancelled: they never run, even once the running one ends."""
    started, loader_threads = [], []
    one_is_loading, release, closed = threading.Event(), threading.Event(), threading.Event()

    def load(i: int) -> int:
        started.append(i)
        loader_threads.append(threading.current_thread())
        if i == 1:
            one_is_loading.set()
            release.wait(3 * _DEADLOCK_GUARD_S)  # held until the test has seen close() return
        return i

    items = read_ahead(load, range(100), depth=5)
    closer = threading.Thread(target=lambda: (items.close(), closed.set()))
    assert next(items)[0] == 0  # 0 handed out; 1-5 submitted
    try:
        assert one_is_loading.wait(_DEADLOCK_GUARD_S)
        closer.start()  # another thread, so that a close() that waits fails the test, not hangs it
        assert closed.wait(_DEADLOCK_GUARD_S), "close() waited for the load in progress"
        assert not release.is_set() and started == [0, 1]  # it returned while 1 was still loading
    finally:
        release.set()
    closer.join(_DEADLOCK_GUARD_S)
    loader_threads[-1].join(_DEADLOCK_GUARD_S)  # the reader ends once 1 is done: nothing left to run
    assert not loader_threads[-1].is_alive()
    assert started == [0, 1]  # 2-5 were cancelled, and nothing after 5 was ever submitted


def test_read_ahead_can_be_finalised_in_its_own_reader_thread():
    """The garbage collector may finalise an abandoned generator in any thread, the reader's too:
    that must not wait for the reader (a deadlock, or "cannot join current thread")."""
    box: dict = {"handed_out": threading.Event(), "done": threading.Event()}

    def load(i: int) -> int:
        if i == 1:
            box["handed_out"].wait(5)  # the generator is suspended at its yield by now
            try:
                box["items"].close()
            except Exception as exc:
                box["error"] = exc
            box["done"].set()
        return i

    box["items"] = read_ahead(load, range(5), depth=1)
    assert next(box["items"])[0] == 0
    box["handed_out"].set()
    assert box["done"].wait(5) and "error" not in box


def test_read_ahead_keeps_every_future_it_handed_out():
    """Exhausting the generator before asking for the results must not cancel any of them."""
    pairs = list(read_ahead(lambda i: time.sleep(0.01) or -i, range(6), depth=2))
    assert [loading.result() for _, loading in pairs] == [0, -1, -2, -3, -4, -5]


def test_read_ahead_hands_out_what_was_loaded_before_the_items_fail():
    def items():
        yield from range(5)
        raise OSError("the listing failed")

    pairs = []
    with pytest.raises(OSError, match="listing failed"):
        for pair in read_ahead(lambda i: time.sleep(0.02) or -i, items(), depth=4):
            pairs.append(pair)  # results asked for only afterwards: none may be cancelled
    assert [loading.result() for _, loading in pairs] == [0, -1, -2, -3, -4]


def test_read_ahead_depth_zero_loads_in_the_callers_thread_when_handed_out():
    started = []

    def load(i: int) -> int:
        started.append((i, threading.get_ident()))
        if i == 1:
            raise FlawscopeError("item 1: broken")
        return -i

    items = read_ahead(load, range(3), depth=0)
    assert next(items)[1].result() == 0 and started == [(0, threading.get_ident())]
    with pytest.raises(FlawscopeError, match="item 1"):
        next(items)[1].result()
    assert next(items)[1].result() == -2 and len(started) == 3
    with pytest.raises(ValueError, match="depth"):
        next(read_ahead(load, range(3), depth=-1))


def test_models_load_and_files_hash_without_python_3_11s_hashlib(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """The package supports Python 3.10, whose hashlib has no ``file_digest``: loading any model
    (its files' digests are checked) raised AttributeError there, the quick start included."""
    import hashlib

    from flawscope.inference.predictor import Predictor

    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    data = bytes(range(256)) * 9000  # over one read chunk
    (tmp_path / "f.bin").write_bytes(data)
    assert fio.file_sha256(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()
    assert Predictor.from_dir().info.model == "STFPM"  # the bundled model, its digest checked
