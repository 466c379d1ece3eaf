"""Nearest-neighbour search of PatchCore: oneDNN and faiss (exact and approximate) against the torch reference."""

from __future__ import annotations

import pytest
import torch

import flawscope.models.knn as knn
import flawscope.models.patchcore as patchcore
from flawscope.errors import FlawscopeError
from flawscope.models import build_model
from flawscope.models.knn import FaissIndex, Int8Index, OneDnnIndex, nearest_neighbors


def clustered(n: int, dim: int = 16, clusters: int = 40, seed: int = 0) -> torch.Tensor:
    """Points around ``clusters`` centres: the structure of real patch features, which IVF exploits."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=gen) * 4
    return centers[torch.randint(clusters, (n,), generator=gen)] + torch.randn(n, dim, generator=gen) * 0.5


def test_torch_search_is_brute_force():
    bank, queries = torch.randn(300, 8), torch.randn(50, 8)
    dist, idx = nearest_neighbors(queries, bank)
    ref = torch.cdist(queries, bank)
    torch.testing.assert_close(dist, ref.amin(1), rtol=1e-4, atol=1e-4)
    assert torch.equal(idx, ref.argmin(1))
    only, none = nearest_neighbors(queries, bank, with_indices=False)  # what PatchCore's patch search uses
    assert none is None and torch.equal(only, dist)


def test_faiss_exact_matches_torch():
    bank, queries = clustered(3000), clustered(500, seed=1)
    dist, idx = FaissIndex(bank, "exact").search(queries)
    ref_dist, ref_idx = nearest_neighbors(queries, bank)
    assert (idx == ref_idx).float().mean() > 0.999  # ties aside
    torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not knn.onednn_available(), reason="torch without oneDNN's packed linear layer, or not on x86")
def test_onednn_exact_matches_torch():
    bank, queries = clustered(3000), clustered(1500, seed=1)  # 1500 queries: several chunks, the last one short
    index = OneDnnIndex(bank)
    assert 1 < len(queries) / index.chunk < 5
    dist, idx = index.search(queries)
    ref_dist, ref_idx = nearest_neighbors(queries, bank)
    assert (idx == ref_idx).float().mean() > 0.999  # ties aside
    torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-4)
    only, none = index.search(queries[:7].T.contiguous().T, with_indices=False)  # a strided view too
    assert none is None and torch.equal(only, dist[:7])


def test_cpu_index_takes_the_fastest_available(monkeypatch):
    bank = clustered(500)
    if knn.onednn_available():
        assert isinstance(knn.cpu_index(bank, "exact", 8), OneDnnIndex)  # small: float32 is faster
        if knn.int8_available():
            wide = clustered(100, dim=640)  # few rows of many values, as an image bank: read from memory
            assert isinstance(knn.cpu_index(wide, "exact", 8), OneDnnIndex)
            monkeypatch.setattr(knn, "INT8_MIN_VALUES", wide.numel())
            assert isinstance(knn.cpu_index(wide, "exact", 8), Int8Index)
            assert isinstance(knn.cpu_index(bank, "exact", 8), OneDnnIndex)
            monkeypatch.setattr(knn, "INT8_MIN_BANK", 500)
            assert isinstance(knn.cpu_index(bank, "exact", 8), Int8Index)
    monkeypatch.setattr(knn, "int8_available", lambda: False)
    if knn.onednn_available():
        assert isinstance(knn.cpu_index(bank, "exact", 8), OneDnnIndex)
    assert isinstance(knn.cpu_index(bank, "approximate", 8), FaissIndex)  # oneDNN has no approximate search
    monkeypatch.setattr(knn, "onednn_available", lambda: False)
    assert isinstance(knn.cpu_index(bank, "exact", 8), FaissIndex)
    monkeypatch.setattr(knn, "faiss", None)
    assert knn.cpu_index(bank, "exact", 8) is None  # torch's nearest_neighbors, then


@pytest.mark.skipif(not knn.onednn_available(), reason="torch without oneDNN's packed linear layer, or not on x86")
def test_onednn_is_tried_not_assumed(monkeypatch):
    def changed_operator(self, queries, with_indices=True):
        raise RuntimeError("mkldnn::_linear_pointwise() expected at most 6 argument(s)")

    monkeypatch.setattr(OneDnnIndex, "search", changed_operator)  # as a torch release might
    assert knn.onednn_available.__wrapped__() is False  # faiss and torch search, then


@pytest.mark.skipif(not knn.onednn_available(), reason="torch without oneDNN's packed linear layer, or not on x86")
def test_onednn_that_runs_but_computes_otherwise_is_not_used(monkeypatch):
    reorder = torch.ops.mkldnn._reorder_linear_weight

    def other_layout(weight, batch_size):  # runs, but the linear layer reads its rows in another order
        return reorder(weight.flip(0).contiguous(), batch_size)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", other_layout)
    assert knn.onednn_available.__wrapped__() is False


needs_int8 = pytest.mark.skipif(not knn.int8_available(), reason="no exact oneDNN int8 linear layer here (x86 with VNNI)")


def counted_fallbacks(monkeypatch) -> list:
    """Calls of the float32 search that ``Int8Index`` falls back on."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return nearest_neighbors(*args, **kwargs)

    monkeypatch.setattr(knn, "nearest_neighbors", counting)
    return calls


