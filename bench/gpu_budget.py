"""The GPU check's time budget, checked on a CPU before any device time is spent (``bash bench/gpu_check.sh
--dry-run``): the stages of bench/gpu_check.sh with their time limits (read from the script itself), the Triton
kernels each stage compiles, and an estimate of each stage's time.

    python -m bench.gpu_budget [--json FILE] [--times bench/sm90_compile_times.json]

The estimate is a model, not a measurement: per stage, a fixed start-up cost (Python, torch, CUDA context), plus
the sm_90 compile time of each kernel configuration that is new to Triton's cache in that stage (CPU seconds measured
here by ``python -m bench.compile_times``; the H200 host's CPU is assumed no faster), plus autotuning (each tuning key
× candidate: one Triton ``do_bench`` of about 0.2 s), plus the benchmark cases' own estimates. Stages after the
goal-point benchmark are time-boxed (they get what remains and stop), so only their limits count.

Which kernels compile: a GEMM configuration per autotuning candidate in use (the first with
QLORA_KERNELS_AUTOTUNE=0, as the smoke stage runs; the first ``autotune_limit`` in the gpu-check plan), once more
for M = 1 (Triton specialises an integer argument equal to 1); the thin LoRA passes per operand (A or B, whose
strides differ), row-tile class and M = 1; split-K's partial-sum kernel at decode-sized M; the NF4 quantize (two
kernels) and dequantize kernels.
Must run with TRITON_INTERPRET unset (the interpreter replaces the candidate tables with one configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "gpu_check.sh")
TIMES = os.path.join(HERE, "sm90_compile_times.json")

STARTUP_S = 12.0  # python + torch + transformers imports + CUDA context, per process (assumed)
AUTOTUNE_BENCH_S = 0.2  # one candidate at one tuning key: do_bench's 25 ms warm-up + 100 ms of runs + launches
DEFAULT_COMPILE_S = 4.0  # a configuration the timings file lacks, when its family has no measured entry either
BUILD_EST_S = 75.0  # pip install of the wheels + nvcc of the extension for sm_90 with ninja, 16 jobs (assumed)
ENV_EST_S = 5.0


@dataclass
class Compile:
    kernel: str  # GEMM family (fwd_large_m, ...), rows, cols, nf4
    config: str
    seconds: float
    measured: bool


@dataclass
class Stage:
    name: str
    limit_s: int
    estimate_s: float
    time_boxed: bool
    compiles: list = field(default_factory=list)
    autotune_benchmarks: int = 0
    cases: int = 0
    detail: str = ""


def script_limits(path: str = SCRIPT) -> dict:
    """The ``T_<STAGE>=<seconds>`` and ``TOTAL=<seconds>`` lines of bench/gpu_check.sh."""
    limits = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^(T_[A-Z_]+|TOTAL)=(\d+)\b", line.strip())
            if m:
                limits[m.group(1)] = int(m.group(2))
    return limits


def load_times(path: str = TIMES) -> dict:
    if not os.path.exists(path):
        return {"entries": {}}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _Timer:
    """Compile seconds of a configuration from the measured file; unmeasured ones take their family's median."""

    def __init__(self, times: dict) -> None:
        self.entries = times.get("entries", {})
        by_family: dict = {}
        for entry in self.entries.values():
            by_family.setdefault(entry["family"], []).append(entry["cpu_s"])
        self.family_median = {f: statistics.median(v) for f, v in by_family.items()}
        all_values = [e["cpu_s"] for e in self.entries.values()]
        self.overall = statistics.median(all_values) if all_values else DEFAULT_COMPILE_S

    def get(self, family: str, key: Optional[str]) -> tuple[float, bool]:
        if key is not None and key in self.entries:
            return self.entries[key]["cpu_s"], True
        return self.family_median.get(family, self.overall), False


def _gemm_key(family: str, config) -> str:
    from bench.compile_times import case_key

    constexprs = dict(config.kwargs)
    constexprs.setdefault("BLOCK_R", 16)
    return case_key(family, {k: constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "SWAP_AB")},
                    {"num_warps": config.num_warps, "num_stages": config.num_stages})


