"""STFPM: Student-Teacher Feature Pyramid Matching (Wang et al., BMVC 2021).

A frozen ImageNet-pretrained teacher and a randomly initialised student of the same architecture
see the same normal images; the student learns to reproduce the teacher's feature pyramid. On a
defect the student, never having seen one, disagrees with the teacher: the per-pixel distance of
their channel-normalised features is the anomaly map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flawscope.backbones import create_backbone
from flawscope.models.common import GaussianBlur


def feature_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Half the squared distance of channel-L2-normalised features, Bx1xHxW, in [0, 2]."""
    t = F.normalize(teacher, dim=1)
    s = F.normalize(student, dim=1)
    return 0.5 * (t - s).pow(2).sum(dim=1, keepdim=True)


def stfpm_loss(teacher_feats: list[torch.Tensor], student_feats: list[torch.Tensor]) -> torch.Tensor:
    """Sum over pyramid levels of the mean feature distance (the paper's loss)."""
    return sum(feature_distance(t, s).mean() for t, s in zip(teacher_feats, student_feats))


class STFPM(nn.Module):
    """Normalised image batch Bx3xSxS in, raw anomaly map Bx1xSxS out.

    The paper taps ResNet18 at strides 4/8/16; on EfficientNet-Lite0, whose early stages are much
    narrower, strides 8/16/32 are the comparable depth and the better default (docs/benchmarks.md).
    """

    def __init__(self, backbone: str = "efficientnet_lite0", strides: tuple[int, ...] = (8, 16, 32),
                 map_combine: str = "product", smooth_sigma: float = 4.0, pretrained: bool = True) -> None:
        super().__init__()
        if map_combine not in ("product", "sum"):
            raise ValueError(f"map_combine must be 'product' or 'sum', not {map_combine!r}")
        self.backbone, self.strides = backbone, tuple(strides)
        self.map_combine, self.smooth_sigma = map_combine, float(smooth_sigma)
        self.teacher = create_backbone(backbone, self.strides, pretrained=pretrained).eval()
        self.teacher.requires_grad_(False)
        self.student = create_backbone(backbone, self.strides, pretrained=False)
        self.blur = GaussianBlur(smooth_sigma)

    def config(self) -> dict:
        return {"backbone": self.backbone, "strides": list(self.strides),
                "map_combine": self.map_combine, "smooth_sigma": self.smooth_sigma}

    def train(self, mode: bool = True) -> "STFPM":
        """The teacher stays in eval mode: its BatchNorm statistics are ImageNet's."""
        super().train(mode)
        self.teacher.eval()
        return self

    def anomaly_map(self, teacher_feats: list[torch.Tensor], student_feats: list[torch.Tensor],
                    size: tuple[int, int]) -> torch.Tensor:
        amap = None
        for t, s in zip(teacher_feats, student_feats):
            level = F.interpolate(feature_distance(t, s), size=size, mode="bilinear", align_corners=False)
            if amap is None:
                amap = level
            elif self.map_combine == "product":
                amap = amap * level
            else:
                amap = amap + level
        return self.blur(amap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.anomaly_map(self.teacher(x), self.student(x), x.shape[-2:])

    def map_and_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Bx1xSxS raw anomaly map, B image scores): the score is the smoothed map's maximum."""
        amap = self(x)
        return amap, amap.flatten(1).amax(1)
