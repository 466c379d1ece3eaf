"""Filling a PatchCore memory bank: patch features of the normal images, then a greedy coreset.

The greedy k-center coreset (Sener & Savarese 2018, as PatchCore uses it) repeatedly adds the
patch farthest from those chosen so far, so every training patch ends up within the coverage
radius of the bank. Run naively, each of the k steps is a matrix-vector product over all N
patches, bound by memory bandwidth: 88 s for 1% of 731k patches on 2 cores. ``greedy_coreset``
selects exactly the same points in rounds: the distances of the farthest candidates to each
other decide, without looking at the other patches, how many of them plain greedy would pick in
a row, and all N distances are then updated for the whole round by cache-sized matrix products,
which run at the CPU's arithmetic peak (1% of 731k: 9-14 s on one core with torch's product;
10%: 78 s). Through oneDNN, where it runs (``knn.nearest_offsets``), the same selection takes
half that on this AMD CPU. Distances are taken in a seeded random projection (default 64-d) of
the features, as in the paper.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from tqdm import tqdm

from flawscope.models.image_bank import ImageBankScore
from flawscope.models.knn import nearest_neighbors, nearest_offsets, search_once
from flawscope.models.patchcore import PatchCore

_CANDIDATES = 1024  # farthest points examined per round of the batched greedy search
REFERENCE_IMAGES = 64  # training images scored leave-one-out to put the global score on the patch score's scale


def random_projection(dim: int, projection_dim: int | None, seed: int) -> torch.Tensor:
    """Gaussian Johnson-Lindenstrauss matrix dim x projection_dim (identity when not smaller)."""
    if projection_dim is None or projection_dim >= dim:
        return torch.eye(dim)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, projection_dim, generator=gen) / math.sqrt(projection_dim)


def _update_distances(d2: torch.Tensor, points: torch.Tensor, points_sq: torch.Tensor, chosen: torch.Tensor) -> None:
    """d2 <- min(d2, squared distance to the nearest of ``chosen``), in place, in row chunks."""
    for rows, offset in nearest_offsets(points, chosen):
        torch.minimum(d2[rows], offset.add_(points_sq[rows]).clamp_min_(0), out=d2[rows])


def greedy_coreset(points: torch.Tensor, k: int, seed: int = 0, start_distances: torch.Tensor | None = None,
                   stop_radius: float = 0.0) -> tuple[torch.Tensor, float]:
    """Greedy k-center selection of up to ``k`` rows of ``points`` (NxP float32).

    ``start_distances``: each point's distance to an already chosen set (e.g. an existing bank);
    without it the first point is random (seeded). Stops early once every point is within
    ``stop_radius``. Returns the selected indices in selection order and the final coverage
    radius (largest distance of a point to its nearest selected one).
    """
    n = len(points)
    k = min(k, n)
    points_sq = torch.linalg.vector_norm(points, dim=1).square_()  # no NxP temporary
    selected: list[int] = []
    if start_distances is None:
        first = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
        d2 = (points_sq - 2 * points @ points[first] + points_sq[first]).clamp_min_(0)
        selected.append(first)
    else:
        d2 = start_distances.float().pow(2)
    stop2 = stop_radius ** 2
    bar = tqdm(total=k, initial=len(selected), desc="coreset", leave=False, unit="pt", disable=None)
    while len(selected) < k:
        # The farthest candidates, and a bound for everyone else: a point outside the candidates
        # is at most ``bound`` away now and only gets closer, so a candidate whose distance, updated
        # for this round's picks, is still >= bound is exactly the point plain greedy picks next.
        m = min(_CANDIDATES, n)
        top = torch.topk(d2, m + 1 if m < n else m, sorted=True)
        bound = float(top.values[m]) if m < n else -1.0
        cand = top.indices[:m]
        c = points[cand]
        pair = (points_sq[cand, None] + points_sq[None, cand] - 2 * c @ c.T).clamp_min_(0)
        value = top.values[:m].clone()
        picks = []
        while len(selected) + len(picks) < k:
            i = int(value.argmax())
            if value[i] < bound or value[i] <= stop2:
                break
            picks.append(i)
            torch.minimum(value, pair[i], out=value)
        if not picks:  # everything is within stop_radius
            break
        selected += cand[picks].tolist()
        _update_distances(d2, points, points_sq, c[picks])
        bar.update(len(picks))
    bar.close()
    return torch.tensor(selected, dtype=torch.long), float(d2.max().sqrt())


def image_bank_rows(model: ImageBankScore, descriptors: torch.Tensor, size: int | None,
                    seed: int = 0) -> torch.Tensor | None:
    """The images (rows of ``descriptors``) an image bank of at most ``size`` keeps; None: all.
    Greedy k-center selection, as for patches, so that every image lies near a kept one; each
    descriptor is scaled to unit total spread first, so that each counts alike, as in the score."""
    if size is None or len(descriptors) <= size:
        return None
    parts = descriptors.split(model.bank_widths(descriptors.shape[1]), dim=1)
    scaled = torch.cat([part / part.std(0).norm().clamp_min(1e-12) for part in parts], dim=1)
    return greedy_coreset(scaled, size, seed)[0]


@torch.no_grad()
def extract_patches(model: PatchCore, images_uint8: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor],
                    device: torch.device | str, projection: torch.Tensor, batch_size: int,
                    max_patches: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(features float16 MxC, projected float32 MxP) of all patches, or of an equal random share
    of each image's patches when there are more than ``max_patches`` (memory stays bounded by
    ``max_patches`` whatever the number of images); the images are consecutive blocks of equal
    size. Third: the images' descriptors Nx2G with ``global_score``, else None.
    """
    n = len(images_uint8)
    gen = torch.Generator().manual_seed(seed)
    projection = projection.to(device)
    feats = proj = keep = None
    descriptors = []
    for start in tqdm(range(0, n, batch_size), desc="patch features", leave=False, unit="batch", disable=None):
        x = normalize(images_uint8[start:start + batch_size].to(device))
        emb, descriptor = model.features(x)
        if descriptor is not None:
            descriptors.append(descriptor.cpu())
        per_image = emb.shape[2] * emb.shape[3]
        rows = model.patch_rows(emb)
        if feats is None:
            keep = min(per_image, max(1, max_patches // n))
            feats = torch.empty(n * keep, rows.shape[1], dtype=torch.float16)
            proj = torch.empty(n * keep, projection.shape[1])
        if keep < per_image:
            picks = torch.stack([torch.randperm(per_image, generator=gen)[:keep] for _ in range(len(x))])
            rows = rows.view(len(x), per_image, -1)[torch.arange(len(x))[:, None], picks.to(device)].flatten(0, 1)
        rows = rows.half()  # the bank keeps float16 values: select among exactly those
        feats[start * keep:start * keep + len(rows)] = rows.cpu()
        proj[start * keep:start * keep + len(rows)] = (rows.float() @ projection).cpu()
    return feats, proj, torch.cat(descriptors) if descriptors else None


@torch.no_grad()
def leave_one_out_scores(model: PatchCore, images_uint8: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor],
                         device: torch.device | str, owner: torch.Tensor, seed: int) -> torch.Tensor:
    """Patch image scores of up to ``REFERENCE_IMAGES`` of the images, each against the memory bank
    without the entries that image contributed (``owner``: each bank row's image, -1 for rows
    from earlier fits): how a new good image scores, measured on the training set itself."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(images_uint8), generator=gen)[:REFERENCE_IMAGES].tolist()
    bank, owner = model.memory_bank, owner.to(model.memory_bank.device)
    scores = []
    for i in tqdm(picks, desc="reference scores", leave=False, unit="img", disable=None):
        others = bank[owner != i]
        if len(others) == 0:
            continue
        emb = model.embed(normalize(images_uint8[i:i + 1].to(device)))
        scores.append(model.image_score(emb, model.patch_scores(emb, bank=others), bank=others).cpu())
    return torch.cat(scores) if scores else torch.empty(0)


@torch.no_grad()
def fit_patchcore(model: PatchCore, images_uint8: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor],
                  device: torch.device | str = "cpu", coreset_ratio: float = 0.01, seed: int = 0,
                  batch_size: int = 4, projection_dim: int | None = 64, max_patches: int = 1 << 20,
                  image_bank_size: int | None = None) -> dict:
    """Fill ``model``'s memory bank from normal images NxSxSx3 uint8; returns timings and sizes.

    The bank keeps ``coreset_ratio`` of the (at most ``max_patches``) training patches, chosen
    by greedy k-center selection in a ``projection_dim`` random projection seeded by ``seed``.
    The image bank keeps at most ``image_bank_size`` images (``image_bank_rows``).
    On CPU small batches are fastest: at 256x256 the backbone's activations of 4 images stay in
    cache, and it runs 4x faster per image than with batches of 16.
    """
    if not 0 < coreset_ratio <= 1:
        raise ValueError(f"coreset_ratio must be in (0, 1], not {coreset_ratio}")
    model.to(device).eval()
    t0 = time.perf_counter()
    projection = random_projection(model.embed_dim, projection_dim, seed)
    feats, proj, descriptors = extract_patches(model, images_uint8, normalize, device, projection, batch_size,
                                               max_patches, seed)
    repeats = 0
    if descriptors is not None:
        images_uint8, feats, proj, descriptors, repeats = _drop_repeated(descriptors[:0], images_uint8, feats, proj,
                                                                         descriptors)
    t1 = time.perf_counter()
    k = max(1, math.ceil(coreset_ratio * len(feats)))
    if k < len(feats):
        selected, radius = greedy_coreset(proj.to(device), k, seed)
    else:
        selected, radius = torch.arange(len(feats)), 0.0
    t2 = time.perf_counter()
    model.set_memory_bank(feats[selected].float(), projection, radius)
    stats = {"patches": len(feats), "patches_per_image": len(feats) // max(len(images_uint8), 1),
             "repeated_images": repeats, "bank_size": len(selected), "coverage_radius": radius,
             "feature_seconds": t1 - t0, "coreset_seconds": t2 - t1}
    if descriptors is not None:
        owner = selected // stats["patches_per_image"]
        model.set_image_bank(descriptors, leave_one_out_scores(model, images_uint8, normalize, device, owner, seed),
                             image_bank_rows(model, descriptors, image_bank_size, seed))
        stats["reference_seconds"] = time.perf_counter() - t2
        stats["image_bank_size"] = len(model.image_bank)
    return stats


def repeated_images(descriptors: torch.Tensor, image_bank: torch.Tensor) -> torch.Tensor:
    """Which images (rows of ``descriptors``, as wide as ``image_bank``) the image bank holds
    already or repeat an earlier row: within 1% of their length of it. The same file again lands
    within 0.08% (other batches, float16 rounding); different images lie 9-50% apart on the four
    benchmark sets, and so does an image saved again as a JPEG of quality 90 (11-21%): that
    counts as a new image. A repeat's leave-one-out distance would be zero, shrinking the spreads
    the image score is measured in."""
    rounded = descriptors.to(image_bank.device, torch.float16).float()  # as the bank holds them
    tolerance = 0.01 * torch.linalg.vector_norm(rounded, dim=1)
    repeated = torch.zeros(len(rounded), dtype=torch.bool, device=rounded.device)
    if len(image_bank):
        repeated |= nearest_neighbors(rounded, image_bank, with_indices=False)[0] <= tolerance
    for start in range(0, len(rounded), 1024):  # against the earlier rows, 1024 rows at a time
        rows = slice(start, start + 1024)
        close = torch.cdist(rounded[rows], rounded[:start + 1024]) <= tolerance[rows, None]
        repeated[rows] |= close.tril(diagonal=start - 1).any(1)
    return repeated


def _drop_repeated(image_bank: torch.Tensor, images: torch.Tensor, feats: torch.Tensor, proj: torch.Tensor,
                   descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(images, their blocks of patch rows, projected rows, descriptors) without the
    ``repeated_images``, and how many those were."""
    repeated = repeated_images(descriptors, image_bank).cpu()
    repeats = int(repeated.sum())
    if not repeats:
        return images, feats, proj, descriptors, 0
    keep = ~repeated
    rows = keep.repeat_interleave(len(feats) // len(images))
    return images[keep], feats[rows], proj[rows], descriptors[keep], repeats


@torch.no_grad()
def add_normals(model: PatchCore, images_uint8: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor],
                device: torch.device | str = "cpu", coreset_ratio: float = 0.01, seed: int = 0,
                batch_size: int = 4, max_patches: int = 1 << 20, image_bank_size: int | None = None,
                known: torch.Tensor | None = None) -> dict:
    """Extend a fitted bank with more normal images without refitting from scratch.

    The coreset continues from the existing bank: new patches start at their distance to it, so
    patches the bank already covers are never picked. Up to ``coreset_ratio`` of the new patches
    are added, fewer when all are within the bank's coverage radius from the original fit.

    With an image bank, images it holds already or that repeat another are left out
    (``repeated_images``): a hazelnut model's image threshold went from 1.36 to 3257 when its own
    training images were added again. With ``image_bank_size``, the image bank keeps at most that
    many of its images and the new ones; the images it dropped before are no longer there to
    measure the reference on, which then runs slightly high (the kept images lie further apart).
    ``known`` marks the images the caller knows the model holds (by its record of the images it
    was fitted on, which a capped image bank, or none, cannot tell): left out as well.
    """
    if len(model.memory_bank) == 0:
        raise ValueError("add_normals needs a fitted PatchCore (its memory bank is empty)")
    model.to(device).eval()
    repeats = int(known.sum()) if known is not None else 0
    if repeats:
        images_uint8 = images_uint8[~known.cpu()]
    old_size = len(model.memory_bank)
    stats = {"new_images": 0, "repeated_images": repeats, "patches": 0, "added": 0,
             "bank_size": old_size, "coverage_radius": float(model.coverage_radius)}
    if len(images_uint8) == 0:
        return stats
    projection = model.projection.cpu()
    feats, proj, descriptors = extract_patches(model, images_uint8, normalize, device, projection, batch_size,
                                               max_patches, seed)
    if descriptors is not None and len(model.image_bank):
        width = model.image_bank.shape[1]  # a model saved before the spread descriptor keeps the mean only
        images_uint8, feats, proj, descriptors, more = _drop_repeated(model.image_bank, images_uint8, feats, proj,
                                                                      descriptors[:, :width])
        repeats += more
    stats |= {"new_images": len(images_uint8), "repeated_images": repeats, "patches": len(feats)}
    if len(images_uint8) == 0:
        return stats
    proj = proj.to(device)
    start = search_once(proj, model.memory_bank @ model.projection, with_indices=False)[0]
    radius = float(model.coverage_radius)
    k = max(1, math.ceil(coreset_ratio * len(feats)))
    selected, new_radius = greedy_coreset(proj, k, seed, start_distances=start, stop_radius=radius)
    bank = torch.cat([model.memory_bank.cpu(), feats[selected].float()])
    radius = max(radius, new_radius)
    model.set_memory_bank(bank, projection, radius)
    if descriptors is not None and len(model.image_bank):
        # The new images are scored leave-one-out against the grown bank; the references of the
        # first fit are kept (they were measured against the smaller bank, so slightly high).
        owner = torch.cat([torch.full((old_size,), -1), selected // (len(feats) // len(images_uint8))])
        new_refs = leave_one_out_scores(model, images_uint8, normalize, device, owner, seed)
        images = torch.cat([model.image_bank.cpu(), descriptors])
        model.set_image_bank(images, torch.cat([model.reference_scores.cpu(), new_refs]),
                             image_bank_rows(model, images, image_bank_size, seed))
    return stats | {"added": len(selected), "bank_size": len(bank), "coverage_radius": radius}
