"""The benchmark harness: results schema, the correctness gate, and the quick run's files."""

from __future__ import annotations

import json

import pytest
import torch

from bench import harness, report

RECORD_KEYS = {"op", "impl", "M", "N", "K", "r", "dtype", "ms", "bytes", "flops", "peak_mem_mb", "case"}


def _case(impl, value, want):
    return harness.Case(
        "fwd", impl, make=lambda: (lambda: torch.full((4,), value)),
        check=lambda out: None if torch.equal(out, want) else f"max error {(out - want).abs().max().item()}",
        M=1, N=4, K=8, r=2, dtype="float32", bytes=64, flops=128, case="unit",
    )


def test_correctness_gate_reports_a_wrong_impl_and_does_not_time_it():
    want = torch.ones(4)
    cases = [_case("qlora_kernels", 1.0, want), _case("bnb_peft", 2.0, want)]
    results = harness.run(cases, torch.device("cpu"), quick=True, progress=False).to_json()
    assert [r["impl"] for r in results["records"]] == ["qlora_kernels"]
    assert len(results["failures"]) == 1
    failure = results["failures"][0]
    assert failure["impl"] == "bnb_peft" and "max error 1.0" in failure["error"] and "ms" not in failure


def test_a_crashing_impl_is_a_failure_not_a_crash():
    def make():
        raise RuntimeError("kernel exploded")

    case = harness.Case("fwd", "qlora_kernels", make=make, M=1, N=1, K=1)
    results = harness.run([case], torch.device("cpu"), quick=True, progress=False).to_json()
    assert results["records"] == [] and "kernel exploded" in results["failures"][0]["error"]


def test_results_schema_and_report_files(tmp_path):
    want = torch.ones(4)
    results = harness.run([_case("qlora_kernels", 1.0, want)], torch.device("cpu"), quick=True, progress=False)
    path = tmp_path / "results.json"
    harness.write_json(results, str(path))
    data = json.loads(path.read_text())
    assert {"device", "versions", "copy_gbps", "bf16_tflops", "records"} <= set(data)
    assert {"torch", "triton", "bitsandbytes", "peft", "qlora_kernels"} <= set(data["versions"])
    assert data["copy_gbps"] > 0 and data["bf16_tflops"] > 0
    (record,) = data["records"]
    assert set(record) == RECORD_KEYS and record["ms"] > 0
    table = report.markdown(data)
    assert "| fwd | 1 | 4 | 8 | 2 | float32 | unit | qlora_kernels |" in table
    assert report.plot(data, str(tmp_path / "results.png")) and (tmp_path / "results.png").stat().st_size > 0


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="op must be one of"):
        harness.Case("matmul", "qlora_kernels", make=lambda: (lambda: None))


def test_speedups_compare_against_ours():
    data = {"records": [
        {"op": "fwd", "impl": "qlora_kernels", "M": 1, "N": 2, "K": 3, "r": 4, "dtype": "bf16", "case": "", "ms": 1.0},
        {"op": "fwd", "impl": "bnb_peft", "M": 1, "N": 2, "K": 3, "r": 4, "dtype": "bf16", "case": "", "ms": 2.5},
    ]}
    assert report.speedups(data) == {("fwd", 1, 2, 3, 4, "bf16", ""): {"bnb_peft": 2.5}}


def test_quick_cli_writes_the_three_files(tmp_path):
    from bench.__main__ import main

    code = main(["--quick", "--out", str(tmp_path), "--only", "quant:dequant/*", "--no-progress"])
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["impl"] for r in data["records"]} >= {"qlora_kernels"}
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.png").exists()
