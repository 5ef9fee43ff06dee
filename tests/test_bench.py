"""The benchmark harness: results schema, the correctness gate, time caps, interruption, the report's rates and
goals, and the tiny plan's files."""

from __future__ import annotations

import json
import time
import types

import pytest
import torch

from bench import harness, kernel_hooks, plans, report

RECORD_KEYS = {"op", "impl", "M", "N", "K", "r", "dtype", "ms", "bytes", "flops", "peak_mem_mb", "case",
               "modelled_us", "planned_mem_mb"}
CPU = torch.device("cpu")


def _results(**kw) -> harness.Results:
    """Results with fixed floors, so the tests do not spend seconds measuring this machine."""
    defaults = dict(device="cpu: test", versions={}, copy_gbps=10.0, bf16_tflops=0.001, device_type="cpu",
                    plan="test", matmul_tflops={"bfloat16": 0.001, "float32": 0.1})
    defaults.update(kw)
    return harness.Results(**defaults)


def _case(impl, value, want, **kw):
    return harness.Case(
        "fwd", impl, make=lambda: (lambda: torch.full((4,), value)),
        check=lambda out: None if torch.equal(out, want) else f"max error {(out - want).abs().max().item()}",
        M=1, N=4, K=8, r=2, dtype="float32", bytes=64, flops=128, case="unit", **kw,
    )


def _run(cases, **kw):
    return harness.run(cases, CPU, quick=True, progress=False, results=_results(), **kw).to_json()


def test_correctness_gate_reports_a_wrong_impl_and_does_not_time_it():
    want = torch.ones(4)
    results = _run([_case("qlora_kernels", 1.0, want), _case("bnb_peft", 2.0, want)])
    assert [r["impl"] for r in results["records"]] == ["qlora_kernels"]
    assert len(results["failures"]) == 1
    failure = results["failures"][0]
    assert failure["impl"] == "bnb_peft" and "max error 1.0" in failure["error"] and "ms" not in failure


def test_a_crashing_impl_is_a_failure_not_a_crash():
    def make():
        raise RuntimeError("kernel exploded")

    results = _run([harness.Case("fwd", "qlora_kernels", make=make, M=1, N=1, K=1)])
    assert results["records"] == [] and "kernel exploded" in results["failures"][0]["error"]


def test_results_schema_and_report_files(tmp_path):
    results = harness.run([_case("qlora_kernels", 1.0, torch.ones(4))], CPU, quick=True, progress=False)  # real floors
    path = tmp_path / "results.json"
    harness.write_json(results, str(path))
    data = json.loads(path.read_text())
    assert {"device", "versions", "copy_gbps", "bf16_tflops", "records", "matmul_tflops", "plan", "timeouts"} <= set(data)
    assert {"torch", "triton", "bitsandbytes", "peft", "qlora_kernels"} <= set(data["versions"])
    assert data["copy_gbps"] > 0 and data["bf16_tflops"] > 0 and data["matmul_tflops"]["float32"] > 0
    (record,) = data["records"]
    assert set(record) == RECORD_KEYS and record["ms"] > 0
    table = report.markdown(data)
    assert "| fwd | 1 | 4 | 8 | 2 | float32 | unit | qlora_kernels |" in table
    assert report.plot(data, str(tmp_path / "results.png")) and (tmp_path / "results.png").stat().st_size > 0


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="op must be one of"):
        harness.Case("matmul", "qlora_kernels", make=lambda: (lambda: None))


def test_unknown_plan_is_refused():
    with pytest.raises(ValueError, match="plan must be one of"):
        plans.get("everything")


def test_speedups_compare_against_ours():
    data = {"records": [
        {"op": "fwd", "impl": "qlora_kernels", "M": 1, "N": 2, "K": 3, "r": 4, "dtype": "bf16", "case": "", "ms": 1.0},
        {"op": "fwd", "impl": "bnb_peft", "M": 1, "N": 2, "K": 3, "r": 4, "dtype": "bf16", "case": "", "ms": 2.5},
    ]}
    assert report.speedups(data) == {("fwd", 1, 2, 3, 4, "bf16", ""): {"bnb_peft": 2.5}}


