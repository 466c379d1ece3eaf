"""PatchCore: the coreset, the scores, saving and loading, extending the bank (random-init backbone, 64x64)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy import special, stats
from torch import nn

import flawscope.models.knn as knn
import flawscope.training.patchcore_fit as patchcore_fit
from conftest import written_before_digests
from flawscope.data.transforms import normalize
from flawscope.errors import FlawscopeError
from flawscope.inference.model_dir import Calibration, ModelInfo, load_model_dir, save_model_dir
from flawscope.models import build_model
from flawscope.models.image_bank import ImageBankScore, normal_deviates
from flawscope.models.patchcore import PatchCore
from flawscope.training.patchcore_fit import add_normals, fit_patchcore, greedy_coreset, image_bank_rows

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: a second OpenMP thread only adds synchronisation, which stalls
    when the CPU is shared with other jobs (35x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def norm(batch: torch.Tensor) -> torch.Tensor:
    return normalize(batch, MEAN, STD)


def plain_greedy(points: torch.Tensor, first: int, k: int) -> list[int]:
    """The textbook k-center greedy, one full distance update per pick."""
    chosen, d = [first], torch.cdist(points, points[first:first + 1])[:, 0]
    while len(chosen) < k:
        chosen.append(int(d.argmax()))
        d = torch.minimum(d, torch.cdist(points, points[chosen[-1]:chosen[-1] + 1])[:, 0])
    return chosen


def coverage(points: torch.Tensor, chosen: torch.Tensor) -> float:
    return float(torch.cdist(points, points[chosen]).amin(1).max())


def clustered_points(n: int = 3000, dim: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(20, dim, generator=gen) * 5
    return centers[torch.randint(20, (n,), generator=gen)] + torch.randn(n, dim, generator=gen)


def textures(kind: str, phases: list[int], seed: int, size: int = SIZE) -> torch.Tensor:
    """N x size x size x 3 uint8 with a little noise: vertical "stripes" (period 8) or "checks"
    (period 16), shifted by ``phases`` pixels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.arange(size)
    out = []
    for phase in phases:
        if kind == "stripes":
            img = ((x + phase) // 4 % 2).float().expand(size, size) * 160 + 40
        else:
            img = (((x[:, None] + phase) // 8 + (x[None] + phase) // 8) % 2).float() * 200 + 20
        img = img + torch.randn(size, size, generator=gen)
        out.append(img.clamp(0, 255).to(torch.uint8)[..., None].expand(size, size, 3))
    return torch.stack(out)


def make_model(**kwargs) -> PatchCore:
    """A random-init PatchCore whose BatchNorm statistics are those of the synthetic images, so its
    features have unit scale like a pretrained backbone's (default statistics shrink them to
    denormal floats: useless in float16, and 100x slower)."""
    torch.manual_seed(0)
    model = PatchCore(pretrained=False, smooth_sigma=1.0, **kwargs)
    for module in model.extractor.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.extractor.train()
    with torch.no_grad():
        model.extractor(norm(torch.cat([textures(kind, list(range(8)), 9) for kind in ("stripes", "checks")])))
    return model.eval()


@pytest.fixture(scope="module")
def fitted() -> PatchCore:
    model = make_model()
    fit_patchcore(model, textures("stripes", list(range(8)), 0), norm, coreset_ratio=0.25, seed=0)
    return model


@pytest.mark.parametrize("onednn", [True, False])
def test_coreset_is_plain_greedy_and_covers_ever_better(monkeypatch, onednn):
    if onednn and not knn.onednn_available():
        pytest.skip("torch without oneDNN's packed linear layer, or not on x86")
    monkeypatch.setattr(knn, "onednn_available", lambda: onednn)  # the distance updates' two routes
    monkeypatch.setattr(knn, "CHUNK_ELEMENTS", 3000)  # oneDNN from the first pick (3,000 points x 1)
    monkeypatch.setattr(patchcore_fit, "_CANDIDATES", 32)  # many rounds, each cut short by the bound
    points = clustered_points()
    chosen, radius = greedy_coreset(points, 80, seed=1)
    assert chosen.tolist() == plain_greedy(points, int(chosen[0]), 80)
    radii = [coverage(points, chosen[:i]) for i in (1, 5, 10, 20, 40, 80)]
    assert all(a >= b for a, b in zip(radii, radii[1:])) and radii[-1] < radii[0] / 2
    assert radius == pytest.approx(radii[-1], rel=1e-4)


def test_coreset_continues_from_existing_points_and_stops_at_radius():
    points = clustered_points()
    existing, new = points[:500], points[500:]
    start = torch.cdist(new, existing).amin(1)
    chosen, radius = greedy_coreset(new, 10_000, start_distances=start, stop_radius=4.0)
    assert radius <= 4.0 < float(start.max())
    everything = torch.cat([existing, new])
    assert coverage(everything, torch.cat([torch.arange(500), 500 + chosen])) == pytest.approx(radius, rel=1e-4)
    alone, _ = greedy_coreset(new, 10_000, stop_radius=4.0)
    assert len(chosen) < len(alone)  # the existing points already cover part of the new ones


def test_embedding_shapes_and_empty_bank():
    model = make_model(feature_dim=32)
    x = norm(textures("stripes", [0, 1], 0))
    assert model.embed(x).shape == (2, 32, SIZE // 8, SIZE // 8)
    assert model.embed_dim == 32 and model.config()["feature_dim"] == 32
    assert PatchCore(pretrained=False).embed_dim == 40 + 112
    assert PatchCore(pretrained=False, feature_dim=152).embed_dim == 152
    with pytest.raises(ValueError, match=r"feature_dim must be from 1 to the 152 channels of strides \[8, 16\], not 153"):
        PatchCore(pretrained=False, feature_dim=153)  # it would only repeat channels
    with pytest.raises(RuntimeError, match="empty memory bank"):
        model(x)


def test_fit_takes_an_equal_share_of_each_image_beyond_max_patches():
    model = make_model()
    stats = fit_patchcore(model, textures("stripes", list(range(8)), 0), norm, coreset_ratio=0.5, max_patches=200)
    assert stats["patches"] == 8 * 25 and stats["bank_size"] == 100 == len(model.memory_bank)


def test_unlike_patch_scores_higher(fitted):
    normal = norm(textures("stripes", [1, 6], 1))
    defect = normal.clone()
    defect[:, :, 24:40, 24:40] = norm(textures("checks", [1, 6], 1))[:, :, 24:40, 24:40]
    normal_map, normal_score = fitted.map_and_score(normal)
    defect_map, defect_score = fitted.map_and_score(defect)
    assert normal_map.shape == (2, 1, SIZE, SIZE) and normal_score.shape == (2,)
    assert (defect_score > 2 * normal_score.max()).all()
    peak = defect_map.flatten(1).argmax(1)
    peak_rows, peak_cols = peak // SIZE, peak % SIZE
    assert ((peak_rows >= 20) & (peak_rows < 44) & (peak_cols >= 20) & (peak_cols < 44)).all()
    assert (defect_map[:, :, 28:36, 28:36].mean((1, 2, 3)) > 1.3 * defect_map[:, :, :12].mean((1, 2, 3))).all()
    assert torch.equal(fitted(defect), defect_map)


def test_save_load_round_trip(fitted, tmp_path):
    info = ModelInfo(model="PatchCore", model_config=fitted.config(), input_size=SIZE, resize_mode="resize",
                     mean=list(MEAN), std=list(STD), calibration=Calibration(1.0, 0.5, 1.0, 0.5))
    save_model_dir(tmp_path / "pc", fitted, info)
    with safe_open(str(tmp_path / "pc" / "model.safetensors"), "pt") as f:
        assert f.get_slice("memory_bank").get_dtype() == "F16" and f.get_slice("bank_neighbors").get_dtype() == "I32"
    loaded, loaded_info = load_model_dir(tmp_path / "pc")
    assert loaded_info.model == "PatchCore" and loaded.memory_bank.shape == fitted.memory_bank.shape
    x = norm(textures("checks", [0, 3], 3))
    for a, b in zip(loaded.map_and_score(x), fitted.map_and_score(x)):
        assert torch.equal(a, b)  # the bank holds float16 values already: saving loses nothing
    assert float(loaded.coverage_radius) == float(fitted.coverage_radius)
    state = load_file(str(tmp_path / "pc" / "model.safetensors"))
    assert torch.equal(state.pop("bank_neighbors"), fitted.bank_neighbors)
    save_file(state, str(tmp_path / "pc" / "model.safetensors"))  # as saved before bank_neighbors
    with pytest.raises(FlawscopeError, match="model.safetensors: not the file inference.yml beside it was written with"):
        load_model_dir(tmp_path / "pc")
    written_before_digests(tmp_path / "pc")
    older, _ = load_model_dir(tmp_path / "pc")
    assert torch.equal(older.bank_neighbors, fitted.bank_neighbors)
    for a, b in zip(older.map_and_score(x), fitted.map_and_score(x)):
        assert torch.equal(a, b)


def test_a_model_saved_before_the_image_level_score_loads_and_scores_as_it_did(fitted, tmp_path):
    """PatchCore folders of the first releases hold no image bank buffers; they were refused as
    weights that do not fit. Without ``global_score`` the model scores with the patches alone."""
    assert not fitted.global_score and len(fitted.image_bank) == 0
    info = ModelInfo(model="PatchCore", model_config=fitted.config(), input_size=SIZE, resize_mode="resize",
                     mean=list(MEAN), std=list(STD), calibration=Calibration(1.0, 0.5, 1.0, 0.5))
    save_model_dir(tmp_path / "pc", fitted, info)
    state = load_file(str(tmp_path / "pc" / "model.safetensors"))
    for name in ("image_bank", "reference_scores", "score_reference", "reference_counts", "bank_neighbors"):
        del state[name]
    save_file(state, str(tmp_path / "pc" / "model.safetensors"))
    meta = yaml.safe_load((tmp_path / "pc" / "inference.yml").read_text())
    for key in ("global_score", "global_grid", "global_strides"):
        del meta["model_config"][key]
    (tmp_path / "pc" / "inference.yml").write_text(yaml.safe_dump(meta))
    written_before_digests(tmp_path / "pc")
    older, _ = load_model_dir(tmp_path / "pc")
    x = norm(textures("checks", [0, 3], 3))
    for a, b in zip(older.map_and_score(x), fitted.map_and_score(x)):
        assert torch.equal(a, b)
    state.update(image_bank=fitted.image_bank, reference_scores=torch.zeros(3))  # some of them: damaged
    save_file(state, str(tmp_path / "pc" / "model.safetensors"))
    with pytest.raises(FlawscopeError, match="weights do not fit model PatchCore"):
        load_model_dir(tmp_path / "pc")


def test_image_score_weighs_the_worst_patchs_neighbourhood_in_the_bank(fitted):
    """The paper's reweighting, with N_b(m*) from the neighbours found once per bank
    (``bank_neighbors``), equals it with the neighbourhood searched for each image."""
    emb = fitted.embed(norm(textures("checks", [0, 5], 4)))
    scores = fitted.patch_scores(emb)
    s_star, worst = scores.flatten(1).max(1)
    patch = emb.flatten(2)[torch.arange(2), :, worst]
    bank = fitted.memory_bank
    m_star = torch.cdist(patch, bank).argmin(1)
    to_m_star = torch.cdist(bank[m_star], bank)
    to_m_star[torch.arange(2), m_star] = torch.inf
    support = torch.cat([m_star[:, None], to_m_star.topk(fitted.num_neighbors - 1, largest=False).indices], 1)
    weight = 1 - torch.softmax(torch.cdist(patch[:, None], bank[support])[:, 0], dim=1)[:, 0]
    torch.testing.assert_close(fitted.image_score(emb, scores), weight * s_star)
    torch.testing.assert_close(fitted.image_score(emb, scores, bank=bank), weight * s_star)
    assert fitted.bank_neighbors.shape == (len(bank), fitted.num_neighbors - 1)
    assert (weight < 1).all() and (fitted.image_score(emb, scores) < s_star).all()


def test_add_normals_grows_bank_and_learns_the_new_kind(fitted):
    model = make_model()
    model.load_state_dict(fitted.state_dict())
    size = len(model.memory_bank)
    checks = norm(textures("checks", [2, 5], 5))
    before = model.map_and_score(checks)[1]
    again = add_normals(model, textures("stripes", list(range(8)), 0), norm, coreset_ratio=0.25)
    stats = add_normals(model, textures("checks", list(range(8)), 4), norm, coreset_ratio=0.25)
    assert again["added"] <= 2 < stats["added"]  # the bank already covers the training images
    assert len(model.memory_bank) == size + again["added"] + stats["added"] == stats["bank_size"]
    assert (model.map_and_score(checks)[1] < before / 1.5).all()



# The global score needs features that mean something at stride 32: the ImageNet weights, at 128x128.
GLOBAL_SIZE = 128


def half_and_half(splits: list[int], seed: int) -> torch.Tensor:
    """Stripes and checks side by side, split at column ``split``, stripes on the left in the even
    images and on the right in the odd ones: every image shows both textures, and each texture
    appears at every position in the set."""
    out = textures("stripes", list(range(len(splits))), seed, GLOBAL_SIZE).clone()
    checks = textures("checks", list(range(len(splits))), seed + 1, GLOBAL_SIZE)
    for i, split in enumerate(splits):
        side = slice(split, None) if i % 2 == 0 else slice(None, split)
        out[i, :, side] = checks[i, :, side]
    return out


TRAIN_SPLITS = [48, 56, 64, 72, 80, 52, 60, 68, 76, 50]


def only_stripes(seed: int) -> torch.Tensor:
    return textures("stripes", [1, 5], seed, GLOBAL_SIZE)


@pytest.fixture(scope="module")
def fitted_global() -> PatchCore:
    model = PatchCore(global_score=True, smooth_sigma=1.0).eval()
    fit_patchcore(model, half_and_half(TRAIN_SPLITS, 0), norm, coreset_ratio=0.5)
    return model


def spreads_above(model: PatchCore, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(patch score, mean descriptor's distance, spread descriptor's distance) of each image, in
    leave-one-out spreads above their means."""
    emb, descriptor = model.features(norm(x))
    patch = model.image_score(emb, model.patch_scores(emb))
    g = model.descriptor_widths[0]
    mean_d, spread_d = (torch.cdist(descriptor[:, part], model.image_bank[:, part]).amin(1)
                        for part in (slice(None, g), slice(g, None)))
    p_mean, p_std, m_mean, m_std, s_mean, s_std = model.score_reference
    return (patch - p_mean) / p_std, (mean_d - m_mean) / m_std, (spread_d - s_mean) / s_std


def test_global_score_flags_an_image_made_only_of_normal_patches(fitted_global):
    normal = half_and_half([52, 68, 76], 7)
    patch_z, mean_z, spread_z = spreads_above(fitted_global, only_stripes(7))
    assert (patch_z < 2).all()  # every patch is like a training patch...
    assert (mean_z > 4).all()  # ...but no training image is all stripes
    score_normal, score_stripes = (fitted_global.map_and_score(norm(x))[1] for x in (normal, only_stripes(7)))
    parts = normal_deviates(torch.stack([patch_z, mean_z, spread_z], 1), fitted_global.reference_counts)
    assert torch.allclose(score_stripes, parts.amax(1), atol=1e-4)
    assert score_stripes.min() > score_normal.max() + 2


def test_global_score_is_measured_in_leave_one_out_spreads(fitted_global):
    """New normal images score no higher than the training images did when each was left out of
    the bank (a bank one image smaller, so if anything lower); scored against their own patches,
    the training images would have made every new normal image look many spreads anomalous."""
    assert len(fitted_global.image_bank) == 10 and len(fitted_global.reference_scores) == 10
    assert fitted_global.score_reference.shape == (6,) and (fitted_global.score_reference > 0).all()
    new_normals = half_and_half([49, 54, 58, 62, 66, 70, 74, 78], 11)
    assert all(z.max() < 2 for z in spreads_above(fitted_global, new_normals))
    emb = fitted_global.embed(norm(half_and_half(TRAIN_SPLITS, 0)))  # the training set
    own = fitted_global.image_score(emb, fitted_global.patch_scores(emb))
    emb = fitted_global.embed(norm(new_normals))
    naive_z = (fitted_global.image_score(emb, fitted_global.patch_scores(emb)) - own.mean()) / own.std()
    assert naive_z.min() > 3


def test_global_score_round_trip_and_add_normals(fitted_global, tmp_path):
    info = ModelInfo(model="PatchCore", model_config=fitted_global.config(), input_size=GLOBAL_SIZE,
                     resize_mode="resize", mean=list(MEAN), std=list(STD), calibration=Calibration(1.0, 0.5, 1.0, 0.5))
    save_model_dir(tmp_path / "pc", fitted_global, info)
    loaded, _ = load_model_dir(tmp_path / "pc")
    x = norm(torch.cat([half_and_half([60], 3), only_stripes(3)]))
    assert torch.equal(loaded.map_and_score(x)[1], fitted_global.map_and_score(x)[1])
    assert torch.equal(loaded.score_reference, fitted_global.score_reference)

    before = loaded.map_and_score(norm(only_stripes(7)))[1]
    add_normals(loaded, textures("stripes", list(range(8)), 8, GLOBAL_SIZE), norm, coreset_ratio=0.25)
    assert len(loaded.image_bank) == 18 and len(loaded.reference_scores) == 18
    assert (loaded.map_and_score(norm(only_stripes(7)))[1] < before - 2).all()  # all stripes is normal now


def test_add_normals_leaves_out_images_the_model_already_holds(fitted_global):
    """Adding the training images again (here with two new ones) must not add their zero
    leave-one-out distances: the image score's scale would collapse and every image look anomalous."""
    model = PatchCore(global_score=True, smooth_sigma=1.0).eval()
    model.load_state_dict(fitted_global.state_dict())
    again = add_normals(model, half_and_half(TRAIN_SPLITS, 0), norm, coreset_ratio=0.25)
    assert again["repeated_images"] == 10 and again["added"] == 0
    for name, value in fitted_global.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name  # nothing changed

    new = half_and_half([54, 70], 21)
    size = len(model.memory_bank)
    known = half_and_half(TRAIN_SPLITS, 0)
    stats = add_normals(model, torch.cat([new[:1], known, new[1:]]), norm, coreset_ratio=1.0)
    assert stats["repeated_images"] == 10 and stats["new_images"] == 2
    assert len(model.image_bank) == 12 and len(model.reference_scores) == 12
    added = model.memory_bank[size:]
    to_new, to_known = (torch.cdist(added, model.patch_rows(model.embed(norm(x)))).amin(1) for x in (new, known))
    assert stats["added"] > 0 and to_new.max() < 0.5 and to_known.min() > 2  # the new images' patches only...
    projected = model.patch_rows(model.embed(norm(new))) @ model.projection
    covered = torch.cdist(projected, model.memory_bank @ model.projection).amin(1)
    assert covered.max() < 1.1 * model.coverage_radius  # ...all of them (coreset_ratio 1 stops at the radius)
    before, after = fitted_global.score_reference.view(-1, 2), model.score_reference.view(-1, 2)
    assert (after[:, 1] > 0.5 * before[:, 1]).all()  # the spreads keep their size
    x = norm(half_and_half([58, 74], 5))
    assert (model.map_and_score(x)[1] < 2).all()  # new normal images still look normal


class _Bank(ImageBankScore, nn.Module):
    """The image bank alone: one 3-channel stride-32 map described over one cell (mean, spread)."""

    def __init__(self) -> None:
        super().__init__()
        self.global_grid, self.global_strides = 1, (32,)
        self._init_image_bank([3])


@pytest.mark.parametrize("n", [2, 3, 5, 10, 64, 1000])
def test_normal_deviates_are_the_student_t_tails_read_as_normal_ones(n):
    """A standard score against n reference values is read through Student's t with n - 1 degrees
    of freedom: close to scipy's exact normal deviate of the same tail, monotone, odd, and the
    plain score as n grows."""
    z = torch.linspace(-40, 40, 801, dtype=torch.float64)
    got = normal_deviates(z, torch.tensor([float(n)], dtype=torch.float64))
    exact = -torch.from_numpy(special.ndtri_exp(stats.t.logsf(z.numpy() / math.sqrt(1 + 1 / n), n - 1)))
    torch.testing.assert_close(got, exact, rtol=0.082 if n == 2 else 0.05, atol=1e-3)
    assert (got.diff() > 0).all()
    torch.testing.assert_close(got, -got.flip(0), rtol=1e-12, atol=1e-12)  # odd
    assert (got.abs() <= z.abs()).all()  # a small sample never makes a score more extreme
    if n == 1000:
        torch.testing.assert_close(got[380:421], z[380:421], rtol=0.01, atol=0.01)  # |z| <= 2


def test_a_part_measured_on_few_images_counts_less_than_one_measured_on_many():
    """The same standard score is less extreme against 3 held-out images than against 60
    training images: the image score follows the part with the larger sample."""
    generator = torch.Generator().manual_seed(0)
    descriptors = torch.randn(60, 6, generator=generator)
    bank = _Bank()
    bank.set_image_bank(descriptors, torch.randn(3, generator=generator))
    assert bank.reference_counts.tolist() == [3, 60, 60]
    mean, std = bank.score_reference.view(-1, 2).unbind(1)
    new = torch.full((1, 6), 4.0)  # off the training images: its distances spreads above their means
    z = (torch.cat([torch.zeros(1), bank.descriptor_distances(new)[0]]) - mean) / std
    own = mean[0] + std[0] * (z[1:].max() + 1)  # one deviation more than the larger descriptor part
    assert z[1:].max() > 2
    parts = bank.score_parts(own[None], new)[0]
    assert parts[0] < parts[1:].max() and torch.equal(bank.combined_score(own[None], new), parts[1:].max()[None])
    bank.reference_counts = torch.empty(0)  # a model saved before the counts: plain standard scores
    torch.testing.assert_close(bank.score_parts(own[None], new)[0], torch.cat([z[1:].max()[None] + 1, z[1:]]))


@pytest.mark.parametrize("counts", [[2.5, 60, 60], [3, float("nan"), 60], [1, 60, 60], [3, 60], [[3, 60, 60]], [[]]])
def test_reference_counts_that_are_not_sample_sizes_are_refused_on_loading(counts):
    bank = _Bank()
    bank.set_image_bank(torch.randn(60, 6), torch.randn(3))
    with pytest.raises(ValueError, match="are not 3 whole counts of 2 or more"):
        _Bank().load_state_dict({**bank.state_dict(), "reference_counts": torch.tensor(counts)})


def test_a_capped_image_bank_keeps_one_image_of_each_kind_and_measures_every_image_against_it():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0] * 6, [10.0] * 6, [-10.0] * 6])
    descriptors = torch.cat([c + 0.1 * torch.randn(5, 6, generator=generator) for c in centres])  # 3 kinds x 5
    bank = _Bank()
    assert image_bank_rows(bank, descriptors, 15) is None and image_bank_rows(bank, descriptors, None) is None
    keep = image_bank_rows(bank, descriptors, 3, seed=1)
    assert sorted((keep // 5).tolist()) == [0, 1, 2]  # farthest-point selection: one of each kind

    bank.set_image_bank(descriptors, torch.randn(4, generator=generator), keep)
    rounded = descriptors.half().float()
    assert torch.equal(bank.image_bank, rounded[keep])
    for i, part in enumerate((slice(0, 3), slice(3, 6))):
        distances = torch.cdist(rounded[:, part], rounded[keep][:, part])
        for j, row in enumerate(keep.tolist()):
            distances[row, j] = torch.inf  # a kept image is measured against the other kept ones
        nearest = distances.min(1).values
        dropped = torch.ones(15, dtype=torch.bool)
        dropped[keep] = False
        assert nearest[keep].min() > 5 and nearest[dropped].max() < 1  # kept: the next kind; dropped: its own
        torch.testing.assert_close(bank.score_reference[2 + 2 * i:4 + 2 * i], torch.stack([nearest.mean(), nearest.std()]))
    new = centres[1:2] + 0.1 * torch.randn(1, 6, generator=generator)
    assert bank.descriptor_distances(new).max() < 1  # a new image of a known kind is near a kept one


def test_a_capped_image_bank_measures_new_normal_images_as_the_whole_one_does(fitted_global):
    """Ten training images, eight kept: new normal images still score within two spreads, an image
    no training image resembles well above them; added normals stay within the cap."""
    model = PatchCore(global_score=True, smooth_sigma=1.0).eval()
    stats = fit_patchcore(model, half_and_half(TRAIN_SPLITS, 0), norm, coreset_ratio=0.5, image_bank_size=8)
    assert stats["image_bank_size"] == len(model.image_bank) == 8 and len(model.reference_scores) == 10
    new_normals, stripes = norm(half_and_half([49, 54, 58, 62, 66, 70, 74, 78], 11)), norm(only_stripes(7))
    normal_scores, stripe_scores = model.map_and_score(new_normals)[1], model.map_and_score(stripes)[1]
    assert normal_scores.max() < 2 and stripe_scores.min() > normal_scores.max() + 2
    add_normals(model, textures("stripes", list(range(8)), 8, GLOBAL_SIZE), norm, coreset_ratio=0.25, image_bank_size=8)
    assert len(model.image_bank) == 8 and len(model.reference_scores) == 18
    assert (model.map_and_score(stripes)[1] < stripe_scores - 2).all()  # all stripes is normal now


def test_repeated_images_are_fitted_once(fitted_global):
    """A training set holding some images twice fits the model it would without the copies; added
    normals that repeat each other are added once."""
    train = half_and_half(TRAIN_SPLITS, 0)
    model = PatchCore(global_score=True, smooth_sigma=1.0).eval()
    stats = fit_patchcore(model, torch.cat([train, train[[4, 0, 7]]]), norm, coreset_ratio=0.5)
    assert stats["repeated_images"] == 3
    for name, value in fitted_global.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name

    new = half_and_half([54, 70], 21)
    stats = add_normals(model, torch.cat([new, new[[1]], new]), norm, coreset_ratio=0.25)
    assert stats["new_images"] == 2 and stats["repeated_images"] == 3 and len(model.image_bank) == 12


def test_a_model_saved_before_the_spread_descriptor_scores_with_the_mean_alone(fitted_global, tmp_path):
    """Model directories written before the spread descriptor (image bank NxG, four reference
    values) load, score with the patch and mean distances, and grow with add_normals."""
    info = ModelInfo(model="PatchCore", model_config=fitted_global.config(), input_size=GLOBAL_SIZE,
                     resize_mode="resize", mean=list(MEAN), std=list(STD), calibration=Calibration(1.0, 0.5, 1.0, 0.5))
    save_model_dir(tmp_path / "old", fitted_global, info)
    weights = tmp_path / "old" / "model.safetensors"
    state = load_file(str(weights))
    state["image_bank"] = state["image_bank"][:, :fitted_global.descriptor_widths[0]].contiguous()
    state["score_reference"] = state["score_reference"][:4].contiguous()
    del state["bank_neighbors"], state["reference_counts"]  # newer still
    save_file(state, str(weights))
    written_before_digests(tmp_path / "old")
    old, _ = load_model_dir(tmp_path / "old")
    x = torch.cat([half_and_half([60], 3), only_stripes(3)])
    patch_z, mean_z, _ = spreads_above(fitted_global, x)
    assert torch.allclose(old.map_and_score(norm(x))[1], torch.maximum(patch_z, mean_z), atol=1e-4)
    add_normals(old, textures("stripes", list(range(4)), 8, GLOBAL_SIZE), norm, coreset_ratio=0.25)
    assert old.image_bank.shape == (14, fitted_global.descriptor_widths[0]) and old.score_reference.shape == (4,)
    assert old.reference_counts.tolist() == [len(old.reference_scores), 14]


@pytest.mark.parametrize("damage", ["image_bank", "score_reference", "memory_bank", "reference_counts"])
def test_a_model_dir_whose_banks_do_not_fit_fails_on_loading(fitted_global, tmp_path, damage):
    """A damaged or mismatched weights file is one clear error when the model loads, not a
    traceback at the first image."""
    info = ModelInfo(model="PatchCore", model_config=fitted_global.config(), input_size=GLOBAL_SIZE,
                     resize_mode="resize", mean=list(MEAN), std=list(STD), calibration=Calibration(1.0, 0.5, 1.0, 0.5))
    save_model_dir(tmp_path / "pc", fitted_global, info)
    weights = tmp_path / "pc" / "model.safetensors"
    state = load_file(str(weights))
    state[damage] = state[damage][:, :-1].contiguous() if state[damage].ndim == 2 else state[damage][:-2].contiguous()
    save_file(state, str(weights))
    with pytest.raises(FlawscopeError, match=re.escape(f"{weights}: weights do not fit model PatchCore")):
        load_model_dir(tmp_path / "pc")


def _saved(model: PatchCore, path, size: int = SIZE):
    """``model`` saved as a model directory at ``path``: (its weights file, its tensors)."""
    info = ModelInfo(model="PatchCore", model_config=model.config(), input_size=size, resize_mode="resize",
                     mean=list(MEAN), std=list(STD), calibration=Calibration(1.0, 0.5, 1.0, 0.5))
    save_model_dir(path, model, info)
    return path / "model.safetensors", load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize(("damage", "message"), [
    ("beyond", r"bank_neighbors hold indices from 1000 to \d+, outside the (\d+) entries of the memory bank"),
    ("negative", r"bank_neighbors hold indices from -1 to \d+, outside the \d+ entries of the memory bank"),
    ("rows", r"bank_neighbors are \((\d+), 8\), not \d+x8 as for a memory bank of \d+ entries"),
    ("empty", r"its memory bank is empty: never fitted, or damaged"),
], ids=["beyond", "negative", "rows", "empty"])
def test_a_memory_bank_or_its_neighbours_damaged_fail_on_loading_in_one_line(fitted, tmp_path, damage, message):
    """Not a traceback at the first image (an index beyond the bank), nor a negative index that
    would silently wrap around to the bank's end."""
    weights, state = _saved(fitted, tmp_path / "pc")
    neighbors = state["bank_neighbors"]
    if damage == "beyond":
        state["bank_neighbors"] = neighbors + 1000
    elif damage == "negative":
        neighbors[5, 2] = -1
    elif damage == "rows":
        state["bank_neighbors"] = neighbors[:-1].contiguous()
    else:
        state["memory_bank"], state["bank_neighbors"] = state["memory_bank"][:0], neighbors[:0]
    save_file(state, str(weights))
    with pytest.raises(FlawscopeError) as refused:
        load_model_dir(tmp_path / "pc")
    assert str(refused.value).startswith(f"{weights}: weights do not fit model PatchCore (")
    assert re.search(message, str(refused.value)), refused.value


def test_bank_neighbors_follow_num_neighbors_edited_in_inference_yml(fitted, tmp_path):
    """The saved neighbourhood of 8 would weigh the image score with the wrong neighbours: it is
    found again for the 2 that ``num_neighbors: 3`` keeps, as each image's search finds them."""
    _saved(fitted, tmp_path / "pc")
    meta = tmp_path / "pc" / "inference.yml"
    assert "num_neighbors: 9\n" in meta.read_text()
    meta.write_text(meta.read_text().replace("num_neighbors: 9\n", "num_neighbors: 3\n"))
    model, _ = load_model_dir(tmp_path / "pc")
    assert model.bank_neighbors.shape == (len(fitted.memory_bank), 2)
    emb = model.embed(norm(textures("checks", [0, 5], 4)))
    scores = model.patch_scores(emb)
    torch.testing.assert_close(model.image_score(emb, scores), model.image_score(emb, scores, bank=model.memory_bank))


@pytest.mark.parametrize(("key", "value", "allowed"), [("num_neighbors", ".inf", "an integer >= 1"),
                                                      ("search_nprobe", ".inf", "an integer >= 1"),
                                                      ("num_neighbors", "4.0", "an integer >= 1"),
                                                      ("smooth_sigma", ".nan", "a number >= 0")])
def test_numbers_edited_in_inference_yml_are_checked_before_the_model_is_built(fitted, tmp_path, key, value, allowed):
    """Not an OverflowError or ValueError traceback from ``int(inf)`` in the model's constructor."""
    _saved(fitted, tmp_path / "pc")
    meta = tmp_path / "pc" / "inference.yml"
    text, count = re.subn(rf"(?m)^  {key}: .*$", f"  {key}: {value}", meta.read_text())
    assert count == 1
    meta.write_text(text)
    shown = {".inf": "Infinity", ".nan": "NaN"}.get(value, value)
    with pytest.raises(FlawscopeError, match=re.escape(f"{meta}: model_config {key} must be {allowed}, got {shown}")):
        load_model_dir(tmp_path / "pc")


def test_global_score_needs_two_training_images():
    model = PatchCore(global_score=True, smooth_sigma=1.0).eval()
    fit_patchcore(model, half_and_half([64], 0), norm, coreset_ratio=0.5)
    assert len(model.image_bank) == 0  # no spread to measure: the paper's score alone
    x = norm(only_stripes(1))
    emb, _ = model.features(x)
    assert torch.equal(model.map_and_score(x)[1], model.image_score(emb, model.patch_scores(emb)))


def test_grid_descriptors_are_each_cells_mean_and_spread():
    """One cell is the whole image's mean and spread; a 2x2 grid is those of each quarter, side by
    side, and a grid that does not divide the map is refused."""
    deep = torch.randn(3, 5, 4, 6)
    whole = PatchCore.describe(deep, 1)
    assert torch.allclose(whole, torch.cat([deep.mean((2, 3)), nn.functional.normalize(
        deep.std((2, 3), correction=0), dim=1)], dim=1), atol=1e-6)
    got = PatchCore.describe(deep, 2)
    top_right = deep[:, :, :2, 3:]  # cell (0, 1): columns 1, 1 + 4, ... of each half
    assert torch.allclose(got[:, 1:20:4], top_right.mean((2, 3)), atol=1e-6)
    spread = torch.stack([deep[:, :, r:r + 2, c:c + 3].std((2, 3), correction=0)
                          for r in (0, 2) for c in (0, 3)], dim=2).flatten(1)
    assert torch.allclose(got[:, 20:], nn.functional.normalize(spread, dim=1), atol=1e-6)
    for g in (3, 4):  # 3 does not divide 4 rows; 4 leaves cells of one row
        with pytest.raises(ValueError, match=f"a grid of {g}x{g} cells does not split the 4x6 feature map"):
            PatchCore.describe(deep, g)


def test_stride_16_descriptors_have_cells_of_as_many_features_as_stride_32s():
    """With ``global_strides`` [16, 32] the descriptors are those of each stride over a grid twice
    as fine at 16 (2x2 features a cell at both), finest first, each with its own place on the
    image score's scale; a model dir without the key describes stride 32 alone, as it did."""
    model = PatchCore(strides=(8,), global_score=True, global_grid=2, global_strides=(32, 16)).eval()
    assert model.global_strides == (16, 32) and model.config()["global_strides"] == [16, 32]
    c16, c32 = model.extractor.out_channels[-2:]
    assert model.descriptor_widths == [c16 * 16, c16 * 16, c32 * 4, c32 * 4]
    x = norm(half_and_half([60, 64], 1))
    _, level16, level32 = model.extractor(x)
    torch.testing.assert_close(model.features(x)[1], torch.cat([PatchCore.describe(level16, 4),
                                                                 PatchCore.describe(level32, 2)], 1))
    fit_patchcore(model, half_and_half(TRAIN_SPLITS, 0), norm, coreset_ratio=0.5)
    assert model.image_bank.shape == (10, sum(model.descriptor_widths)) and model.score_reference.shape == (10,)
    emb, descriptor = model.features(norm(only_stripes(7)))
    parts = model.score_parts(model.image_score(emb, model.patch_scores(emb)), descriptor)
    assert parts.shape == (2, 5) and (parts[:, 3] > 3).all()  # stride 32's mean: no training image is all stripes
    assert torch.equal(model.map_and_score(norm(only_stripes(7)))[1], parts.amax(1))
    old = build_model("PatchCore", {k: v for k, v in model.config().items() if k != "global_strides"}, pretrained=False)
    assert old.global_strides == (32,) and old.descriptor_widths == [c32 * 4, c32 * 4]
    with pytest.raises(ValueError, match="global_strides must be some of 8, 16 and 32"):
        PatchCore(pretrained=False, global_score=True, global_strides=(4,))


def test_an_image_bank_without_spread_is_not_divided_by_zero():
    """Two images: one distance measured twice, so no bank. Three at equal distances: their spread
    is 0 and counts as a thousandth of the mean."""
    bank = _Bank()
    bank.set_image_bank(torch.randn(2, 6), torch.randn(4))
    assert len(bank.image_bank) == 0 and torch.equal(bank.combined_score(torch.tensor([1.5]), torch.randn(1, 6)),
                                                     torch.tensor([1.5]))
    corners = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.75 ** 0.5, 0.0]])
    bank.set_image_bank(torch.cat([corners, torch.ones(3, 3)], dim=1), torch.randn(4))
    mean, std = bank.score_reference[2:4].tolist()
    assert mean == pytest.approx(1, abs=1e-3) and std == pytest.approx(1e-3 * mean)
