"""STFPM: Student-Teacher Feature Pyramid Matching (Wang et al., BMVC 2021).

A frozen ImageNet-pretrained teacher and a randomly initialised student of the same architecture
see the same normal images; the student learns to reproduce the teacher's feature pyramid. On a
defect the student, never having seen one, disagrees with the teacher: the per-pixel distance of
their channel-normalised features is the anomaly map.

With ``global_score``, the image score also asks whether the image as a whole resembles a training
image (``flawscope.models.image_bank``, as PatchCore does), from the teacher's features: on
textures the student's maximum misjudges images whose every spot looks normal. The student's own
score is measured against its scores of good images held out of its training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flawscope.backbones import create_backbone
from flawscope.models.common import GaussianBlur
from flawscope.models.image_bank import ImageBankScore


def feature_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Half the squared distance of channel-L2-normalised features, Bx1xHxW, in [0, 2]."""
    t = F.normalize(teacher, dim=1)
    s = F.normalize(student, dim=1)
    return 0.5 * (t - s).pow(2).sum(dim=1, keepdim=True)


def stfpm_loss(teacher_feats: list[torch.Tensor], student_feats: list[torch.Tensor],
               hard_fraction: float | None = None) -> torch.Tensor:
    """Sum over pyramid levels of the mean feature distance (the paper's loss).

    With ``hard_fraction``, each level's mean is over its hardest fraction of positions in the
    batch only (EfficientAD's hard feature loss, Batzner et al., WACV 2024): the student stops
    refining what it already matches and learns the spots of normal images it still misses, which
    are what make good textures score high (docs/benchmarks.md).
    """
    means = []
    for t, s in zip(teacher_feats, student_feats):
        d = feature_distance(t, s).flatten()
        if hard_fraction is not None:
            d = d.topk(max(1, int(len(d) * hard_fraction))).values
        means.append(d.mean())
    return torch.stack(means).sum()


class STFPM(ImageBankScore, nn.Module):
    """Normalised image batch Bx3xSxS in, raw anomaly map Bx1xSxS out.

    The paper taps ResNet18 at strides 4/8/16; on EfficientNet-Lite0, whose early stages are much
    narrower, strides 8/16/32 are the comparable depth and the better default (docs/benchmarks.md).
    With ``global_score`` (whose ``global_strides`` must be among ``strides``), the
    ``ImageBankScore`` buffers are in ``state_dict``: ``reference_scores`` are the student's scores
    of held-out good images. Without it there are none, as in models saved before it.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", strides: tuple[int, ...] = (8, 16, 32),
                 map_combine: str = "product", smooth_sigma: float = 4.0, score_levels: int | None = None,
                 global_score: bool = False, global_grid: int = 1, global_strides: tuple[int, ...] = (32,),
                 pretrained: bool = True) -> None:
        super().__init__()
        if map_combine not in ("product", "sum"):
            raise ValueError(f"map_combine must be 'product' or 'sum', not {map_combine!r}")
        if score_levels is not None and score_levels < 1:
            raise ValueError(f"score_levels must be null or >= 1, not {score_levels}")
        if global_score and not set(global_strides) <= set(strides):
            raise ValueError(f"global_strides {list(global_strides)} must be among the strides {list(strides)}")
        self._image_bank_settings(global_score, global_grid, global_strides)
        # sorted, as the backbone returns its levels: ``strides.index`` and the deepest levels agree with them
        self.backbone, self.strides = backbone, tuple(sorted(strides))
        self.map_combine, self.smooth_sigma = map_combine, float(smooth_sigma)
        # None: all levels (also when fewer than score_levels are configured)
        self.score_levels = None if score_levels is None or score_levels >= len(self.strides) else int(score_levels)
        self.teacher = create_backbone(backbone, self.strides, pretrained=pretrained).eval()
        self.teacher.requires_grad_(False)
        self.student = create_backbone(backbone, self.strides, pretrained=False)
        self.blur = GaussianBlur(smooth_sigma)
        if self.global_score:
            self._init_image_bank([self.teacher.out_channels[self.strides.index(s)] for s in self.global_strides])

    def config(self) -> dict:
        return {"backbone": self.backbone, "strides": list(self.strides), "map_combine": self.map_combine,
                "smooth_sigma": self.smooth_sigma, "score_levels": self.score_levels,
                "global_score": self.global_score, "global_grid": self.global_grid,
                "global_strides": list(self.global_strides)}

    def train(self, mode: bool = True) -> "STFPM":
        """The teacher stays in eval mode: its BatchNorm statistics are ImageNet's."""
        super().train(mode)
        self.teacher.eval()
        return self

    def level_maps(self, teacher_feats: list[torch.Tensor], student_feats: list[torch.Tensor],
                   size: tuple[int, int]) -> list[torch.Tensor]:
        """Each level's feature distance upsampled to ``size``, shallowest first."""
        return [F.interpolate(feature_distance(t, s), size=size, mode="bilinear", align_corners=False)
                for t, s in zip(teacher_feats, student_feats)]

    def combine(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """The levels' product (or sum), smoothed."""
        amap = levels[0]
        for level in levels[1:]:
            amap = amap * level if self.map_combine == "product" else amap + level
        return self.blur(amap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.level_maps(self.teacher(x), self.student(x), x.shape[-2:]))

    def map_and_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Bx1xSxS raw anomaly map, B image scores).

        The score is the maximum of the smoothed map of the deepest ``score_levels`` levels (all of
        them by default: the map's own maximum, as in the paper and PaddleX). On textures the
        shallowest level's distances are high somewhere on good images too; leaving it out of the
        image score but not of the map judges images better at no cost to localisation
        (docs/benchmarks.md). With ``global_score`` and a fitted image bank, that score is
        combined with the image descriptors' (``combined_score``).
        """
        teacher = self.teacher(x)
        levels = self.level_maps(teacher, self.student(x), x.shape[-2:])
        amap = self.combine(levels)
        score = self.image_score(levels, amap)
        if self.global_score:
            score = self.combined_score(score, self.teacher_descriptors(teacher))
        return amap, score

    def teacher_descriptors(self, teacher_feats: list[torch.Tensor]) -> torch.Tensor:
        """The image descriptors (``ImageBankScore.descriptors``) of the teacher's features."""
        return self.descriptors([teacher_feats[self.strides.index(s)] for s in self.global_strides])

    def image_score(self, levels: list[torch.Tensor], amap: torch.Tensor) -> torch.Tensor:
        """``map_and_score``'s B scores from its ``level_maps`` and their combined map."""
        scored = amap if self.score_levels is None else self.combine(levels[-self.score_levels:])
        return scored.flatten(1).amax(1)
