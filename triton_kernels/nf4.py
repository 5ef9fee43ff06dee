"""NF4 quantize / dequantize kernels (bitsandbytes' format, see DESIGN.md "The NF4 format").

Quantize is two launches plus one torch reduction: the NF4 pass writes packed codes and float32 absmax per block;
the offset (mean of absmax) is ``torch.mean`` as bitsandbytes takes it; the double-quantization pass encodes
``absmax - offset`` with the signed 8-bit dynamic map in blocks of 256. Dequantize is one launch over packed bytes
that decodes the (double-quantized) absmax in-kernel and writes two outputs per byte.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from qlora_kernels import reference

from ._common import check_launchable, compile_options, interpreting

_NESTED = reference.NESTED_BLOCKSIZE


@triton.jit
def _tiny(like):
    # reference._TINY (1e-38, guarding 1/absmax of an all-zero block) as a float32 tile shaped like ``like``. Typed
    # explicitly: a bare 1e-38 is below FLT_MIN, Triton types such a literal fp64, and Triton 3.6's tl.maximum then
    # promotes the whole expression to fp64 (3.9 casts the scalar down). tl.full rounds it to float32 as torch does.
    return tl.full(like.shape, 1e-38, tl.float32)


@triton.jit
def _quantize_nf4_kernel(
    w_ptr,
    packed_ptr,
    absmax_ptr,
    midpoints_ptr,
    numel,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_block = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    offs_pair = tl.arange(0, BLOCKSIZE // 2)
    # Element 2j goes to the high nibble of byte j, element 2j+1 to the low nibble.
    offs_even = offs_block[:, None] * BLOCKSIZE + 2 * offs_pair[None, :]
    offs_odd = offs_even + 1
    mask_even = offs_even < numel
    # Masked-off elements read as 0: they leave absmax unchanged and the pad nibble of an odd numel codes 0.0.
    x_even = tl.load(w_ptr + offs_even, mask=mask_even, other=0.0).to(tl.float32)
    x_odd = tl.load(w_ptr + offs_odd, mask=offs_odd < numel, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(x_even), axis=1), tl.max(tl.abs(x_odd), axis=1))
    # bitsandbytes scales by a correctly rounded reciprocal (1.0f / absmax), not by a division per element.
    inv = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, _tiny(absmax)))
    s_even = tl.minimum(tl.maximum(x_even * inv[:, None], -1.0), 1.0)
    s_odd = tl.minimum(tl.maximum(x_odd * inv[:, None], -1.0), 1.0)
    # Nearest level by the 15 float32 midpoints; a value on a midpoint goes to the lower code.
    code_even = tl.zeros(s_even.shape, tl.int32)
    code_odd = tl.zeros(s_odd.shape, tl.int32)
    for i in tl.static_range(15):
        mid = tl.load(midpoints_ptr + i)
        code_even += (s_even > mid).to(tl.int32)
        code_odd += (s_odd > mid).to(tl.int32)
    packed = (code_even << 4) | code_odd
    offs_byte = offs_block[:, None] * (BLOCKSIZE // 2) + offs_pair[None, :]
    tl.store(packed_ptr + offs_byte, packed.to(tl.uint8), mask=mask_even)
    nblocks = tl.cdiv(numel, BLOCKSIZE)
    tl.store(absmax_ptr + offs_block, absmax, mask=offs_block < nblocks)


@triton.jit
def _quantize_absmax_8bit_kernel(
    absmax_ptr,
    offset_ptr,
    midpoints_ptr,
    codes_ptr,
    nested_absmax_ptr,
    nblocks,
    NESTED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * NESTED + tl.arange(0, NESTED)
    mask = offs < nblocks
    centred = tl.load(absmax_ptr + offs, mask=mask, other=0.0) - tl.load(offset_ptr)
    centred = tl.where(mask, centred, 0.0)
    nested_absmax = tl.max(tl.abs(centred), axis=0)
    one = tl.full(nested_absmax.shape, 1.0, tl.float32)
    inv = tl.math.div_rn(one, tl.maximum(nested_absmax, _tiny(nested_absmax)))
    scaled = tl.minimum(tl.maximum(centred * inv, -1.0), 1.0)
    # Binary search for the number of the 255 midpoints below the value (= the nearest level's index).
    code = tl.zeros(scaled.shape, tl.int32)
    step = 128
    for _ in tl.static_range(8):
        probe = tl.load(midpoints_ptr + code + step - 1)
        code = tl.where(probe < scaled, code + step, code)
        step //= 2
    tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(nested_absmax_ptr + pid, nested_absmax)


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    offset_ptr,
    code_ptr,
    nested_code_ptr,
    out_ptr,
    numel,
    BLOCKSIZE: tl.constexpr,
    BYTES_PER_PROGRAM: tl.constexpr,
    HAS_DOUBLE_QUANT: tl.constexpr,
    NESTED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_byte = pid * BYTES_PER_PROGRAM + tl.arange(0, BYTES_PER_PROGRAM)
    mask_byte = offs_byte < (numel + 1) // 2
    byte = tl.load(packed_ptr + offs_byte, mask=mask_byte, other=0).to(tl.int32)
    block = (2 * offs_byte) // BLOCKSIZE  # both elements of a byte share a block: BLOCKSIZE is even
    if HAS_DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask_byte, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED, mask=mask_byte, other=0.0)
        # Two roundings, as bitsandbytes (dequantize, then add the offset); the launch disables FMA contraction.
        scale = tl.load(nested_code_ptr + q) * nested + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask_byte, other=0.0)
    hi = tl.load(code_ptr + (byte >> 4)) * scale
    lo = tl.load(code_ptr + (byte & 0xF)) * scale
    values = tl.reshape(tl.join(hi, lo), [2 * BYTES_PER_PROGRAM])
    offs_out = pid * 2 * BYTES_PER_PROGRAM + tl.arange(0, 2 * BYTES_PER_PROGRAM)
    tl.store(out_ptr + offs_out, values.to(out_ptr.dtype.element_ty), mask=offs_out < numel)


def _quantize_config(blocksize: int) -> int:
    """Blocks per program: about 2K elements per program on a GPU (1K for blocks of 256 and more: 8 blocks of 256
    spill registers under Triton 3.6), 16K under the interpreter (fewer Python steps)."""
    target = 16384 if interpreting() else (2048 if blocksize < 256 else 1024)
    return max(1, target // blocksize)


def _dequantize_config() -> int:
    """Packed bytes per program."""
    return 8192 if interpreting() else 1024


def quantize_nf4(
    weight: torch.Tensor,
    blocksize: int,
    double_quant: bool,
    *,
    out_packed: Optional[torch.Tensor] = None,
    out_absmax: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launcher of the NF4 quantization: same contract as ``reference.quantize_nf4``.

    ``out_packed`` (uint8 [(n + 1) // 2]) and ``out_absmax`` (float32 [blocks]) may be given to be written in place;
    with double quantization, ``out_absmax`` receives the float32 absmax before it is encoded.
    """
    check_launchable(weight)
    w = weight.contiguous().reshape(-1)
    numel = w.numel()
    nblocks = triton.cdiv(numel, blocksize)
    packed = out_packed if out_packed is not None else torch.empty((numel + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = out_absmax if out_absmax is not None else torch.empty(nblocks, dtype=torch.float32, device=w.device)
    code = reference.nf4_code(w.device)
    blocks_per_program = _quantize_config(blocksize)
    _quantize_nf4_kernel[(triton.cdiv(nblocks, blocks_per_program),)](
        w, packed, absmax, reference.midpoints(code), numel,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=blocks_per_program,
    )
    if not double_quant:
        return packed, absmax, None, None
    offset = absmax.mean()
    nested_blocks = triton.cdiv(nblocks, _NESTED)
    codes = torch.empty(nblocks, dtype=torch.uint8, device=w.device)
    nested_absmax = torch.empty(nested_blocks, dtype=torch.float32, device=w.device)
    _quantize_absmax_8bit_kernel[(nested_blocks,)](
        absmax, offset, reference.midpoints(reference.dynamic_map(True, w.device)), codes, nested_absmax, nblocks,
        NESTED=_NESTED,
    )
    return packed, codes, nested_absmax, offset


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_code: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launcher of the NF4 dequantization: same contract as ``reference.dequantize_nf4``; ``out`` may be given."""
    packed_bytes = packed.reshape(-1).view(torch.uint8)
    double_quant = nested_absmax is not None
    if double_quant and nested_code is None:
        nested_code = reference.dynamic_map(True, packed.device)
    check_launchable(packed_bytes, absmax, nested_absmax, offset, nested_code)
    numel = 1
    for s in shape:
        numel *= int(s)
    if out is None:
        out = torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=packed.device)
    bytes_per_program = _dequantize_config()
    grid = (triton.cdiv((numel + 1) // 2, bytes_per_program),)
    if numel:
        _dequantize_nf4_kernel[grid](
            packed_bytes, absmax,
            nested_absmax if double_quant else absmax,
            offset if double_quant else absmax,
            reference.nf4_code(packed.device),
            nested_code if double_quant else absmax,
            out, numel,
            BLOCKSIZE=blocksize, BYTES_PER_PROGRAM=bytes_per_program, HAS_DOUBLE_QUANT=double_quant, NESTED=_NESTED,
            **compile_options(enable_fp_fusion=False),
        )
    return out
