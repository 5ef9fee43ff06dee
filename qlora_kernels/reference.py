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


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 [n]: each block of ``values`` times its absmax (the trailing block may be short)."""
    n = values.numel()
    return (_blocks(values, blocksize) * absmax.float().reshape(-1)[:, None]).reshape(-1)[:n]


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 [n]: ``code[codes] * absmax[block]``."""
    return _scale_blocks(code.float()[codes.reshape(-1).long()], absmax, blocksize)


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
    # Flat views: an absmax stored as [blocks, 1] (or any shape with the right count) must index by block, never
    # broadcast against the block axis.
    absmax = absmax.reshape(-1)
    if nested_absmax is None:
        return absmax.float()
    if nested_code is None:
        nested_code = dynamic_map(True, absmax.device)
    nested = dequantize_blockwise_8bit(absmax, nested_absmax.reshape(-1), nested_code.reshape(-1), NESTED_BLOCKSIZE)
    return nested + offset.float().reshape(())


@functools.lru_cache(maxsize=None)
def _nf4_byte_table_cpu() -> torch.Tensor:
    byte = torch.arange(256)
    return torch.stack([nf4_code()[byte >> 4], nf4_code()[byte & 0xF]], dim=1)


def _nf4_byte_table(device: torch.device | str) -> torch.Tensor:
    """float32 [256, 2]: the two levels (high nibble, low nibble) that each packed byte decodes to."""
    return _nf4_byte_table_cpu().to(device)


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
    levels = _nf4_byte_table(packed.device).index_select(0, packed.reshape(-1).view(torch.uint8).int())
    values = _scale_blocks(levels.reshape(-1)[:numel], decode_absmax(absmax, nested_absmax, offset, nested_code), blocksize)
    return values.to(dtype).reshape(tuple(int(s) for s in shape))


# ================================================================================ fused NF4 + LoRA linear
#
# y = x · deq(W)ᵀ + scale · (dropout(x) · Aᵀ) · Bᵀ + bias, on 2-D x [M, K] (the functional API flattens leading
# dimensions). These functions are the CPU kernels of the qlora_kernels::nf4_lora_linear_* ops and the spec of the
# Triton kernels, whose roundings they mirror: deq(W) is rounded once to x's dtype (as a dequantize-then-matmul
# would), products accumulate in float32, and the r-wide LoRA intermediates (S = dropout(x)·Aᵀ, dS = dY·B) are kept
# in float32 and rounded to x's dtype, already multiplied by ``scale``, where they feed a product. Called with
# float64 tensors they compute in float64: the tests' gold standard.

# Dropout keeps element (m, k) of x [M, K] iff hash(m·K + k, seed) >> 8 >= round(p · 2^24): a counter-based mask
# that the forward, the backward and this reference regenerate bit for bit, so no M×K mask is ever stored.
DROPOUT_HASH_BITS = 24
_U32 = 0xFFFFFFFF
_FMIX_C1 = 0x85EBCA6B  # MurmurHash3's 32-bit finalizer constants
_FMIX_C2 = 0xC2B2AE35


def dropout_threshold(p: float) -> int:
    """The integer threshold of a dropout probability: an element is kept iff ``hash >> 8 >= threshold``."""
    return int(p * (1 << DROPOUT_HASH_BITS) + 0.5)  # p >= 0: truncation is floor


