"""Backbone weight files: read without unpickling arbitrary objects, fitted to the layers a backbone built."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from flawscope.data.io import PADDLE_SUFFIXES, check_local
from flawscope.errors import FlawscopeError, first_line


def reason(exc: BaseException) -> str:
    """``first_line`` of ``exc``, after its type when that line is only a number (a ``KeyError``
    of torch's loader on a damaged file says ``174812789``)."""
    line = first_line(exc)
    return f"{type(exc).__name__} {line}" if line.isdigit() else line


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does (an 8-byte little-endian header length,
    then the JSON header), whatever its name says."""
    with path.open("rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") > 1


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file (told by its header, not its name), or from a PyTorch
    file of plain tensors, read with ``weights_only=True`` only (PyTorch's loader that refuses
    anything but tensors and containers)."""
    check_local(path, "a backbone weights file")
    path = Path(path)
    if path.suffix.lower() in PADDLE_SUFFIXES:
        raise FlawscopeError(f"{path}: Paddle weights, which flawscope cannot read: give the backbone's PyTorch or "
                             "safetensors weights (null: its ImageNet weights)")
    if path.is_dir():
        raise FlawscopeError(f"{path}: a folder, not a backbone weights file")
    if not path.is_file():
        raise FlawscopeError(f"{path}: backbone weights file not found")
    try:
        if path.suffix.lower() == ".safetensors" or is_safetensors(path):
            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch's own advice on pickle protocols: not the user's to act on
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text advises weights_only=False: unsafe, and not ours to give
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = (f"holds Python objects besides tensors, e.g. {found.group(1)}" if found
                else "neither safetensors nor a PyTorch file of plain tensors")
        raise FlawscopeError(f"{path}: not a weights file that loads safely ({what}: refused, not unpickled)") from None
    except Exception as exc:
        raise FlawscopeError(f"{path}: not a weights file that loads safely ({reason(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FlawscopeError(f"{path}: not a state dict (a mapping of names to tensors)")
    check_finite(state, path)
    return state


def check_finite(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse NaN or infinite weights now, rather than NaN features after training has begun."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FlawscopeError(f"{source}: {name} holds NaN or infinite values (a damaged file?)")


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str, whole: nn.Module) -> nn.Module:
    """Load ``model``'s tensors from a whole network's ``state``; ``whole`` is that network as the
    architecture builds it (on the meta device: names and shapes only).

    Tensors of stages or heads ``model`` did not build are ignored (a fine-tuned head may have
    other classes), as are those of modules the architecture has none of. A tensor the
    architecture lacks under a module it has (ResNet34's third block of ``layer1`` in a ResNet18
    file), or one of another shape under a module ``model`` built (Lite2's ``_blocks.3`` for a
    Lite0 tapped at stride 4, which builds blocks 0-2 of the list), is another architecture's.
    BatchNorm's ``num_batches_tracked`` counters may be absent (older files): they do not affect
    the features.
    """
    own, full = model.state_dict(), whole.state_dict()
    built = {name for name, _ in model.named_children()}
    known = {name for name, _ in whole.named_children()}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise FlawscopeError(f"{source}: lacks {len(missing)} of the backbone's tensors, e.g. {missing[0]} "
                             "(weights of another architecture?)")
    wrong = [k for k in state if k in full and k.split(".")[0] in built and state[k].shape != full[k].shape]
    if wrong:
        raise FlawscopeError(f"{source}: {wrong[0]} is {tuple(state[wrong[0]].shape)}, the backbone's is "
                             f"{tuple(full[wrong[0]].shape)} (weights of another architecture?)")
    unknown = [k for k in state if k not in full and k.split(".")[0] in known]
    if unknown:
        raise FlawscopeError(f"{source}: holds {unknown[0]}, which the backbone does not have "
                             "(weights of another architecture?)")
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
