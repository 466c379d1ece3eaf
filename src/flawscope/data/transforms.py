"""Mapping images to the square model input and anomaly maps back to the original image.

The model sees SxS images; users want anomaly maps and outlines at their image's own size.
``Resizer`` holds the one geometry both directions share, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESIZE_MODES = ("resize", "letterbox")


class Resizer:
    """Image -> SxS model input, and SxS anomaly map -> original image size.

    ``mode="resize"`` stretches to SxS (what most anomaly models are trained with);
    ``mode="letterbox"`` keeps the aspect ratio, scales the long side to S and pads the rest
    with black, centred, so elongated parts are not distorted.
    """

    def __init__(self, size: int, mode: str = "resize") -> None:
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, not {mode!r}")
        if size < 1:
            raise ValueError(f"input size must be positive, not {size}")
        self.size = size
        self.mode = mode

    def _placement(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Where an image of ``width`` x ``height`` lands in the SxS input: left, top, w, h."""
        if self.mode == "resize":
            return 0, 0, self.size, self.size
        scale = self.size / max(width, height)
        new_w = max(1, round(width * scale))
        new_h = max(1, round(height * scale))
        return (self.size - new_w) // 2, (self.size - new_h) // 2, new_w, new_h

    def _place(self, img: Image.Image, resample: Image.Resampling) -> Image.Image:
        left, top, new_w, new_h = self._placement(*img.size)
        resized = img.resize((new_w, new_h), resample)
        if (new_w, new_h) == (self.size, self.size):
            return resized
        canvas = Image.new(img.mode, (self.size, self.size))  # zeros: black / not defect
        canvas.paste(resized, (left, top))
        return canvas

    def to_input(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> SxSx3 uint8; Pillow's bilinear filter widens when shrinking (area-like)."""
        return np.array(self._place(Image.fromarray(image), Image.Resampling.BILINEAR))

    def mask_to_input(self, mask: np.ndarray) -> np.ndarray:
        """HxW bool -> SxS bool, nearest neighbour so the mask stays binary."""
        img = Image.fromarray(mask.astype(np.uint8))
        return np.asarray(self._place(img, Image.Resampling.NEAREST)) != 0

    def to_original(self, amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """SxS float anomaly map -> HxW float32 for an original image of ``size`` (width, height).

        The letterbox padding is cropped off first, so the map is stretched only over the part
        that shows the image; resizing is bilinear in float32, keeping the scores' precision.
        """
        if amap.shape != (self.size, self.size):
            raise ValueError(f"anomaly map must be {self.size}x{self.size}, not {amap.shape}")
        width, height = size
        left, top, new_w, new_h = self._placement(width, height)
        crop = np.ascontiguousarray(amap[top : top + new_h, left : left + new_w], dtype=np.float32)
        out = F.interpolate(  # antialiasing changes only shrinking, and costs 50% more time
            torch.from_numpy(crop)[None, None], size=(height, width), mode="bilinear",
            align_corners=False, antialias=height < new_h or width < new_w,
        )
        return out[0, 0].numpy()


def normalize(
    batch_uint8: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """NxSxSx3 uint8 -> Nx3xSxS float32 ``(x / 255 - mean) / std``, on the batch's device.

    Normalising after batching (possibly on the GPU) keeps the data pipeline in uint8,
    a quarter of the memory and transfer of float32. The result is stored channels-last (NHWC),
    the layout in which the backbones' depthwise convolutions run fastest on CPU.
    """
    batch = torch.as_tensor(batch_uint8)
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected an NxHxWx3 uint8 batch, got {tuple(batch.shape)} {batch.dtype}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    x = (batch.permute(0, 3, 1, 2).float() / 255.0 - mean_t) / std_t
    return x.contiguous(memory_format=torch.channels_last)