# ------------------------------------------------------------------------------------ caps and interruption


def test_a_case_past_its_cap_is_a_timeout_and_the_run_goes_on():
    def make_slow():
        return lambda: time.sleep(0.15) or torch.ones(4)

    slow = harness.Case("fwd", "bnb_peft", make=make_slow, M=1, N=4, K=8, dtype="float32", case="slow")
    hang = harness.Case("fwd", "unsloth_style", make=lambda: time.sleep(30), M=1, N=4, K=8, dtype="float32")
    results = _run([slow, hang, _case("qlora_kernels", 1.0, torch.ones(4))], case_cap_s=0.6)
    assert [r["impl"] for r in results["records"]] == ["qlora_kernels"]
    by_impl = {t["impl"]: t for t in results["timeouts"]}
    assert set(by_impl) == {"bnb_peft", "unsloth_style"}
    # The slow case passed its gate and finished some timed runs before the cap: their median is kept.
    assert by_impl["bnb_peft"]["error"].startswith("timing") and by_impl["bnb_peft"]["runs"] >= 1
    assert by_impl["bnb_peft"]["ms_of_finished_runs"] >= 140
    assert by_impl["unsloth_style"]["error"].startswith("build") and by_impl["unsloth_style"]["runs"] == 0
    assert "Timed out (cap 0.6 s per case)" in report.markdown(results)


def test_a_case_may_carry_its_own_cap():
    def make_slow():
        return lambda: time.sleep(0.1) or torch.ones(4)

    patient = harness.Case("fwd", "qlora_kernels", make=make_slow, M=1, N=4, K=8, dtype="float32", cap_s=10.0)
    results = _run([patient], case_cap_s=0.3)
    assert len(results["records"]) == 1 and not results["timeouts"]


def test_ctrl_c_ends_the_run_with_what_was_measured(tmp_path):
    def make_interrupt():
        raise KeyboardInterrupt

    written = []
    cases = [_case("qlora_kernels", 1.0, torch.ones(4)),
             harness.Case("fwd", "bnb_peft", make=make_interrupt, M=1, N=4, K=8, dtype="float32"),
             _case("dense_bf16", 1.0, torch.ones(4))]
    results = _run(cases, checkpoint=lambda r: written.append(len(r.records))).copy()
    assert [r["impl"] for r in results["records"]] == ["qlora_kernels"]
    assert "Ctrl-C" in results["interrupted"] and len(results["skipped"]) == 2
    assert written and written[-1] == 1  # the final checkpoint saw the measured record
    table = report.markdown(results)
    assert "Cut short" in table and "Not run (2 cases)" in table
    assert report.plot(results, str(tmp_path / "p.png"))


def test_run_budget_skips_the_rest():
    def make_slow():
        time.sleep(0.3)
        return lambda: torch.ones(4)

    cases = [harness.Case("fwd", "qlora_kernels", make=make_slow, M=1, N=4, K=8, dtype="float32")] + \
        [_case("qlora_kernels", 1.0, torch.ones(4)) for _ in range(3)]
    results = _run(cases, run_budget_s=0.2)
    assert len(results["records"]) == 1 and len(results["skipped"]) == 3
    assert "run budget" in results["interrupted"]


