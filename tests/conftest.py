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


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch) -> str:
    """Run a test through the torch reference and through the Triton launchers (interpreted on CPU)."""
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
