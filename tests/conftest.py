"""Test harness: Triton's interpreter without CUDA, the `gpu` marker, backends, tolerances, NaN-prefilled outputs.

TRITON_INTERPRET must be set before Triton decorates our kernels, so it is set here, at import, before any test
module imports qlora_kernels.
"""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("QLORA_KERNELS_BACKEND", None)  # each test chooses its backend through the `backend` fixture

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernels run: the GPU when there is one, else the CPU (Triton through the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def triton_device(device) -> torch.device:
    """``device`` for tests that call the Triton launchers directly (skipped on a CPU without the interpreter)."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (this run turned the interpreter off)")
    return device


@pytest.fixture(params=["torch", "triton", "cpu"])
def backend(request, monkeypatch) -> str:
    """Run a test through the torch reference, through the Triton launchers (interpreted on CPU) and through the C++
    CPU kernels (``QLORA_KERNELS_BACKEND=cpu``, qlora_kernels/cpu_kernels.py). Tests that take this fixture make their
    tensors on ``device``, so on a GPU machine the Triton side runs compiled on CUDA; the ``cpu`` side needs CPU
    tensors and is skipped there."""
    if request.param == "triton" and not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (this run turned the interpreter off)")
    if request.param == "cpu":
        if HAS_CUDA:
            pytest.skip("the C++ CPU kernels serve CPU tensors; on a GPU machine the tests make theirs on the GPU")
        from qlora_kernels import cpu_kernels

        if not cpu_kernels.available():
            pytest.skip("qlora_kernels._C lacks the C++ CPU kernels (csrc/nf4_cpu.cpp)")
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
