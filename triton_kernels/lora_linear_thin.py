"""The thin (rank-wide) products of the fused NF4 + LoRA linear. Memory-bound: each streams one [M, C] activation.

``_lora_rows_kernel``  P[split, M, r] = Σ_{c in split} dropout?(X)[M, c] · Wᵀ[c, r]      (float32 partial sums)
    forward  S  = dropout(x) · Aᵀ   (X = x [M, K], W = A [r, K], dropout mask regenerated from the seed)
    backward dS = dY · B            (X = dY [M, N], W = Bᵀ [r, N] through strides)
``_lora_cols_kernel``  O[split, r, c] = Σ_{m in split} (g_scale · G)ᵀ[r, m] · dropout?(X)[m, c]   (+ Σ_m X[m, c])
    backward dA = (scale · dS)ᵀ · dropout(x)   (G = dS, X = x)
    backward dB = ((scale · S)ᵀ · dY)ᵀ and dbias = Σ_m dY   (G = S, X = dY, stored transposed through strides)

Why Triton rather than torch.matmul for these: the forward S and the dA product read dropout(x), which would
otherwise be an M×K tensor in memory; the mask is regenerated here from the seed instead. Reductions over a long
dimension are split across programs so the grid fills the GPU; the splits stay separate partial sums (summed by the
consumer, in a fixed order) so results are deterministic - no atomics.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import interpreting
from .lora_linear_tiles import dropout_keep, mma, to_dot_operand


@triton.jit
def _lora_rows_kernel(
    x_ptr, w_ptr, parts_ptr, seed_ptr,
    M, C, rank, chunk, threshold, inv_keep,
    stride_xm, stride_xc, stride_wr, stride_wc, stride_part, stride_part_m,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)  # times a stride of the caller's: int64
    mask_m = offs_m < M
    mask_r = offs_r < rank
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    c_start = split * chunk
    c_end = tl.minimum(c_start + chunk, C)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # Every split runs the same trip count (chunk / BLOCK_C, from the arguments); the last split's excess steps are
    # masked off. (Triton 3.6's interpreter holds every integer argument as a 1-element array, which range() rejects
    # with numpy >= 2.4, whatever the bounds: under 3.6, interpret with numpy < 2.4.)
    for c0 in range(0, chunk, BLOCK_C):
        offs_c = c_start + c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < c_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :] * stride_xc,
            mask=mask_m[:, None] & mask_c[None, :],
            other=0.0,
        )
        if HAS_DROPOUT:
            keep = dropout_keep(offs_m[:, None] * C + offs_c[None, :], seed_ptr, threshold)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0)
        w = tl.load(
            w_ptr + offs_c[:, None] * stride_wc + offs_r[None, :] * stride_wr,
            mask=mask_c[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc = mma(to_dot_operand(x, DTYPE, DOT_FP32), to_dot_operand(w, DTYPE, DOT_FP32), acc, DOT_FP32)
    part_ptrs = parts_ptr + split * stride_part + offs_m[:, None] * stride_part_m + offs_r[None, :]
    tl.store(part_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_cols_kernel(
    g_ptr, x_ptr, out_ptr, colsum_ptr, seed_ptr,
    M, C, rank, chunk, g_scale, threshold, inv_keep,
    stride_gm, stride_gr, stride_xm, stride_xc, stride_out_split, stride_out_r, stride_out_c, stride_colsum_split,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_COLSUM: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)  # times a stride of the caller's: int64
    mask_c = offs_c < C
    mask_r = offs_r < rank
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    m_start = split * chunk
    m_end = tl.minimum(m_start + chunk, M)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    # One trip count for every split, as in _lora_rows_kernel. In this form the dB/dbias pass at r <= 16 compiles
    # without register spills under Triton 3.6 (the earlier range(m_start, m_end) form spilled 6 instructions).
    for m0 in range(0, chunk, BLOCK_M):
        offs_m = m_start + m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        g = tl.load(
            g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :] * stride_xc,
            mask=mask_m[:, None] & mask_c[None, :],
            other=0.0,
        )
        if HAS_COLSUM:
            colsum += tl.sum(x.to(tl.float32), axis=0)
        if HAS_DROPOUT:
            keep = dropout_keep(offs_m[:, None] * C + offs_c[None, :], seed_ptr, threshold)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0)
        g = to_dot_operand(g * g_scale, DTYPE, DOT_FP32)
        acc = mma(tl.trans(g), to_dot_operand(x, DTYPE, DOT_FP32), acc, DOT_FP32)
    out_ptrs = out_ptr + split * stride_out_split + offs_r[:, None] * stride_out_r + offs_c[None, :] * stride_out_c
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])
    if HAS_COLSUM:
        tl.store(colsum_ptr + split * stride_colsum_split + offs_c, colsum.to(colsum_ptr.dtype.element_ty), mask=mask_c)


# ------------------------------------------------------------------------------------------------ planning


@dataclasses.dataclass(frozen=True)
class ThinPlan:
    """Tiles and the split of the long reduction for one thin launch."""

    block_m: int
    block_c: int
    block_r: int
    splits: int
    chunk: int  # reduction elements per split, a multiple of the reduction tile
    num_warps: int


def block_r(rank: int) -> int:
    """The rank padded to a power of two, at least 16 (the smallest tensor-core operand)."""
    return max(16, triton.next_power_of_2(rank))


def _target_programs(device: torch.device) -> int:
    # About two programs per SM saturate HBM with these streaming loops. Under the interpreter, a handful: small
    # test shapes then still split, so the split path is exercised.
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Every consumer program reads all splits' partial sums for its rows: at most 8 keeps that a small fraction of the
# row's own data (a decode step's thin pass would otherwise split K 32 ways and each GEMV program read 32 partials).
MAX_SPLITS = 8


def _split(reduce_len: int, reduce_tile: int, parallel_tiles: int, device: torch.device) -> tuple[int, int]:
    tiles = triton.cdiv(max(reduce_len, 1), reduce_tile)
    splits = min(tiles, MAX_SPLITS, max(1, triton.cdiv(_target_programs(device), parallel_tiles)))
    chunk = triton.cdiv(tiles, splits) * reduce_tile
    return triton.cdiv(max(reduce_len, 1), chunk), chunk


def rows_plan(M: int, C: int, rank: int, device: torch.device) -> ThinPlan:
    """Plan of ``_lora_rows_kernel`` over X [M, C]. Tiles shrink as the rank grows: the [BLOCK_M, BLOCK_R]
    accumulator stays ≤ 4K floats and the [BLOCK_C, BLOCK_R] operand ≤ 16K values (larger ones spilled at r = 256
    in the sm_90 compile check)."""
    br = block_r(rank)
    bm = 16 if M <= 16 or interpreting() else max(16, min(64, 4096 // br))
    bc = 64 if interpreting() or br > 64 else 128
    splits, chunk = _split(C, bc, triton.cdiv(M, bm), device)
    return ThinPlan(bm, bc, br, splits, chunk, num_warps=1 if interpreting() else 4)


def cols_plan(M: int, C: int, rank: int, device: torch.device) -> ThinPlan:
    """Plan of ``_lora_cols_kernel`` over X [M, C]: the [BLOCK_R, BLOCK_C] accumulator and the [BLOCK_M, BLOCK_R]
    float32 operand stay ≤ 8K floats each."""
    br = block_r(rank)
    bc = 32 if interpreting() else max(32, min(128, 8192 // br))
    bm = 32 if interpreting() else max(16, min(64, 8192 // br))
    splits, chunk = _split(M, bm, triton.cdiv(C, bc), device)
    return ThinPlan(bm, bc, br, splits, chunk, num_warps=1 if interpreting() else 4)
