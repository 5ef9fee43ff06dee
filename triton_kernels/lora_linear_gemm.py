"""The two big GEMMs of the fused NF4 + LoRA linear, dequantizing NF4 inside the reduction loop.

Forward:  Y [M, N]  = x · deq(W)ᵀ + (scale · S) · Bᵀ + bias      (S = dropout(x) · Aᵀ from the thin pass)
Backward: dX [M, K] = dY · deq(W) + mask ⊙ (scale · dS) · A / (1 - p)   (dS = dY · B from the thin pass)

One kernel each. The r-wide LoRA product *initialises* the accumulator (before the reduction loop, so it costs no
extra registers beside the accumulator, and the dropout mask of dX applies to it alone), then every step of the loop
loads a tile of packed NF4 bytes, decodes it (``load_nf4_tile``) and feeds the tensor cores. The weight is never
materialised. The thin pass may leave S (or dS) as float32 partial sums over column splits; the GEMM adds them up
while initialising and, with WRITE_LORA, the first program column stores the sum for the backward.

SWAP_AB computes the transposed tile (deq(W) · xᵀ instead of x · deq(W)ᵀ) so that the decoded weight, which lives in
registers, is the left operand of Hopper's wgmma (the one that may come from registers; the right one must come
from shared memory). Both orientations are autotuning candidates (DESIGN.md, "Kernels: the plan": measure both).
Compiled for sm_90, the swapped order leaves each wgmma in flight while the next tile is decoded; the plain order
stores the decoded tile to shared memory and waits on every wgmma at once (compile_check's "ovl" column).

The same forward kernel serves decode-sized M (≤ 16 rows) with its own configurations: one M tile, so the packed
weight is read exactly once, in BLOCK_K / 2-byte row segments (wide loads), with many narrow N tiles to spread the
memory traffic over the SMs. That case is memory-bound; its floor is bytes(NF4 weight) / HBM bandwidth.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ._common import interpreting
from .lora_linear_tiles import (
    DECODE_GATHER, dropout_keep, load_nf4_tile, load_nf4_tile_mma_order, mma, mma_order_columns, nf4_register_words,
    to_dot_operand,
)

SMALL_M = 16  # rows up to which the decode-shaped configurations serve


def _config(bm, bn, bk, warps, stages, swap, group_m=8, split_k=False) -> triton.Config:
    # WARPS repeats num_warps for the kernels (the forward's MMA-order tiles lay their rows out by warp). SPLIT_K
    # lets the launch split the reduction over a second grid axis (decode-sized M; ``_common.split_count``).
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "SWAP_AB": swap, "WARPS": warps,
         "SPLIT_K": split_k},
        num_warps=warps,
        num_stages=stages,
    )


# Candidates for training shapes on Hopper (H100/H200), both operand orders. Chosen from the sm_90 compile check
# (python -m qlora_kernels.triton_kernels.compile_check) and its static model (sass_model.py): configurations that
# spill registers or overflow the 227 KB of shared memory are left out (4-warp 128×128 tiles, 128×256 dX tiles,
# BLOCK_K = 128 for dX all spilled). The first row of each table is the one used with QLORA_KERNELS_AUTOTUNE=0:
# swapped operands, whose wgmma stays in flight while the next tile decodes (the plain order waits on each wgmma at
# once), on 128-row tiles that suit every M. The second is the model's pick for training shapes (measured second
# by the GPU check's two-candidate tuning). Forward: 256 token rows per tile halve the decode work per MMA, which
# puts the modelled issue time under the tensor-core time (issue 11: ≤ 0.9 of it). dX: the model's shared-memory
# bound decides it - every 64 output columns of a wgmma re-read the whole dY tile, and each dY tile is written to
# shared memory once per reduction step, so wide output tiles (BLOCK_K = 256, 64-row reduction steps) move the
# fewest bytes per MMA: 128x64x256 is modelled at 175 us at M = 4096, 4096^2 (shared-bound), 256x128x64 at 201.
_TRITON_3_9 = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9)
_FWD_LARGE_M = [
    (128, 128, 64, 8, 3, True),
    (256, 64, 128, 8, 3, True),
    (128, 128, 64, 8, 4, True),
    (128, 256, 64, 8, 3, True),
    (64, 128, 64, 4, 4, True),
    (128, 128, 128, 8, 3, True),
    (128, 128, 64, 8, 3, False),
    (128, 256, 64, 8, 3, False),
]
if not _TRITON_3_9:
    # The H200's Triton 3.6 compiles this one without spills (model: issue 0.61 of tensor time); 3.9 spills.
    _FWD_LARGE_M.insert(2, (256, 128, 64, 8, 3, True))
_DX_LARGE_M = [
    (128, 128, 64, 8, 3, True),
    (128, 64, 256, 8, 3, True),
    (256, 128, 64, 8, 3, True),
    (128, 128, 64, 8, 4, True),
    (64, 128, 64, 4, 4, True),
    (128, 128, 64, 8, 3, False),
    (64, 128, 64, 4, 4, False),
    (256, 128, 64, 8, 3, False),
]
# Decode (M ≤ 16): one 16-row M tile, narrow output tiles, long reduction steps (wide byte loads). With SWAP_AB the
# weight tile is wgmma's 64/128-row left operand and the token rows its N dimension. Every decode candidate may split
# its reduction (SPLIT_K; the launch picks the count, ``_common.split_count``), so the output tiles need not fill the
# SMs alone. Each table starts with the static model's pick at M = 1 (sass_model.json; the first candidate is what
# QLORA_KERNELS_AUTOTUNE=0 runs and the first two what the GPU check tunes): forward 16×64×256 swapped at N = 4096
# and 14336 (MMA-order tiles, ALU-bound: 64 output tiles split 4 ways at N = 4096, 256 programs, modelled 3.3 µs;
# 16×32×256 plain, shared-memory-bound, 5.5 µs split or not).
_FWD_SMALL_M = [
    (16, 64, 256, 4, 3, True),
    (16, 32, 256, 4, 3, False),
    (16, 128, 128, 4, 3, True),
    (16, 16, 256, 4, 3, False),
    (16, 64, 128, 4, 4, False),
]
# dX: 16×64×256 swapped at M = 1 (16 output tiles of K = 4096, split 16 ways: 256 programs, modelled 3.9 µs), then
# narrow output tiles (BLOCK_K = 32, still 16-byte rows of packed bytes: 128 programs before splitting): 16×256×32
# with 4 warps (5.5 µs), 16×128×32 with 2 warps (the model's pick at M = 16, where the partial sums' traffic allows
# two splits: 4.5 µs; 4 spill under Triton 3.9). 16×64×32 loses the 16-byte copies of packed bytes. 16,128,128
# swapped spills registers in the dX kernel under Triton 3.6 (not under 3.9): left out.
_DX_SMALL_M = [
    (16, 64, 256, 4, 3, True),
    (16, 256, 32, 4, 3, False),
    (16, 128, 32, 2, 3, False),
    (16, 16, 256, 4, 3, False),
    (16, 32, 256, 4, 3, False),
]


def autotuning_enabled() -> bool:
    """False with ``QLORA_KERNELS_AUTOTUNE=0``: each GEMM family then runs its first candidate without tuning
    (first calls take seconds, not minutes, for short GPU sessions; read at import)."""
    return os.environ.get("QLORA_KERNELS_AUTOTUNE", "1").strip() != "0"


def _configs(table, every_candidate: bool = False) -> list[triton.Config]:
    # One small tile when interpreting: the interpreter cannot autotune, and small tiles keep its Python-speed loops
    # short. The single interpreter configuration of the decode family is the swapped one (the large family's is
    # not), so the default launches exercise both orientations.
    if interpreting():
        small = table[0][0] == SMALL_M
        if small:
            return [_config(16, 32, 64, 1, 1, True, group_m=1, split_k=True)]
        return [_config(32, 32, 64, 1, 1, False, group_m=2)]
    # Decode-sized M: every candidate may split the reduction (the launch decides how many splits; one is the
    # unsplit kernel), since its output tiles alone may not fill the SMs.
    configs = [_config(*row, group_m=1 if row[0] == SMALL_M else 8, split_k=row[0] == SMALL_M) for row in table]
    return configs if every_candidate or autotuning_enabled() else configs[:1]


# The per-element decode path (K not a multiple of the blocksize) gathers a byte, a level and an absmax per weight
# element, with 64-bit addresses: the software pipeliner would stage all of them in shared memory (over 256 KB at
# 128×128 tiles) and most of the tiles above spill registers there. It has its own unpipelined candidates, the
# spill-free ones of the sm_90 compile check.
_PER_ELEMENT_LARGE_M = [(128, 128, 64, 8, 1, True), (128, 128, 64, 8, 1, False)]
_PER_ELEMENT_SMALL_M = [(16, 64, 64, 4, 1, True), (16, 32, 64, 4, 1, False), (16, 16, 64, 4, 1, False)]

_TABLES = {
    # (kernel, small M, block-aligned rows) -> candidates
    ("fwd", False, True): _FWD_LARGE_M,
    ("fwd", True, True): _FWD_SMALL_M,
    ("dx", False, True): _DX_LARGE_M,
    ("dx", True, True): _DX_SMALL_M,
    ("fwd", False, False): _PER_ELEMENT_LARGE_M,
    ("fwd", True, False): _PER_ELEMENT_SMALL_M,
    ("dx", False, False): _PER_ELEMENT_LARGE_M,
    ("dx", True, False): _PER_ELEMENT_SMALL_M,
}


def gemm_configs(kernel: str, small_m: bool, aligned_rows: bool, every_candidate: bool = False) -> list[triton.Config]:
    """Autotuning candidates of the ``kernel`` ("fwd" or "dx") GEMM for M ≤ 16 (``small_m``) or larger, on the
    block-aligned decode path (``aligned_rows``: K % blocksize == 0) or the per-element one. ``every_candidate``
    ignores QLORA_KERNELS_AUTOTUNE=0 (the compile check covers them all)."""
    return _configs(_TABLES[(kernel, small_m, aligned_rows)], every_candidate)


# Every constexpr that is not a tile size, plus the shape: a new value re-tunes (DESIGN.md, "Conventions").
FWD_TUNING_KEY = [
    "m_bucket", "N", "K", "BLOCK_R", "BLOCKSIZE", "ALIGNED_ROWS", "HAS_DOUBLE_QUANT", "NESTED", "HAS_BIAS",
    "WRITE_LORA", "DOT_FP32", "DECODE", "PACKED_ALIGNED",
]
DX_TUNING_KEY = [
    "m_bucket", "N", "K", "BLOCK_R", "BLOCKSIZE", "ALIGNED_ROWS", "HAS_DOUBLE_QUANT", "NESTED", "HAS_DROPOUT",
    "WRITE_LORA", "DOT_FP32", "DECODE",
]


@triton.jit
def _tile_ids(M, OUT, BLOCK_M: tl.constexpr, BLOCK_OUT: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M consecutive row tiles sweep the output columns together, so the weight tiles they
    # share stay in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_out = tl.cdiv(OUT, BLOCK_OUT)
    per_group = GROUP_M * tiles_out
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_out = (pid % per_group) // group_m
    return pid_m.to(tl.int64), pid_out.to(tl.int64)


@triton.jit
def _lora_init(
    parts_ptr, stride_part, stride_part_m, lora_parts, lora_out_ptr, write_lora,
    right_ptr, stride_right_out, stride_right_r,
    offs_m, offs_out, mask_m, mask_out, rank, scale,
    BLOCK_M: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_R: tl.constexpr, SWAP_AB: tl.constexpr,
    WRITE_LORA: tl.constexpr, DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """The accumulator's first value: (scale · L) · Rᵀ for the tile, with L [M, rank] the float32 LoRA intermediate
    (the sum of ``lora_parts`` partial sums) and R [OUT, rank] the LoRA matrix on the output side. [BLOCK_M,
    BLOCK_OUT], or its transpose with SWAP_AB. With WRITE_LORA, ``write_lora`` programs store the summed L."""
    if SWAP_AB:
        acc = tl.zeros((BLOCK_OUT, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        # int64 offsets: a strided LoRA matrix (offs_r · stride_right_r) and splits · M · rank can pass 2^31.
        offs_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask_r = offs_r < rank
        mask_mr = mask_m[:, None] & mask_r[None, :]
        part_ptrs = parts_ptr + offs_m[:, None] * stride_part_m + offs_r[None, :]
        lora = tl.load(part_ptrs, mask=mask_mr, other=0.0)
        for split in range(1, lora_parts):
            lora += tl.load(part_ptrs + tl.cast(split, tl.int64) * stride_part, mask=mask_mr, other=0.0)
        if WRITE_LORA:
            if write_lora:
                tl.store(lora_out_ptr + offs_m[:, None] * rank + offs_r[None, :], lora, mask=mask_mr)
        lora = to_dot_operand(lora * scale, DTYPE, DOT_FP32)
        right = tl.load(
            right_ptr + offs_out[:, None] * stride_right_out + offs_r[None, :] * stride_right_r,
            mask=mask_out[:, None] & mask_r[None, :],
            other=0.0,
        )
        right = to_dot_operand(right, DTYPE, DOT_FP32)
        if SWAP_AB:
            acc = mma(right, tl.trans(lora), acc, DOT_FP32)
        else:
            acc = mma(lora, tl.trans(right), acc, DOT_FP32)
    return acc


@triton.jit
def _split_range(LEN, BLOCK: tl.constexpr):
    """(split, begin, end): this program's share of a reduction of LEN in BLOCK steps, split tl.program_id(1) of
    tl.num_programs(1) (whole steps, in order)."""
    split = tl.program_id(1)
    per_split = tl.cdiv(tl.cdiv(LEN, BLOCK), tl.num_programs(1)) * BLOCK
    begin = split * per_split
    return split, begin, tl.minimum(LEN, begin + per_split)


@triton.jit
def _store_output(
    acc, out_ptr, stride_om, stride_oc, part_ptr, M, OUT, offs_m, offs_out, mask_m, mask_out,
    SWAP_AB: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Store the accumulator ([BLOCK_M, BLOCK_OUT], or its transpose with SWAP_AB) into out [M, OUT] in out's dtype,
    or, one split of several, as float32 partial sums into part [splits, M, OUT] (contiguous) for _split_sum_kernel."""
    if SPLIT_K:
        if tl.num_programs(1) > 1:
            part_ptr += tl.program_id(1).to(tl.int64) * M * OUT
            _store_tile(acc, part_ptr, OUT, 1, offs_m, offs_out, mask_m, mask_out, SWAP_AB)
        else:
            _store_tile(acc, out_ptr, stride_om, stride_oc, offs_m, offs_out, mask_m, mask_out, SWAP_AB)
    else:
        _store_tile(acc, out_ptr, stride_om, stride_oc, offs_m, offs_out, mask_m, mask_out, SWAP_AB)


