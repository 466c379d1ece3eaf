"""Device parsing; CUDA paths run here by faking torch.cuda's view of the machine."""

from __future__ import annotations

import pytest
import torch

from flawscope.device import parse_device
from flawscope.errors import FlawscopeError


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("spec", ["cpu", "CPU", "  cpu "])
def test_cpu(spec: str) -> None:
    assert parse_device(spec) == [torch.device("cpu")]


@pytest.mark.parametrize(
    ("spec", "ids"),
    [
        ("gpu", [0, 1]),
        ("cuda", [0, 1]),
        ("gpu:0", [0]),
        ("GPU:1", [1]),
        ("cuda:1", [1]),
        ("gpu:1,0", [1, 0]),
        (" gpu: 0, 1 ", [0, 1]),
    ],
)
def test_gpu_forms(monkeypatch: pytest.MonkeyPatch, spec: str, ids: list[int]) -> None:
    fake_gpus(monkeypatch, 2)
    assert parse_device(spec) == [torch.device("cuda", i) for i in ids]


def test_gpu_index_beyond_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 1)
    with pytest.raises(FlawscopeError) as info:
        parse_device("gpu:1")
    expected = "Global.device: 'gpu:1' asked for GPU 1 but 1 CUDA device(s) are visible"
    assert str(info.value) == expected


def test_gpu_listed_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 2)
    with pytest.raises(FlawscopeError, match="same GPU more than once"):
        parse_device("gpu:0,0")


@pytest.mark.parametrize("cuda_build", [None, "12.1"])
def test_gpu_without_cuda(monkeypatch: pytest.MonkeyPatch, cuda_build: str | None) -> None:
    fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    with pytest.raises(FlawscopeError) as info:
        parse_device("gpu")
    message = str(info.value)
    assert message.startswith("Global.device: 'gpu' asked for a GPU but CUDA is not available")
    assert f"this torch build: {torch.__version__}, " in message
    assert ("CPU only" if cuda_build is None else "CUDA 12.1") in message


@pytest.mark.parametrize("spec", ["", "tpu", "gpu:", "gpu:a", "gpu:0,", "cpu:0", "gpu0", "mps"])
def test_unknown_spec_lists_accepted_forms(spec: str) -> None:
    with pytest.raises(FlawscopeError) as info:
        parse_device(spec)
    assert f"{spec!r} is not a device; use cpu, gpu (all visible GPUs), gpu:N" in str(info.value)


def test_prediction_runs_on_the_first_of_several_gpus_and_says_so(monkeypatch, caplog) -> None:
    import logging

    from flawscope.device import one_device

    fake_gpus(monkeypatch, 2)
    caplog.set_level(logging.WARNING, logger="flawscope")
    assert one_device("gpu:1,0") == torch.device("cuda", 1)
    assert "names 2 GPUs; only training uses several, this runs on the first (cuda:1)" in caplog.text
    caplog.clear()
    assert one_device("gpu:0") == torch.device("cuda", 0) and not caplog.text
