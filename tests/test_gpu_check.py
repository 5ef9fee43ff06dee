"""The GPU check fits one lease: its dry run (on this CPU) keeps every priority stage inside its limit and the whole
script inside its budget; its smoke stage runs and can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_budget, gpu_smoke

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
LEASE_COMMAND_LIMIT_S = 600  # one device command
SCRIPT_BUDGET_S = 480  # issue 10: the whole script in 8 minutes, build included


def test_stage_limits_fit_the_budget():
    limits = gpu_budget.script_limits(str(SCRIPT))
    assert {"T_ENV", "T_BUILD", "T_SMOKE", "T_PLAN", "T_TESTS", "TOTAL"} <= set(limits)
    assert limits["TOTAL"] <= SCRIPT_BUDGET_S < LEASE_COMMAND_LIMIT_S
    assert limits["T_BUILD"] <= 90 and limits["T_SMOKE"] <= 90  # the caps for those stages
    assert sum(v for k, v in limits.items() if k != "TOTAL") <= limits["TOTAL"]


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_estimate_is_under_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real candidate tables
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "dry_run.json").read_text())
    stages = {s["name"]: s for s in result["stages"]}
    assert list(stages) == ["env", "build", "smoke", "gpu-check plan", "gpu tests", "full plan"]
    for stage in stages.values():
        assert stage["estimate_s"] <= stage["limit_s"], stage["name"]
    assert result["limits_sum_s"] <= result["budget_s"] <= SCRIPT_BUDGET_S
    assert result["priority_estimate_s"] + sum(s["limit_s"] for s in stages.values() if s["time_boxed"]) \
        <= result["budget_s"]
    # The estimate is built from compile times measured here, and names the kernels each stage compiles.
    smoke = [c["kernel"] for c in stages["smoke"]["compiles"]]
    assert {"fwd_small_m", "bwd_dx_small_m", "fwd_large_m", "bwd_dx_large_m", "rows", "cols"} <= set(smoke)
    assert any(k.startswith("nf4") for k in smoke)
    measured = [c["measured"] for s in stages.values() for c in s["compiles"]]
    assert sum(measured) >= len(measured) // 2
    idents = [tuple(c["config"]) for s in stages.values() for c in s["compiles"]]
    assert len(idents) == len(set(idents))  # a kernel that an earlier stage put in Triton's cache is not counted again
    plan = stages["gpu-check plan"]
    assert plan["autotune_benchmarks"] > 0 and plan["cases"] >= 30
    assert "smoke" in (tmp_path / "dry_run.txt").read_text()


def test_compile_seconds_come_from_the_measurements():
    times = {"entries": {
        "fwd_large_m[a]": {"family": "fwd_large_m", "cpu_s": 3.0},
        "fwd_large_m[b]": {"family": "fwd_large_m", "cpu_s": 5.0},
        "rows[c]": {"family": "rows", "cpu_s": 1.0},
    }}
    timer = gpu_budget._Timer(times)
    assert timer.get("fwd_large_m", "fwd_large_m[b]") == (5.0, True)
    assert timer.get("fwd_large_m", "fwd_large_m[unmeasured]") == (4.0, False)  # its family's median
    assert timer.get("nf4_dequantize", None) == (3.0, False)  # no such family measured: the overall median
    assert gpu_budget._Timer({"entries": {}}).get("rows", "x") == (gpu_budget.DEFAULT_COMPILE_S, False)


def test_smoke_groups_and_a_passing_check(tmp_path):
    checks = gpu_smoke.checks_for(torch.device("cpu"), small=True)
    assert [g for g, _, _ in checks].count("M=1") == 2 and {g for g, _, _ in checks} >= {"M=16", "nf4+optim"}
    out = tmp_path / "smoke.json"
    code = gpu_smoke.main([str(out), "--device", "cpu", "--small", "--group", "nf4+optim"])
    data = json.loads(out.read_text())
    assert code == 0 and len(data["checks"]) == 3 and all(c["ok"] for c in data["checks"])


def test_smoke_linear_check_fails_on_a_wrong_kernel(monkeypatch):
    import qlora_kernels as qk

    good = gpu_smoke.check_linear(torch.device("cpu"), 128, 64, 16)
    assert good["ok"] and max(good["errors"].values()) < 1e-4  # float32 on a CPU
    real = qk.nf4_lora_linear
    monkeypatch.setattr(qk, "nf4_lora_linear", lambda *a, **kw: real(*a, **kw) * 1.05)
    bad = gpu_smoke.check_linear(torch.device("cpu"), 128, 64, 16)
    assert not bad["ok"] and bad["errors"]["y"] > gpu_smoke.LINEAR_TOL


@pytest.mark.gpu
def test_smoke_passes_on_the_gpu(tmp_path):
    out = tmp_path / "smoke.json"
    assert gpu_smoke.main([str(out), "--small"]) == 0
