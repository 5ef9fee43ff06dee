"""Benchmark machinery: cases, the correctness gate, timing, floors, and the results files.

Method (DESIGN.md, "Benchmarks"): every case's output is checked against a reference before it is timed, and a wrong
result is reported as wrong (in ``failures``), never timed. On a GPU: CUDA events, warm-up, the median of many runs,
inputs rotated past L2, CUDA graphs for small M. On a CPU: wall-clock medians (the interpreter is not timed: CPU runs
use the torch reference path, which is what a CPU user gets).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

OPS = ("fwd", "bwd", "fwd_bwd", "dequant", "quantize", "optim_step", "train_step")
RECORD_KEYS = ("op", "impl", "M", "N", "K", "r", "dtype", "ms", "bytes", "flops", "peak_mem_mb", "case")


@dataclass
class Case:
    """One thing to time. ``make()`` builds the inputs once and returns the callable to time; ``check(output)``
    returns None when the output is right, else a message (the case is then reported wrong and not timed)."""

    op: str
    impl: str
    make: Callable[[], Callable[[], Any]]
    check: Optional[Callable[[Any], Optional[str]]] = None
    M: int = 0
    N: int = 0
    K: int = 0
    r: int = 0
    dtype: str = ""
    bytes: int = 0
    flops: int = 0
    case: str = ""
    cuda_graph: bool = False  # capture the call in a CUDA graph (small M: launch overhead dominates)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")

    @property
    def name(self) -> str:
        shape = f"M={self.M} N={self.N} K={self.K}" + (f" r={self.r}" if self.r else "")
        return f"{self.op}/{self.impl} {shape} {self.dtype} {self.case}".strip()


@dataclass
class Results:
    device: str
    versions: dict
    copy_gbps: float
    bf16_tflops: float
    records: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    commit: str = ""
    quick: bool = False

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], Any], device: torch.device, *, min_runs: int = 10, budget_s: float = 1.0,
                  cuda_graph: bool = False) -> float:
    """Median milliseconds of ``fn()`` after warm-up; runs until ``budget_s`` or 200 runs, at least ``min_runs``."""
    if device.type == "cuda":
        if cuda_graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            fn = graph.replay
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        times = []
        start_all = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start_all < budget_s and len(times) < 200):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    fn()  # warm-up
    times = []
    start_all = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start_all < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() - start_all > 4 * budget_s:
            break
    return statistics.median(times)


def rotating(inputs: list) -> Callable[[], Any]:
    """Cycle through several copies of the inputs so that a GPU call does not find its operands in L2."""
    it = itertools.cycle(inputs)
    return lambda: next(it)


def copies_past_l2(bytes_per_copy: int, device: torch.device, l2_bytes: int = 60 * 2**20) -> int:
    """How many input copies make the rotation exceed the L2 cache (H200: 50 MiB), at most 8."""
    if device.type != "cuda" or bytes_per_copy <= 0:
        return 1
    return max(1, min(8, -(-2 * l2_bytes // bytes_per_copy)))


# ------------------------------------------------------------------------------------------------ floors


def measure_copy_gbps(device: torch.device, quick: bool) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    numel = (64 if quick or device.type == "cpu" else 1024) * 2**20 // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_callable(lambda: dst.copy_(src), device, budget_s=0.5)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def measure_bf16_tflops(device: torch.device, quick: bool) -> float:
    """Dense bf16 matmul throughput in TFLOP/s (8192³ on a GPU, 512³ on a CPU)."""
    n = 512 if device.type == "cpu" else (4096 if quick else 8192)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_callable(lambda: a @ b, device, budget_s=0.5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------- running


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model} ({os.cpu_count()} threads, torch uses {torch.get_num_threads()})"


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "bitsandbytes", "peft", "transformers", "qlora_kernels"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing or broken package is recorded, not fatal
            out[name] = None
    return out


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def run_case(case: Case, device: torch.device, results: Results, budget_s: float) -> None:
    """Build, check, then time one case, appending a record or a failure."""
    base = {k: getattr(case, k) for k in RECORD_KEYS if hasattr(case, k)}
    try:
        fn = case.make()
        out = fn()
        _sync(device)
        error = case.check(out) if case.check is not None else None
    except Exception as exc:  # noqa: BLE001 - a crashing impl is reported, not fatal to the run
        error = f"{type(exc).__name__}: {exc}"
        fn = None
    if error is not None:
        results.failures.append({**base, "error": error})
        return
    del out
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    ms = time_callable(fn, device, budget_s=budget_s, cuda_graph=case.cuda_graph)
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20
    results.records.append({**base, "ms": ms, "peak_mem_mb": peak})


def run(cases: Iterable[Case], device: torch.device, quick: bool, progress: bool = True,
        checkpoint: Optional[Callable[[Results], None]] = None, checkpoint_every_s: float = 20.0) -> Results:
    """Run every case; ``checkpoint(results)`` is called every ``checkpoint_every_s`` seconds and at the end, so an
    interrupted run (a time limit on a lent GPU) still leaves its results behind."""
    cases = list(cases)
    results = Results(
        device=device_name(device),
        versions=versions(),
        copy_gbps=measure_copy_gbps(device, quick),
        bf16_tflops=measure_bf16_tflops(device, quick),
        commit=git_commit(),
        quick=quick,
    )
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(cases), unit="case", dynamic_ncols=True)
        except ImportError:
            bar = None
    budget = 0.3 if quick or device.type == "cpu" else 0.15  # seconds per case: >= 20 runs of the slowest GPU case
    last_checkpoint = time.perf_counter()
    for i, case in enumerate(cases):
        if bar is not None:
            bar.set_description(case.name[:60])
        elif progress:
            print(f"[{i + 1}/{len(cases)}] {case.name}", flush=True)
        run_case(case, device, results, budget)
        if bar is not None:
            bar.update(1)
        if checkpoint is not None and time.perf_counter() - last_checkpoint > checkpoint_every_s:
            checkpoint(results)
            last_checkpoint = time.perf_counter()
    if bar is not None:
        bar.close()
    if checkpoint is not None:
        checkpoint(results)
    return results


def write_json(results: Results, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results.to_json(), f, indent=1)
