"""Compile every Triton kernel configuration of the package for Hopper (sm_90) without a GPU, and look at the result.

    python -m qlora_kernels.triton_kernels.compile_check [--quick] [--json FILE] [--filter TEXT]

Every ``@triton.jit`` kernel of ``triton_kernels/`` is covered (the fused linear's GEMMs and thin passes, NF4
quantize, double quantization and dequantize); a kernel without a case is reported as a problem. For each kernel ×
configuration × feature variant: ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` from the
kernel's AST with the argument specialisation a real launch would get (16-byte-aligned pointers, strides that are
multiples of 16, unit strides as constants), then the PTX (``wgmma`` = Hopper's asynchronous tensor-core MMA, or
the older ``mma.sync``) and the SASS of the cubin (Triton ships ``cuobjdump``/``nvdisasm``): registers, local-memory
spills (``LDL``/``STL``), the global loads and copies (128-bit ones, cp.async), shared memory, whether the packed
NF4 bytes arrive in 16-byte copies ("nf4B") and whether a wgmma stays in flight while the next tile is decoded
("ovl"), and the main loop's instruction counts that ``sass_model`` turns into modelled H200 bounds. Exit status 1
when a kernel has no case, or a configuration fails to compile, spills registers (float32 inputs aside), overflows
shared memory, or is a large-M GEMM configuration without ``wgmma``.

Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces the kernels' compiled form); DESIGN.md, "Looking
at GPU code without a GPU".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter replaces the kernels that this compiles)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from . import decode_check  # noqa: E402
from . import lora_linear_dense as dense  # noqa: E402
from . import lora_linear_gemm as gemm  # noqa: E402
from . import lora_linear_thin as thin  # noqa: E402
from . import nf4  # noqa: E402
from . import sass_model  # noqa: E402
from .lora_linear import decode_mode  # noqa: E402
from .lora_linear_tiles import DECODE_REGISTERS_ASM, DECODE_REGISTERS_TWIN  # noqa: E402

try:  # the specialisation rule a launch applies to each argument (Triton ≥ 3.3)
    from triton._C.libtriton import native_specialize_impl as _specialize_impl
except ImportError:  # pragma: no cover - older Triton
    _specialize_impl = None

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_MAX_SHARED = 232448  # bytes of shared memory one block may opt in to on sm_90 (227 KB)
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclasses.dataclass
class Case:
    """One compilation: a kernel, sample arguments standing for a realistic launch, constexprs and options."""

    family: str  # fwd_large_m | fwd_small_m | bwd_dx_large_m | bwd_dx_small_m | rows | cols | nf4_*
    variant: str
    kernel: Any
    args: dict[str, Any]
    constexprs: dict[str, Any]
    options: dict[str, Any]
    needs_wgmma: bool

    @property
    def name(self) -> str:
        cfg = ",".join(
            f"{k}={v}" for k, v in self.constexprs.items() if k.startswith(("BLOCK", "BYTES")) or k == "SWAP_AB"
        )
        return f"{self.family}[{self.variant}] {cfg} w{self.options['num_warps']}s{self.options['num_stages']}"


def _tensor(dtype: torch.dtype) -> torch.Tensor:
    # Only the dtype and the address's alignment matter to the specialisation; torch allocations are 64-byte aligned.
    return torch.empty(16, dtype=dtype)


_TYPE_NAMES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32",
    torch.int8: "i8", torch.uint8: "u8",
}


def _specialize(value: Any) -> tuple[str, str]:
    """(type, attribute) of one launch argument, as Triton's launcher specialises it: 16-byte-aligned pointers and
    integers divisible by 16 get "D" (divisibility 16); an integer equal to 1 becomes a constant."""
    if _specialize_impl is not None:
        return _specialize_impl(BaseBackend, value, False, True, True)
    if isinstance(value, torch.Tensor):  # pragma: no cover - Triton without the native specialiser
        return "*" + _TYPE_NAMES[value.dtype], "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool):  # pragma: no cover
        return "u1", ""
    if isinstance(value, int):  # pragma: no cover
        if value == 1:
            return "constexpr", ""
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), "D" if value % 16 == 0 else ""
    return "fp32", ""  # pragma: no cover


def _signature(kernel, args: dict[str, Any], constexprs: dict[str, Any]) -> tuple[dict, dict]:
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind, attr = _specialize(args[name])
        signature[name] = kind  # "constexpr" for an integer equal to 1, compiled as the constant 1
        if attr and kind != "constexpr":
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return signature, attrs


def _gemm_args(
    kind: str, M: int, N: int, K: int, rank: int, dtype: torch.dtype, double_quant: bool, bias: bool, dropout: bool
) -> dict[str, Any]:
    t = _tensor
    common = {
        "packed_ptr": t(torch.uint8), "absmax_ptr": t(torch.uint8 if double_quant else torch.float32),
        "nested_absmax_ptr": t(torch.float32), "offset_ptr": t(torch.float32), "code_ptr": t(torch.float32),
"nested_code_ptr": t(torch.float32), "part_ptr": t(torch.float32),
        "M": M, "N": N, "K": K, "rank": rank, "scale": 2.0, "m_bucket": min(triton.next_power_of_2(M), 8192),
    }
    if kind == "fwd":
        return {
            **common, "x_ptr": t(dtype), "s_parts_ptr": t(torch.float32), "lora_b_ptr": t(dtype),
            "bias_ptr": t(dtype if bias else torch.float32), "y_ptr": t(dtype), "s_ptr": t(torch.float32),
            "s_splits": 2, "stride_xm": K, "stride_xk": 1, "stride_s_split": M * rank, "stride_bn": rank,
            "stride_br": 1, "stride_ym": N, "stride_yn": 1,
        }
    return {
        **common, "dy_ptr": t(dtype), "ds_parts_ptr": t(torch.float32), "lora_a_ptr": t(dtype),
        "seed_ptr": t(torch.int64), "dx_ptr": t(dtype), "ds_ptr": t(torch.float32), "ds_splits": 2,
        "threshold": 1677722 if dropout else 0, "inv_keep": 1.0 / 0.9 if dropout else 1.0,
        "stride_dym": N, "stride_dyn": 1, "stride_ds_split": M * rank, "stride_ar": K, "stride_ak": 1,
        "stride_dxm": K, "stride_dxk": 1,
    }


def _gemm_cases(quick: bool) -> list[Case]:
    cases = []
    # Llama-style training / decode shapes: x [M, 4096] through a 14336×4096 weight, r = 16, blocksize 64.
    M_LARGE, M_SMALL, N, K, RANK = 4096, 16, 14336, 4096, 16
    variants = [  # (name, dtype, double_quant, bias / dropout, blocksize, K)
        ("bf16,dq,aligned", torch.bfloat16, True, True, 64, K),
        ("fp16,aligned", torch.float16, False, False, 64, K),
        ("bf16,dq,unaligned", torch.bfloat16, True, True, 64, K + 32),
        ("fp32,dq,aligned", torch.float32, True, False, 64, K),  # float32 runs exact products: no tensor cores
    ]
    families = [
        ("fwd_large_m", gemm._nf4_lora_fwd_kernel, "fwd", M_LARGE, True),
        ("fwd_small_m", gemm._nf4_lora_fwd_kernel, "fwd", M_SMALL, False),
        ("bwd_dx_large_m", gemm._nf4_lora_bwd_dx_kernel, "dx", M_LARGE, True),
        ("bwd_dx_small_m", gemm._nf4_lora_bwd_dx_kernel, "dx", M_SMALL, False),
    ]
    for family, kernel, kind, M, needs_wgmma in families:
        for vi, (variant, dtype, dq, flag, blocksize, k) in enumerate(variants):
            # Every candidate of the main variant and of the per-element decode path (its own candidates); the
            # dtype variants once (they change the decode, not the tiling).
            chosen = gemm.gemm_configs(kind, M <= gemm.SMALL_M, k % blocksize == 0, every_candidate=True)
            chosen = chosen if vi in (0, 2) else chosen[:1]
            if quick:
                chosen = [chosen[0], next(c for c in chosen if c.kwargs["SWAP_AB"])] if vi == 0 else []
            for config in chosen:
                constexprs = {
                    **config.kwargs, "BLOCK_R": 16, "BLOCKSIZE": blocksize, "ALIGNED_ROWS": k % blocksize == 0,
                    "HAS_DOUBLE_QUANT": dq, "NESTED": 256, "WRITE_LORA": True, "DOT_FP32": dtype == torch.float32,
                    "DECODE": decode_mode(dtype),
                    **({"HAS_BIAS": flag, "PACKED_ALIGNED": True} if kind == "fwd" else {"HAS_DROPOUT": flag}),
                }
                args = _gemm_args(kind, M, N, k, RANK, dtype, dq, flag, flag)
                options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": False}
                cases.append(Case(family, variant, kernel, args, constexprs, options, needs_wgmma))
    return cases


def _thin_cases(quick: bool) -> list[Case]:
    cases = []
    M, C = 4096, 4096
    ranks = [16] if quick else [16, 64, 256]
    for rank in ranks:
        for dropout in (True, False):
            plan = thin.rows_plan(M, C, rank, torch.device("cpu"))
            t = _tensor
            cases.append(Case(
                "rows", f"r={rank},{'dropout' if dropout else 'plain'}", thin._lora_rows_kernel,
                {"x_ptr": t(torch.bfloat16), "w_ptr": t(torch.bfloat16), "parts_ptr": t(torch.float32),
                 "seed_ptr": t(torch.int64), "M": M, "C": C, "rank": rank, "chunk": 1024, "threshold": 1677722,
                 "inv_keep": 1.1, "stride_xm": C, "stride_xc": 1, "stride_wr": C, "stride_wc": 1,
                 "stride_part": M * rank, "stride_part_m": rank},
                {"BLOCK_M": plan.block_m, "BLOCK_C": plan.block_c, "BLOCK_R": plan.block_r, "HAS_DROPOUT": dropout,
                 "DOT_FP32": False},
                {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": False}, False,
            ))
            plan = thin.cols_plan(M, C, rank, torch.device("cpu"))
            cases.append(Case(
                "cols", f"r={rank},{'dropout' if dropout else 'colsum'}", thin._lora_cols_kernel,
                {"g_ptr": t(torch.float32), "x_ptr": t(torch.bfloat16), "out_ptr": t(torch.float32),
                 "colsum_ptr": t(torch.float32), "seed_ptr": t(torch.int64), "M": M, "C": C, "rank": rank,
                 "chunk": 1024, "g_scale": 2.0, "threshold": 1677722, "inv_keep": 1.1, "stride_gm": rank,
                 "stride_gr": 1, "stride_xm": C, "stride_xc": 1, "stride_out_split": rank * C, "stride_out_r": C,
                 "stride_out_c": 1, "stride_colsum_split": C},
                {"BLOCK_M": plan.block_m, "BLOCK_C": plan.block_c, "BLOCK_R": plan.block_r, "HAS_DROPOUT": dropout,
                 "HAS_COLSUM": not dropout, "DOT_FP32": False},
                {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": False}, False,
            ))
    return cases


def _nf4_cases(quick: bool) -> list[Case]:
    """The NF4 quantize, double-quantization and dequantize kernels, with the launchers' GPU configurations."""
    t = _tensor
    numel = 14336 * 4096
    cases = []
    blocksizes = [64] if quick else [64, 32, 256]
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    for blocksize in blocksizes:
        for dtype in dtypes if blocksize == 64 else [torch.bfloat16]:
            name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
            cases.append(Case(
                "nf4_quantize", f"{name},bs={blocksize}", nf4._quantize_nf4_kernel,
                {"w_ptr": t(dtype), "packed_ptr": t(torch.uint8), "absmax_ptr": t(torch.float32),
                 "midpoints_ptr": t(torch.float32), "numel": numel},
                {"BLOCKSIZE": blocksize, "BLOCKS_PER_PROGRAM": nf4._quantize_config(blocksize)},
                {"num_warps": 4, "num_stages": 3}, False,
            ))
            for double_quant in (True, False):
                cases.append(Case(
                    "nf4_dequantize", f"{name},bs={blocksize},{'dq' if double_quant else 'plain'}",
                    nf4._dequantize_nf4_kernel,
                    {"packed_ptr": t(torch.uint8), "absmax_ptr": t(torch.uint8 if double_quant else torch.float32),
                     "nested_absmax_ptr": t(torch.float32), "offset_ptr": t(torch.float32),
                     "code_ptr": t(torch.float32), "nested_code_ptr": t(torch.float32), "out_ptr": t(dtype),
                     "numel": numel},
                    {"BLOCKSIZE": blocksize, "BYTES_PER_PROGRAM": nf4._dequantize_config(),
                     "HAS_DOUBLE_QUANT": double_quant, "NESTED": nf4._NESTED},
                    {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": False}, False,
                ))
    cases.append(Case(
        "nf4_absmax_8bit", "fp32", nf4._quantize_absmax_8bit_kernel,
        {"absmax_ptr": t(torch.float32), "offset_ptr": t(torch.float32), "midpoints_ptr": t(torch.float32),
         "codes_ptr": t(torch.uint8), "nested_absmax_ptr": t(torch.float32), "nblocks": numel // 64},
        {"NESTED": nf4._NESTED}, {"num_warps": 4, "num_stages": 3}, False,
    ))
    return cases


def cases(quick: bool = False) -> list[Case]:
    """Every compilation the check performs (``quick``: one plain and one swapped configuration per GEMM family,
    one variant of the others)."""
    dense_cases = [Case(*c, needs_wgmma=False) for c in dense.compile_cases(quick)]
    return (_gemm_cases(quick) + _thin_cases(quick) + _nf4_cases(quick) + dense_cases + _decode_check_cases()
            + _split_sum_cases())


def _split_sum_cases() -> list[Case]:
    """The split-K partial sums' kernel (lora_linear_gemm): a decode-sized GEMM's splits added into Y or dX."""
    t = _tensor
    return [
        Case("split_sum", name, gemm._split_sum_kernel,
             {"part_ptr": t(torch.float32), "out_ptr": t(dtype), "M": 16, "OUT": 14336, "splits": 4,
              "stride_om": 14336, "stride_oc": 1},
             {"BLOCK": gemm.SPLIT_SUM_BLOCK}, {"num_warps": 4, "num_stages": 3}, False)
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
    ]


def _decode_check_cases() -> list[Case]:
    """The register decode's first-use check (``decode_check``), asm and twin: it runs on every GPU."""
    t = _tensor
    args = {"byte_ptr": t(torch.uint8), "absmax_ptr": t(torch.float32), "code_ptr": t(torch.float32),
            "hi_ptr": t(torch.bfloat16), "lo_ptr": t(torch.bfloat16)}
    tile_args = {"packed_ptr": t(torch.uint8), "absmax_ptr": t(torch.float32), "code_ptr": t(torch.float32),
                 "out_ptr": t(torch.bfloat16)}
    modes = (("asm", DECODE_REGISTERS_ASM), ("twin", DECODE_REGISTERS_TWIN))
    constexprs = {"ROWS": decode_check.ROWS, "COLS": decode_check.COLS}
    return [
        Case("decode_check", name, decode_check._decode_pairs_kernel, args, {**constexprs, "DECODE": mode.value},
             {"num_warps": 4, "num_stages": 1}, False)
        for name, mode in modes
    ] + [
        Case("decode_check", f"mma tile,{name}", decode_check._decode_mma_tile_kernel, tile_args,
             {**constexprs, "DECODE": mode.value}, {"num_warps": 1, "num_stages": 1}, False)
        for name, mode in modes
    ]


KERNEL_MODULES = (gemm, thin, nf4, dense, decode_check)


def package_kernels() -> dict[str, Any]:
    """Every launchable ``@triton.jit`` kernel of the package (named ``*_kernel``; the other jit functions are
    device helpers inlined into these), by qualified name. The check must compile each of them."""
    found = {}
    for module in KERNEL_MODULES:
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and attr.endswith("_kernel"):
                found[f"{module.__name__.rsplit('.', 1)[-1]}.{attr}"] = value
    return found


def uncovered_kernels(all_cases: list[Case]) -> list[str]:
    """Names of package kernels that no case compiles."""
    compiled = {id(c.kernel) for c in all_cases}
    return sorted(name for name, fn in package_kernels().items() if id(fn) not in compiled)


def _cuobjdump(flag: str, path: str) -> str:
    return subprocess.run([os.path.join(_BIN, "cuobjdump"), flag, path], capture_output=True, text=True).stdout


def _sass_stats(cubin: bytes) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass, usage = _cuobjdump("-sass", f.name), _cuobjdump("-res-usage", f.name)
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    loads = re.findall(r"\bLDG\.E(?:\.[A-Z0-9_]+)*", sass)
    widths = [int(m.group(1)) for m in (re.search(r"\.(128|64)\b", ld) for ld in loads) if m]
    return {
        "main_loop": sass_model.loop_stats(sass),
        "registers": int(regs.group(1)) if regs else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        "spill_insts": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
        "ldg_total": len(loads),
        "ldg_128": widths.count(128),
        "ldg_64": widths.count(64),
        "ldgsts": len(re.findall(r"\bLDGSTS\b", sass)),
        "ldgsts_128": len(re.findall(r"\bLDGSTS(?:\.[A-Z0-9_]+)*\.128\b", sass)),
    }


def _packed_byte_contiguity(ttgir: str) -> int | None:
    """Bytes per copy of the packed NF4 codes in the pipelined K-loop (``load_nf4_tile``'s ``byte`` loads, or the
    int32 ``word`` loads of ``load_nf4_tile_mma_order``): 16 means 16-byte cp.async copies. None when those loads
    are not pipelined copies (per-element path, or no pipelining)."""
    found = [int(m.group(2)) * (4 if m.group(3) == "i32" else 1) for m in re.finditer(
        r"%(byte|word)\w* = ttg\.async_copy_global_to_local .*?\{contiguity = (\d+) : i32\} : "
        r"tensor<[^>]*ptr<(i8|i32)>", ttgir)]
    return min(found) if found else None


def _wgmma_overlaps(ttgir: str) -> bool:
    """Whether some wgmma is left in flight while the warps go on (a wait with pendings >= 1): the tensor cores
    then overlap the next tile's NF4 decode. With the decoded tile on wgmma's shared-memory operand Triton waits at
    once (pendings = 0) - the case for SWAP_AB."""
    return any(int(p) > 0 for p in re.findall(r"warp_group_dot_wait .*?pendings = (\d+)", ttgir))


def compile_case(case: Case) -> dict[str, Any]:
    """Compile one case for sm_90; a dict with the outcome and the PTX/SASS facts."""
    start = time.time()
    result: dict[str, Any] = {
        "name": case.name, "family": case.family, "variant": case.variant, "needs_wgmma": case.needs_wgmma,
        "kernel": case.kernel.__name__,
        "constexprs": case.constexprs, "num_warps": case.options["num_warps"],
        "num_stages": case.options["num_stages"], "triton": triton.__version__,
    }
    try:
        signature, attrs = _signature(case.kernel, case.args, case.constexprs)
        constexprs = {k: v for k, v in case.args.items() if signature.get(k) == "constexpr"}
        constexprs.update(case.constexprs)
        src = ASTSource(fn=case.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=HOPPER, options=case.options)
        ptx = compiled.asm["ptx"]
        result.update(
            ok=True,
            wgmma="wgmma.mma_async" in ptx,
            mma_sync="mma.sync" in ptx,
            shared_bytes=compiled.metadata.shared,
            packed_contiguity=_packed_byte_contiguity(compiled.asm["ttgir"]),
            wgmma_overlap=_wgmma_overlaps(compiled.asm["ttgir"]),
            **_sass_stats(compiled.asm["cubin"]),
        )
    except Exception as exc:  # noqa: BLE001 - a failed compile is a result to report
        result.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
    result["seconds"] = round(time.time() - start, 1)
    return result


def _compile_nth(job: tuple[bool, int]) -> dict[str, Any]:
    # Worker entry: cases hold kernel objects, which do not pickle; rebuild the list and pick one by index.
    quick, index = job
    return compile_case(cases(quick)[index])


def _problems(results: list[dict[str, Any]], all_cases: list[Case]) -> list[str]:
    problems = [f"{name}: no case of the check compiles this kernel" for name in uncovered_kernels(all_cases)]
    problems += [f"{r['name']}: does not compile: {r['error']}" for r in results if not r["ok"]]
    problems += [
        f"{r['name']}: no wgmma in the PTX"
        for r in results if r["ok"] and r["needs_wgmma"] and not r["wgmma"] and "fp32" not in r["name"]
    ]
    problems += [  # float32 inputs take the exact CUDA-core path: a correctness path, allowed to spill
        f"{r['name']}: {r['spill_insts']} register-spill instructions (LDL/STL)"
        for r in results if r["ok"] and r["spill_insts"] and "fp32" not in r["name"]
    ]
    problems += [
        f"{r['name']}: {r['shared_bytes']} bytes of shared memory > {HOPPER_MAX_SHARED}"
        for r in results if r["ok"] and r["shared_bytes"] > HOPPER_MAX_SHARED
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one plain and one swapped configuration per GEMM")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--filter", default="", help="only cases whose name contains this text")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    todo = [(args.quick, i) for i, c in enumerate(cases(args.quick)) if args.filter in c.name]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_compile_nth, todo))
    else:
        results = [_compile_nth(job) for job in todo]
    header = (
        f"{'kernel / configuration':<86} {'mma':>6} {'ovl':>3} {'regs':>4} {'spill':>5} {'nf4B':>4} {'ldg128':>6} "
        f"{'ldg':>4} "
        f"{'cp128':>5} {'cp':>4} {'smem':>6} {'s':>5}"
    )
    print(header)
    for r in results:
        if not r["ok"]:
            print(f"{r['name']:<86} FAILED")
            continue
        mma = "wgmma" if r["wgmma"] else ("mma" if r["mma_sync"] else "fma")
        print(
            f"{r['name']:<86} {mma:>6} {'yes' if r['wgmma_overlap'] else 'no':>3} {r['registers'] or '?':>4} "
            f"{r['spill_insts']:>5} "
            f"{r['packed_contiguity'] or '-':>4} {r['ldg_128']:>6} {r['ldg_total']:>4} {r['ldgsts_128']:>5} "
            f"{r['ldgsts']:>4} {r['shared_bytes']:>6} {r['seconds']:>5}"
        )
    problems = _problems(results, cases(args.quick))
    for p in problems:
        print("PROBLEM:", p)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