@triton.jit
def _store_tile(acc, ptr, stride_m, stride_c, offs_m, offs_c, mask_m, mask_c, SWAP_AB: tl.constexpr):
    value = acc.to(ptr.dtype.element_ty)
    if SWAP_AB:
        tl.store(ptr + offs_c[:, None] * stride_c + offs_m[None, :] * stride_m, value,
                 mask=mask_c[:, None] & mask_m[None, :])
    else:
        tl.store(ptr + offs_m[:, None] * stride_m + offs_c[None, :] * stride_c, value,
                 mask=mask_m[:, None] & mask_c[None, :])


@triton.jit
def _nf4_lora_fwd_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, nested_code_ptr,
    s_parts_ptr, lora_b_ptr, bias_ptr, y_ptr, s_ptr, part_ptr,
    M, N, K, rank, s_splits, scale,
    stride_xm, stride_xk, stride_s_split, stride_bn, stride_br, stride_ym, stride_yn,
    m_bucket,  # noqa: ARG001 - autotuning key only (a power-of-two bucket of M)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCKSIZE: tl.constexpr, ALIGNED_ROWS: tl.constexpr, HAS_DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr, WRITE_LORA: tl.constexpr, DOT_FP32: tl.constexpr, DECODE: tl.constexpr,
    PACKED_ALIGNED: tl.constexpr = False, WARPS: tl.constexpr = 4, SPLIT_K: tl.constexpr = False,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    write_s = pid_n == 0
    if SPLIT_K:
        split, k_begin, k_end = _split_range(K, BLOCK_K)
        write_s = write_s & (split == 0)
    else:
        k_begin = 0
        k_end = K

    acc = _lora_init(
        s_parts_ptr, stride_s_split, rank, s_splits, s_ptr, write_s,
        lora_b_ptr, stride_bn, stride_br,
        offs_m, offs_n, mask_m, mask_n, rank, scale,
        BLOCK_M, BLOCK_N, BLOCK_R, SWAP_AB, WRITE_LORA, DTYPE, DOT_FP32,
    )
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if SWAP_AB:
            acc += bias[:, None]
        else:
            acc += bias[None, :]
    if SPLIT_K:
        acc = tl.where(split == 0, acc, 0.0)  # the LoRA term and the bias once, in the first split's sum

    words = nf4_register_words(code_ptr, DECODE)
    # Decode-sized tiles with the decoded weight as wgmma's register operand (SWAP_AB, register decode, block-aligned
    # rows, packed bytes 16-byte aligned: read as words) take it in MMA order (lora_linear_tiles: no shared-memory
    # round trip), x's columns following that order: gathered in pairs (4-byte copies), cheap for a 16-row x tile;
    # the training tiles' 128-256-row x tiles would need 8 times the copies (and their 256-row tiles spill).
    MMA_ORDER: tl.constexpr = (
        BLOCK_M <= 16 and SWAP_AB and ALIGNED_ROWS and PACKED_ALIGNED and DECODE != DECODE_GATHER
        and BLOCK_N % (16 * WARPS) == 0 and BLOCK_K % 32 == 0 and BLOCK_K <= 4 * BLOCKSIZE
    )
    # x's column offsets in int64: a column-strided x (a transposed activation) has k · stride_xk past 2^31.
    offs_x = tl.arange(0, BLOCK_K).to(tl.int64)
    if SPLIT_K:
        offs_x += k_begin
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_x[None, :] * stride_xk
    x_step = tl.cast(stride_xk, tl.int64) * BLOCK_K
    for k0 in range(k_begin, k_end, BLOCK_K):
        if MMA_ORDER:
            offs_k = mma_order_columns(k0, BLOCK_K)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk,
                mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0,
            )
            w = load_nf4_tile_mma_order(
                packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, nested_code_ptr,
                pid_n * BLOCK_N, k0, N, K, BLOCK_N, BLOCK_K, WARPS, BLOCKSIZE, HAS_DOUBLE_QUANT, NESTED, DECODE,
                words,
            )
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
            x_ptrs += x_step
            w = load_nf4_tile(
                packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, nested_code_ptr,
                offs_n, k0, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, ALIGNED_ROWS, HAS_DOUBLE_QUANT, NESTED, DECODE,
                words,
            )
        x = to_dot_operand(x, DTYPE, DOT_FP32)
        w = to_dot_operand(w, DTYPE, DOT_FP32)
        if SWAP_AB:
            acc = mma(w, tl.trans(x), acc, DOT_FP32)
        else:
            acc = mma(x, tl.trans(w), acc, DOT_FP32)

    _store_output(acc, y_ptr, stride_ym, stride_yn, part_ptr, M, N, offs_m, offs_n, mask_m, mask_n, SWAP_AB, SPLIT_K)


