"""Resizer and normalize: the geometry to the model input and back, and the input scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flawscope.data.transforms import Resizer, normalize


def test_resize_stretches_to_square():
    image = np.full((20, 40, 3), (10, 200, 30), dtype=np.uint8)
    out = Resizer(16).to_input(image)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and out.flags.writeable
    assert (out == (10, 200, 30)).all()


def test_letterbox_keeps_aspect_ratio_and_pads_black():
    out = Resizer(32, "letterbox").to_input(np.full((20, 40, 3), 255, dtype=np.uint8))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[8:24] == 255).all()  # 40x20 -> 32x16, centred vertically
    assert (out[:8] == 0).all() and (out[24:] == 0).all()


def test_mask_to_input_stays_binary():
    mask = np.zeros((20, 40), dtype=bool)
    mask[:, 20:] = True
    out = Resizer(32, "letterbox").mask_to_input(mask)
    assert out.shape == (32, 32) and out.dtype == bool
    assert out[8:24, 16:].all() and not out[8:24, :16].any() and not out[:8].any()


@pytest.mark.parametrize("mode", ["resize", "letterbox"])
@pytest.mark.parametrize(("width", "height"), [(40, 20), (23, 37)])
def test_letterbox_round_trip_to_original(mode, width, height):
    resizer = Resizer(32, mode)
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    amap = resizer.to_input(image)[..., 0].astype(np.float32) / 255  # 1 on the image, 0 on padding
    if mode == "letterbox":
        assert amap.min() == 0  # there is padding to crop off
    out = resizer.to_original(amap, (width, height))
    assert out.shape == (height, width) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_to_original_keeps_float_precision():
    amap = np.full((8, 8), 0.123456, dtype=np.float32)
    out = Resizer(8).to_original(amap, (5, 13))
    assert out.shape == (13, 5)
    np.testing.assert_allclose(out, 0.123456, rtol=1e-6)


def test_to_original_averages_when_shrinking_and_interpolates_when_enlarging():
    lines = np.tile(np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32), (16, 4))  # a line every 4th column
    shrunk = Resizer(16).to_original(lines, (4, 16))  # 4 columns from 16: each averages its 4
    assert (shrunk > 0.15).all() and (shrunk < 0.3).all()  # bilinear sampling alone misses every line: 0
    ramp = np.tile(np.arange(16, dtype=np.float32), (16, 1))
    enlarged = Resizer(16).to_original(ramp, (32, 16))
    expected = torch.nn.functional.interpolate(torch.from_numpy(ramp)[None, None], size=(16, 32), mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(enlarged, expected, atol=1e-6)


def test_to_original_rejects_wrong_map_size():
    with pytest.raises(ValueError, match="8x8"):
        Resizer(8).to_original(np.zeros((4, 4), dtype=np.float32), (4, 4))


@pytest.mark.parametrize(("size", "mode"), [(32, "crop"), (0, "resize")])
def test_bad_arguments(size, mode):
    with pytest.raises(ValueError):
        Resizer(size, mode)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_normalize(as_tensor):
    batch = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    batch[1] = 255
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    out = normalize(torch.from_numpy(batch) if as_tensor else batch, mean, std)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)  # the fast layout for the backbones
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-1.0, -1.0, 0.0]))
    torch.testing.assert_close(out[1, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))


def test_normalize_rejects_float_batch():
    with pytest.raises(ValueError, match="uint8"):
        normalize(np.zeros((1, 4, 4, 3), dtype=np.float32), (0, 0, 0), (1, 1, 1))
