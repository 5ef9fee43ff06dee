"""Measure how long each Triton kernel configuration the GPU check needs takes to compile for sm_90, here, without a
GPU; the GPU check's time estimate (bench/gpu_budget.py) is built from these numbers.

    python -m bench.compile_times [--out bench/sm90_compile_times.json] [--all]

Uses the compile check's public entry points (``compile_check.cases()`` and ``compile_case()``) on the bf16,
double-quantized, block-aligned variant of every GEMM candidate (``--all``: every variant) and on the thin LoRA
kernels, plus any other kernel family the compile check lists (NF4 quantize / dequantize once it covers them).
Times are CPU seconds of this process and its children (ptxas), so a machine shared with other jobs measures the
same work; the H200 host compiles single-threaded too, one kernel after another, as Triton's autotuner does.
Must run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_compile_times.json")
MAIN_VARIANT = "bf16,dq,aligned"


def case_key(family: str, constexprs: dict, options: dict) -> str:
    """A configuration's name, independent of the compile check's formatting: family + tile sizes + warps/stages."""
    tiles = ",".join(f"{k}={constexprs[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "BLOCK_R",
                                                      "SWAP_AB") if k in constexprs)
    return f"{family}[{tiles}]w{options.get('num_warps')}s{options.get('num_stages')}"


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(select_all: bool = False) -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")
    # A fresh, empty Triton cache: a configuration compiled before (by the compile check, say) would otherwise be
    # read from ~/.triton/cache in a fraction of its compile time, and the GPU check's estimate would be too low.
    import tempfile

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="qk-compile-times-")
    import triton

    from qlora_kernels.triton_kernels import compile_check

    entries = {}
    for case in compile_check.cases(False):
        gemm = case.family.startswith(("fwd_", "bwd_"))
        if gemm and not select_all and case.variant != MAIN_VARIANT:
            continue
        if case.family in ("rows", "cols") and not select_all and not case.variant.startswith("r=16,"):
            continue
        key = case_key(case.family, case.constexprs, case.options)
        if key in entries:
            continue
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        result = compile_check.compile_case(case)
        entries[key] = {
            "family": case.family, "variant": case.variant, "ok": bool(result.get("ok")),
            "cpu_s": round(_cpu_seconds() - cpu0, 2), "wall_s": round(time.perf_counter() - wall0, 2),
            "spill_insts": result.get("spill_insts"),
        }
        print(f"{key:<80} {entries[key]['cpu_s']:6.2f} s cpu {entries[key]['wall_s']:6.2f} s wall"
              + ("" if entries[key]["ok"] else "  FAILED"), flush=True)
    return {
        "what": "CPU seconds (self + ptxas) to compile each configuration for sm_90 with triton.compile, measured "
                "without a GPU",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "triton": triton.__version__, "python": platform.python_version(), "machine": platform.processor() or
        platform.machine(), "load_average": [round(x, 2) for x in os.getloadavg()],
        "entries": entries,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--all", action="store_true", help="every variant, not only the bf16 block-aligned one")
    args = parser.parse_args(argv)
    data = measure(args.all)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {args.out}: {len(data['entries'])} configurations, "
          f"{sum(e['cpu_s'] for e in data['entries'].values()):.0f} CPU s in all")
    return 0 if all(e["ok"] for e in data["entries"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