@triton.jit
def _nf4_lora_bwd_dx_kernel(
    dy_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, nested_code_ptr,
    ds_parts_ptr, lora_a_ptr, seed_ptr, dx_ptr, ds_ptr, part_ptr,
    M, N, K, rank, ds_splits, scale, threshold, inv_keep,
    stride_dym, stride_dyn, stride_ds_split, stride_ar, stride_ak, stride_dxm, stride_dxk,
    m_bucket,  # noqa: ARG001 - autotuning key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCKSIZE: tl.constexpr, ALIGNED_ROWS: tl.constexpr, HAS_DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, WRITE_LORA: tl.constexpr, DOT_FP32: tl.constexpr, DECODE: tl.constexpr,
    WARPS: tl.constexpr = 4,  # noqa: ARG001 - the configurations' num_warps (used by the forward's tiles)
    SPLIT_K: tl.constexpr = False,
):
    # The output tile is [BLOCK_M, BLOCK_K] of dX; the reduction runs over N in BLOCK_N steps, reading the weight
    # tile W[n0 : n0 + BLOCK_N, k-tile] (rows contiguous along K, the output dimension here).
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    DTYPE: tl.constexpr = dx_ptr.dtype.element_ty
    write_ds = pid_k == 0
    if SPLIT_K:  # splits of the reduction over N
        split, n_begin, n_end = _split_range(N, BLOCK_N)
        write_ds = write_ds & (split == 0)
    else:
        n_begin = 0
        n_end = N

    # lora_A [rank, K] is the right-hand LoRA matrix R [K, rank] read through swapped strides.
    acc = _lora_init(
        ds_parts_ptr, stride_ds_split, rank, ds_splits, ds_ptr, write_ds,
        lora_a_ptr, stride_ak, stride_ar,
        offs_m, offs_k, mask_m, mask_k, rank, scale,
        BLOCK_M, BLOCK_K, BLOCK_R, SWAP_AB, WRITE_LORA, DTYPE, DOT_FP32,
    )
    if HAS_DROPOUT:
        # The LoRA path saw dropout(x): its gradient is masked and rescaled; the base path's is not.
        if SWAP_AB:
            keep = dropout_keep(offs_m[None, :] * K + offs_k[:, None], seed_ptr, threshold)
        else:
            keep = dropout_keep(offs_m[:, None] * K + offs_k[None, :], seed_ptr, threshold)
        acc = tl.where(keep, acc * inv_keep, 0.0)
    if SPLIT_K:
        acc = tl.where(split == 0, acc, 0.0)  # the LoRA term once, in the first split's sum

    words = nf4_register_words(code_ptr, DECODE)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=mask_m[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
        w = load_nf4_tile(
            packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, nested_code_ptr,
            offs_n, pid_k * BLOCK_K, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, ALIGNED_ROWS, HAS_DOUBLE_QUANT, NESTED,
            DECODE, words,
        )
        dy = to_dot_operand(dy, DTYPE, DOT_FP32)
        w = to_dot_operand(w, DTYPE, DOT_FP32)
        if SWAP_AB:
            acc = mma(tl.trans(w), tl.trans(dy), acc, DOT_FP32)
        else:
            acc = mma(dy, w, acc, DOT_FP32)

    _store_output(acc, dx_ptr, stride_dxm, stride_dxk, part_ptr, M, K, offs_m, offs_k, mask_m, mask_k, SWAP_AB,
                  SPLIT_K)


SPLIT_SUM_BLOCK = 1024  # output elements per program of _split_sum_kernel


@triton.jit
def _split_sum_kernel(part_ptr, out_ptr, M, OUT, splits, stride_om, stride_oc, BLOCK: tl.constexpr):
    """out [M, OUT] (its dtype, any strides) = Σ_s part[s], the float32 partial sums [splits, M, OUT] of a split
    GEMM, added in split order (the same sum every run)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    count = tl.cast(M, tl.int64) * OUT
    mask = offs < count
    total = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in range(1, splits):
        total += tl.load(part_ptr + s * count + offs, mask=mask, other=0.0)
    rows = offs // OUT
    cols = offs - rows * OUT
    tl.store(out_ptr + rows * stride_om + cols * stride_oc, total.to(out_ptr.dtype.element_ty), mask=mask)


# Autotuned entry points. The raw kernels above stay launchable with an explicit configuration (tests, the sm_90
# compile check).
_KERNELS = {"fwd": _nf4_lora_fwd_kernel, "dx": _nf4_lora_bwd_dx_kernel}
_KEYS = {"fwd": FWD_TUNING_KEY, "dx": DX_TUNING_KEY}
# One autotuner per candidate table; each caches its best configuration per tuning key.
_TUNED = {spec: triton.autotune(_configs(table), _KEYS[spec[0]])(_KERNELS[spec[0]]) for spec, table in _TABLES.items()}


def tuned_gemm(kernel: str, M: int, aligned_rows: bool):
    """The autotuned ``kernel`` ("fwd" or "dx") GEMM serving M rows on the given decode path."""
    return _TUNED[(kernel, M <= SMALL_M, aligned_rows)]
