"""Which device to run on and which reduced precision it computes natively; imports only torch, and that when
first asked (so that `DeviceError` costs no torch import: the ONNX path raises it too)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import torch

DEVICE_KINDS = ("cpu", "cuda", "mps")
DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"


class DeviceError(UsageError):
    """A device name that is no device ferkit runs on, or a device this machine does not have."""


def available_devices() -> list[str]:
    """The devices this machine and this torch build can run on: cpu, then cuda:0.., then mps."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def pick_device(name: str = "auto") -> torch.device:
    """`name` as given, or for "auto" the best there is: cuda, then mps, then cpu.

    A name that is no device (`gpu`) or a device this machine lacks (`cuda` on a CPU-only torch,
    `cuda:3` with two GPUs) raises a one-line DeviceError that lists the devices this machine has.
    """
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    has = ", ".join(available_devices())
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_KINDS:
        raise DeviceError(f"device {name!r} is not a device ferkit runs on: choose {DEVICE_NAMES} "
                          f"(this machine has: {has})")
    reason = _missing(device)
    if reason:
        raise DeviceError(f"device {name!r} is not available here ({reason}); this machine has: {has}")
    return device


def _missing(device: torch.device) -> str | None:
    """Why this machine cannot run on `device`, or None if it can."""
    import torch

    if device.type == "cuda":
        hip = getattr(torch.version, "hip", None)  # ROCm builds run AMD GPUs through torch.cuda
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {hip}" if hip else None
        if not torch.cuda.is_available():
            return f"this torch, built for {build}, sees no GPU" if build else "this torch is a CPU build"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"{count} CUDA GPU{'s' * (count != 1)}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "no Apple GPU (MPS)"
    if device.type == "cpu" and device.index not in (None, 0):
        return "the CPU is cpu or cpu:0"
    return None


def autocast_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """bf16 where the hardware computes it natively, else None (stay in float32)."""
    import torch

    if not enabled:
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return None


def _cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