def test_progress_eta_follows_the_measured_pace(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    cases = [_case("qlora_kernels", 1.0, torch.ones(4), est_s=4.0) for _ in range(4)]
    bar = harness.Progress(cases, enabled=False)
    assert bar.eta_s() == pytest.approx(16.0)  # nothing measured yet: the estimates
    clock[0] += 16.0  # two cases took twice their estimate
    bar.step()
    bar.step()
    assert bar.eta_s() == pytest.approx(16.0)  # 8 estimated seconds left, at half the estimated pace
    assert "2/4" in bar.line("x") and "ETA 0:16" in bar.line("x")


# ------------------------------------------------------------------------------------------- the report


def _rec(op, impl, ms, M=256, N=4096, K=4096, r=16, dtype="float32", case="", **kw):
    return {"op": op, "impl": impl, "M": M, "N": N, "K": K, "r": r, "dtype": dtype, "case": case, "ms": ms,
            "bytes": kw.get("bytes", 0), "flops": kw.get("flops", 0), "peak_mem_mb": kw.get("peak_mem_mb"),
            "modelled_us": kw.get("modelled_us"), "planned_mem_mb": kw.get("planned_mem_mb")}


def test_rates_use_the_records_own_dtype_and_never_round_to_zero():
    data = _results().to_json()
    # 1 GFLOP in 20 ms = 50 GFLOP/s against a float32 matmul at 100 GFLOP/s: 50 % of the floor. Measured against
    # the (much slower) bf16 rate it would read 5000 %.
    data["records"] = [_rec("fwd", "qlora_kernels", 20.0, flops=10**9),
                       _rec("fwd", "bnb_peft", 500.0, M=1, flops=2 * 4096 * 4096)]
    table = report.markdown(data)
    row = next(line for line in table.splitlines() if "| qlora_kernels |" in line)
    assert "| 50 |" in row and "| 50% |" in row
    slow = next(line for line in table.splitlines() if "| bnb_peft |" in line)
    assert "| 0.0671 |" in slow  # 33.5 MFLOP in 0.5 s: 0.0671 GFLOP/s, not "0.00"
    assert "0.00 " not in table and "GFLOP/s" in table and "What a CPU run tells" in table


def test_cpu_goals_are_computed_from_the_records():
    data = _results(copy_gbps=20.0).to_json()
    nf4 = report.nf4_nbytes(4096, 4096)
    data["records"] = [
        _rec("dequant", "qlora_kernels", 5.0, M=0, r=0), _rec("dequant", "bnb", 10.0, M=0, r=0),
        _rec("fwd", "qlora_kernels", nf4 / 15e9 * 1e3, M=1),  # 15 GB/s of NF4 bytes: 75 % of 20 GB/s
        _rec("fwd", "qlora_kernels", 12.0), _rec("fwd", "bnb_peft", 10.0), _rec("fwd", "dense_float32", 10.0),
    ]
    rows = {(g["goal"], g["point"]): g for g in report.goals(data)}
    assert rows[("dequantize vs bitsandbytes' native CPU", "4096×4096 float32")]["met"] is True
    bandwidth = rows[("fwd M=1: NF4 bytes at the copy bandwidth", "M=1 4096×4096 r=16 float32")]
    assert bandwidth["met"] is True and bandwidth["value"].startswith("75%")
    assert rows[("fwd M ≥ 256 vs bitsandbytes + peft", "M=256 4096×4096 r=16 float32")]["met"] is False
    dense = rows[("fwd M ≥ 256 vs dense F.linear + LoRA", "M=256 4096×4096 r=16 float32")]
    assert dense["met"] is True and dense["value"] == "1.20× its time"
    assert "## Goals" in report.markdown(data)


def test_modelled_column_only_on_gpu_runs_and_planned_memory_beside_the_peak():
    cpu = _results().to_json()
    cpu["records"] = [_rec("fwd", "qlora_kernels", 1.0)]
    assert "modelled H200 µs" not in report.markdown(cpu)
    gpu = _results(device_type="cuda", device="NVIDIA H200").to_json()
    gpu["records"] = [_rec("fwd_bwd", "qlora_kernels", 0.5, M=4096, dtype="bfloat16", modelled_us=410.0),
                      _rec("train_step", "qlora_kernels", 50.0, peak_mem_mb=900.0, planned_mem_mb=950.0)]
    table = report.markdown(gpu)
    assert "modelled H200 µs" in table and "| 410 |" in table and "TFLOP/s" in table
    assert "planned MiB" in table and "| 900 | 950 |" in table


def test_plot_title_names_device_plan_and_commit(tmp_path, monkeypatch):
    titles = []
    import matplotlib.figure

    original = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda self, t, **kw: titles.append(t) or original(self, t, **kw))
    data = _results(commit="0123456789abcdef").to_json()
    data["records"] = [_rec("fwd", "qlora_kernels", 1.0), _rec("fwd", "bnb_peft", 2.0)]
    assert report.plot(data, str(tmp_path / "p.png"))
    assert titles == ["cpu: test · plan test · commit 0123456789ab"]


