"""STFPM as a pure module: shapes, the loss, the anomaly map and the training loop's contract."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from flawscope.errors import FlawscopeError
from flawscope.inference.model_dir import Calibration, ModelInfo, load_model_dir, read_model_info, save_model_dir
from flawscope.inference.runtimes import import_runtime
from flawscope.models.common import GaussianBlur
from flawscope.models.image_bank import normal_deviates
from flawscope.models.stfpm import STFPM, feature_distance, stfpm_loss
from flawscope.training.stfpm_trainer import CHECKPOINT_FILES, fit_image_bank, read_checkpoint


def _model(**kwargs) -> STFPM:
    torch.manual_seed(0)
    return STFPM(pretrained=False, **kwargs).eval()


def test_map_has_the_input_size_and_is_zero_when_student_equals_teacher() -> None:
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 1, 64, 64)
    model.student.load_state_dict(model.teacher.state_dict())
    assert model(x).abs().max() < 1e-5


def test_score_levels_leave_the_shallow_levels_out_of_the_image_score_but_not_of_the_map() -> None:
    """A student equal to the teacher up to stride 8 and different after it: the stride-8 level's
    distances are zero, so the product map is zero; the deepest two levels still tell."""
    x = torch.randn(2, 3, 64, 64)
    scores, maps = {}, {}
    for levels in (None, 2):
        model = _model(score_levels=levels)
        state = model.teacher.state_dict()
        stride8_tap = model.teacher.taps[0]
        for name, value in model.student.state_dict().items():
            deeper = name.startswith("_blocks.") and int(name.split(".")[1]) > stride8_tap
            if not deeper:
                value.copy_(state[name])
        maps[levels], scores[levels] = model.map_and_score(x)
    assert torch.equal(maps[None], maps[2]) and maps[2].abs().max() < 1e-5
    assert torch.allclose(scores[None], maps[None].flatten(1).amax(1))
    assert (scores[2] > 1e-3).all()


def test_score_levels_beyond_the_configured_levels_mean_all_of_them() -> None:
    assert _model(strides=(16, 32), score_levels=2).score_levels is None
    assert _model(strides=(16,), score_levels=2).config()["score_levels"] is None
    with pytest.raises(ValueError, match="score_levels"):
        _model(score_levels=0)


def test_score_levels_export_to_onnx_as_in_torch(tmp_path) -> None:
    from flawscope.inference.export import _MapAndScore, export_graph

    ort = import_runtime("onnxruntime")

    model, x = _model(score_levels=2), torch.randn(1, 3, 64, 64)
    export_graph(_MapAndScore(model), (x,), ["image"], tmp_path / "model.onnx", "onnx")
    onnx_map, onnx_score = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"image": x.numpy()})
    with torch.no_grad():
        torch_map, torch_score = model.map_and_score(x)
    assert torch.allclose(torch.from_numpy(onnx_map), torch_map, atol=1e-5)
    assert torch.allclose(torch.from_numpy(onnx_score), torch_score, rtol=1e-4)
    assert not torch.allclose(torch_score, torch_map.flatten(1).amax(1))  # the score is not the map's maximum


def test_feature_distance_is_scale_invariant_and_bounded() -> None:
    a = torch.randn(1, 8, 4, 4)
    assert torch.allclose(feature_distance(a, 3 * a), torch.zeros(1, 1, 4, 4), atol=1e-6)
    assert torch.allclose(feature_distance(a, -a), torch.full((1, 1, 4, 4), 2.0), atol=1e-5)


def test_loss_trains_only_the_student_and_the_teacher_stays_in_eval_mode() -> None:
    model = _model().train()
    assert not model.teacher.training and model.student.training
    x = torch.randn(2, 3, 64, 64)
    loss = stfpm_loss(model.teacher(x), model.student(x))
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters())


def test_hard_loss_averages_each_levels_hardest_positions_and_leaves_the_rest_without_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 6, 4, 4, generator=gen)]
    student = [torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True),
               torch.randn(2, 6, 4, 4, generator=gen, requires_grad=True)]
    dists = [feature_distance(t, s).flatten() for t, s in zip(teacher, student)]
    # 10% of 128 positions -> the 12 largest; of 32 -> the 3 largest
    expected = sum(d.sort(descending=True).values[:k].mean() for d, k in zip(dists, (12, 3)))
    loss = stfpm_loss(teacher, student, hard_fraction=0.1)
    assert torch.allclose(loss, expected)
    assert torch.allclose(stfpm_loss(teacher, student, hard_fraction=1.0), stfpm_loss(teacher, student))
    assert loss > stfpm_loss(teacher, student)
    loss.backward()
    moved = student[1].grad.abs().sum(1).flatten() > 0  # positions of the deeper level that get a gradient
    assert moved.sum() == 3 and moved[dists[1].topk(3).indices].all()


def test_product_and_sum_maps_differ_and_sum_is_larger() -> None:
    x = torch.randn(1, 3, 64, 64)
    product, total = _model(map_combine="product")(x), _model(map_combine="sum")(x)
    assert (total > product).all()


def test_gaussian_blur_keeps_constants_and_spreads_a_peak() -> None:
    blur = GaussianBlur(2.0)
    assert torch.allclose(blur(torch.ones(1, 1, 20, 20)), torch.ones(1, 1, 20, 20), atol=1e-6)
    peak = torch.zeros(1, 1, 21, 21)
    peak[0, 0, 10, 10] = 1
    out = blur(peak)
    assert out[0, 0, 10, 10] < 1 and out[0, 0, 10, 12] > 0 and abs(out.sum() - 1) < 1e-5
    assert torch.equal(GaussianBlur(0)(peak), peak)


@pytest.mark.parametrize("sigma", [0.0, 1.0, 4.0])
@pytest.mark.parametrize(("source", "size"),
                         [((32, 32), (256, 256)), ((7, 12), (40, 30)), ((40, 36), (20, 30)), ((20, 20), (20, 20))])
def test_upsampled_blur_is_interpolation_then_blur(sigma, source, size) -> None:
    """PatchCore's one-matrix-product-per-axis map equals bilinear resizing, then the blur's
    reflect-padded convolutions, also where it shrinks an axis."""
    blur = GaussianBlur(sigma)
    amap = torch.rand(2, 1, *source, generator=torch.Generator().manual_seed(0))
    expected = blur(F.interpolate(amap, size=size, mode="bilinear", align_corners=False))
    torch.testing.assert_close(blur.upsampled(amap, size), expected, rtol=1e-5, atol=1e-6)


def _random_images(*counts: int) -> tuple[torch.Tensor, ...]:
    """Batches of random 64x64 RGB uint8 images, as the train mode holds them, one per count."""
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=generator) for n in counts)


def _norm(batch: torch.Tensor) -> torch.Tensor:
    return batch.permute(0, 3, 1, 2).float() / 127.5 - 1


def _own_scores(model: STFPM, x: torch.Tensor) -> torch.Tensor:
    levels = model.level_maps(model.teacher(x), model.student(x), x.shape[-2:])
    return model.image_score(levels, model.combine(levels))


@torch.no_grad()
def test_image_bank_measures_the_student_on_held_out_images_and_scores_the_largest_part() -> None:
    model = _model(global_score=True, global_strides=(16, 32), smooth_sigma=1.0)
    train, held_out, test = _random_images(6, 5, 3)
    x = _norm(test)
    before = model.map_and_score(x)
    assert torch.equal(before[1], _own_scores(model, x))  # no bank yet: the student's score

    fit_image_bank(model, train, held_out, torch.device("cpu"), _norm, batch_size=4)  # batches split both sets
    assert model.image_bank.shape == (6, sum(model.descriptor_widths))
    assert model.descriptor_widths == [112 * 4, 112 * 4, 320, 320]  # grid 2x2 at stride 16, one cell at 32
    reference = _own_scores(model, _norm(held_out))
    torch.testing.assert_close(model.reference_scores, reference)
    torch.testing.assert_close(model.score_reference[:2], torch.stack([reference.mean(), reference.std()]))
    amap, score = model.map_and_score(x)
    assert torch.equal(amap, before[0])  # the map is the student's still
    parts = model.score_parts(_own_scores(model, x), model.teacher_descriptors(model.teacher(x)))
    assert parts.shape == (3, 5) and torch.equal(score, parts.amax(1))
    assert model.reference_counts.tolist() == [5, 6, 6, 6, 6]  # held-out images; every training image
    torch.testing.assert_close(parts[:, 0], normal_deviates((before[1] - reference.mean()) / reference.std(),
                                                            torch.tensor([5.0])))

    fit_image_bank(model, train, held_out, torch.device("cpu"), _norm, size=4)  # Model.image_bank_size
    assert len(model.image_bank) == 4 and torch.equal(model.reference_scores, reference)

    fit_image_bank(model, train, held_out[:1], torch.device("cpu"), _norm)  # one held-out score has no spread
    assert len(model.image_bank) == 0 and torch.equal(model.map_and_score(x)[1], before[1])


@torch.no_grad()
def test_strides_listed_unsorted_make_the_sorted_model(tmp_path) -> None:
    """Model.strides [32, 8, 16] is the model of [8, 16, 32]: the backbone returns its levels in
    stride order, so global_strides [32] describe the stride-32 features (not the first listed
    level's), score_levels keep the deepest, and a model directory saved with either order loads
    and scores the same."""
    settings = {"score_levels": 2, "global_score": True, "global_strides": (32,), "smooth_sigma": 1.0}
    model, unsorted = _model(strides=(8, 16, 32), **settings), _model(strides=(32, 8, 16), **settings)
    assert unsorted.config() == model.config() and unsorted.descriptor_widths == [320, 320]
    unsorted.load_state_dict(model.state_dict())
    train, held_out, test = _random_images(4, 3, 2)
    x = _norm(test)
    feats = unsorted.teacher(x)
    assert torch.equal(unsorted.teacher_descriptors(feats), unsorted.describe(feats[2], 1))
    fit_image_bank(unsorted, train, held_out, torch.device("cpu"), _norm)
    fit_image_bank(model, train, held_out, torch.device("cpu"), _norm)
    expected = model.map_and_score(x)
    assert all(torch.equal(a, b) for a, b in zip(unsorted.map_and_score(x), expected))
    for order in ([32, 8, 16], [8, 16, 32]):  # the training config's order, as inference.yml keeps it
        info = ModelInfo(model="STFPM", model_config={**unsorted.config(), "strides": order}, input_size=64,
                         resize_mode="resize", mean=[0.5] * 3, std=[0.5] * 3,
                         calibration=Calibration(1.0, 0.5, 1.0, 0.5))
        save_model_dir(tmp_path / "st", unsorted, info)
        loaded, _ = load_model_dir(tmp_path / "st")
        assert all(torch.equal(a, b) for a, b in zip(loaded.map_and_score(x), expected))


def test_models_saved_before_score_levels_score_on_every_level() -> None:
    from flawscope.inference.model_dir import load_model_dir
    from flawscope.inference.predictor import default_model_dir

    model, info = load_model_dir(default_model_dir())
    assert "score_levels" not in info.model_config and model.score_levels is None
    assert "global_score" not in info.model_config and "image_bank" not in model.state_dict()
    x = torch.randn(1, 3, info.input_size, info.input_size)
    with torch.no_grad():
        amap, score = model.map_and_score(x)
    assert torch.equal(score, amap.flatten(1).amax(1))


def test_a_checkpoint_file_given_for_its_folder_is_told_the_folder(tmp_path) -> None:
    """As PaddleX users give a weights file: the error named the file it was given as missing."""
    folder = tmp_path / "iter_25"
    folder.mkdir()
    for name in CHECKPOINT_FILES:
        (folder / name).write_text("{}")
    with pytest.raises(FlawscopeError, match=re.escape(f"give the folder that holds it ({folder})")):
        read_checkpoint(folder / CHECKPOINT_FILES[0], {})
    # ... and the checkpoint given for a model directory says what it is.
    with pytest.raises(FlawscopeError, match=re.escape(f"{folder}: not an inference model directory (missing "
                                                       "inference.yml); it is a training checkpoint, which "
                                                       "Train.resume_path takes")):
        read_model_info(folder)
