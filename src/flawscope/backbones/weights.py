"""Backbone weight files: read without unpickling arbitrary objects, fitted to the layers a backbone built."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from flawscope.errors import FlawscopeError, first_line


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or from a ``.pth`` file of plain tensors, read
    with ``weights_only=True`` (PyTorch's loader that refuses anything but tensors and containers)."""
    path = Path(path)
    if not path.is_file():
        raise FlawscopeError(f"{path}: backbone weights file not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FlawscopeError(f"{path}: not a weights file that loads safely ({first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FlawscopeError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``model``'s tensors from a whole network's ``state``, ignoring the layers it did not build.

    BatchNorm's ``num_batches_tracked`` counters may be absent (older files): they do not affect
    the features.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise FlawscopeError(f"{source}: lacks {len(missing)} of the backbone's tensors, e.g. {missing[0]} "
                             "(weights of another architecture?)")
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if wrong:
        raise FlawscopeError(f"{source}: {wrong[0]} is {tuple(state[wrong[0]].shape)}, the backbone's is "
                             f"{tuple(own[wrong[0]].shape)} (weights of another architecture?)")
    model.load_state_dict({k: state.get(k, own[k]) for k in own})
    return model


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the convolution before it (exact up to rounding)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight = nn.Parameter((conv.weight * scale.view(-1, 1, 1, 1)).detach(), requires_grad=False)
    conv.bias = nn.Parameter(bias.detach(), requires_grad=False)
