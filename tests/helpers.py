"""Shared test utilities: tolerances from DESIGN.md, norm-wise comparison, NaN-prefilled buffers, bf16 ulps."""

from __future__ import annotations

import os

import torch

# Relative norm-wise tolerances against a float64 reference (DESIGN.md, "Tests").
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def assert_close_normwise(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """‖actual − expected‖ / ‖expected‖ ≤ scale · TOLERANCE[dtype], in float64; and no NaN/Inf in ``actual``."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), "result holds NaN/Inf (an unwritten or corrupted element?)"
    denom = e.norm().item()
    err = (a - e).norm().item() / (denom if denom > 0 else 1.0)
    tol = scale * TOLERANCE[dtype]
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e} ({dtype})"


def nan_filled(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A buffer every element of which fails a comparison until a kernel writes it (NaN, or 0xFF bytes)."""
    if dtype.is_floating_point:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.full(tuple(shape), torch.iinfo(dtype).max, dtype=dtype, device=device)


def max_ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of last place between two same-dtype 16-bit float tensors of equal sign."""
    assert a.dtype == b.dtype and a.element_size() == 2
    return int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max().item()) if a.numel() else 0
