"""Benchmark machinery: cases, the correctness gate, timing, floors, time caps, progress, and the results files.

Method (DESIGN.md, "Benchmarks"): every case's output is checked against a reference before it is timed, and a wrong
result is reported as wrong (in ``failures``), never timed. On a GPU: CUDA events, warm-up, the median of many runs,
inputs rotated past L2, CUDA graphs for small M. On a CPU: wall-clock medians of what a CPU user gets (the default
CPU backend of the custom ops, never Triton's interpreter), inputs rotated past the last-level cache where the floor
is memory.

A case that runs past its time cap is recorded in ``timeouts`` (with the runs it finished, if any), a run past its
total budget records the cases it skipped, and Ctrl-C ends the run early: in every case the results written so far
stay valid, and ``python -m bench`` writes its table and plot from them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

OPS = ("fwd", "bwd", "fwd_bwd", "dequant", "quantize", "optim_step", "train_step")
RECORD_KEYS = ("op", "impl", "M", "N", "K", "r", "dtype", "ms", "bytes", "flops", "peak_mem_mb", "case",
               "modelled_us", "planned_mem_mb")


@dataclass
class Case:
    """One thing to time. ``make()`` builds the inputs once and returns the callable to time; ``check(output)``
    returns None when the output is right, else a message (the case is then reported wrong and not timed).
    ``est_s`` is the expected wall time of the whole case (build, check, timing), used only for the ETA."""

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
    min_runs: Optional[int] = None  # timed runs at least (None: the harness's default for the device)
    cap_s: Optional[float] = None  # this case's time cap (None: the run's per-case cap)
    est_s: float = 2.0
    modelled_us: Optional[float] = None  # a static model's prediction (GPU runs), never a measurement
    planned_mem_mb: Optional[float] = None  # the memory planner's prediction of the peak (train_step)
    # Filled by the case itself while it runs (e.g. the planner's breakdown); copied into the record.
    notes: dict = field(default_factory=dict)

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
    device_type: str = "cpu"
    plan: str = ""
    # Dense matmul rate per dtype name, measured in the same run: the flops floor of a record uses its own dtype's.
    matmul_tflops: dict = field(default_factory=dict)
    records: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    timeouts: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    interrupted: str = ""  # why the run ended early ("" when it ran every case)
    commit: str = ""
    quick: bool = False
    case_cap_s: float = 0.0
    wall_s: float = 0.0
    notes: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class CaseTimeout(Exception):
    """Raised inside a case that ran past its time cap."""


# ------------------------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], Any], device: torch.device, *, min_runs: int = 10, budget_s: float = 1.0,
                  cuda_graph: bool = False, times: Optional[list] = None) -> float:
    """Median milliseconds of ``fn()`` after warm-up; runs until ``budget_s`` (at least ``min_runs``, at most 200 on
    a GPU and 50 on a CPU). Each run's time is appended to ``times`` as it is measured, so a caller interrupted by a
    time cap still has the runs that finished."""
    times = [] if times is None else times
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
    start_all = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start_all < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() - start_all > 4 * budget_s:
            break
    return statistics.median(times)


def rotating(inputs: list) -> Callable[[], Any]:
    """Cycle through several copies of the inputs so that a call does not find its operands in cache."""
    it = itertools.cycle(inputs)
    return lambda: next(it)


def last_level_cache_bytes(device: torch.device) -> int:
    """The cache a rotation must overflow: the GPU's L2 (H200: 50 MiB, 60 MiB assumed when unknown), or the CPU's
    largest cache level from sysfs (32 MiB assumed when unreadable)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():  # planning GPU cases on a CPU machine (the GPU check's dry run)
            return 60 * 2**20
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 60 * 2**20)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in os.listdir(base):
            with open(os.path.join(base, index, "size"), encoding="utf-8") as f:
                text = f.read().strip().upper()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return best or 32 * 2**20


