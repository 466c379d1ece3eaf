"""Input expansion and loading without a model: listings, URLs, tensors and PIL images."""

from __future__ import annotations

import base64
import errno
import gzip
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flawscope.data.io import read_image
from flawscope.errors import FlawscopeError
from flawscope.inference.inputs import expand_inputs, load_input

DEMO = Path(__file__).resolve().parents[1] / "src" / "flawscope" / "assets" / "demo"


def _names(items) -> list[tuple[str, str | None]]:
    """(name, the error's message or None) per item."""
    return [(name, str(source) if isinstance(source, Exception) else None) for name, source in items]


@pytest.fixture
def trickle_server():
    """Serves a body of 4000 bytes one byte per 0.1 s (for at most 30 s); ``started`` is set at
    the first request."""
    started = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            started.set()
            self.send_response(200)
            self.send_header("Content-Length", "4000")
            self.end_headers()
            end = time.monotonic() + 30
            try:
                while time.monotonic() < end:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:  # the client gave up
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/x.png", started
    server.shutdown()
    server.server_close()


def test_a_trickling_server_fails_within_the_timeout(trickle_server, monkeypatch) -> None:
    """read(n) waited for all n bytes: one byte a tenth of a second kept it going far past the timeout."""
    url, _ = trickle_server
    monkeypatch.setattr("flawscope.inference.inputs.URL_TIMEOUT_S", 1)
    start = time.monotonic()
    with pytest.raises(FlawscopeError, match=r"download failed \(not complete after 1 s\)"):
        load_input(url, url)
    assert time.monotonic() - start < 3


def test_ctrl_c_during_a_download_exits_at_once(trickle_server, tmp_path) -> None:
    """The reader thread's download must not keep the process alive after Ctrl-C."""
    url, started = trickle_server
    cli = subprocess.Popen([sys.executable, "-m", "flawscope", "--pipeline", "anomaly_detection", "--input", url,
                            "--save_path", str(tmp_path / "out")], stderr=subprocess.PIPE, text=True)
    try:
        assert started.wait(120), "the CLI never asked for the URL"
        time.sleep(0.5)
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=10) == 130
        assert "interrupted" in cli.stderr.read()
    finally:
        cli.kill()
        cli.wait()


def test_a_recursive_pattern_under_a_missing_folder_matches_nothing_as_a_plain_one_does(tmp_path) -> None:
    for pattern in (f"{tmp_path}/missing/*.png", f"{tmp_path}/missing/**/*.png"):
        assert _names(expand_inputs(pattern)) == [(pattern, f"{pattern}: no images match this pattern")]


