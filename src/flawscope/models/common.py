"""Small layers shared by the models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GaussianBlur(nn.Module):
    """Separable Gaussian smoothing of a Bx1xHxW map as fixed convolutions (exports to ONNX).

    A sigma of 0 disables it. Kernel radius 4 sigma, reflect padding, as anomalib does.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = float(sigma)
        radius = max(int(math.ceil(4 * self.sigma)), 0)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / max(self.sigma, 1e-6)) ** 2)
        self.register_buffer("kernel", (kernel / kernel.sum()), persistent=False)
        self.radius = radius

    def forward(self, amap: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0:
            return amap
        r = self.radius
        amap = F.conv2d(F.pad(amap, (r, r, 0, 0), mode="reflect"), self.kernel.view(1, 1, 1, -1))
        return F.conv2d(F.pad(amap, (0, 0, r, r), mode="reflect"), self.kernel.view(1, 1, -1, 1))
