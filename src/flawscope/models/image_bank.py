"""The image-level score: does the image *as a whole* resemble a training image?

A local score (PatchCore's nearest patch, STFPM's student-teacher distance) misses defects made
of normal-looking parts: a fibre layer laid at the wrong angle is made of normal fibre patches,
but no training image has that layer. Two descriptors of a frozen backbone's deep features catch
them: their mean over each cell of a grid (what the image shows) and their spread over each cell,
scaled to unit length (how it varies, whatever the exposure: a hairline crack on a tile raises the
spread of a few channels). Each descriptor's distance to the nearest training image's and the
model's own score are put on one scale by their distributions over training images, and the
largest wins. PatchCore and STFPM mix this in, each with its own frozen backbone.

A standard score stands for a tail probability under a normal model, and under that model a
sample of n values only estimates its mean and spread: a new value's standard score follows
Student's t with n-1 degrees of freedom (after a factor sqrt(1 + 1/n)). Each part is read as the
normal deviate of that t tail, so a part measured against few images (STFPM's student: the good
images held out of its training, 9 on a set of 90) counts less than one measured against every
training image, however many deviations it lies above its small sample. (The descriptors'
nearest-neighbour distances are skewed to the right, so their tails stay heavier than normal:
the reading corrects the sample sizes, not the shapes.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flawscope.models.knn import FaissIndex, OneDnnIndex, cpu_index, nearest_neighbors


def grid_splits(side: int, grid: int) -> bool:
    """Whether ``grid`` cells split ``side`` stride-32 features into equal cells of 2 or more: one
    feature a cell has no spread, and the ONNX export needs equal cells. (A finer stride's grid
    splits its map exactly when the stride-32 grid splits the stride-32 map.)"""
    return side % grid == 0 and side // grid >= 2


class ImageBankScore:
    """Mixed into an ``nn.Module`` that sets ``global_grid`` and ``global_strides`` and calls
    ``_init_image_bank``.

    Buffers: ``image_bank`` (the training images' descriptors, float16 values: for each of
    ``global_strides``, finest first, G mean then G spread columns, G = ``descriptor_widths``' entry:
    channels x grid²; PatchCore models saved before the spread have only the stride-32 mean),
    ``reference_scores`` (the model's own scores of training images it was not fitted on) and
    ``score_reference`` (mean and spread of those scores, then of each descriptor's reference
    distances, ``set_image_bank``: what the image score is measured in) and ``reference_counts``
    (how many values each of those was measured on; empty in models saved before it, whose parts
    are read as plain standard scores, as they were calibrated).
    """

    global_score: bool
    global_grid: int
    global_strides: tuple[int, ...]
    search_nprobe: int = 8  # only approximate searches use it (PatchCore's patches)
    _BUFFERS = ("image_bank", "reference_scores", "score_reference", "reference_counts")

    def _image_bank_settings(self, global_score: bool, global_grid: int, global_strides: tuple[int, ...]) -> None:
        """Check and keep the constructor's three image-bank settings."""
        if global_grid < 1:
            raise ValueError(f"global_grid must be >= 1, not {global_grid}")
        self.global_score, self.global_grid = bool(global_score), int(global_grid)
        self.global_strides = tuple(sorted(global_strides))

    def _init_image_bank(self, channels: list[int]) -> None:
        """``channels``: the backbone's at each of ``global_strides``."""
        # CPU indexes over the banks, built on first use
        self._indexes: dict[str, OneDnnIndex | FaissIndex | None] = {}
        self.descriptor_widths = [c * self.grid(s) ** 2 for c, s in zip(channels, self.global_strides)
                                  for _ in ("mean", "spread")]
        for name, value in self._unfitted_image_bank().items():
            self.register_buffer(name, value)

    def _unfitted_image_bank(self) -> dict[str, torch.Tensor]:
        """The image bank's buffers before fitting: an empty bank, which leaves the model's own score alone."""
        return {"image_bank": torch.empty(0, sum(self.descriptor_widths)), "reference_scores": torch.empty(0),
                "score_reference": torch.tensor([0.0, 1.0]), "reference_counts": torch.empty(0)}

    def grid(self, stride: int) -> int:
        """The cells a side of the descriptors at ``stride``: ``global_grid`` at stride 32, finer in
        proportion below it, so that a cell holds as many features at every stride (2x2 with the
        shipped 4x4 grid at stride 32: a cell of 64 pixels at stride 32, of 32 at stride 16)."""
        return self.global_grid * 32 // stride

    def descriptors(self, deep: list[torch.Tensor]) -> torch.Tensor:
        """B x sum(``descriptor_widths``) from the backbone's feature maps at ``global_strides``."""
        return torch.cat([self.describe(level, self.grid(s)) for level, s in zip(deep, self.global_strides)], 1)

    @staticmethod
    def describe(deep: torch.Tensor, g: int) -> torch.Tensor:
        """Bx2G image descriptors from a BxCxhxw feature map: its mean over each cell of a g x g
        grid, then its spread over each cell, at unit length so that exposure does not count. One
        cell (the whole image) judges what the image shows and how much it varies; finer cells
        also where (a misplaced layer) and in which part (a crack changes the spread of one area,
        not of the whole tile)."""
        b, c, h, w = deep.shape
        if not (grid_splits(h, g) and grid_splits(w, g)):
            raise ValueError(f"a grid of {g}x{g} cells does not split the {h}x{w} feature map "
                             "into cells of 2x2 or more")
        cells = deep.reshape(b, c, g, h // g, g, w // g).permute(0, 1, 2, 4, 3, 5).flatten(4)
        return torch.cat([cells.mean(-1).flatten(1), F.normalize(cells.std(-1, correction=0).flatten(1), dim=1)], dim=1)

    def set_image_bank(self, descriptors: torch.Tensor, reference_scores: torch.Tensor,
                       keep: torch.Tensor | None = None) -> None:
        """Install the training images' descriptors and the model's own scores of some training
        images it was not fitted on. ``keep``: the images (rows) the bank holds, all by default.
        Each descriptor's reference is every image's distance to the nearest kept image other than
        itself: a kept image's leave-one-out distance, and for the others what a new normal image
        meets. With fewer than two kept images or two reference scores, or only two images (each
        the other's nearest: one distance, measured twice), there is no spread to measure, and the
        image score stays the model's own. A spread under a thousandth of its mean counts as that
        much: dividing by ~0 would put new good images millions of spreads away. Descriptors are
        rounded to float16 values: a grid's cells make the image bank large (10k values an image
        with Lite0 at 4x4), and saved as float16 it loses nothing.
        """
        device = self.score_reference.device
        self.drop_indexes()
        self.reference_counts = torch.empty(0, device=device)
        descriptors = descriptors.to(device, torch.float16).float()
        reference_scores = reference_scores.to(device).float()
        keep = torch.arange(len(descriptors), device=device) if keep is None else keep.to(device)
        if len(keep) < 2 or len(descriptors) < 3 or len(reference_scores) < 2:
            descriptors, reference_scores = descriptors[:0], reference_scores[:0]
            self.score_reference = torch.tensor([0.0, 1.0], device=device)
        else:
            reference = [reference_scores]
            for part in descriptors.split(self.bank_widths(descriptors.shape[1]), dim=1):
                distances = torch.cdist(part, part[keep])
                distances[keep, torch.arange(len(keep), device=device)] = torch.inf  # not itself
                reference.append(distances.min(1).values)
            self.score_reference = torch.stack([v for r in reference
                                                for v in (r.mean(), torch.maximum(r.std(), 1e-3 * r.mean().abs()).clamp_min(1e-6))])
            self.reference_counts = torch.tensor([float(len(r)) for r in reference], device=device)
            descriptors = descriptors[keep]
        self.image_bank, self.reference_scores = descriptors, reference_scores

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # float16 values already (set_image_bank): half the bytes. Not with keep_vars, which asks for the buffers
        # themselves: the ONNX exporter finds them by identity, and embedded a copy at each use of one it did not find.
        if prefix + "image_bank" in destination and not keep_vars:
            destination[prefix + "image_bank"] = destination[prefix + "image_bank"].half()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        """The image bank's size is only known after fitting: take the saved tensors' shapes, and
        refuse a bank this model cannot search (so a damaged file fails on loading, not on the
        first image). A model built without the bank (STFPM without ``global_score``) has none."""
        has_bank = "image_bank" in self._buffers
        if has_bank:
            state_dict.setdefault(prefix + "reference_counts", torch.empty(0))  # saved before it: plain standard scores
            self._size_on_load(state_dict, prefix, self._BUFFERS)
        super()._load_from_state_dict(state_dict, prefix, *args)
        if has_bank:
            self._check_image_bank()

    def _size_on_load(self, state_dict: dict, prefix: str, names: tuple[str, ...]) -> None:
        """Banks are sized by fitting: take the saved tensors' shapes before loading them."""
        self.drop_indexes()
        for name in names:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                own = getattr(self, name)
                setattr(self, name, torch.empty(saved.shape, dtype=own.dtype, device=own.device))

    def _check_image_bank(self) -> None:
        """Refuse a loaded image bank this model cannot search (a damaged file fails on loading)."""
        if len(self.image_bank):
            parts = len(self.bank_widths(self.image_bank.shape[1]))
            if self.score_reference.shape != (2 * (1 + parts),):
                raise ValueError(f"{len(self.score_reference)} score reference values for {parts} descriptors, "
                                 f"not {2 * (1 + parts)}")
            counts = self.reference_counts
            if counts.shape != (0,) and (counts.shape != (1 + parts,) or not bool(
                    (counts >= 2).all() & counts.isfinite().all() & (counts == counts.round()).all())):
                raise ValueError(f"reference_counts {counts.tolist()} are not {1 + parts} whole counts of 2 or more")

    def bank_widths(self, width: int) -> list[int]:
        """The descriptors an image bank ``width`` columns wide holds: all of ``descriptor_widths``,
        or the stride-32 mean alone in a PatchCore model saved before the spread."""
        widths = self.descriptor_widths if width == sum(self.descriptor_widths) else self.descriptor_widths[:1]
        if sum(widths) != width:
            raise ValueError(f"an image bank {width} columns wide does not hold descriptors {self.descriptor_widths}")
        return widths

    def _nearest(self, queries: torch.Tensor, name: str, bank: torch.Tensor, mode: str = "exact",
                 with_indices: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nearest_neighbors`` of ``queries`` in ``bank``: on a CPU through the index kept under
        ``name`` and ``mode`` (``knn.cpu_index``: oneDNN or faiss; it also keeps the bank's norms,
        which torch recomputes on every call: 2 ms an image for a 4x4 grid's image bank); torch on
        a GPU, while exporting and where neither index runs."""
        exporting = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
        if bank.device.type != "cpu" or exporting:
            return nearest_neighbors(queries, bank, with_indices)
        key = f"{name} {mode}"
        if key not in self._indexes:
            self._indexes[key] = cpu_index(bank, mode, self.search_nprobe)
        index = self._indexes[key]
        return nearest_neighbors(queries, bank, with_indices) if index is None else index.search(queries, with_indices)

    def _apply(self, fn, *args, **kwargs):
        """``to()``, ``cuda()``, ``half()``... replace the banks: the indexes must be rebuilt."""
        self.drop_indexes()
        return super()._apply(fn, *args, **kwargs)

    def drop_indexes(self) -> None:
        """Let the search indexes go (packed copies of the banks); the next search rebuilds them."""
        self._indexes = {}

    def descriptor_distances(self, descriptor: torch.Tensor) -> torch.Tensor:
        """BxK: each image descriptor's distance to the nearest training image's (K = 2 per global
        stride: mean and spread; 1 in PatchCore models saved before the spread, whose image bank
        holds the mean only)."""
        widths = self.bank_widths(self.image_bank.shape[1])
        parts = descriptor.split(self.descriptor_widths, dim=1)
        return torch.stack([self._nearest(part, f"descriptor {i}", bank)[0] for i, (part, bank)
                            in enumerate(zip(parts, self.image_bank.split(widths, dim=1)))], dim=1)

    def combined_score(self, own_score: torch.Tensor, descriptor: torch.Tensor | None) -> torch.Tensor:
        """The largest of the model's own score and the descriptors' distances to the nearest
        training image, each read as ``score_parts`` does; the own score alone without an image bank."""
        if descriptor is None or len(self.image_bank) == 0:
            return own_score
        return self.score_parts(own_score, descriptor).amax(1)

    def score_parts(self, own_score: torch.Tensor, descriptor: torch.Tensor) -> torch.Tensor:
        """Bx(1+K): the model's own score and each descriptor's distance to the nearest training
        image, as normal deviates of their tail probabilities over their reference samples
        (``normal_deviates``; plain standard scores in models saved before ``reference_counts``).
        Needs an image bank."""
        scores = torch.cat([own_score[:, None], self.descriptor_distances(descriptor)], dim=1)
        mean, std = self.score_reference.view(-1, 2).unbind(1)
        z = (scores - mean) / std
        return z if self.reference_counts.numel() == 0 else normal_deviates(z, self.reference_counts)


def normal_deviates(z: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Standard scores measured against samples of ``counts`` values, as the normal deviates of the
    same tail probabilities. A new value's score against a normal sample of n follows Student's t
    with v = n - 1 degrees of freedom once divided by sqrt(1 + 1/n); Wallace's approximation
    (Ann. Math. Statist. 1959) turns a t into its normal deviate in closed form, so the model stays
    plain torch and exportable: sign(t) sqrt(v ln(1 + t²/v)) (8v + 1) / (8v + 3). Monotone in z and
    tending to z as n grows; up to 60 deviations it is within 5% of the exact deviate for n >= 3
    (8.1% for n = 2)."""
    n = counts.to(z.dtype)
    v = n - 1
    t = z / torch.sqrt(1 + 1 / n)
    return torch.sign(t) * torch.sqrt(v * torch.log1p(t * t / v)) * (8 * v + 1) / (8 * v + 3)