def _thin_key(family: str, plan, rank: int = 16) -> str:
    from bench.compile_times import case_key

    return case_key(family, {"BLOCK_M": plan.block_m, "BLOCK_C": plan.block_c, "BLOCK_R": plan.block_r},
                    {"num_warps": 4, "num_stages": 3})


def linear_compiles(points: list, candidates: Optional[int], timer: _Timer) -> dict:
    """{identity: Compile} of the fused linear at ``points`` = [(M, N, K, ops)] with the first ``candidates``
    autotuning candidates (None: all), and the count of autotune benchmarks."""
    import torch

    from qlora_kernels.triton_kernels import lora_linear_gemm as gemm
    from qlora_kernels.triton_kernels import lora_linear_thin as thin

    found: dict = {}
    tuning_keys: set = set()
    cpu = torch.device("cpu")

    def add(identity, kernel, config_key):
        if identity not in found:
            seconds, measured = timer.get(kernel, config_key)
            found[identity] = Compile(kernel, identity, seconds, measured)

    for m, n, k, ops in points:
        kinds = ["fwd"] + (["dx"] if any(op in ("bwd", "fwd_bwd") for op in ops) else [])
        small = m <= gemm.SMALL_M
        for kind in kinds:
            family = f"{'fwd' if kind == 'fwd' else 'bwd_dx'}_{'small' if small else 'large'}_m"
            configs = gemm.gemm_configs(kind, small, True, every_candidate=True)
            configs = configs if candidates is None else configs[:candidates]
            bucket = min(1 << max(0, (max(m, 1) - 1).bit_length()), 8192)
            if candidates is None or candidates > 1:
                tuning_keys.update((kind, bucket, n, k, i) for i in range(len(configs)))
            for config in configs:
                key = _gemm_key(family, config)
                add((key, m == 1), family, key)
            if small:  # split-K's partial sums (lora_linear_gemm._split_sum_kernel), per output dtype (bf16)
                add(("split_sum[bf16]", m == 1), "split_sum", "split_sum[]w4s3")
        if not small and (candidates is None or candidates > 1):
            # With autotuning on, the first large-M call of a shape also times the dense route (route.py): the
            # LoRA-term kernel per direction, the dequantize kernel, and one more benchmark per direction.
            for kind in kinds:
                add((f"lora_term[{kind}]", False), "lora_term", "lora_term[BLOCK_M=64,BLOCK_C=128,BLOCK_R=16]w8s1")
                tuning_keys.add((kind, "dense", min(1 << max(0, (m - 1).bit_length()), 8192), n, k))
            add(("dequantize_nf4->bfloat16 (dense route)", False), "nf4_dequantize", None)
        rows = thin.rows_plan(m, k, 16, cpu)
        add((_thin_key("rows", rows) + "[A]", m == 1), "rows", _thin_key("rows", rows))
        if "dx" in kinds:
            rows_b = thin.rows_plan(m, n, 16, cpu)
            add((_thin_key("rows", rows_b) + "[B]", m == 1), "rows", _thin_key("rows", rows_b))
            cols = thin.cols_plan(m, k, 16, cpu)
            for colsum in (False, True):
                add((_thin_key("cols", cols) + f"[colsum={colsum}]", m == 1), "cols", _thin_key("cols", cols))
    if points:  # the register decode's first-use check (decode_check.py): four small kernels, once per process
        for mode in ("asm", "twin"):
            add((f"decode_check[{mode}]", False), "decode_check", "decode_check[]w4s1")
            add((f"decode_check[mma tile,{mode}]", False), "decode_check", "decode_check[]w1s1")
    return {"compiles": found, "autotune_benchmarks": len(tuning_keys)}


