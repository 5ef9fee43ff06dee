"""Which route computes the fused linear's big product at large M: the fused Triton GEMM or dequantize + cuBLAS.

The fused GEMMs (``lora_linear_gemm``) never materialise the weight; the dense route (``lora_linear_dense``)
dequantizes it once into a scratch tensor and calls cuBLAS. Which is faster depends on the shape, the GPU and the
Triton version (issue 11: the static sm_90 model puts today's fused GEMMs at 1.1-1.5x cuBLAS at M = 4096), so it
is measured, as Triton's autotuner measures GEMM configurations: on the first call of each shape key both routes
run a few times after a warm-up, timed with CUDA events, and the faster one is cached for the process. The key
follows the Triton autotune keys of ``lora_linear_gemm`` (M bucket, N, K, rank bucket, dtype, blocksize, double
quantization, the bias flag for the forward and the dropout flag for dX), so shapes that share a tuned GEMM
configuration share a route.

Controls (read per call):
- ``QLORA_KERNELS_ROUTE=auto|fused|dense``: ``auto`` (default) measures; ``fused`` / ``dense`` force a route for
  every M > 16 call (dense for float32 then follows torch's float32 matmul precision setting).
- ``QLORA_KERNELS_AUTOTUNE=0``: no measurement, the fused route (first calls take seconds, not minutes).

No real measurement is possible without CUDA (Triton's interpreter times Python): there ``auto`` keeps the fused
route unless a timer is injected (``set_timer`` / ``use_timer``, or ``timer=``): that is how the tests drive the
choice. Under CUDA-graph capture nothing is measured (the fused route runs, uncached). Numerics: the routes agree on
s, dS, the dropout mask and the LoRA gradients bit for bit, and on y / dX within rounding; where run-to-run
bit-reproducibility across processes matters, force a route.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
from typing import Callable, Iterator, Mapping, NamedTuple, Optional

import torch
import triton

from .lora_linear_dense import dense_matches_contract
from .lora_linear_gemm import autotuning_enabled
from .lora_linear_thin import block_r

ROUTES = ("fused", "dense")  # in order of preference on a tie
WARMUP = 2  # the first fused call autotunes and compiles; the first dense call compiles two small kernels
REPEATS = 5

Candidates = Mapping[str, Callable[[], None]]
# A timer takes the candidates (name -> a call that runs that route once, writing the launcher's outputs) and
# returns a time per candidate it measured, in any one unit; the smallest wins.
Timer = Callable[[Candidates], Mapping[str, float]]


class RouteKey(NamedTuple):
    kind: str  # "fwd" | "dx"
    m_bucket: int
    N: int
    K: int
    rank_bucket: int
    dtype: torch.dtype
    blocksize: int
    double_quant: bool
    has_bias: bool  # forward only (dX has no bias term)
    has_dropout: bool  # dX only (the forward's dropout lives in the shared thin pass)


def m_bucket(M: int) -> int:
    """M's power-of-two bucket, capped at 8192: the ``m_bucket`` of the fused GEMMs' autotune key."""
    return min(triton.next_power_of_2(max(M, 1)), 8192)


def route_key(
    kind: str, M: int, N: int, K: int, rank: int, dtype: torch.dtype, blocksize: int, double_quant: bool,
    has_bias: bool = False, has_dropout: bool = False,
) -> RouteKey:
    """The cache key of one launch. The flag that does not change the ``kind`` stage is dropped (the forward's
    dropout, dX's bias), so it does not cost a second measurement."""
    if kind not in ("fwd", "dx"):
        raise ValueError(f"kind must be 'fwd' or 'dx', got {kind!r}")
    return RouteKey(kind, m_bucket(M), N, K, block_r(rank), dtype, blocksize, bool(double_quant),
                    bool(has_bias) and kind == "fwd", bool(has_dropout) and kind == "dx")


_CACHE: dict[RouteKey, str] = {}
_TIMES: dict[RouteKey, dict[str, float]] = {}
_timer_hook: Optional[Timer] = None


def cached_choices() -> dict[RouteKey, str]:
    """A copy of the routes chosen so far, by key."""
    return dict(_CACHE)


def measured_times() -> dict[RouteKey, dict[str, float]]:
    """The times (ms with the CUDA timer) behind each cached choice: what a benchmark report can print."""
    return {k: dict(v) for k, v in _TIMES.items()}


def clear_cache() -> None:
    _CACHE.clear()
    _TIMES.clear()


def set_timer(timer: Optional[Timer]) -> Optional[Timer]:
    """Install the timer used for every measurement (None: the CUDA-event timer on CUDA, none elsewhere); returns
    the previous one."""
    global _timer_hook
    previous, _timer_hook = _timer_hook, timer
    return previous


@contextlib.contextmanager
def use_timer(timer: Optional[Timer]) -> Iterator[None]:
    previous = set_timer(timer)
    try:
        yield
    finally:
        set_timer(previous)


def forced_route() -> Optional[str]:
    """The route QLORA_KERNELS_ROUTE forces, or None for ``auto`` (or unset)."""
    value = os.environ.get("QLORA_KERNELS_ROUTE", "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ROUTES:
        raise ValueError(f"QLORA_KERNELS_ROUTE must be auto, fused or dense, got {value!r}")
    return value


def _l2_flush_buffer(device: torch.device) -> Optional[torch.Tensor]:
    # Each timed run starts with a cold L2, as a training step's layer does: written over by twice its size
    # between runs (H200: 60 MB of L2, so 120 MB, transient, first call of a shape only).
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
    try:
        return torch.empty(2 * size, dtype=torch.uint8, device=device)
    except torch.OutOfMemoryError:
        return None


def cuda_event_timer(candidates: Candidates, *, warmup: int = WARMUP, repeats: int = REPEATS) -> dict[str, float]:
    """Median milliseconds per candidate on the current CUDA stream: ``warmup`` untimed runs each, then ``repeats``
    rounds timed with CUDA events, the candidates interleaved within a round (so clock or thermal drift does not
    favour one), each run after an L2 flush."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    device = torch.device("cuda", torch.cuda.current_device())
    flush = _l2_flush_buffer(device)
    events = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    del flush
    return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in events.items()}


def choose(key: RouteKey, candidates: Candidates, device: torch.device, *, timer: Optional[Timer] = None) -> str:
    """The route for ``key``: forced by QLORA_KERNELS_ROUTE, else cached, else measured once and cached. Without a
    possible measurement (QLORA_KERNELS_AUTOTUNE=0, no CUDA and no injected timer, CUDA-graph capture, float32
    under TF32) the fused route. A candidate missing from ``candidates`` is never chosen."""
    forced = forced_route()
    if forced is not None:
        return forced if forced in candidates else "fused"
    if "dense" not in candidates:
        return "fused"
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    if not autotuning_enabled() or not dense_matches_contract(key.dtype):
        return "fused"
    timer = timer or _timer_hook or (cuda_event_timer if device.type == "cuda" else None)
    if timer is None:
        return "fused"
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "fused"
    try:
        # Events and the L2 flush belong on the tensors' device, which need not be the current one.
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            times = dict(timer(candidates))
    except torch.OutOfMemoryError:
        # The dense route's scratch weight does not fit beside this model: the fused route needs none.
        times = {"fused": 0.0}
    best = min((n for n in ROUTES if n in candidates), key=lambda n: times.get(n, math.inf))
    _CACHE[key] = best
    _TIMES[key] = times
    return best


def run(key: RouteKey, candidates: Candidates, device: torch.device, *, timer: Optional[Timer] = None) -> str:
    """Choose the route for ``key`` (``choose``) and run it once; returns its name. A dense run that finds no memory
    for its scratch weight (memory pressure that came after the choice) runs the fused route instead: both write
    every output, so nothing half-written survives."""
    name = choose(key, candidates, device, timer=timer)
    if name == "dense":
        try:
            candidates["dense"]()
        except torch.OutOfMemoryError:
            candidates["fused"]()
            return "fused"
        return name
    candidates["fused"]()
    return "fused"
