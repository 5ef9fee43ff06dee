"""Which implementation serves a call: the Triton kernels or the torch reference (DESIGN.md, "Layers").

CUDA tensors go to Triton. CPU tensors go to the reference unless ``QLORA_KERNELS_BACKEND=triton`` (with
``TRITON_INTERPRET=1``), which sends them through the same Triton launchers. ``QLORA_KERNELS_BACKEND=torch`` forces
the reference everywhere. The variable is read at every call, so tests can switch it.
"""

from __future__ import annotations

import os

import torch

_CHOICES = ("auto", "torch", "triton")


def backend_setting() -> str:
    value = os.environ.get("QLORA_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"QLORA_KERNELS_BACKEND must be one of {_CHOICES}, got {value!r}")
    return value


def use_triton(device: torch.device) -> bool:
    """True when a call on ``device`` should run the Triton kernels."""
    setting = backend_setting()
    if setting == "torch":
        return False
    if device.type == "cuda":
        return True
    return setting == "triton"


def triton_kernels():
    """The ``qlora_kernels.triton_kernels`` package, imported on first use (Triton is optional on CPU)."""
    try:
        from . import triton_kernels as tk
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"the Triton kernels need the `triton` package, which failed to import: {exc}") from exc
    return tk
