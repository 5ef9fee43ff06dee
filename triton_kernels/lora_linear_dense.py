"""The dense route of the fused NF4 + LoRA linear at large M: dequantize W once into a scratch tensor, run cuBLAS.

Forward:  y  = [bias + (scale · S) · Bᵀ]  then  y += x · deq(W)ᵀ           (one addmm_ with beta = 1)
Backward: dX = [mask ⊙ (scale · dS) · A / (1 - p)]  then  dX += dY · deq(W)  (one addmm_ with beta = 1)

Why a second route: at training shapes (M in the thousands) the fused GEMMs (``lora_linear_gemm``) decode NF4 inside
the reduction loop, and their sm_90 SASS says the decode does not hide under the tensor cores yet (issue 11: issue
time 1.5-2x tensor time). bitsandbytes' own route, dequantize once and call cuBLAS, then wins: the dequantization
is a memory-bound pass over N·K elements that costs a few percent of an M×N×K GEMM when M is large. This module is
that route with the LoRA term and the bias folded in: the bracketed term is written first by one small Triton
kernel (``_lora_term_kernel``, memory-bound: it writes the output once), and cuBLAS then adds the big product into
it through its beta = 1 epilogue (``Tensor.addmm_``), which reads the output once inside the GEMM. So the output
is written once and read once beyond the GEMM's own store; peft + bitsandbytes spend about five passes there.
``route.py`` chooses between this route and the fused GEMMs by measuring both on the first call of each shape.

What the two routes share, so that their results agree bit for bit where the contract says they must: the thin
passes (S = dropout(x) · Aᵀ and dS = dY · B, launched by ``lora_linear`` before either route), the summation of
their partial sums (same order, part 0 + part 1 + ..., in float32, as the fused GEMMs' ``_lora_init``), the rounding
of scale · S to the operand dtype, and the dropout hash of dX's LoRA term. s, dS, and therefore grad_A / grad_B /
grad_bias are identical between routes; y and dX differ only by rounding (the LoRA term is rounded to x's dtype
before cuBLAS adds the product to it, cuBLAS orders its sums differently, and in bf16 the fused GEMMs decode W with
bf16 intermediate roundings where the dequantize kernel rounds once).

Scratch memory: the dequantized weight is one [N, K] tensor in x's dtype, N·K·2 bytes in bf16 (117 MB for a
14336×4096 MLP weight, 470 MB for 28672×8192), allocated per call from torch's caching allocator and released when
the call returns; no copy of the weight outlives the call (a persistent bf16 copy would undo QLoRA's 4x saving).
The transient peak of a forward or dX call is therefore the NF4 storage + N·K·2 bytes + cuBLAS's workspace. The
caching allocator keeps the freed block reserved, so consecutive layers of one shape reuse it (under CUDA-graph
capture it stays in the graph's private pool: one scratch block per captured graph, reused by its layers).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import triton
import triton.language as tl

from . import nf4 as _nf4
from ._common import compile_options, interpreting
from .lora_linear_thin import block_r
from .lora_linear_tiles import dropout_keep, mma, to_dot_operand

# The r-chunk of the LoRA product. 32, not the fused GEMMs' 64: at 64 the exact-float32 dot spilled registers in
# the sm_90 compile (Triton 3.6 and 3.9), at 32 with 8 warps no variant spills (≤ 128 registers).
_MAX_BLOCK_R = 32


@triton.jit
def _lora_term_kernel(
    parts_ptr, right_ptr, bias_ptr, seed_ptr, out_ptr, lora_ptr,
    M, C, rank, splits, scale, threshold, inv_keep,
    stride_part, stride_right_c, stride_right_r, stride_om, stride_oc,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, WRITE_LORA: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """out[M, C] = drop?(bias + (scale · L) · Rᵀ) with L [M, rank] the float32 sum of ``splits`` partial sums
    [splits, M, rank] and R [C, rank] through strides; with WRITE_LORA the first program column stores L."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask_r = offs_r < rank
        mask_mr = mask_m[:, None] & mask_r[None, :]
        part_ptrs = parts_ptr + offs_m[:, None] * rank + offs_r[None, :]
        # The partial sums in the fused GEMMs' order (part 0, then + part 1, ...): s and dS come out bit-identical.
        lora = tl.load(part_ptrs, mask=mask_mr, other=0.0)
        for split in range(1, splits):
            lora += tl.load(part_ptrs + tl.cast(split, tl.int64) * stride_part, mask=mask_mr, other=0.0)
        if WRITE_LORA:
            if pid_c == 0:
                tl.store(lora_ptr + offs_m[:, None] * rank + offs_r[None, :], lora, mask=mask_mr)
        lora = to_dot_operand(lora * scale, DTYPE, DOT_FP32)
        right = tl.load(
            right_ptr + offs_c[:, None] * stride_right_c + offs_r[None, :] * stride_right_r,
            mask=mask_c[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc = mma(lora, tl.trans(to_dot_operand(right, DTYPE, DOT_FP32)), acc, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_DROPOUT:
        # dX's LoRA path saw dropout(x): the same hash of (seed, row · K + column) as the thin passes and dX GEMM.
        keep = dropout_keep(offs_m[:, None] * C + offs_c[None, :], seed_ptr, threshold)
        acc = tl.where(keep, acc * inv_keep, 0.0)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(DTYPE), mask=mask_m[:, None] & mask_c[None, :])


def lora_term_plan(rank: int) -> dict[str, int]:
    """Tiles of ``_lora_term_kernel``. It streams its output (M·C elements written, M·r + C·r read), so the tile
    only has to be wide enough for full 128-byte stores: 64×128 with 8 warps (32 accumulator registers per thread;
    compiled for sm_90, bf16 and float32, r = 16 to 256: no spills, 128-bit stores). Under the interpreter, one
    small tile keeps the Python-speed loops short."""
    br = min(block_r(rank), _MAX_BLOCK_R)
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_C": 64, "BLOCK_R": br, "num_warps": 1}
    return {"BLOCK_M": 64, "BLOCK_C": 128, "BLOCK_R": br, "num_warps": 8}


def _launch_lora_term(
    parts: torch.Tensor, right_cr: tuple[torch.Tensor, int, int], out: torch.Tensor, lora_out: torch.Tensor,
    write_lora: bool, scale: float, bias: Optional[torch.Tensor], dropout_args, dot_fp32: bool,
) -> None:
    splits, M, rank = parts.shape
    C = out.shape[1]
    right, stride_rc, stride_rr = right_cr
    has_dropout, seed, threshold, inv_keep = dropout_args
    plan = lora_term_plan(rank)
    grid = (triton.cdiv(M, plan["BLOCK_M"]), triton.cdiv(C, plan["BLOCK_C"]))
    _lora_term_kernel[grid](
        parts, right, bias if bias is not None else parts, seed, out, lora_out,
        M, C, rank, splits, float(scale), threshold, inv_keep,
        parts.stride(0), stride_rc, stride_rr, out.stride(0), out.stride(1),
        BLOCK_M=plan["BLOCK_M"], BLOCK_C=plan["BLOCK_C"], BLOCK_R=plan["BLOCK_R"],
        HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, WRITE_LORA=write_lora, DOT_FP32=dot_fp32,
        **compile_options(num_warps=plan["num_warps"], num_stages=1, enable_fp_fusion=False),
    )


def dequantize_scratch(
    nf4: Sequence[torch.Tensor], double_quant: bool, blocksize: int, N: int, K: int, dtype: torch.dtype
) -> torch.Tensor:
    """deq(W) [N, K] in ``dtype``, a fresh tensor the caller drops when done (the transient N·K·itemsize bytes).
    ``nf4`` is the launcher's pointer list (``lora_linear._nf4_args``); the values are the reference's (level ·
    absmax in float32, one rounding to ``dtype``). The fused GEMMs' bf16 register decode rounds level and absmax to
    bf16 first, so in bf16 the two routes' weights can differ by a rounding, within DESIGN.md's bf16 tolerance."""
    packed, absmax, nested_absmax, offset, _code, nested_code = nf4
    return _nf4.dequantize_nf4(
        packed, absmax, nested_absmax if double_quant else None, offset if double_quant else None,
        blocksize, (N, K), dtype, nested_code if double_quant else None,
    )


def _cublas_context(device: torch.device):
    # The launchers may be called directly, under a caller's autocast or with inputs that require grad: the
    # in-place addmm_ must neither be recast nor recorded.
    return torch.autocast(device.type, enabled=False)


def dense_fwd(
    x: torch.Tensor, nf4: Sequence[torch.Tensor], double_quant: bool, blocksize: int,
    s_parts: torch.Tensor, lora_B: torch.Tensor, scale: float, bias: Optional[torch.Tensor],
    y: torch.Tensor, s: torch.Tensor, write_s: bool, dot_fp32: bool,
) -> None:
    """y = bias + (scale · S) · Bᵀ + x · deq(W)ᵀ, written into ``y``; S (the sum of ``s_parts``) into ``s`` when
    ``write_s``. The arguments are the launcher's, already checked (``lora_linear.nf4_lora_linear_fwd``)."""
    N, K = y.shape[1], x.shape[1]
    no_dropout = (False, s_parts, 0, 1.0)
    with torch.no_grad(), _cublas_context(x.device):
        _launch_lora_term(s_parts, (lora_B, lora_B.stride(0), lora_B.stride(1)), y, s, write_s, scale, bias,
                          no_dropout, dot_fp32)
        w = dequantize_scratch(nf4, double_quant, blocksize, N, K, x.dtype)
        y.addmm_(x, w.t())
        del w


def dense_dx(
    grad_y: torch.Tensor, nf4: Sequence[torch.Tensor], double_quant: bool, blocksize: int,
    ds_parts: torch.Tensor, lora_A: torch.Tensor, scale: float, dropout_args,
    grad_x: torch.Tensor, ds: torch.Tensor, write_ds: bool, dot_fp32: bool,
) -> None:
    """dX = mask ⊙ (scale · dS) · A / (1 - p) + dY · deq(W), written into ``grad_x``; dS (the sum of ``ds_parts``)
    into ``ds`` when ``write_ds``. ``dropout_args`` is ``lora_linear._dropout_args``' tuple."""
    N, K = grad_y.shape[1], grad_x.shape[1]
    with torch.no_grad(), _cublas_context(grad_y.device):
        # lora_A [r, K] is the right-hand LoRA matrix R [K, r] through swapped strides.
        _launch_lora_term(ds_parts, (lora_A, lora_A.stride(1), lora_A.stride(0)), grad_x, ds, write_ds, scale,
                          None, dropout_args, dot_fp32)
        w = dequantize_scratch(nf4, double_quant, blocksize, N, K, grad_y.dtype)
        grad_x.addmm_(grad_y, w)
        del w


def dense_matches_contract(dtype: torch.dtype) -> bool:
    """Whether cuBLAS keeps the launchers' precision contract for ``dtype``: float32 inputs get exact float32
    products (no TF32) from the fused kernels, so the dense route qualifies for float32 only while torch's float32
    matmul precision is "highest" (its default)."""
    return dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest"


def compile_cases(quick: bool = False) -> list[tuple[str, str, Any, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """``(family, variant, kernel, args, constexprs, options)`` of each sm_90 compilation that covers
    ``_lora_term_kernel`` with the launcher's GPU plan, for ``compile_check`` (its ``Case`` takes these in this
    order, then ``needs_wgmma=False``): forward (bias) into a 14336-wide output and dX (dropout) into a 4096-wide
    one, 4096 rows, two partial sums, for r = 16 / 64 / 256 and bf16 / float32 (``quick``: r = 16, bf16)."""
    out = []
    ranks = [16] if quick else [16, 64, 256]
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    M = 4096
    for rank in ranks:
        for dtype in dtypes:
            for kind, C in (("fwd", 14336), ("dx", 4096)):
                plan = dict(lora_term_plan(rank))
                num_warps = plan.pop("num_warps")
                t = lambda dt: torch.empty(16, dtype=dt)  # noqa: E731 - dtype and 16-byte alignment are what count
                args = {
                    "parts_ptr": t(torch.float32), "right_ptr": t(dtype), "bias_ptr": t(dtype),
                    "seed_ptr": t(torch.int64), "out_ptr": t(dtype), "lora_ptr": t(torch.float32),
                    "M": M, "C": C, "rank": rank, "splits": 2, "scale": 2.0, "threshold": 1677722, "inv_keep": 1.1,
                    "stride_part": M * rank,
                    # fwd: lora_B [N, r] row-major; dx: lora_A [r, K] read as [K, r]
                    "stride_right_c": rank if kind == "fwd" else 1, "stride_right_r": 1 if kind == "fwd" else C,
                    "stride_om": C, "stride_oc": 1,
                }
                constexprs = {**plan, "HAS_BIAS": kind == "fwd", "HAS_DROPOUT": kind == "dx", "WRITE_LORA": True,
                              "DOT_FP32": dtype == torch.float32}
                name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
                options = {"num_warps": num_warps, "num_stages": 1, "enable_fp_fusion": False}
                out.append(("lora_term", f"{kind},r={rank},{name}", _lora_term_kernel, args, constexprs, options))
    return out


# ------------------------------------------------------------------------------------------------ static model

# cuBLAS's bf16 rate at the training shapes, as a fraction of the tensor-core peak. 0.8 · 989 TFLOP/s = 791, the
# "≈ 790 TFLOP/s cuBLAS reaches" at M = 4096, N = K = 4096 that DESIGN.md ("Kernels: the plan") works from.
CUBLAS_FRACTION_OF_PEAK = 0.8


def _nf4_storage_bytes(N: int, K: int, blocksize: int, double_quant: bool) -> int:
    numel = N * K
    blocks = math.ceil(numel / blocksize)
    if double_quant:  # uint8 codes, float32 per 256 blocks, the 256-entry map and the offset
        absmax = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4
    else:
        absmax = 4 * blocks
    return (numel + 1) // 2 + absmax + 4 * 16


def modelled_dense_route(
    kind: str, M: int, N: int, K: int, r: int, machine: Any = None, *,
    blocksize: int = 64, double_quant: bool = True, itemsize: int = 2, cublas_fraction: float = CUBLAS_FRACTION_OF_PEAK,
) -> dict[str, float]:
    """The modelled H200 time (µs) of the dense route's stage that replaces the fused ``kind`` GEMM ("fwd" or
    "dx"), by part. A MODEL, not a measurement. Assumptions:

    - dequantize: memory-bound; reads the NF4 storage, writes N·K·itemsize bytes, at ``machine.hbm_bytes_per_s``;
    - LoRA term: memory-bound; writes the M×out output once, reads the float32 [M, r] partial sums (one split)
      and the [out, r] LoRA matrix (out = N for fwd, K for dx);
    - cuBLAS GEMM: max(2·M·N·K / (cublas_fraction · machine.dense_bf16_flops), its bytes / HBM bandwidth) with
      bytes = both operands + the output read once (beta = 1) and written once;
    - the three launches run back to back (no overlap between them); launch latency is not counted.

    The thin passes (S, dS, dA, dB), which both routes share, are not included: add the fused model's thin terms
    to compare whole directions. ``machine`` needs ``hbm_bytes_per_s`` and ``dense_bf16_flops`` (default: the
    H200 of ``sass_model``)."""
    if kind not in ("fwd", "dx"):
        raise ValueError(f"kind must be 'fwd' or 'dx', got {kind!r}")
    if min(M, N, K, r) <= 0:
        raise ValueError(f"M, N, K and r must be positive, got {(M, N, K, r)}")
    if machine is None:
        from .sass_model import H200 as machine  # lazily: sass_model imports this module's function itself
    hbm, flops_per_s = machine.hbm_bytes_per_s, cublas_fraction * machine.dense_bf16_flops
    out_cols, reduce_len = (N, K) if kind == "fwd" else (K, N)
    dequant_bytes = _nf4_storage_bytes(N, K, blocksize, double_quant) + N * K * itemsize
    lora_bytes = M * out_cols * itemsize + 4 * M * r + itemsize * r * out_cols + (itemsize * N if kind == "fwd" else 0)
    gemm_bytes = itemsize * (M * reduce_len + N * K + 2 * M * out_cols)
    gemm_flops_us = 2 * M * N * K / flops_per_s * 1e6
    gemm_us = max(gemm_flops_us, gemm_bytes / hbm * 1e6)
    parts = {
        "dequantize_us": dequant_bytes / hbm * 1e6,
        "lora_term_us": lora_bytes / hbm * 1e6,
        "gemm_us": gemm_us,
    }
    total = sum(parts.values())
    return {**parts, "time_us": total, "cublas_only_us": gemm_flops_us, "over_cublas": total / gemm_flops_us,
            "scratch_bytes": N * K * itemsize}


def modelled_dense_route_us(kind: str, M: int, N: int, K: int, r: int, machine: Any = None) -> float:
    """``modelled_dense_route(...)["time_us"]``: the dense route's modelled H200 time in µs for the ``kind`` ("fwd"
    or "dx") stage at x [M, K], W [N, K], rank r, bf16, blocksize 64, double quantization (for ``sass_model``)."""
    return modelled_dense_route(kind, M, N, K, r, machine)["time_us"]
