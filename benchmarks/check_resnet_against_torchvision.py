"""flawscope's ResNets against torchvision's: same state-dict format, same outputs.

Needs torchvision, which does not install beside this project's torch 2.13.0 CPU wheel, so run it
from a separate environment with flawscope's source on the path, e.g.

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch torchvision safetensors
    /tmp/tv/bin/python benchmarks/check_resnet_against_torchvision.py [--write-fixture]

Each torchvision network gets random weights and random BatchNorm statistics (so that every
tensor matters), is saved as a torchvision weights file and loaded into flawscope's ResNet through
``load_resnet_weights``; the logits and the features at strides 4/8/16/32 must then agree, before
and after folding the BatchNorms. ``--write-fixture`` rewrites the key-and-shape list that the
test suite checks flawscope's modules against without torchvision.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from flawscope.backbones.resnet import URLS, ResNet, load_resnet_weights  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "torchvision_resnet_state_dicts.json"


def tv_features(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    feats = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
        feats.append(x)
    return feats


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-fixture", action="store_true")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    fixture = {}
    for arch in URLS:
        reference = getattr(torchvision.models, arch)(weights=None).eval()
        randomise(reference, gen)
        state = reference.state_dict()
        fixture[arch] = {k: list(v.shape) for k, v in state.items()}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{arch}.pth"
            torch.save(state, path)
            ours = load_resnet_weights(ResNet(classifier=True, arch=arch), path).eval()
            trunk = load_resnet_weights(ResNet((4, 8, 16, 32), arch=arch), path).eval()
        x = torch.randn(2, 3, 160, 128, generator=gen)
        logits, expected = ours(x), reference(x)
        report = {"logits_max_abs_diff": float((logits - expected).abs().max()),
                  "logits_scale": float(expected.abs().max())}
        expected_features = tv_features(reference, x)
        for i, (a, b) in enumerate(zip(trunk(x), expected_features)):
            report[f"stride{4 << i}_max_rel_diff"] = float((a - b).abs().max() / b.abs().max())
        report["fused_max_rel_diff"] = max(float((a - b).abs().max() / b.abs().max())
                                           for a, b in zip(trunk.fuse_batchnorm()(x), expected_features))
        report["same_keys_and_shapes"] = {k: list(v.shape) for k, v in ours.state_dict().items()} == fixture[arch]
        report["torchvision_url"] = getattr(torchvision.models, {"resnet18": "ResNet18_Weights",
                                            "wide_resnet50_2": "Wide_ResNet50_2_Weights"}[arch]).IMAGENET1K_V1.url
        report["flawscope_url"] = URLS[arch]
        print(arch, json.dumps(report, indent=1))
    if args.write_fixture:
        FIXTURE.write_text(json.dumps({"source": f"torchvision {torchvision.__version__} state_dict() key names "
                                       "and shapes, written by benchmarks/check_resnet_against_torchvision.py",
                                       **fixture}, indent=0) + "\n")
        print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
