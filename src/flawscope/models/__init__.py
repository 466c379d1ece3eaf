"""The anomaly models, by the name used in ``Global.model``."""

from __future__ import annotations

from torch import nn

from flawscope.errors import FlawscopeError
from flawscope.models.patchcore import PatchCore
from flawscope.models.stfpm import STFPM

MODELS: dict[str, type[nn.Module]] = {"STFPM": STFPM, "PatchCore": PatchCore}


def build_model(name: str, config: dict, pretrained: bool = True) -> nn.Module:
    """Instantiate model ``name`` from the ``config()`` dict it saved (or the Model section)."""
    if name not in MODELS:
        raise FlawscopeError(f"Global.model: unknown model '{name}'; available: {', '.join(MODELS)}")
    try:
        return MODELS[name](**config, pretrained=pretrained)
    except ValueError as exc:  # a setting this machine cannot honour, e.g. approximate search without faiss
        raise FlawscopeError(f"Model: {exc}") from None
