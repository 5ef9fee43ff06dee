"""Which implementation serves a call: the Triton kernels, the C++ CPU kernels or the torch reference (DESIGN.md,
"Layers").

``QLORA_KERNELS_BACKEND`` (read at every call, so tests can switch it):

- ``auto`` (default): CUDA tensors go to Triton; CPU tensors go to the C++ CPU kernels
  (:mod:`qlora_kernels.cpu_kernels`) when the extension ``qlora_kernels._C`` has them, else to the reference.
- ``cpu``: as ``auto``, but a CPU call raises when the C++ CPU kernels are missing instead of falling back.
- ``triton`` (with ``TRITON_INTERPRET=1`` on a CPU-only machine): CPU tensors go through the Triton launchers too.
- ``torch``: the reference everywhere.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

_CHOICES = ("auto", "cpu", "torch", "triton")


def backend_setting() -> str:
    value = os.environ.get("QLORA_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"QLORA_KERNELS_BACKEND must be one of {_CHOICES}, got {value!r}")
    return value


def use_cpu_kernels(device: torch.device, setting: Optional[str] = None) -> bool:
    """True when a call on ``device`` should run the C++ CPU kernels (a CPU tensor, ``auto`` or ``cpu``);
    ``setting``: :func:`backend_setting`'s value when the caller has read it already."""
    if device.type != "cpu":
        return False
    setting = backend_setting() if setting is None else setting
    if setting not in ("auto", "cpu"):
        return False
    if cpu_kernels().available():
        return True
    if setting == "cpu":
        from ._extension import _IMPORT_ERROR

        raise RuntimeError(
            "QLORA_KERNELS_BACKEND=cpu needs the C++ CPU kernels of qlora_kernels._C (csrc/nf4_cpu.cpp), which are "
            f"not available (extension import error: {_IMPORT_ERROR}); rebuild with "
            "`pip install --no-build-isolation -e .`"
        )
    return False


_CPU_KERNELS = None


def cpu_kernels():
    """The ``qlora_kernels.cpu_kernels`` module (its C++ kernels may be missing: see ``available()``)."""
    global _CPU_KERNELS
    if _CPU_KERNELS is None:  # imported on first use, then kept: this runs at every fused call
        from . import cpu_kernels as ck

        _CPU_KERNELS = ck
    return _CPU_KERNELS


def triton_kernels():
    """The ``qlora_kernels.triton_kernels`` package, imported on first use (Triton is optional on CPU)."""
    try:
        from . import triton_kernels as tk
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"the Triton kernels need the `triton` package, which failed to import: {exc}") from exc
    return tk