@needs_int8
def test_int8_index_is_exact(monkeypatch):
    bank, queries = clustered(3000, dim=64), clustered(1500, dim=64, seed=1)  # several chunks, the last one short
    index = Int8Index(bank)
    assert 1 < len(queries) / index.chunk < 5
    fallbacks = counted_fallbacks(monkeypatch)
    dist, idx = index.search(queries)
    assert not fallbacks  # the int8 candidates did it
    ref = torch.cdist(queries.double(), bank.double())
    ref_dist, ref_idx = ref.min(1)
    assert (idx == ref_idx).float().mean() > 0.999  # ties aside
    torch.testing.assert_close(dist, ref_dist.float(), rtol=1e-5, atol=1e-5)
    only, none = index.search(queries[:7].T.contiguous().T, with_indices=False)  # a strided view too
    assert none is None
    torch.testing.assert_close(only, dist[:7], rtol=1e-6, atol=1e-6)


@needs_int8
def test_int8_index_tells_apart_rows_its_rounding_cannot(monkeypatch):
    """Bank rows at distances 10, 10.001, 10.002... of each query: int8 rounds them alike; the
    nearest must still be the nearest, which a search that trusted the rounded products misses."""
    gen = torch.Generator().manual_seed(3)
    queries = torch.randn(200, 48, generator=gen) * 3
    directions = torch.nn.functional.normalize(torch.randn(200, 40, 48, generator=gen), dim=2)
    radii = 10 + 0.001 * torch.randperm(40, generator=gen).double()
    bank = (queries[:, None].double() + directions.double() * radii[:, None]).flatten(0, 1).float()
    fallbacks = counted_fallbacks(monkeypatch)
    dist, idx = Int8Index(bank).search(queries)
    assert not fallbacks
    assert torch.equal(idx, torch.cdist(queries.double(), bank.double()).argmin(1))
    torch.testing.assert_close(dist, torch.full((200,), 10.0), rtol=0, atol=1e-4)


@needs_int8
def test_int8_index_measures_the_whole_bank_where_most_rows_are_within_reach(monkeypatch):
    """One query, 60 rows at distances 10, 10.001, 10.002...: all are candidates, and the float32
    product over the bank finds the nearest without the fallback search."""
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(1, 48, generator=gen) * 3
    directions = torch.nn.functional.normalize(torch.randn(60, 48, generator=gen), dim=1)
    bank = (query.double() + directions.double() * (10 + 0.001 * torch.randperm(60, generator=gen).double())[:, None]).float()
    index = Int8Index(bank)
    fallbacks, gathered = counted_fallbacks(monkeypatch), []
    real_index = torch.Tensor.__getitem__
    monkeypatch.setattr(torch.Tensor, "__getitem__", lambda t, i: gathered.append(t is index.bank) or real_index(t, i))
    dist, idx = index.search(query)
    assert not fallbacks and not any(gathered)  # no rows gathered: the bank measured whole
    assert int(idx) == int(torch.cdist(query.double(), bank.double()).argmin())
    torch.testing.assert_close(dist, torch.tensor([10.0]), rtol=0, atol=1e-4)