def test_a_directory_skips_hidden_files_and_folders_as_a_glob_does(tmp_path) -> None:
    image = (DEMO / "hazelnut_good.jpg").read_bytes()
    for name in ("x.jpg", "._x.jpg", ".hidden/y.jpg", "sub/z.jpg", "sub/._z.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(image)
    assert _names(expand_inputs(str(tmp_path))) == [(str(tmp_path / "x.jpg"), None)]
    recursive = _names(expand_inputs(str(tmp_path), recursive=True))
    assert recursive == [(str(tmp_path / "sub/z.jpg"), None), (str(tmp_path / "x.jpg"), None)]
    assert recursive == _names(expand_inputs(f"{tmp_path}/**/*"))
    (only_hidden := tmp_path / "only_hidden" / ".git").mkdir(parents=True)
    (only_hidden / "a.jpg").write_bytes(image)
    (error,) = _names(expand_inputs(str(only_hidden.parent)))
    assert error[1].endswith("no images in this directory")  # no hint to descend: that would find none


@pytest.mark.parametrize("recursive_glob", [False, True])
def test_an_unreadable_sub_folder_is_an_error_item_in_its_place(tmp_path, monkeypatch, recursive_glob) -> None:
    """Path.glob and glob.glob skip a folder they may not list; the user must learn its images
    were not inspected. (The test runs as root, so the refusal is simulated.)"""
    image = (DEMO / "hazelnut_good.jpg").read_bytes()
    for name in ("a.jpg", "sub/b.jpg", "z/c.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(image)
    scandir = os.scandir

    def refusing(path=".") -> os.ScandirIterator:
        if os.fspath(path).rstrip("/") == str(tmp_path / "sub"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    items = expand_inputs(f"{tmp_path}/**/*.jpg" if recursive_glob else str(tmp_path), recursive=True)
    refused = f"{tmp_path / 'sub'}: cannot list this directory (Permission denied)"
    assert _names(items) == [(str(tmp_path / "a.jpg"), None), (str(tmp_path / "sub"), refused),
                             (str(tmp_path / "z/c.jpg"), None)]
    # A folder that the pattern does not search is no error of it.
    assert _names(expand_inputs(f"{tmp_path}/[!s]*/**/*.jpg")) == [(str(tmp_path / "z/c.jpg"), None)]


@pytest.mark.parametrize("tensor", [torch.zeros(8, 8, 3, dtype=torch.uint8), torch.rand(3, 8, 8), torch.tensor(1.0)])
def test_a_torch_tensor_is_refused_with_what_to_give(tensor) -> None:
    ((name, error),) = expand_inputs(tensor)
    assert name is None and isinstance(error, FlawscopeError)
    assert "torch.Tensor" in str(error) and ".numpy()" in str(error)


def test_a_pil_image_is_turned_upright_as_its_file_is(tmp_path) -> None:
    """EXIF orientation 6 (rotate 90 degrees clockwise): a path applies it, so a PIL image must too."""
    path = tmp_path / "rotated.jpg"
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:5] = 255  # a white top band, to tell the rotation from its mirror image
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    with Image.open(path) as image:
        from_pil = load_input(None, image)
        assert image.size == (30, 20)  # the caller's image is left as it is
    np.testing.assert_array_equal(from_pil, read_image(path))
    assert from_pil.shape == (30, 20, 3)


def test_one_lazily_opened_pil_image_decoded_by_several_threads_at_once_reads_right() -> None:
    """Image.open decodes on first use, which Pillow does not guard: eight threads predicting on
    one such image gave a blank image's score without an error, or crashed."""
    expected = read_image(DEMO / "hazelnut_good.jpg")
    for _ in range(5):
        image, start = Image.open(DEMO / "hazelnut_good.jpg"), threading.Barrier(8)

        def load(_) -> np.ndarray:
            start.wait()
            return load_input(None, image)

        with ThreadPoolExecutor(8) as pool:
            assert all(np.array_equal(got, expected) for got in pool.map(load, range(8)))


def test_a_malformed_url_is_an_error_item_and_the_others_go_on() -> None:
    """urlsplit's ValueError ended the whole prediction with a traceback naming no input."""
    items = list(expand_inputs([str(DEMO / "hazelnut_good.jpg"), "http://user:pw@[::1/x.jpg", str(DEMO)]))
    assert [name for name, _ in items][:2] == [str(DEMO / "hazelnut_good.jpg"), "http://***@[::1/x.jpg"]
    assert str(items[1][1]) == "http://***@[::1/x.jpg: not a valid URL (Invalid IPv6 URL)" and len(items) == 4


def test_a_closed_pil_image_says_so() -> None:
    image = Image.open(DEMO / "hazelnut_good.jpg")
    image.close()
    with pytest.raises(FlawscopeError, match=r"^PIL image: the image was closed \(PIL's Image.close\(\)\) before"):
        load_input(None, image)


def test_a_32_bit_integer_pil_image_made_in_memory_is_refused_not_darkened(tmp_path) -> None:
    """``convert("I")`` keeps 8-bit values, which the 16-bit scale of mode I made nearly black
    (a demo hazelnut's maximum became 1); a mode I image read from a file has its depth from it."""
    pixels = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    with pytest.raises(FlawscopeError, match=r"^PIL image: a 32-bit integer \(mode I\) image made in memory does "
                                             r"not say its bit depth .*: convert it to L or RGB"):
        load_input(None, Image.fromarray(pixels).convert("I"))
    path = tmp_path / "deep.pgm"  # 16-bit PGM: Pillow opens it in mode I
    Image.fromarray(pixels.astype(np.uint16) * 257).save(path)
    with Image.open(path) as image:
        assert image.mode == "I"
        np.testing.assert_array_equal(load_input(None, image), read_image(path))
    np.testing.assert_array_equal(read_image(path)[:, :, 0], pixels)


@pytest.fixture
def odd_server():
    """Serves the demo JPEG as a browser's address bar or a camera would ask for it: under a
    non-ASCII name with a space, behind basic authentication, gzip-encoded, and cut short."""
    image = (DEMO / "hazelnut_good.jpg").read_bytes()
    seen: list[tuple[str, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append((self.path, self.headers.get("Authorization")))
            body, headers = image, {"Content-Length": str(len(image))}
            if self.path.startswith("/gzip"):
                body = gzip.compress(image)
                headers = {"Content-Length": str(len(body)), "Content-Encoding": "gzip"}
            elif self.path.startswith("/short"):
                body = image[: len(image) // 2]  # Content-Length says the whole image
            elif self.path.startswith("/camera") and self.headers.get("Authorization") != \
                    "Basic " + base64.b64encode(b"admin:s3cr@t").decode():
                self.send_response(401)
                self.end_headers()
                return
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", image, seen
    server.shutdown()
    server.server_close()


def test_urls_as_users_paste_them(odd_server) -> None:
    base, image, seen = odd_server
    expected = read_image(DEMO / "hazelnut_good.jpg")
    for url in (f"{base}/部品 1.jpg?cam=2 b", f"{base}/gzip.jpg", f"{base}/camera/snap.jpg".replace("//", "//admin:s3cr%40t@", 1)):
        ((name, source),) = expand_inputs(url)
        assert np.array_equal(load_input(name, source), expected), url
    assert seen[0][0] == "/%E9%83%A8%E5%93%81%201.jpg?cam=2%20b"  # percent-encoded as a browser sends it
    assert seen[-1][1] == "Basic " + base64.b64encode(b"admin:s3cr@t").decode()  # credentials as basic authentication
    assert name == f"{base}/camera/snap.jpg".replace("//", "//admin:***@", 1)  # the password never printed or saved
    short = f"{base}/short.jpg"
    with pytest.raises(FlawscopeError, match=rf"{short}: download incomplete \(got {len(image) // 2} of {len(image)} bytes\)"):
        load_input(short, short)


def test_a_directory_follows_linked_folders_once(tmp_path) -> None:
    """A linked sub-folder was skipped with --recursive (its images never inspected) while a ** glob
    followed it; a link back up the tree is not followed round."""
    image = (DEMO / "hazelnut_good.jpg").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.jpg").write_bytes(image)
    top = tmp_path / "top"
    top.mkdir()
    (top / "b.jpg").write_bytes(image)
    (top / "linked").symlink_to(elsewhere)
    (elsewhere / "loop").symlink_to(top)
    found = [name for name, _ in expand_inputs(str(top), recursive=True)]
    assert found == [str(top / "b.jpg"), str(top / "linked/a.jpg")]


def test_a_pipe_is_named_as_what_it_is(tmp_path) -> None:
    fifo = tmp_path / "camera.fifo"
    os.mkfifo(fifo)
    assert _names(expand_inputs(str(fifo))) == [
        (str(fifo), f"{fifo}: not a regular file (a pipe or a device): save the image to a file")]
