"""What every launcher needs: whether Triton runs through its CPU interpreter, and device checks."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``, read when Triton decorates them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raise before a launch that cannot work: CPU tensors outside the interpreter, or tensors on mixed devices."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors of one kernel call must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop() if devices else None
    if device is not None and device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "CPU tensors reach the Triton kernels only through Triton's interpreter: set TRITON_INTERPRET=1 before "
            "importing qlora_kernels, or unset QLORA_KERNELS_BACKEND to use the torch reference on CPU"
        )


def compile_options(**options) -> dict:
    """Launch options that only a real compiler understands (the interpreter takes no compile options)."""
    return {} if interpreting() else options