@needs_int8
def test_int8_index_bounds_each_row_by_its_own_rounding(monkeypatch):
    """A few bank rows far larger than the rest round far more coarsely: a bound taken at their
    rounding would reach most of the bank from every query, and the search would measure it whole.
    Bounded by each block of similar rows, the queries measure a few rows, and find the nearest."""
    bank = torch.cat([clustered(3000, dim=64), clustered(30, dim=64, seed=2) * 50])
    queries = clustered(100, dim=64, seed=1)
    index = Int8Index(bank)
    fallbacks, gathered = counted_fallbacks(monkeypatch), []
    real_index = torch.Tensor.__getitem__
    monkeypatch.setattr(torch.Tensor, "__getitem__",
                        lambda t, i: (gathered.append(len(i)) if t is index.bank else None) or real_index(t, i))
    dist, idx = index.search(queries)
    assert not fallbacks and gathered and sum(gathered) < len(bank) / 3  # candidates, not the bank whole
    ref = torch.cdist(queries.double(), bank.double())
    assert (idx == ref.argmin(1)).float().mean() > 0.999  # ties aside
    torch.testing.assert_close(dist, ref.amin(1).float(), rtol=1e-5, atol=1e-5)


@needs_int8
def test_int8_index_checks_its_bound_and_searches_in_float32_where_it_fails(monkeypatch):
    bank, queries = clustered(2000, dim=32), clustered(300, dim=32, seed=1)
    index = Int8Index(bank)
    real = torch.ops.onednn.qlinear_pointwise

    def off_by_one_row(*args):  # as a kernel that got one bank row wrong
        out = real(*args)
        out[:, 123] -= 1000  # far more than the rounding can move it
        return out

    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", off_by_one_row)
    fallbacks = counted_fallbacks(monkeypatch)
    dist, idx = index.search(queries)
    assert fallbacks
    ref_dist, ref_idx = nearest_neighbors(queries, bank)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-5, atol=1e-5)
    nan = index.search(torch.full((3, 32), torch.nan))[0]  # not finite: float32 says what it says
    assert torch.isnan(nan).all()
    dist, idx = index.search(torch.empty(0, 32))  # no queries: nothing found, as faiss answers
    assert dist.shape == idx.shape == (0,) and idx.dtype == torch.long


@needs_int8
def test_int8_is_tried_not_assumed(monkeypatch):
    real = torch.ops.onednn.qlinear_pointwise

    def halved_weights(x, x_scale, x_zero_point, weight, *args):  # what CPUs without VNNI may do
        return 2 * real(x, x_scale, x_zero_point, weight, *args).div(2).trunc()

    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", halved_weights)
    assert knn.int8_available.__wrapped__() is False  # the float32 product, then


@pytest.mark.parametrize("onednn", [True, False])
def test_nearest_offsets_are_squared_distances_less_the_query_norm(monkeypatch, onednn):
    if onednn and not knn.onednn_available():
        pytest.skip("torch without oneDNN's packed linear layer, or not on x86")
    monkeypatch.setattr(knn, "onednn_available", lambda: onednn)
    bank, points = clustered(300), clustered(5000, seed=2)  # 5000 points: several chunks
    offsets = torch.empty(len(points))
    for rows, offset in knn.nearest_offsets(points, bank):
        offsets[rows] = offset
    torch.testing.assert_close(offsets + points.pow(2).sum(1), torch.cdist(points, bank).amin(1).pow(2),
                               rtol=1e-4, atol=1e-2)


def test_approximate_search_overestimates_only_and_is_exact_with_all_cells():
    bank, queries = clustered(4000), clustered(1000, seed=1)
    ref_dist, ref_idx = nearest_neighbors(queries, bank)
    approx = FaissIndex(bank, "approximate", nprobe=4)
    assert approx.index.nlist == 63  # about sqrt(4000) cells
    dist, idx = approx.search(queries)
    assert (dist >= ref_dist - 1e-4).all()  # a real bank entry: never closer than the nearest one
    assert (idx == ref_idx).float().mean() > 0.9
    torch.testing.assert_close(dist, torch.cdist(queries, bank)[torch.arange(len(idx)), idx], rtol=1e-4, atol=1e-4)
    dist, idx = FaissIndex(bank, "approximate", nprobe=10_000).search(queries)  # every cell scanned
    torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-4)


def small_patchcore(**kwargs) -> patchcore.PatchCore:
    torch.manual_seed(0)
    model = patchcore.PatchCore(pretrained=False, smooth_sigma=0, **kwargs).eval()
    bank = clustered(2000, dim=model.embed_dim)
    model.set_memory_bank(bank, torch.eye(model.embed_dim), 1.0)
    return model


