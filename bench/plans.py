"""Named benchmark plans: which points each suite measures, and the time limits of a run.

- ``full``: the GPU plan (every shape, M and r of the linear suite, both optimizer sets, the 8-layer train step).
- ``gpu-check``: exactly the points the performance goals name (README, "Results"), for one short GPU lease:
  fwd at M = 1, 16 and fwd_bwd at M = 4096, 8192 on 4096×4096 and 14336×4096, r = 16, all four linear impls;
  optim_step on the LoRA set of Llama-3-8B; the train step. Autotuning limited to each GEMM family's first
  ``autotune_limit`` candidates.
- ``cpu``: the CPU goals of issue 14 in one run of a few minutes on 2 cores (float32, what CPUs handle well).
- ``quick``: a small subset (minutes on a CPU).
- ``tiny``: seconds: the harness's own tests (256×256 layers, no train step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Plan:
    name: str
    case_cap_s: float  # a case past this is recorded as a timeout (0: no cap)
    run_budget_s: float  # past this the remaining cases are skipped (0: none)
    autotune_limit: Optional[int]  # first N autotuning candidates per GEMM family (None: all)
    description: str


PLANS = {
    "full": Plan("full", 120.0, 0.0, None, "every shape, M and r on the GPU"),
    "gpu-check": Plan("gpu-check", 60.0, 0.0, 2, "the goal points only, for one short GPU lease"),
    # cpu: its case estimates sum to about 2 minutes; the cap and the budget stop a slow or shared machine.
    "cpu": Plan("cpu", 60.0, 420.0, None, "the CPU goals in one run of a few minutes"),
    "quick": Plan("quick", 30.0, 0.0, None, "a small subset (minutes on a CPU)"),
    "tiny": Plan("tiny", 30.0, 0.0, None, "seconds: the harness's own tests"),
}


def default_plan(device: torch.device) -> str:
    """``full`` on a GPU, ``cpu`` on a CPU."""
    return "full" if device.type == "cuda" else "cpu"


def get(name: str) -> Plan:
    if name not in PLANS:
        raise ValueError(f"plan must be one of {sorted(PLANS)}, got {name!r}")
    return PLANS[name]