def _mul_u32(a: torch.Tensor, c: int) -> torch.Tensor:
    # (a · c) mod 2^32 for a in [0, 2^32) held in int64, without overflowing int64 (torch lacks uint32 arithmetic):
    # split c into 16-bit halves; the high half only contributes its low 16 bits of product, shifted.
    lo, hi = c & 0xFFFF, c >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _U32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul_u32(h, _FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul_u32(h, _FMIX_C2)
    return h ^ (h >> 16)


def dropout_hash(index: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """32-bit hash (int64 in [0, 2^32)) of non-negative element indices under an int64 ``seed`` (scalar tensor).

    ``fmix32(fmix32(lo ^ fmix32(seed_lo)) ^ (hi + seed_hi))`` with (lo, hi) the 32-bit halves of the index: a
    bijection of the low half for a given seed (no two elements of one 2^32 range collide), two mixing rounds
    between the seed and the element."""
    seed = seed.to(device=index.device, dtype=torch.int64)
    key = _fmix32(seed & _U32)
    lo, hi = index & _U32, (index >> 32) & _U32
    return _fmix32(_fmix32(lo ^ key) ^ ((hi + ((seed >> 32) & _U32)) & _U32))


def dropout_keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """bool [rows, cols]: which elements of a [rows, cols] input dropout with probability ``p`` keeps."""
    device = seed.device if device is None else device
    index = torch.arange(rows, device=device, dtype=torch.int64)[:, None] * cols + torch.arange(cols, device=device)
    return (dropout_hash(index, seed) >> 8) >= dropout_threshold(p)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def lora_dropout(
    x: torch.Tensor, p: float, seed: Optional[torch.Tensor], keep: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Inverted dropout of 2-D ``x`` with the hash mask (or ``keep``, that mask already built), in x's dtype: kept
    elements scaled by 1 / (1 - p)."""
    if p == 0.0:
        return x
    if keep is None:
        keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, x.device)
    return torch.where(keep, x.to(_acc_dtype(x.dtype)) * (1.0 / (1.0 - p)), 0.0).to(x.dtype)


def nf4_lora_linear_fwd(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    blocksize: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor],
    dropout: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the fused linear on x [M, K] with W [N, K] (N = lora_B.shape[0]) in NF4 storage.

    Returns ``(y, s)``: y [M, N] in x's dtype and s = dropout(x) · lora_Aᵀ [M, r] in float32 (float64 for float64
    x), which the backward needs. ``seed`` (int64 scalar tensor) drives the dropout mask when ``dropout > 0``.
    """
    acc = _acc_dtype(x.dtype)
    n, k = lora_B.shape[0], x.shape[1]
    w = dequantize_nf4(packed, absmax, nested_absmax, offset, blocksize, (n, k), x.dtype, nested_code).to(acc)
    s = lora_dropout(x, dropout, seed).to(acc) @ lora_A.to(acc).T
    y = x.to(acc) @ w.T + (scale * s).to(x.dtype).to(acc) @ lora_B.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), s


def nf4_lora_linear_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    blocksize: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout: float,
    seed: Optional[torch.Tensor],
    need_x: bool = True,
    need_A: bool = True,
    need_B: bool = True,
    need_bias: bool = False,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward of :func:`nf4_lora_linear_fwd`: ``(grad_x, grad_A, grad_B, grad_bias)``, None where not needed.

    dS = dY · B; dX = dY · deq(W) + mask ⊙ (scale · dS) · A / (1 - p); dA = (scale · dS)ᵀ · dropout(x);
    dB = dYᵀ · (scale · S); dbias = Σ_m dY. No gradient for the frozen W.
    """
    dtype = x.dtype
    acc = _acc_dtype(dtype)
    n, k = lora_B.shape[0], x.shape[1]
    dy = grad_y.to(acc)
    grad_x = grad_A = grad_B = grad_bias = None
    keep = None
    if dropout > 0.0 and (need_x or need_A):
        keep = dropout_keep_mask(seed, x.shape[0], k, dropout, x.device)
    if need_x or need_A:
        ds_scaled = (scale * (dy @ lora_B.to(acc))).to(dtype).to(acc)
    if need_x:
        w = dequantize_nf4(packed, absmax, nested_absmax, offset, blocksize, (n, k), dtype, nested_code).to(acc)
        lora = ds_scaled @ lora_A.to(acc)
        if keep is not None:
            lora = torch.where(keep, lora * (1.0 / (1.0 - dropout)), 0.0)
        grad_x = (dy @ w + lora).to(dtype)
    if need_A:
        grad_A = (ds_scaled.T @ lora_dropout(x, dropout, seed, keep).to(acc)).to(lora_A.dtype)
    if need_B:
        grad_B = (dy.T @ (scale * s.to(acc)).to(dtype).to(acc)).to(lora_B.dtype)
    if need_bias:
        grad_bias = dy.sum(0).to(dtype)
    return grad_x, grad_A, grad_B, grad_bias