@pytest.mark.parametrize("index", ["int8", "onednn", "faiss"])
def test_model_scores_the_same_through_each_index(monkeypatch, index):
    if index != "faiss" and not (knn.onednn_available() and (index == "onednn" or knn.int8_available())):
        pytest.skip(f"torch without oneDNN's {index} linear layer, or not on x86")
    monkeypatch.setattr(knn, "onednn_available", lambda: index != "faiss")
    monkeypatch.setattr(knn, "int8_available", lambda: index == "int8")
    monkeypatch.setattr(knn, "INT8_MIN_BANK", 0)  # the image bank's 30 rows too
    model = small_patchcore(strides=(8,), global_score=True)
    model.set_image_bank(torch.randn(30, model.image_bank.shape[1]), torch.randn(20))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = model.map_and_score(x)
        kind = {"int8": Int8Index, "onednn": OneDnnIndex, "faiss": FaissIndex}[index]
        assert {name: type(i) for name, i in model._indexes.items()} == \
            {"patches exact": kind, "descriptor 0 exact": kind, "descriptor 1 exact": kind}  # both banks
        monkeypatch.setattr(knn, "onednn_available", lambda: False)
        monkeypatch.setattr(knn, "faiss", None)
        model.set_image_bank(model.image_bank, model.reference_scores)  # drops the indexes
        fallback = model.map_and_score(x)
        assert set(model._indexes.values()) == {None}  # torch searched
    for a, b in zip(fast, fallback):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_index_follows_a_new_bank():
    model = small_patchcore(strides=(8,))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.set_memory_bank(clustered(2000, dim=model.embed_dim, seed=5) + 3, torch.eye(model.embed_dim), 1.0)
        after = model(x)
        torch.testing.assert_close(after, model.anomaly_map(
            nearest_neighbors(model.patch_rows(model.embed(x)), model.memory_bank)[0].view(1, 8, 8), (64, 64)))
    assert not torch.allclose(before, after)


def test_descriptor_indexes_follow_a_new_image_bank():
    model = small_patchcore(strides=(8,), global_score=True)
    model.set_image_bank(torch.randn(30, model.image_bank.shape[1]), torch.randn(20))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, descriptor = model.features(x)
        before = model.descriptor_distances(descriptor)
        model.set_image_bank(torch.randn(30, model.image_bank.shape[1]) + 5, torch.randn(20))
        after = model.descriptor_distances(descriptor)
    reference = [nearest_neighbors(part, bank)[0] for part, bank in
                 zip(descriptor.split(model.descriptor_widths, 1), model.image_bank.split(model.descriptor_widths, 1))]
    torch.testing.assert_close(after, torch.stack(reference, 1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before, after)


def test_approximate_without_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(knn, "faiss", None)
    with pytest.raises(FlawscopeError, match="approximate.*pip install faiss-cpu"):
        build_model("PatchCore", {"strides": [8], "search": "approximate"}, pretrained=False)


@pytest.mark.parametrize("onednn", [True, False])
def test_nearest_others_are_each_rows_nearest_but_itself(monkeypatch, onednn):
    if onednn and not knn.onednn_available():
        pytest.skip("torch without oneDNN's packed linear layer, or not on x86")
    monkeypatch.setattr(knn, "onednn_available", lambda: onednn)
    monkeypatch.setattr(knn, "CHUNK_ELEMENTS", 3 * 500)  # several chunks
    bank = clustered(500, dim=16)
    dist = torch.cdist(bank, bank).fill_diagonal_(torch.inf)
    expected = dist.topk(4, dim=1, largest=False).indices
    assert torch.equal(knn.nearest_others(bank, 4), expected)
    rows = torch.tensor([7, 3, 7])
    assert torch.equal(knn.nearest_others(bank, 4, rows), expected[rows])
    assert knn.nearest_others(bank, 0, rows).shape == (3, 0)


@pytest.mark.parametrize("onednn", [True, False])
def test_search_once_is_nearest_neighbors(monkeypatch, onednn):
    if onednn and not knn.onednn_available():
        pytest.skip("torch without oneDNN's packed linear layer, or not on x86")
    monkeypatch.setattr(knn, "onednn_available", lambda: onednn)
    bank, queries = clustered(3000), clustered(1500, seed=1)  # several chunks
    dist, idx = knn.search_once(queries, bank)
    ref_dist, ref_idx = nearest_neighbors(queries, bank)
    assert (idx == ref_idx).float().mean() > 0.999  # ties aside
    torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-4)
    assert knn.search_once(queries, bank, with_indices=False)[1] is None
