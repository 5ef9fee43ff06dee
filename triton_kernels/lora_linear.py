"""Launchers of the fused NF4 + LoRA linear: ``nf4_lora_linear_fwd`` and ``nf4_lora_linear_bwd``.

Same contracts as ``qlora_kernels.reference.nf4_lora_linear_fwd`` / ``_bwd`` (2-D x [M, K], NF4 storage of W [N, K],
lora_A [r, K], lora_B [N, r], one float dtype for x, the LoRA matrices and the bias), plus ``out_*`` buffers to be
written in place and ``config`` to force one GEMM configuration (tests, the compile check).

Launch order, forward: thin pass (S partial sums) -> GEMM (sums S, stores it, writes Y). Backward: thin pass (dS
partial sums) -> dX GEMM (sums dS, stores it) -> dA thin pass over x -> dB (+ dbias) thin pass over dY. At M ≤ 16 a
GEMM may split its reduction (split-K, ``_common.split_count``: when its output tiles alone would leave SMs idle):
the splits write float32 partial sums and ``_split_sum_kernel`` adds them, in order, into Y (or dX).

At M > 16 each GEMM has a second route, dequantize once + cuBLAS (``lora_linear_dense``), chosen per shape by a
first-call measurement (``route``); ``_gemm_or_dense`` is the one place each direction asks. A forced ``config``
means the fused GEMM. Decode-sized M stays fused: there reading the weight is the whole cost, and the dense route
would write and re-read it in bf16.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional

import torch
import triton

from qlora_kernels import reference

from . import decode_check as _decode_check
from . import lora_linear_dense as _dense
from . import route as _route
from ._common import check_launchable, compile_options, interpreting, split_count, split_limit
from .lora_linear_gemm import (
    SMALL_M, SPLIT_SUM_BLOCK, _nf4_lora_bwd_dx_kernel, _nf4_lora_fwd_kernel, _split_sum_kernel, tuned_gemm,
)
from .lora_linear_thin import _lora_cols_kernel, _lora_rows_kernel, block_r, cols_plan, rows_plan
from .lora_linear_tiles import DECODE_GATHER, DECODE_REGISTERS_ASM, DECODE_REGISTERS_TWIN, nf4_levels

_NESTED = reference.NESTED_BLOCKSIZE
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The r-chunk of the LoRA product inside the GEMMs: the [BLOCK_M, BLOCK_R] operand stays small beside the tile.
_GEMM_MAX_BLOCK_R = 64


def _check(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax, offset, blocksize: int,
    lora_A: torch.Tensor, lora_B: torch.Tensor, bias: Optional[torch.Tensor],
) -> tuple[int, int, int, int]:
    """(M, N, K, rank) after the checks that keep a launch from reading out of bounds."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    M, K = x.shape
    if lora_A.dim() != 2 or lora_A.shape[1] != K or not 1 <= lora_A.shape[0] <= 256:
        raise ValueError(f"lora_A must be [r, K={K}] with 1 <= r <= 256, got {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    if lora_B.dim() != 2 or lora_B.shape[1] != rank:
        raise ValueError(f"lora_B must be [N, r={rank}], got {tuple(lora_B.shape)}")
    N = lora_B.shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [N={N}], got {tuple(bias.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if blocksize not in reference.VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {reference.VALID_BLOCKSIZES}, got {blocksize}")
    if packed.dtype != torch.uint8 or packed.numel() != (N * K + 1) // 2:
        raise ValueError(
            f"packed must be uint8 [(N*K + 1) // 2 = {(N * K + 1) // 2}], got {packed.dtype} {tuple(packed.shape)}"
        )
    if absmax.numel() != triton.cdiv(N * K, blocksize):
        raise ValueError(f"absmax must have {triton.cdiv(N * K, blocksize)} entries, got {absmax.numel()}")
    if (nested_absmax is None) != (offset is None):
        raise ValueError("nested_absmax and offset come together (double quantization) or not at all")
    return M, N, K, rank


def _nf4_args(packed, absmax, nested_absmax, offset, nested_code, device) -> tuple[list[torch.Tensor], bool]:
    """The weight's pointer arguments in kernel order, and whether it is double-quantized."""
    code = nf4_levels(device)
    double_quant = nested_absmax is not None
    if double_quant and nested_code is None:
        nested_code = reference.dynamic_map(True, device)
    absmax = absmax.contiguous()
    return [
        packed.contiguous(),
        absmax,
        nested_absmax.contiguous() if double_quant else absmax,  # unused placeholders without double quantization
        offset.reshape(1).float() if double_quant else absmax,
        code,
        nested_code.contiguous().float() if double_quant else code,
    ], double_quant


_DECODE_CHOICES = {"auto": None, "gather": DECODE_GATHER, "twin": DECODE_REGISTERS_TWIN}


def decode_mode(dtype: torch.dtype, device: Optional[torch.device] = None) -> int:
    """The GEMMs' DECODE constexpr: bf16 decodes in registers (``nf4_asm``; its plain-Triton twin under the
    interpreter, which cannot run inline asm), fp16 and fp32 gather float32 levels (lora_linear_tiles). On a CUDA
    ``device`` the asm is used once ``decode_check`` has seen it decode exactly like its twin there (checked on the
    first call, per device; otherwise a warning and the gather decode). ``QLORA_KERNELS_NF4_DECODE=gather`` (or
    ``twin``) replaces the asm without that check (read at each call; ``auto`` is the default)."""
    choice = os.environ.get("QLORA_KERNELS_NF4_DECODE", "auto").strip().lower() or "auto"
    if choice not in _DECODE_CHOICES:
        raise ValueError(f"QLORA_KERNELS_NF4_DECODE must be one of {sorted(_DECODE_CHOICES)}, got {choice!r}")
    if dtype != torch.bfloat16 or choice == "gather":
        return DECODE_GATHER.value
    if choice == "twin" or interpreting():
        return DECODE_REGISTERS_TWIN.value
    if device is not None and device.type == "cuda" and not _decode_check.register_decode_works(device):
        return DECODE_GATHER.value
    return DECODE_REGISTERS_ASM.value


def _m_bucket(M: int) -> int:
    return min(triton.next_power_of_2(max(M, 1)), 8192)


# The interpreter has no SMs: it splits decode-sized reductions as an H200 (132 SMs) would, so that the tests run the
# split-K path at the launches' own choice.
_INTERPRETER_SMS = 132


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


@dataclasses.dataclass
class _GemmLaunch:
    """One GEMM launch: ``kernel[grid](...)`` with ``extra`` kwargs. A configuration with SPLIT_K may split the
    reduction over the grid's second axis (``splits_of``: how many for a configuration's kwargs); its float32
    partial sums go to a buffer of ``max_splits`` slices, and ``finish`` adds them into the output."""

    kernel: Any
    grid: Callable
    extra: dict
    splits_of: Callable[[dict], int]
    max_splits: int
    used: Callable[[], dict]  # the kwargs of the configuration that ran (after the launch)

    def parts(self, M: int, out_cols: int, device: torch.device, placeholder: torch.Tensor) -> torch.Tensor:
        """The partial sums' buffer [max_splits, M, out_cols] float32, or ``placeholder`` (float32) when no
        configuration splits."""
        if self.max_splits == 1:
            return placeholder
        return torch.empty((self.max_splits, M, out_cols), dtype=torch.float32, device=device)

    def finish(self, parts: torch.Tensor, out: torch.Tensor) -> None:
        """After the launch: out = Σ of the partial sums, in split order, if the configuration that ran split (only
        decode-sized configurations split: with none among the candidates, which ran is not asked)."""
        if self.max_splits == 1:
            return
        splits = self.splits_of(self.used())
        if splits > 1:
            M, out_cols = out.shape
            _split_sum_kernel[(triton.cdiv(M * out_cols, SPLIT_SUM_BLOCK),)](
                parts, out, M, out_cols, splits, out.stride(0), out.stride(1), BLOCK=SPLIT_SUM_BLOCK,
            )


def _gemm_launch(
    kind: str, M: int, out_cols: int, reduce_len: int, aligned_rows: bool, device: torch.device,
    config: Optional[dict[str, Any]],
) -> _GemmLaunch:
    """The autotuned ``kind`` GEMM for M and the decode path, or the raw kernel with ``config`` forced (a forced
    config may also name its split count, ``splits``). The output columns (out_cols of them) are tiled by BLOCK_N
    (fwd) or BLOCK_K (dx), the reduction (reduce_len) by the other."""
    out_tile, reduce_tile = ("BLOCK_N", "BLOCK_K") if kind == "fwd" else ("BLOCK_K", "BLOCK_N")
    sms = _sm_count(device)
    forced_splits = None if config is None else config.get("splits")

    def tiles(meta) -> int:
        return triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(out_cols, meta[out_tile])

    def splits_of(meta) -> int:
        if not meta.get("SPLIT_K", False):
            return 1
        if forced_splits is not None:
            return forced_splits
        return split_count(tiles(meta), triton.cdiv(reduce_len, meta[reduce_tile]), sms, split_limit(M, reduce_len))

    grid = lambda meta: (tiles(meta), splits_of(meta))  # noqa: E731
    if config is None:
        tuned = tuned_gemm(kind, M, aligned_rows)
        max_splits = max(splits_of(c.kwargs) for c in tuned.configs)
        return _GemmLaunch(tuned, grid, {}, splits_of, max_splits, lambda: tuned.best_config.kwargs)
    config = dict(config)
    config.pop("splits", None)
    if forced_splits is not None and not (isinstance(forced_splits, int) and 1 <= forced_splits):
        raise ValueError(f"config['splits'] must be a positive int, got {forced_splits!r}")
    launch = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
    raw = _nf4_lora_fwd_kernel if kind == "fwd" else _nf4_lora_bwd_dx_kernel
    return _GemmLaunch(raw, grid(config), {**config, **compile_options(**launch)}, splits_of, splits_of(config),
                       lambda: config)


def _gemm_or_dense(fused_launch, key_args: tuple, dense, fused_forced: bool, device: torch.device):
    """The call that computes a direction's big product: ``fused_launch`` (the GEMM kernel with its grid) itself,
    or a call that takes the same arguments and runs whichever of the fused GEMM and ``dense`` (dequantize +
    cuBLAS, no arguments) ``route`` chooses for the shape ``key_args`` (``route.route_key``'s). Decode-sized M and
    ``fused_forced`` (the caller forced something of the GEMM's own, e.g. its ``config``) take the fused GEMM."""
    if key_args[1] <= SMALL_M or fused_forced:
        return fused_launch

    def launch(*args, **kwargs) -> None:
        key = _route.route_key(*key_args)
        _route.run(key, {"fused": lambda: fused_launch(*args, **kwargs), "dense": dense}, device)

    return launch


def _dot_fp32(dtype: torch.dtype) -> bool:
    # float32 operands use exact float32 products (no TF32); the interpreter computes every dot in float32.
    return interpreting() or dtype == torch.float32


def _dropout_args(
    dropout: float, seed: Optional[torch.Tensor], placeholder: torch.Tensor
) -> tuple[bool, torch.Tensor, int, float]:
    """(HAS_DROPOUT, seed pointer, integer threshold, 1 / (1 - p)). Without dropout the seed pointer is never read:
    ``placeholder`` (any tensor of the call) stands in, so no launch is spent creating one."""
    if dropout > 0.0:
        if seed is None or seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError("dropout > 0 needs an int64 seed tensor with one element")
        return True, seed.reshape(1), reference.dropout_threshold(dropout), 1.0 / (1.0 - dropout)
    return False, placeholder, 0, 1.0


def _launch_rows(
    x: torch.Tensor, w_rc: tuple[torch.Tensor, int, int], rank: int, dropout_args, dot_fp32: bool
) -> torch.Tensor:
    """float32 partial sums [splits, M, rank] of dropout?(x) · Wᵀ, W given as (tensor, stride_r, stride_c)."""
    M, C = x.shape
    plan = rows_plan(M, C, rank, x.device)
    parts = torch.empty((plan.splits, M, rank), dtype=torch.float32, device=x.device)
    has_dropout, seed, threshold, inv_keep = dropout_args
    w, stride_wr, stride_wc = w_rc
    _lora_rows_kernel[(triton.cdiv(M, plan.block_m), plan.splits)](
        x, w, parts, seed, M, C, rank, plan.chunk, threshold, inv_keep,
        x.stride(0), x.stride(1), stride_wr, stride_wc, parts.stride(0), parts.stride(1),
        BLOCK_M=plan.block_m, BLOCK_C=plan.block_c, BLOCK_R=plan.block_r,
        HAS_DROPOUT=has_dropout, DOT_FP32=dot_fp32,
        **compile_options(num_warps=plan.num_warps, enable_fp_fusion=False),
    )
    return parts


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
    *,
    out: Optional[torch.Tensor] = None,
    out_s: Optional[torch.Tensor] = None,
    config: Optional[dict[str, Any]] = None,
    decode: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(y [M, N] in x's dtype, s = dropout(x) · lora_Aᵀ [M, r] float32)``; see the module docstring.
    ``decode`` forces the GEMM's DECODE mode (``lora_linear_tiles.DECODE_*``; the GPU check compares the register
    decode's asm with its twin); by default ``decode_mode(x.dtype)``."""
    M, N, K, rank = _check(x, packed, absmax, nested_absmax, offset, blocksize, lora_A, lora_B, bias)
    check_launchable(x, packed, absmax, nested_absmax, offset, lora_A, lora_B, bias, seed)
    device = x.device
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=device)
    if M == 0:
        return y, out_s if out_s is not None else torch.empty((M, rank), dtype=torch.float32, device=device)
    dot_fp32 = _dot_fp32(x.dtype)
    dropout_args = _dropout_args(dropout, seed, x)
    s_parts = _launch_rows(x, (lora_A, lora_A.stride(0), lora_A.stride(1)), rank, dropout_args, dot_fp32)
    splits = s_parts.shape[0]
    # One split: the partial sum is S. Several (or a caller's buffer): the GEMM stores their sum (WRITE_LORA).
    s = out_s if out_s is not None else (s_parts[0] if splits == 1 else torch.empty_like(s_parts[0]))
    write_s = s.data_ptr() != s_parts.data_ptr()
    nf4, double_quant = _nf4_args(packed, absmax, nested_absmax, offset, nested_code, device)
    aligned_rows = K % blocksize == 0
    gemm = _gemm_launch("fwd", M, N, K, aligned_rows, device, config)
    parts = gemm.parts(M, N, device, s_parts)
    bias_arg = bias.contiguous() if bias is not None else s_parts
    dense = lambda: _dense.dense_fwd(  # noqa: E731
        x, nf4, double_quant, blocksize, s_parts, lora_B, float(scale), bias_arg if bias is not None else None,
        y, s, write_s, dot_fp32,
    )
    launch = _gemm_or_dense(gemm.kernel[gemm.grid], ("fwd", M, N, K, rank, x.dtype, blocksize, double_quant,
                                                     bias is not None, False), dense,
                            config is not None or decode is not None, device)
    launch(
        x, *nf4, s_parts, lora_B, bias_arg, y, s, parts,
        M, N, K, rank, splits, float(scale),
        x.stride(0), x.stride(1), s_parts.stride(0), lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        _m_bucket(M),
        BLOCK_R=min(block_r(rank), _GEMM_MAX_BLOCK_R),
        BLOCKSIZE=blocksize, ALIGNED_ROWS=aligned_rows, HAS_DOUBLE_QUANT=double_quant, NESTED=_NESTED,
        HAS_BIAS=bias is not None, WRITE_LORA=write_s, DOT_FP32=dot_fp32,
        DECODE=decode_mode(x.dtype, device) if decode is None else decode,
        PACKED_ALIGNED=nf4[0].data_ptr() % 16 == 0,
        **gemm.extra, **compile_options(enable_fp_fusion=False),
    )
    gemm.finish(parts, y)
    return y, s


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
    *,
    out_x: Optional[torch.Tensor] = None,
    out_A: Optional[torch.Tensor] = None,
    out_B: Optional[torch.Tensor] = None,
    out_bias: Optional[torch.Tensor] = None,
    config: Optional[dict[str, Any]] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward: ``(grad_x, grad_A, grad_B, grad_bias)``, None where not needed; see the module docstring."""
    M, N, K, rank = _check(x, packed, absmax, nested_absmax, offset, blocksize, lora_A, lora_B, None)
    if tuple(grad_y.shape) != (M, N) or grad_y.dtype != x.dtype:
        raise ValueError(f"grad_y must be {x.dtype} [{M}, {N}], got {grad_y.dtype} {tuple(grad_y.shape)}")
    if tuple(s.shape) != (M, rank) or s.dtype != torch.float32:
        raise ValueError(f"s must be float32 [{M}, {rank}], got {s.dtype} {tuple(s.shape)}")
    check_launchable(grad_y, x, s, packed, absmax, nested_absmax, offset, lora_A, lora_B, seed)
    device = x.device
    dtype = x.dtype
    def buffer(needed: bool, out: Optional[torch.Tensor], shape) -> Optional[torch.Tensor]:
        if not needed:
            return None
        return out if out is not None else torch.empty(shape, dtype=dtype, device=device)

    grad_x = buffer(need_x, out_x, (M, K))
    grad_A = buffer(need_A, out_A, (rank, K))
    grad_B = buffer(need_B, out_B, (N, rank))
    grad_bias = buffer(need_bias, out_bias, (N,))
    if M == 0:
        for g in (grad_A, grad_B, grad_bias):
            if g is not None:
                g.zero_()
        return grad_x, grad_A, grad_B, grad_bias
    dot_fp32 = _dot_fp32(dtype)
    dropout_args = _dropout_args(dropout, seed, x)
    has_dropout, seed_arg, threshold, inv_keep = dropout_args

    if need_x or need_A:
        no_dropout = _dropout_args(0.0, None, x)
        ds_parts = _launch_rows(grad_y, (lora_B, lora_B.stride(1), lora_B.stride(0)), rank, no_dropout, dot_fp32)
        splits = ds_parts.shape[0]
        ds = ds_parts[0] if splits == 1 else torch.empty((M, rank), dtype=torch.float32, device=device)
    if need_x:
        nf4, double_quant = _nf4_args(packed, absmax, nested_absmax, offset, nested_code, device)
        aligned_rows = K % blocksize == 0
        gemm = _gemm_launch("dx", M, K, N, aligned_rows, device, config)
        parts = gemm.parts(M, K, device, ds_parts)
        dense = lambda: _dense.dense_dx(  # noqa: E731
            grad_y, nf4, double_quant, blocksize, ds_parts, lora_A, float(scale), dropout_args, grad_x, ds,
            splits > 1, dot_fp32,
        )
        launch = _gemm_or_dense(gemm.kernel[gemm.grid], ("dx", M, N, K, rank, dtype, blocksize, double_quant,
                                                         False, has_dropout), dense, config is not None, device)
        launch(
            grad_y, *nf4, ds_parts, lora_A, seed_arg, grad_x, ds, parts,
            M, N, K, rank, splits, float(scale), threshold, inv_keep,
            grad_y.stride(0), grad_y.stride(1), ds_parts.stride(0), lora_A.stride(0), lora_A.stride(1),
            grad_x.stride(0), grad_x.stride(1),
            _m_bucket(M),
            BLOCK_R=min(block_r(rank), _GEMM_MAX_BLOCK_R),
            BLOCKSIZE=blocksize, ALIGNED_ROWS=aligned_rows, HAS_DOUBLE_QUANT=double_quant, NESTED=_NESTED,
            HAS_DROPOUT=has_dropout, WRITE_LORA=splits > 1, DOT_FP32=dot_fp32, DECODE=decode_mode(dtype, device),
            **gemm.extra, **compile_options(enable_fp_fusion=False),
        )
        gemm.finish(parts, grad_x)
    elif need_A and splits > 1:
        ds = ds_parts.sum(0)
    if need_A:
        _launch_cols(ds, x, grad_A, False, None, float(scale), dropout_args, dot_fp32)
    if need_B:
        colsum = grad_bias if need_bias else None
        _launch_cols(s, grad_y, grad_B, True, colsum, float(scale),
                     _dropout_args(0.0, None, x), dot_fp32)
    elif need_bias:
        grad_bias.copy_(grad_y.sum(0, dtype=torch.float32))
    return grad_x, grad_A, grad_B, grad_bias


def _launch_cols(
    g: torch.Tensor, x: torch.Tensor, out: torch.Tensor, out_is_c_by_r: bool,
    colsum: Optional[torch.Tensor], g_scale: float, dropout_args, dot_fp32: bool,
) -> None:
    """out = (g_scale · g)ᵀ · dropout?(x): [r, C], or its transpose [C, r] with ``out_is_c_by_r``; ``colsum`` [C] =
    Σ_m x when given. Several splits write float32 partial sums, added here in a fixed order."""
    M, C = x.shape
    rank = g.shape[1]
    plan = cols_plan(M, C, rank, x.device)
    has_dropout, seed, threshold, inv_keep = dropout_args
    if plan.splits == 1:
        parts, parts_colsum = out, colsum
    else:
        parts = torch.empty((plan.splits, *out.shape), dtype=torch.float32, device=x.device)
        parts_colsum = None
        if colsum is not None:
            parts_colsum = torch.empty((plan.splits, C), dtype=torch.float32, device=x.device)
    stride_split = parts.stride(0) if plan.splits > 1 else 0
    stride_r, stride_c = parts.stride(-2), parts.stride(-1)
    if out_is_c_by_r:
        stride_r, stride_c = stride_c, stride_r
    _lora_cols_kernel[(triton.cdiv(C, plan.block_c), plan.splits)](
        g, x, parts, parts_colsum if parts_colsum is not None else parts, seed,
        M, C, rank, plan.chunk, g_scale, threshold, inv_keep,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), stride_split, stride_r, stride_c,
        parts_colsum.stride(0) if plan.splits > 1 and parts_colsum is not None else 0,
        BLOCK_M=plan.block_m, BLOCK_C=plan.block_c, BLOCK_R=plan.block_r,
        HAS_DROPOUT=has_dropout, HAS_COLSUM=colsum is not None, DOT_FP32=dot_fp32,
        **compile_options(num_warps=plan.num_warps, enable_fp_fusion=False),
    )
    if plan.splits > 1:
        out.copy_(parts.sum(0))
        if colsum is not None:
            colsum.copy_(parts_colsum.sum(0))
