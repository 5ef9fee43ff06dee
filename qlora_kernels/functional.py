"""Functional API: ``nf4_lora_linear``, the fused NF4 + LoRA linear with autograd.

Validates and normalises the arguments (dtypes, autocast, leading dimensions, the dropout seed), then calls the
``qlora_kernels::nf4_lora_linear_fwd`` custom op, whose registered autograd runs ``qlora_kernels::nf4_lora_linear_bwd``
(:func:`qlora_kernels.ops.nf4_lora_linear`: a plain eager call on the C++ CPU kernels runs the same kernels and
formula without the custom op's Python dispatch, see ops.py). On CUDA both are Triton kernels that dequantize the NF4
weight on the fly (it is never materialised); on CPU they are the C++ CPU kernels (``qlora_kernels.cpu_kernels``),
the torch reference (``qlora_kernels.reference``) with ``QLORA_KERNELS_BACKEND=torch``, or the same Triton kernels
through Triton's interpreter with ``QLORA_KERNELS_BACKEND=triton`` and ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import ops
from .nf4 import NF4Weight

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_RANK = 256
_SEED_HIGH = 2**62  # dropout seeds are drawn from [0, 2^62) with torch's generator for x's device


def _check_tensor(name: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if dims and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got {t.dim()}-D shape {tuple(t.shape)}")


def _check_arguments(x, w4, lora_A, lora_B, scale, bias, dropout) -> None:
    if not isinstance(w4, NF4Weight):
        raise TypeError(f"w4 must be an NF4Weight, got {type(w4).__name__}")
    n, k = w4.shape
    _check_tensor("x", x, 0)
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., K={k}] for a weight of shape [{n}, {k}], got shape {tuple(x.shape)}")
    _check_tensor("lora_A", lora_A, 2)
    r = lora_A.shape[0]
    if lora_A.shape[1] != k or not 1 <= r <= _MAX_RANK:
        raise ValueError(f"lora_A must be [r, K={k}] with 1 <= r <= {_MAX_RANK}, got {tuple(lora_A.shape)}")
    _check_tensor("lora_B", lora_B, 2)
    if tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must be [N={n}, r={r}], got {tuple(lora_B.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be [N={n}], got {tuple(bias.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    devices = {t.device for t in (x, lora_A, lora_B, bias) if t is not None} | {w4.device}
    if len(devices) > 1:
        raise ValueError(f"x, w4, lora_A, lora_B and bias must be on one device, got {sorted(map(str, devices))}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The one compute-dtype rule: the autocast dtype under autocast for x's device (as ``F.linear``), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _compute_dtype(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, bias) -> torch.dtype:
    """:func:`compute_dtype`, outside autocast also checking that the LoRA matrices and the bias share x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return compute_dtype(x)
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"x is {x.dtype} but {name} is {t.dtype}: pass them in one dtype (or run under torch.autocast, "
                "which computes in the autocast dtype)"
            )
    return x.dtype


def nf4_lora_linear(
    x: torch.Tensor,
    w4: NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``x · deq(W)ᵀ + scale · (dropout(x) · lora_Aᵀ) · lora_Bᵀ + bias``, fused.

    x: [..., K] (any leading dimensions, any strides, possibly no rows), float16/bfloat16/float32; w4: NF4Weight
    [N, K] (any blocksize, with or without double quantization); lora_A: [r, K] with 1 <= r <= 256; lora_B: [N, r];
    bias: [N] or None. x, lora_A, lora_B and bias share one dtype, except under ``torch.autocast``, where all of
    them are cast to the autocast dtype. Returns [..., N] in that dtype. Differentiable in x, lora_A, lora_B and
    bias; never in the frozen W.

    ``dropout`` is the LoRA path's dropout probability (pass 0.0 in eval mode). Its mask is a hash of each element's
    position and a seed drawn from torch's generator for x's device (so ``torch.manual_seed`` reproduces it); the
    backward regenerates the mask, nothing of size [M, K] is stored for it.

    Raises TypeError for a wrong type or mixed dtypes, ValueError for shapes, devices, ``scale`` (a finite number)
    and ``dropout`` (in [0, 1)), before any kernel runs.
    """
    _check_arguments(x, w4, lora_A, lora_B, scale, bias, dropout)
    dtype = _compute_dtype(x, lora_A, lora_B, bias)
    n, k = w4.shape
    # A no-op .to() or .reshape() still costs a dispatcher round trip each (~1 µs on a small CPU), and at decode sizes
    # the Python around the kernel is a visible part of the call (~6 % of a 4096×4096 layer at M = 1 on a 2-core CPU,
    # most of a small layer's), so only what needs converting is converted.
    x2d = _as(x, dtype)
    if x2d.dim() != 2:
        x2d = x2d.reshape(-1, k)
    seed = None
    if dropout > 0.0:
        seed = torch.randint(0, _SEED_HIGH, (1,), device=x.device, dtype=torch.int64)
    y = ops.nf4_lora_linear(
        x2d,
        *w4.op_storage(),
        _as(lora_A, dtype),
        _as(lora_B, dtype),
        float(scale),
        None if bias is None else _as(bias, dtype),
        float(dropout),
        seed,
    )
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)
