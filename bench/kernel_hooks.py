"""What the benchmark asks of the kernel package beyond the public API, each looked up defensively (the kernels
change under active work; a missing hook means a blank column or an unbounded autotune, never a failed run):

- ``modelled_time_us(kind, M, N, K, r)``: the static H200 model's prediction for "fwd" or "fwd_bwd" (µs or None),
  from whichever module of ``qlora_kernels.triton_kernels`` defines it;
- the autotuners of the GEMM families, whose candidate lists ``limit_autotune`` cuts to the first N (the GPU check's
  bounded autotune: the first candidate of each table is its expected best).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Optional


def _kernel_modules() -> list:
    try:
        package = importlib.import_module("qlora_kernels.triton_kernels")
    except Exception:  # noqa: BLE001 - no Triton, or a broken kernel package: nothing to look up
        return []
    modules = [package]
    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "compile_check":  # a command (exits under TRITON_INTERPRET=1), not a library module
            continue
        try:
            modules.append(importlib.import_module(f"{package.__name__}.{info.name}"))
        except Exception:  # noqa: BLE001 - a module that does not import here offers nothing
            continue
    return modules


def find_modelled_time_us() -> Optional[Callable]:
    """The kernel model's ``modelled_time_us(kind, M, N, K, r)``, or None where no module defines it."""
    for module in _kernel_modules():
        fn = getattr(module, "modelled_time_us", None)
        if callable(fn):
            return fn
    return None


def modelled_us(fn: Optional[Callable], op: str, m: int, n: int, k: int, r: int) -> Optional[float]:
    """``fn``'s prediction for one record (fwd and fwd_bwd only), None where it has none or fails."""
    if fn is None or op not in ("fwd", "fwd_bwd"):
        return None
    try:
        value = fn(op, m, n, k, r)
    except Exception:  # noqa: BLE001 - a model that cannot answer leaves the cell blank
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def autotuners() -> list:
    """Every Triton ``Autotuner`` held by a kernel module (as a module attribute or in a dict or list of them)."""
    try:
        from triton.runtime.autotuner import Autotuner
    except Exception:  # noqa: BLE001
        return []
    found, seen = [], set()
    for module in _kernel_modules():
        for value in vars(module).values():
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if isinstance(item, Autotuner) and id(item) not in seen:
                    seen.add(id(item))
                    found.append(item)
    return found


def limit_autotune(limit: Optional[int]) -> int:
    """Keep each autotuner's first ``limit`` candidates (None: all); returns how many candidates were dropped."""
    if limit is None:
        return 0
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    dropped = 0
    for tuner in autotuners():
        if len(tuner.configs) > limit:
            dropped += len(tuner.configs) - limit
            tuner.configs = list(tuner.configs[:limit])
    return dropped
