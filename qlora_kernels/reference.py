"""Pure-torch reference of every op: the executable specification.

Readable before fast. The Triton kernels are tested against these functions, and CPU tensors run through them
unless ``QLORA_KERNELS_BACKEND=triton``. All arithmetic that decides a stored byte is float32, in the same order as
bitsandbytes' kernels, so that the bytes agree (see DESIGN.md, "The NF4 format").
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

# The 16 NF4 levels, index = 4-bit code. These float32 values are the format (bitsandbytes' table), not recomputed.
NF4_CODE_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_ZERO_CODE = 7  # NF4_CODE_VALUES[7] == 0.0: what an all-zero block and the pad nibble of an odd numel hold
NESTED_BLOCKSIZE = 256  # double quantization quantizes the absmax vector in blocks of 256
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_TINY = 1e-38  # guards 1/absmax for an all-zero block; the stored absmax stays 0


@functools.lru_cache(maxsize=None)
def _nf4_code_cpu() -> torch.Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 codebook, float32[16], on ``device``."""
    return _nf4_code_cpu().to(device)


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """Decision thresholds between neighbouring levels of a sorted codebook, in float32 as bitsandbytes computes them."""
    return (code[:-1] + code[1:]) / 2


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    # bitsandbytes' 8-bit dynamic data type ("8-bit approximations for parallelism in deep learning"): one sign bit,
    # a run-length exponent (a power of ten from 1e-6 to 1) and the remaining bits as a linear fraction in
    # [0.1, 1]; each fraction interval is represented by its midpoint. Plus 0 and 1.0, sorted.
    exponent_bits, total_bits = 7, 8
    fraction_bits = total_bits - 1 - exponent_bits + (0 if signed else 1)
    levels: list[float] = []
    for exponent in range(exponent_bits):
        edges = torch.linspace(0.1, 1, 2 ** (exponent + fraction_bits) + 1, dtype=torch.float32)
        centres = (10 ** (exponent - exponent_bits + 1)) * ((edges[:-1] + edges[1:]) / 2.0)
        levels += centres.tolist()
        if signed:
            levels += (-centres).tolist()
    levels += [0.0, 1.0]
    assert len(levels) == 2**total_bits
    return torch.tensor(sorted(levels), dtype=torch.float32)


def dynamic_map(signed: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic quantization map (float32[256], sorted): signed for the double-quantized NF4
    absmax and the first Adam moment, unsigned for the second moment."""
    return _dynamic_map_cpu(bool(signed)).to(device)


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[n] -> [ceil(n / blocksize), blocksize], zero-padded (a zero never changes a block's absmax)."""
    n = flat.numel()
    nblocks = -(-n // blocksize)
    return torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)


def quantize_blockwise_8bit(
    values: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization onto a sorted 256-level ``code``: (codes uint8 [n], absmax float32 [blocks]).

    The scaled value is ``x * (1 / absmax)`` and the level is the nearest one, decided by float32 midpoints, as
    bitsandbytes' CUDA kernel does. (bitsandbytes' CPU library approximates this search with a lookup table; its
    bytes differ from these for about 0.2% of values and are never closer. tests/test_nf4_bnb.py measures that.)
    """
    flat = values.reshape(-1).float()
    n = flat.numel()
    blocks = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    codes = torch.bucketize(scaled, midpoints(code.float()), right=False)
    return codes.to(torch.uint8), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 [n]: ``code[codes] * absmax[block]``."""
    flat = codes.reshape(-1).long()
    idx = torch.arange(flat.numel(), device=flat.device) // blocksize
    return code.float()[flat] * absmax.float()[idx]


def quantize_nf4(
    weight: torch.Tensor, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Quantize ``weight`` (any shape, flattened row-major) to NF4.

    Returns ``(packed, absmax, nested_absmax, offset)``: packed uint8 [(n + 1) // 2], two codes per byte with the
    first element in the high nibble; absmax float32 [blocks] without double quantization, else uint8 [blocks]
    (signed dynamic map, blocks of 256) with nested_absmax float32 [ceil(blocks / 256)] and offset a float32
    scalar (the mean of the float32 absmax); nested_absmax and offset are None without double quantization.
    """
    flat = weight.reshape(-1).float()
    n = flat.numel()
    blocks = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    codes = torch.bucketize(scaled, midpoints(nf4_code(flat.device)), right=False).to(torch.uint8)
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO_CODE)])
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return packed, absmax, None, None
    offset = absmax.mean()
    absmax_codes, nested_absmax = quantize_blockwise_8bit(absmax - offset, dynamic_map(True, flat.device), NESTED_BLOCKSIZE)
    return packed, absmax_codes, nested_absmax, offset


def decode_absmax(
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """float32 absmax per NF4 block: as stored, or ``dyn[q] * nested_absmax[b >> 8] + offset`` when double-quantized."""
    if nested_absmax is None:
        return absmax.float()
    if nested_code is None:
        nested_code = dynamic_map(True, absmax.device)
    return dequantize_blockwise_8bit(absmax, nested_absmax, nested_code, NESTED_BLOCKSIZE) + offset.float()


def unpack_nf4_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 codes [numel] from the packed bytes (high nibble first)."""
    flat = packed.reshape(-1).view(torch.uint8)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:numel]


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_code: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``code[nibble] * absmax[block]`` in float32, cast once to ``dtype``, shaped ``shape``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    codes = unpack_nf4_codes(packed, numel).long()
    block_absmax = decode_absmax(absmax, nested_absmax, offset, nested_code)
    idx = torch.arange(numel, device=codes.device) // blocksize
    values = nf4_code(codes.device)[codes] * block_absmax[idx]
    return values.to(dtype).reshape(tuple(int(s) for s in shape))
