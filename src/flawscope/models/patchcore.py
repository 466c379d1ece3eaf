"""PatchCore: nearest-neighbour search in a memory bank of normal patch features (Roth et al., CVPR 2022).

A frozen ImageNet backbone describes every patch of an image by its locally aggregated mid-level
features. The memory bank holds a coreset of the patch features of the normal training images; a
test patch's anomaly score is its distance to the nearest bank entry. Nothing is trained: fitting
(``flawscope.training.patchcore_fit``) only fills the bank.

With ``global_score``, the image score also asks whether the image *as a whole* resembles a
training image (``flawscope.models.image_bank``); the patch score's reference is the training
images' leave-one-out patch scores.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flawscope.backbones import create_backbone
from flawscope.models.common import GaussianBlur
from flawscope.models.image_bank import ImageBankScore
from flawscope.models.knn import check_search, nearest_neighbors, nearest_others, search_once


class PatchCore(ImageBankScore, nn.Module):
    """Normalised image batch Bx3xSxS in, raw anomaly map Bx1xSxS out (patch distances to the bank).

    The image score is the paper's reweighted nearest-neighbour distance of the most anomalous
    patch (with ``global_score``, combined with the global distances), not the max of the
    (smoothed) map: use ``map_and_score``.

    Buffers (all in ``state_dict``, sized on load): ``memory_bank`` KxC (values rounded to
    float16 and saved as float16, so a saved model scores exactly like the fitted one),
    ``projection`` CxP (the random projection the coreset was selected in) and
    ``coverage_radius`` (the largest projected distance of a training patch to the bank), the
    latter two for ``add_normals``. With ``global_score``: ``ImageBankScore``'s, whose
    ``reference_scores`` are leave-one-out patch scores of training images.
    ``bank_neighbors``: each bank entry's ``num_neighbors - 1`` nearest other entries, which the
    image score weighs (found when the bank is set; models saved before it find them when loaded).
    """

    _SIZED_ON_LOAD = ("memory_bank", "projection", "bank_neighbors")  # and ImageBankScore's

    def __init__(self, backbone: str = "efficientnet_lite0", strides: tuple[int, ...] = (8, 16),
                 feature_dim: int | None = None, num_neighbors: int = 9, smooth_sigma: float = 4.0,
                 search: str = "exact", search_nprobe: int = 8, global_score: bool = False,
                 global_grid: int = 1, global_strides: tuple[int, ...] = (32,), pretrained: bool = True) -> None:
        super().__init__()
        if len(strides) < 1:
            raise ValueError("PatchCore needs at least one backbone stride")
        if num_neighbors < 1:
            raise ValueError(f"num_neighbors must be >= 1, not {num_neighbors}")
        if not global_strides or not set(global_strides) <= {8, 16, 32}:
            raise ValueError(f"global_strides must be some of 8, 16 and 32, not {list(global_strides)}")
        check_search(search)
        self.search, self.search_nprobe = search, int(search_nprobe)
        self.backbone, self.strides = backbone, tuple(sorted(strides))
        self.feature_dim = None if feature_dim is None else int(feature_dim)
        self.num_neighbors, self.smooth_sigma = int(num_neighbors), float(smooth_sigma)
        self._image_bank_settings(global_score, global_grid, global_strides)
        levels = sorted(set(self.strides) | (set(self.global_strides) if self.global_score else set()))
        self.extractor = create_backbone(backbone, tuple(levels), pretrained=pretrained).eval()
        self.extractor.requires_grad_(False)
        self._patch_levels = [levels.index(s) for s in self.strides]
        self._global_levels = [levels.index(s) for s in self.global_strides] if self.global_score else []
        channels = sum(self.extractor.out_channels[i] for i in self._patch_levels)
        if self.feature_dim is not None and not 1 <= self.feature_dim <= channels:  # more would repeat channels
            raise ValueError(f"feature_dim must be from 1 to the {channels} channels of strides {list(self.strides)}, "
                             f"not {self.feature_dim}")
        self.embed_dim = self.feature_dim or channels
        if self.feature_dim is not None:  # a constant, so that the ONNX export sees a matrix product
            self.register_buffer("channel_pool", _channel_pool(channels, self.feature_dim), persistent=False)
        self.blur = GaussianBlur(smooth_sigma)
        self.register_buffer("memory_bank", torch.empty(0, self.embed_dim))
        self.register_buffer("projection", torch.empty(self.embed_dim, 0))
        self.register_buffer("coverage_radius", torch.zeros(()))
        self.register_buffer("bank_neighbors", torch.empty(0, 0, dtype=torch.long))
        self._init_image_bank([self.extractor.out_channels[i] for i in self._global_levels])

    def config(self) -> dict:
        return {"backbone": self.backbone, "strides": list(self.strides), "feature_dim": self.feature_dim,
                "num_neighbors": self.num_neighbors, "smooth_sigma": self.smooth_sigma,
                "search": self.search, "search_nprobe": self.search_nprobe, "global_score": self.global_score,
                "global_grid": self.global_grid, "global_strides": list(self.global_strides)}

    def train(self, mode: bool = True) -> "PatchCore":
        """The extractor stays in eval mode: its BatchNorm statistics are ImageNet's."""
        super().train(mode)
        self.extractor.eval()
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features BxCxhxw at the finest stride's resolution."""
        return self.features(x)[0]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(patch features BxCxhxw, image descriptors (B x sum of ``descriptor_widths``) or None
        without ``global_score``).

        Each patch level is averaged over its 3x3 neighbourhood (context without losing
        resolution), deeper levels are upsampled to the finest one and all are concatenated; with
        ``feature_dim``, channels are average-pooled down to it, as the paper does.
        """
        levels = self.extractor(x)
        descriptor = self.descriptors([levels[i] for i in self._global_levels]) if self.global_score else None
        feats = [F.avg_pool2d(levels[i], 3, stride=1, padding=1) for i in self._patch_levels]
        size = feats[0].shape[-2:]
        emb = torch.cat([feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                      for f in feats[1:]], dim=1)
        if self.feature_dim is not None:
            emb = (emb.permute(0, 2, 3, 1) @ self.channel_pool).permute(0, 3, 1, 2)
        return emb, descriptor

    @staticmethod
    def patch_rows(emb: torch.Tensor) -> torch.Tensor:
        """BxCxhxw -> (B*h*w)xC, one row per patch, image-major: the layout of the bank."""
        return emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])

    def set_memory_bank(self, bank: torch.Tensor, projection: torch.Tensor, coverage_radius: float) -> None:
        """Install a fitted bank, rounded to float16 values so that saving it as float16 loses nothing."""
        self._check_memory_bank(bank)
        device = self.coverage_radius.device
        self.drop_indexes()
        self.memory_bank = bank.to(device, torch.float16).float()
        self.projection = projection.to(device, torch.float32)
        self.coverage_radius = torch.tensor(float(coverage_radius), device=device)
        self.bank_neighbors = self._bank_neighbors(self.memory_bank)

    def _check_memory_bank(self, bank: torch.Tensor) -> None:
        if bank.ndim != 2 or bank.shape[1] != self.embed_dim:
            raise ValueError(f"memory bank must be Kx{self.embed_dim}, not {tuple(bank.shape)}")

    def _neighbor_count(self, bank_size: int) -> int:
        """The neighbours ``bank_neighbors`` keeps of each entry: ``num_neighbors - 1``, fewer in a smaller bank."""
        return max(min(self.num_neighbors, bank_size) - 1, 0)

    def _bank_neighbors(self, bank: torch.Tensor) -> torch.Tensor:
        """Each entry's neighbourhood in ``bank``, found once with the bank rather than by a pass
        over the whole bank for every image (0.6 of 0.7 ms of the image score with a 10k bank, and
        a TopK over the bank in an export). It costs O(bank²) once: 0.2 s for 10k entries."""
        return nearest_others(bank, self._neighbor_count(len(bank)))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:  # the buffers themselves with it, as ImageBankScore's image bank
            destination[prefix + "memory_bank"] = destination[prefix + "memory_bank"].half()
            destination[prefix + "bank_neighbors"] = destination[prefix + "bank_neighbors"].int()  # half the bytes

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        """The bank's size is only known after fitting: take the saved tensors' shapes, and refuse
        banks this model cannot search (so a damaged file fails on loading, not on the first image).
        ``bank_neighbors`` are found now where a model lacks them (saved before them, as BatchNorm
        adds a missing counter) or keeps another number of them (``num_neighbors`` edited in
        ``inference.yml``). A model saved before the image-level score (none of its buffers) scores
        with the patches alone, as one with an empty image bank does."""
        if not self.global_score and not any(prefix + name in state_dict for name in self._BUFFERS):
            state_dict.update({prefix + name: value for name, value in self._unfitted_image_bank().items()})
        bank = state_dict.get(prefix + "memory_bank")
        if bank is not None:
            self._check_memory_bank(bank)
            if len(bank) == 0:
                raise ValueError("its memory bank is empty: never fitted, or damaged")
            neighbors = state_dict.get(prefix + "bank_neighbors")
            count = self._neighbor_count(len(bank))
            one_per_entry = neighbors is not None and neighbors.ndim == 2 and len(neighbors) == len(bank)
            if neighbors is None or (one_per_entry and neighbors.shape[1] != count):  # num_neighbors edited
                state_dict[prefix + "bank_neighbors"] = self._bank_neighbors(bank.float())
            elif neighbors.shape != (len(bank), count):
                raise ValueError(f"bank_neighbors are {tuple(neighbors.shape)}, not {len(bank)}x{count} as for a "
                                 f"memory bank of {len(bank)} entries")
            elif count and not bool(((neighbors >= 0) & (neighbors < len(bank))).all()):
                raise ValueError(f"bank_neighbors hold indices from {int(neighbors.min())} to {int(neighbors.max())}, "
                                 f"outside the {len(bank)} entries of the memory bank")
        self._size_on_load(state_dict, prefix, self._SIZED_ON_LOAD)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def patch_scores(self, emb: torch.Tensor, bank: torch.Tensor | None = None) -> torch.Tensor:
        """Bxhxw distances of the patches of ``embed``'s output to their nearest bank entries.
        ``bank``: search this one (exactly) instead of the memory bank."""
        if len(self.memory_bank) == 0:
            raise RuntimeError("PatchCore has an empty memory bank: fit it first")
        b, _, h, w = emb.shape
        rows = self.patch_rows(emb)
        if bank is None:
            dist = self._nearest(rows, "patches", self.memory_bank, self.search)[0]
        else:
            dist = search_once(rows, bank, with_indices=False)[0]
        return dist.view(b, h, w)

    def image_score(self, emb: torch.Tensor, scores: torch.Tensor, bank: torch.Tensor | None = None) -> torch.Tensor:
        """The paper's image score: the largest patch distance s*, damped when its nearest bank
        entry m* sits in a dense region of the bank, i.e. when the test patch is about as far
        from m*'s neighbours as from m* itself (weight ``1 - softmax(distances to N_b(m*))[m*]``).

        m* is searched again (exactly) for the one worst patch of each image rather than kept for
        every patch: the same entry, at a thousandth of the arg-min's cost. N_b(m*) comes from
        ``bank_neighbors``; for another ``bank`` it is searched.
        """
        s_star, worst = scores.flatten(1).max(1)
        b = min(self.num_neighbors, len(self.memory_bank if bank is None else bank))
        if b == 1:
            return s_star
        batch = torch.arange(len(scores), device=scores.device)
        patch = emb.flatten(2)[batch, :, worst]  # B x C
        if bank is None:
            bank = self.memory_bank
            m_star = self._nearest(patch, "patches", bank, "exact", with_indices=True)[1]
            neighbors = self.bank_neighbors[m_star]
        else:
            m_star = nearest_neighbors(patch, bank)[1]
            neighbors = nearest_others(bank, b - 1, m_star)
        support = torch.cat([m_star[:, None], neighbors], 1)  # m*, N_b(m*)
        dists = torch.cdist(patch.unsqueeze(1), bank[support]).squeeze(1)  # B x b
        return (1 - torch.softmax(dists, dim=1)[:, 0]) * s_star

    def anomaly_map(self, scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Patch distances upsampled to the input size and smoothed: Bx1xSxS."""
        return self.blur.upsampled(scores.unsqueeze(1), size)

    def map_and_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Bx1xSxS raw anomaly map, B image scores): what prediction and calibration should use."""
        emb, descriptor = self.features(x)
        return self.score_features(emb, descriptor, x.shape[-2:])

    def score_features(self, emb: torch.Tensor, descriptor: torch.Tensor | None,
                       size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``map_and_score`` after the backbone, from ``features``' output: PatchCore's own cost,
        which the benchmarks time apart from the backbone's."""
        scores = self.patch_scores(emb)
        return self.anomaly_map(scores, size), self.combined_score(self.image_score(emb, scores), descriptor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.anomaly_map(self.patch_scores(self.embed(x)), x.shape[-2:])


def _channel_pool(channels: int, size: int) -> torch.Tensor:
    """channels x size: ``F.adaptive_avg_pool1d`` over the channels as a matrix (output i averages
    channels floor(i*C/D) to ceil((i+1)*C/D)), which the ONNX exporter cannot take from traced shapes."""
    pool = np.zeros((channels, size), dtype=np.float32)
    for i in range(size):
        start, end = i * channels // size, -(-(i + 1) * channels // size)
        pool[start:end, i] = 1 / (end - start)
    return torch.from_numpy(pool)
