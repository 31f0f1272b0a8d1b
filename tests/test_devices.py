"""Device choice: known names only, devices this machine has only, and an error that says what it has."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ferkit.devices import DeviceError, available_devices, pick_device

ON_CPU_ONLY = not torch.cuda.is_available()


def fake_cuda(monkeypatch: pytest.MonkeyPatch, gpus: int, build: str | None = "12.8") -> None:
    """Make torch look like a CUDA build (`build`) with `gpus` visible GPUs."""
    monkeypatch.setattr(torch.version, "cuda", build)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_cpu_and_auto() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cpu:0") == torch.device("cpu:0")
    assert available_devices()[0] == "cpu"
    if ON_CPU_ONLY and not torch.backends.mps.is_available():
        assert pick_device("auto") == pick_device() == torch.device("cpu")
        assert available_devices() == ["cpu"]


@pytest.mark.parametrize("name", ["gpu", "GPU", "cuda0", "tpu", "meta", "", "cpu:x", "cuda:-1"])
def test_names_that_are_not_devices(name: str) -> None:
    with pytest.raises(DeviceError) as err:
        pick_device(name)
    message = str(err.value)
    assert message.startswith(f"device {name!r} is not a device ferkit runs on: choose auto, cpu, cuda, cuda:N or mps")
    assert message.endswith(f"(this machine has: {', '.join(available_devices())})")
    assert "\n" not in message


@pytest.mark.skipif(not ON_CPU_ONLY, reason="this machine has a CUDA GPU")
def test_cuda_on_this_cpu_only_torch() -> None:
    with pytest.raises(DeviceError) as err:
        pick_device("cuda")
    reason = "this torch is a CPU build" if torch.version.cuda is None else \
        f"this torch, built for CUDA {torch.version.cuda}, sees no GPU"
    assert str(err.value) == f"device 'cuda' is not available here ({reason}); this machine has: cpu"


def test_cuda_build_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, gpus=0)
    with pytest.raises(DeviceError) as err:
        pick_device("cuda:0")
    assert str(err.value) == ("device 'cuda:0' is not available here (this torch, built for CUDA 12.8, sees no "
                              "GPU); this machine has: cpu")
    fake_cuda(monkeypatch, gpus=0, build=None)
    with pytest.raises(DeviceError, match=r"\(this torch is a CPU build\); this machine has: cpu$"):
        pick_device("cuda")


def test_a_gpu_index_beyond_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, gpus=2)
    assert available_devices() == ["cpu", "cuda:0", "cuda:1"]
    assert pick_device("cuda") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError) as err:
        pick_device("cuda:2")
    assert str(err.value) == ("device 'cuda:2' is not available here (2 CUDA GPUs); this machine has: cpu, cuda:0, "
                              "cuda:1")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_where_there_is_none() -> None:
    with pytest.raises(DeviceError, match=r"^device 'mps' is not available here \(no Apple GPU \(MPS\)\)"):
        pick_device("mps")


@pytest.mark.parametrize("device", ["gpu", "mps"] + (["cuda"] if ON_CPU_ONLY else []))
def test_onnxruntime_devices(device: str, tmp_path: Path) -> None:
    """The ONNX backend refuses a device its providers cannot run on, naming the providers."""
    ort = pytest.importorskip("onnxruntime")
    from ferkit.predict import EmotionRecognizer

    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime here has CUDA")
    model = tmp_path / "model.onnx"
    model.write_bytes(b"checked after the device")
    with pytest.raises(DeviceError) as err:
        EmotionRecognizer(model, device=device)
    message = str(err.value)
    assert message.startswith(f"device {device!r} ")
    assert "onnxruntime here runs on: " in message and "cpu" in message and "\n" not in message