def nf4_compiles(timer: _Timer, out_dtypes=("bfloat16", "float32")) -> dict:
    """NF4 quantize (codes + absmax, then the 8-bit absmax) and dequantize (per output dtype), timed by the compile
    check's nf4_* families (the median of every measured configuration where it has none)."""
    kernels = [("quantize_nf4", "nf4_quantize"), ("quantize_absmax_8bit", "nf4_absmax_8bit")]
    kernels += [(f"dequantize_nf4->{d}", "nf4_dequantize") for d in out_dtypes]
    found = {}
    for name, family in kernels:
        seconds, measured = timer.get(family, None)
        found[(name, False)] = Compile(family, (name, False), seconds, family in timer.family_median)
    return found


def _train_points(plan: str) -> list:
    """Fused-linear shapes of the train step (the 7 linears of each Llama layer) at its tokens per step."""
    import torch

    from bench.suites import train

    args = train._settings(torch.device("cuda"), plan)
    tokens, h = args.batch_size * args.seq_len, args.hidden
    return [(tokens, n, k, ("fwd_bwd",)) for n, k in {(h, h), (2 * h, h), (h, 2 * h)}]


def _plan_cases(plan: str) -> list:
    import torch

    from bench.suites import SUITES

    cases = []
    for suite in SUITES.values():
        cases += suite.cases(torch.device("cuda"), plan)
    return cases


def estimate(times_path: str = TIMES, script: str = SCRIPT) -> dict:
    """Every stage of bench/gpu_check.sh with its limit, compiles and estimated seconds."""
    from bench import plans

    limits = script_limits(script)
    timer = _Timer(load_times(times_path))
    seen: set = set()

    def new_only(compiles: dict) -> list:
        fresh = [c for ident, c in compiles.items() if ident not in seen]
        seen.update(compiles)
        return fresh

    stages = [Stage("env", limits["T_ENV"], ENV_EST_S, False, detail="nvidia-smi, versions, git commit"),
              Stage("build", limits["T_BUILD"], BUILD_EST_S, False,
                    detail="pip install .whl/*.whl (--no-index --no-deps); ninja checked; "
                           "TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 pip install -e . (assumed, nvcc cannot run here)")]

    # Smoke: first candidates only; fwd + bwd at M = 1, 16, 4096 on both shapes; NF4; two optimizer steps. Its groups
    # (one per M, one for NF4 + optimizers) run as parallel processes: the stage takes as long as its slowest group.
    shapes = [(4096, 4096), (14336, 4096)]
    groups = [{**linear_compiles([(m, n, k, ("fwd_bwd",)) for n, k in shapes], 1, timer)["compiles"],
               **nf4_compiles(timer, ("float32",))} for m in (1, 16, 4096)]  # each group quantizes its weights
    groups.append(nf4_compiles(timer))
    slowest = max(sum(c.seconds for c in group.values()) for group in groups)
    compiles = new_only({ident: c for group in groups for ident, c in group.items()})
    smoke_run_s = 10.0  # the checks themselves once compiled (float32 references at 14336×4096), slowest group
    stages.append(Stage("smoke", limits["T_SMOKE"], STARTUP_S + slowest + smoke_run_s, False, compiles, 0, 9,
                        f"bench.gpu_smoke: 6 fused-linear checks, NF4 vs bitsandbytes, 2 optimizer steps "
                        f"(QLORA_KERNELS_AUTOTUNE=0), {len(groups)} groups in parallel processes: slowest group "
                        f"compiles for {slowest:.0f} s"))

    # The goal points: linear cases, plus the train step's shapes (same kernels, new tuning keys).
    plan = plans.get("gpu-check")
    cases = _plan_cases("gpu-check")
    points = sorted({(c.M, c.N, c.K, (c.op,)) for c in cases if c.op in ("fwd", "fwd_bwd")})
    linear = linear_compiles(points + _train_points("gpu-check"), plan.autotune_limit, timer)
    compiles = new_only(linear["compiles"])
    run_s = sum(c.est_s for c in cases)
    stages.append(Stage("gpu-check plan", limits["T_PLAN"], STARTUP_S + sum(c.seconds for c in compiles)
                        + AUTOTUNE_BENCH_S * linear["autotune_benchmarks"] + run_s, False, compiles,
                        linear["autotune_benchmarks"], len(cases),
                        f"python -m bench --plan gpu-check (autotune: first {plan.autotune_limit} candidates)"))

    used = sum(s.limit_s for s in stages)
    rest = limits["TOTAL"] - used
    stages.append(Stage("gpu tests", min(limits["T_TESTS"], rest), min(limits["T_TESTS"], rest), True,
                        detail="pytest -m gpu (time-boxed: what remains, at most T_TESTS)"))
    full_cases = _plan_cases("full")
    full_points = sorted({(c.M, c.N, c.K, (c.op,)) for c in full_cases if c.op in ("fwd", "bwd", "fwd_bwd")})
    full = linear_compiles(full_points, None, timer)
    compiles = new_only(full["compiles"])
    full_need = (STARTUP_S + sum(c.seconds for c in compiles) + AUTOTUNE_BENCH_S * full["autotune_benchmarks"]
                 + sum(c.est_s for c in full_cases))
    full_limit = max(0, rest - stages[-1].limit_s)
    stages.append(Stage("full plan", full_limit, full_limit, True, compiles, full["autotune_benchmarks"],
                        len(full_cases), f"python -m bench --plan full --budget (the rest; it would need ~"
                        f"{full_need:.0f} s to finish, so it stops early and records the cases it skipped)"))
    total_est = sum(s.estimate_s for s in stages)
    return {
        "budget_s": limits["TOTAL"],
        "limits_sum_s": sum(s.limit_s for s in stages),
        "estimate_s": total_est,
        "priority_estimate_s": sum(s.estimate_s for s in stages if not s.time_boxed),
        "within_limits": all(s.estimate_s <= s.limit_s for s in stages),
        "compile_times": {k: v for k, v in load_times(times_path).items() if k != "entries"},
        "stages": [asdict(s) for s in stages],
    }