def copies_past_cache(bytes_per_copy: int, device: torch.device, cache_bytes: Optional[int] = None,
                      most: int = 8) -> int:
    """How many input copies make a rotation touch twice the last-level cache, at most ``most``."""
    if bytes_per_copy <= 0:
        return 1
    cache_bytes = last_level_cache_bytes(device) if cache_bytes is None else cache_bytes
    return max(1, min(most, -(-2 * cache_bytes // bytes_per_copy)))


def copies_past_l2(bytes_per_copy: int, device: torch.device, l2_bytes: int = 60 * 2**20) -> int:
    """GPU inputs: copies past L2 (1 on a CPU, where activations are small next to the weights that rotate)."""
    if device.type != "cuda":
        return 1
    return copies_past_cache(bytes_per_copy, device, l2_bytes)


# ------------------------------------------------------------------------------------------------ floors


def measure_copy_gbps(device: torch.device, quick: bool) -> float:
    """Copy bandwidth in GB/s (bytes read + written) of buffers past the last-level cache: device memory on a GPU
    (1 GiB), main memory on a CPU (source and destination each twice the LLC, at least 64 MiB)."""
    if device.type == "cuda":
        nbytes = (64 if quick else 1024) * 2**20
    else:
        nbytes = max(64 * 2**20, 2 * last_level_cache_bytes(device))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _best_ms(lambda: dst.copy_(src), device, runs=5)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _best_ms(fn: Callable[[], Any], device: torch.device, runs: int) -> float:
    """The fastest of ``runs`` timed calls after warm-up: a floor is what the machine can do, so the best run (not
    the median, which a busy machine drags down) measures it."""
    times: list = []
    if device.type == "cuda":
        time_callable(fn, device, min_runs=runs, budget_s=0.0, times=times)
        return min(times)
    fn()  # warm-up
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """Dense matmul throughput in TFLOP/s for ``dtype``, the best of several runs (8192³ on a GPU, 4096³ quick; on a
    CPU 2048³ in float32, 256³ in 16-bit types, which CPUs without native support run a hundred times slower)."""
    if device.type == "cpu":
        n = 2048 if dtype in (torch.float32, torch.float64) else 256
    else:
        n = 4096 if quick else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _best_ms(lambda: a @ b, device, runs=5 if device.type == "cpu" else 10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_bf16_tflops(device: torch.device, quick: bool) -> float:
    """Dense bf16 matmul throughput in TFLOP/s (the schema's ``bf16_tflops``)."""
    return measure_matmul_tflops(device, torch.bfloat16, quick)


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
    """Versions of the stack, from the installed packages' metadata (None where a package is missing)."""
    from importlib import metadata

    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "bitsandbytes", "peft", "transformers", "qlora_kernels"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str:
    """HEAD's sha, with "-dirty" when tracked files differ from it (the numbers then measure uncommitted code)."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


@contextlib.contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout in the block after ``seconds`` (SIGALRM: main thread of a POSIX process only; elsewhere
    the cap is not enforced). A long native call is interrupted when it returns to Python."""
    usable = seconds and seconds > 0 and hasattr(signal, "setitimer") and \
        threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout(f"ran past its {seconds:g} s cap")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _record_base(case: Case) -> dict:
    base = {k: getattr(case, k) for k in RECORD_KEYS if hasattr(case, k)}
    if case.notes:
        base["notes"] = dict(case.notes)
    return base


def run_case(case: Case, device: torch.device, results: Results, budget_s: float, cap_s: float = 0.0,
             min_runs: int = 10) -> None:
    """Build, check, then time one case within ``cap_s`` seconds, appending a record, a failure or a timeout."""
    times: list = []
    stage = "build"
    out = None
    try:
        with time_cap(cap_s):
            fn = case.make()
            stage = "check"
            out = fn()
            _sync(device)
            error = case.check(out) if case.check is not None else None
            if error is not None:
                results.failures.append({**_record_base(case), "error": error})
                return
            del out
            stage = "timing"
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                # The peak above what the case found allocated, or above a baseline the case chose (train_step:
                # before its model existed, so the peak is the whole step's, as the memory planner predicts it).
                base_mem = case.notes.get("peak_baseline_bytes", torch.cuda.memory_allocated(device))
            ms = time_callable(fn, device, min_runs=min_runs, budget_s=budget_s, cuda_graph=case.cuda_graph,
                               times=times)
    except CaseTimeout as exc:
        entry = {**_record_base(case), "error": f"{stage}: {exc}", "runs": len(times)}
        if times:
            entry["ms_of_finished_runs"] = statistics.median(times)
        results.timeouts.append(entry)
        return
    except Exception as exc:  # noqa: BLE001 - a crashing impl is reported, not fatal to the run
        results.failures.append({**_record_base(case), "error": f"{type(exc).__name__}: {exc}"})
        return
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20
    results.records.append({**_record_base(case), "ms": ms, "peak_mem_mb": peak})


class Progress:
    """One status line: cases done, elapsed time, and an ETA from the cases' own estimates, calibrated by how the
    finished ones compared with theirs (so a machine twice as slow as estimated shows an ETA twice as long)."""

    def __init__(self, cases: list[Case], stream=None, enabled: bool = True) -> None:
        self.estimates = [max(0.05, c.est_s) for c in cases]
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.done = 0
        self.est_done = 0.0

    def eta_s(self) -> float:
        elapsed = time.perf_counter() - self.start
        remaining = sum(self.estimates[self.done:])
        # Trust the measured pace once a few estimated seconds have passed; before that, the estimates alone.
        pace = elapsed / self.est_done if self.est_done >= 5.0 else 1.0
        return remaining * pace

    @staticmethod
    def _clock(seconds: float) -> str:
        seconds = max(0, int(round(seconds)))
        return f"{seconds // 60}:{seconds % 60:02d}"

    def line(self, label: str) -> str:
        n = len(self.estimates)
        frac = self.est_done / max(1e-9, sum(self.estimates))
        filled = int(20 * frac)
        bar = "#" * filled + "." * (20 - filled)
        return (f"[{bar}] {self.done}/{n} {self._clock(time.perf_counter() - self.start)} elapsed, "
                f"ETA {self._clock(self.eta_s())} | {label}")

    def show(self, label: str) -> None:
        if not self.enabled:
            return
        text = self.line(label)
        if self.tty:
            self.stream.write("\r" + text[:150].ljust(150))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def step(self) -> None:
        self.est_done += self.estimates[self.done]
        self.done += 1

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def new_results(device: torch.device, plan: str, quick: bool, dtypes: Iterable[torch.dtype] = ()) -> Results:
    """Results with the floors of this machine measured: copy bandwidth and the matmul rate of each dtype."""
    rates = {"bfloat16": measure_bf16_tflops(device, quick)}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        if name not in rates:
            rates[name] = measure_matmul_tflops(device, dtype, quick)
    return Results(
        device=device_name(device),
        versions=versions(),
        copy_gbps=measure_copy_gbps(device, quick),
        bf16_tflops=rates["bfloat16"],
        device_type=device.type,
        plan=plan,
        matmul_tflops=rates,
        commit=git_commit(),
        quick=quick,
    )


def run(cases: Iterable[Case], device: torch.device, quick: bool, progress: bool = True,
        checkpoint: Optional[Callable[[Results], None]] = None, checkpoint_every_s: float = 20.0, *,
        plan: str = "", case_cap_s: float = 0.0, run_budget_s: float = 0.0,
        results: Optional[Results] = None) -> Results:
    """Run every case; ``checkpoint(results)`` is called every ``checkpoint_every_s`` seconds and at the end, so an
    interrupted run (a time limit on a lent GPU, Ctrl-C) still leaves its results behind. ``case_cap_s`` caps each
    case (0: no cap); past ``run_budget_s`` seconds (0: none) the remaining cases are recorded as skipped."""
    cases = list(cases)
    start = time.perf_counter()
    if results is None:
        dtypes = {getattr(torch, c.dtype) for c in cases if c.dtype and isinstance(getattr(torch, c.dtype, None),
                                                                              torch.dtype)}
        results = new_results(device, plan, quick, sorted(dtypes, key=str))
    results.case_cap_s = case_cap_s
    cpu = device.type == "cpu"
    budget = 0.3 if quick or cpu else 0.15  # seconds of timed runs per case: >= 20 runs of the slowest GPU case
    min_runs = 5 if cpu else 10
    bar = Progress(cases, enabled=progress)
    last_checkpoint = time.perf_counter()
    try:
        for i, case in enumerate(cases):
            if run_budget_s and time.perf_counter() - start > run_budget_s:
                results.skipped += [c.name for c in cases[i:]]
                results.interrupted = f"run budget of {run_budget_s:g} s spent; {len(cases) - i} cases skipped"
                break
            bar.show(case.name)
            cap = case_cap_s if case.cap_s is None or not case_cap_s else case.cap_s
            run_case(case, device, results, budget, cap_s=cap, min_runs=case.min_runs or min_runs)
            bar.step()
            if checkpoint is not None and time.perf_counter() - last_checkpoint > checkpoint_every_s:
                results.wall_s = time.perf_counter() - start
                checkpoint(results)
                last_checkpoint = time.perf_counter()
        bar.show("done")
    except KeyboardInterrupt:
        results.interrupted = f"interrupted (Ctrl-C) after {bar.done} of {len(cases)} cases"
        results.skipped += [c.name for c in cases[bar.done:]]
    finally:
        bar.close()
        results.wall_s = time.perf_counter() - start
        if checkpoint is not None:
            checkpoint(results)
    return results


def write_json(results: Results, path: str) -> None:
    """results.json, written to a temporary name and renamed, so a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results.to_json(), f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return str(value)
