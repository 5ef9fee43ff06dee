"""Every fused NF4 + LoRA kernel configuration compiles for Hopper (sm_90), checked without a GPU.

Runs ``python -m qlora_kernels.triton_kernels.compile_check`` in a subprocess with TRITON_INTERPRET unset (in this
process conftest.py has turned the kernels into interpreter objects) and checks its JSON report: everything
compiles within sm_90's shared memory, the large-M GEMMs use wgmma, no configuration spills registers to local
memory, and the packed NF4 bytes arrive in 16-byte copies on the block-aligned decode path. float32 inputs take exact
float32 products on CUDA cores (no tensor cores, some spills): a correctness path, left out of the speed checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path_factory.mktemp("sm90") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_kernels.triton_kernels.compile_check", "--jobs", "2", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), f"the compile check wrote no report:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


def test_every_configuration_compiles_for_sm90(report):
    proc, results = report
    failed = [f"{r['name']}: {r['error'][:500]}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stdout[-4000:]
    families = {r["family"] for r in results}
    assert families == {"fwd_large_m", "fwd_small_m", "bwd_dx_large_m", "bwd_dx_small_m", "rows", "cols"}


def _half(results):
    return [r for r in results if "fp32" not in r["name"]]


def test_large_m_gemms_use_wgmma(report):
    _, results = report
    large = [r for r in _half(results) if r["family"] in ("fwd_large_m", "bwd_dx_large_m")]
    assert large and all(r["wgmma"] and r["hgmma"] > 0 for r in large), [r["name"] for r in large if not r["wgmma"]]


def test_swapped_operands_keep_wgmma_in_flight(report):
    # SWAP_AB's point: the decoded weight is wgmma's register operand, so the MMA overlaps the next tile's decode
    # (on the pipelined, block-aligned path; the per-element path runs unpipelined).
    _, results = report
    swapped = [
        r for r in _half(results)
        if r["family"].endswith("large_m") and "SWAP_AB=True" in r["name"] and "unaligned" not in r["name"]
    ]
    assert swapped and all(r["wgmma_overlap"] for r in swapped), [r["name"] for r in swapped if not r["wgmma_overlap"]]


def test_no_register_spills(report):
    _, results = report
    spilled = [f"{r['name']}: {r['spill_insts']} LDL/STL" for r in _half(results) if r["spill_insts"]]
    assert not spilled, "\n".join(spilled)


def test_packed_bytes_arrive_in_16_byte_copies(report):
    _, results = report
    aligned = [r for r in results if r["family"] not in ("rows", "cols") and "unaligned" not in r["name"]]
    narrow = [f"{r['name']}: {r['packed_contiguity']}" for r in aligned if r["packed_contiguity"] != 16]
    assert aligned and not narrow, "\n".join(narrow)