def render(result: dict) -> str:
    lines = [f"GPU check, dry run: budget {result['budget_s']} s for the whole script (stage limits sum to "
             f"{result['limits_sum_s']} s). Estimates are a model (bench/gpu_budget.py), not measurements; compile "
             f"times measured here: {result['compile_times'].get('date', 'none')} "
             f"(triton {result['compile_times'].get('triton', '?')})."]
    for s in result["stages"]:
        flag = "time-boxed" if s["time_boxed"] else ("ok" if s["estimate_s"] <= s["limit_s"] else "OVER")
        lines.append(f"\n== {s['name']}: limit {s['limit_s']} s, estimate {s['estimate_s']:.0f} s [{flag}]"
                     + (f", {s['cases']} cases" if s["cases"] else "")
                     + (f", {s['autotune_benchmarks']} autotune benchmarks" if s["autotune_benchmarks"] else ""))
        if s["detail"]:
            lines.append(f"   {s['detail']}")
        if s["compiles"]:
            total = sum(c["seconds"] for c in s["compiles"])
            lines.append(f"   compiles {len(s['compiles'])} kernel configurations new to the cache ({total:.0f} s):")
            for c in s["compiles"]:
                ident = c["config"]
                name = f"{ident[0]}{' (M=1)' if ident[1] else ''}" if isinstance(ident, (list, tuple)) else ident
                lines.append(f"     {c['seconds']:5.1f} s{'' if c['measured'] else '*'}  {name}")
    lines.append(f"\nPriority stages (env, build, smoke, gpu-check plan): estimated {result['priority_estimate_s']:.0f}"
                 f" s; the rest is time-boxed. * = not measured here: its family's median compile time.")
    lines.append("Every stage within its limit." if result["within_limits"] else "A STAGE IS OVER ITS LIMIT.")
    return "\n".join(lines)


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("gpu_budget: unset TRITON_INTERPRET (the interpreter hides the autotuning candidates)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="also write the estimate here")
    parser.add_argument("--times", default=TIMES, help="compile timings (python -m bench.compile_times)")
    args = parser.parse_args(argv)
    result = estimate(args.times)
    print(render(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
    ok = result["within_limits"] and result["limits_sum_s"] <= result["budget_s"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
