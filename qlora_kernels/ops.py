"""The ``qlora_kernels::`` custom ops: schema, fake (meta) implementation, CPU and CUDA kernels.

Plain tensors in, plain tensors out. The CPU kernel is the torch reference (or the Triton launcher under
``QLORA_KERNELS_BACKEND=triton``), the CUDA kernel the Triton launcher (or the reference under
``QLORA_KERNELS_BACKEND=torch``). Input validation lives in the public API above this layer.
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch

from . import reference
from ._backend import triton_kernels, use_triton

_EMPTY = (0,)


def _nf4_module(device: torch.device):
    """The module implementing the NF4 ops for ``device``: the Triton launchers or the reference."""
    if use_triton(device):
        return importlib.import_module(".nf4", triton_kernels().__name__)
    return reference


# ---------------------------------------------------------------------------------------------- quantize_nf4


@torch.library.custom_op("qlora_kernels::quantize_nf4", mutates_args=(), device_types=("cpu", "cuda"))
def quantize_nf4(
    weight: torch.Tensor, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4-quantize ``weight`` (flattened row-major). Returns (packed uint8 [(n+1)//2], absmax, nested_absmax,
    offset): absmax float32 [blocks] and empty nested_absmax/offset without double quantization; with it, absmax
    uint8 [blocks], nested_absmax float32 [ceil(blocks/256)] and offset a float32 scalar."""
    packed, absmax, nested_absmax, offset = _nf4_module(weight.device).quantize_nf4(weight, blocksize, double_quant)
    if nested_absmax is None:
        nested_absmax = torch.empty(_EMPTY, dtype=torch.float32, device=weight.device)
        offset = torch.empty(_EMPTY, dtype=torch.float32, device=weight.device)
    return packed, absmax, nested_absmax, offset


@quantize_nf4.register_fake
def _(weight, blocksize, double_quant):
    numel = weight.numel()
    nblocks = -(-numel // blocksize)
    packed = weight.new_empty(((numel + 1) // 2,), dtype=torch.uint8)
    if double_quant:
        return (
            packed,
            weight.new_empty((nblocks,), dtype=torch.uint8),
            weight.new_empty((-(-nblocks // reference.NESTED_BLOCKSIZE),), dtype=torch.float32),
            weight.new_empty((), dtype=torch.float32),
        )
    empty = weight.new_empty(_EMPTY, dtype=torch.float32)
    return packed, weight.new_empty((nblocks,), dtype=torch.float32), empty, empty.clone()


# -------------------------------------------------------------------------------------------- dequantize_nf4


@torch.library.custom_op("qlora_kernels::dequantize_nf4", mutates_args=(), device_types=("cpu", "cuda"))
def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize NF4 storage to ``dtype`` [shape]: ``code[nibble] * absmax[block]`` in float32, cast once.
    ``packed`` is the uint8 byte view; pass nested_absmax, offset and nested_code for double quantization."""
    return _nf4_module(packed.device).dequantize_nf4(
        packed, absmax, nested_absmax, offset, blocksize, shape, dtype, nested_code
    )


@dequantize_nf4.register_fake
def _(packed, absmax, nested_absmax, offset, nested_code, blocksize, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)