# ----------------------------------------------------------------------------------------- kernel hooks


def test_modelled_times_are_attached_to_our_cases_only(monkeypatch):
    from bench.__main__ import attach_models

    monkeypatch.setattr(kernel_hooks, "find_modelled_time_us",
                        lambda: (lambda kind, M, N, K, r: 7.5 if kind == "fwd" else None))
    cases = [_case("qlora_kernels", 1.0, torch.ones(4)), _case("bnb_peft", 1.0, torch.ones(4))]
    assert attach_models(cases)
    assert [c.modelled_us for c in cases] == [7.5, None]
    assert kernel_hooks.modelled_us(lambda *a: 1 / 0, "fwd", 1, 2, 3, 4) is None  # a failing model: blank


def test_limit_autotune_keeps_the_first_candidates(monkeypatch):
    import triton

    @triton.jit
    def _kernel(x_ptr):
        pass

    tuner = triton.autotune([triton.Config({}, num_warps=w) for w in (1, 2, 4)], key=[])(_kernel)
    monkeypatch.setattr(kernel_hooks, "_kernel_modules", lambda: [types.SimpleNamespace(TUNED={"a": tuner})])
    assert kernel_hooks.limit_autotune(2) == 1
    assert [c.num_warps for c in tuner.configs] == [1, 2]
    with pytest.raises(ValueError, match="limit"):
        kernel_hooks.limit_autotune(0)


# ------------------------------------------------------------------------------------------------ the CLI


def test_tiny_plan_writes_the_three_files(tmp_path):
    from bench.__main__ import main

    code = main(["--plan", "tiny", "--out", str(tmp_path), "--no-progress", "--device", "cpu",
                 "--only", "linear:fwd/*,quant:dequant/*"])
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())
    impls = {(r["op"], r["impl"]) for r in data["records"]}
    assert {("fwd", "qlora_kernels"), ("fwd", "bnb_peft"), ("fwd", "dense_float32"),
            ("dequant", "qlora_kernels"), ("dequant", "bnb")} <= impls
    assert data["plan"] == "tiny" and not data["failures"] and not data["timeouts"]
    assert all(r["dtype"] == "float32" for r in data["records"])  # like for like on a CPU
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.png").exists()


def test_cpu_plan_measures_every_cpu_goal():
    from bench.__main__ import collect_cases

    cases = collect_cases(CPU, "cpu", None, [])
    names = {(c.op, c.impl, c.M) for c in cases}
    assert {("dequant", "qlora_kernels", 0), ("dequant", "bnb", 0), ("quantize", "bnb", 0),
            ("fwd", "qlora_kernels", 1), ("fwd", "bnb_peft", 256), ("bwd", "dense_float32", 256),
            ("train_step", "qlora_kernels", 512), ("train_step", "bnb_peft", 512)} <= names
    # The case estimates that drive the ETA fit the 5-minute goal with room for building the layers.
    assert sum(c.est_s for c in cases) < 200
    assert plans.get("cpu").run_budget_s <= 420  # a safety net on a slow or shared machine, not the target
