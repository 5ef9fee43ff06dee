"""qlora_kernels.paged (unified-memory tensors) and the extension's op registration.

CPU: paging is a documented no-op, arguments are checked, and the C++ TORCH_LIBRARY block coexists with the
Python custom ops of the same namespace in either load order. GPU (`gpu` marker): managed allocation, the deleter
freeing it, prefetch/evict round trips on small buffers, and the refusal to allocate more than the card has free.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import paged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------------- CPU


def test_cpu_allocations_are_ordinary_and_paging_is_a_noop():
    before = paged.bytes_in_use()
    t = paged.zeros(3, 5, dtype=torch.bfloat16)
    u = paged.empty((2, 2))
    v = paged.zeros_like(t, dtype=torch.float16)
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.device.type == "cpu" and (t == 0).all()
    assert u.shape == (2, 2) and u.dtype == torch.float32
    assert v.shape == (3, 5) and v.dtype == torch.float16 and (v == 0).all()
    for x in (t, u, v):
        assert not paged.is_paged(x)
        paged.prefetch(x)
        paged.evict(x)
    assert paged.bytes_in_use() == before


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: paged.empty(2, device="meta"), ValueError, "device"),
        (lambda: paged.empty(2, -1), ValueError, "size"),
        (lambda: paged.empty(2, dtype="float32"), TypeError, "dtype"),
        (lambda: paged.prefetch([1, 2]), TypeError, "Tensor"),
        (lambda: paged.evict(None), TypeError, "Tensor"),
        (lambda: paged.is_paged(3), TypeError, "Tensor"),
    ],
)
def test_bad_arguments_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_ops_are_registered():
    assert qk.extension_available()
    for name in ("paged_empty", "is_paged", "paged_prefetch", "paged_evict", "paged_bytes_in_use",
                 "multi_tensor_optimizer_step"):
        assert hasattr(torch.ops.qlora_kernels, name), name
    cpu = torch.ops.qlora_kernels.paged_empty([4], torch.float32, torch.device("cpu"))
    assert cpu.shape == (4,) and not torch.ops.qlora_kernels.is_paged(cpu)


# The C++ extension owns the namespace's one TORCH_LIBRARY block, qlora_kernels/ops.py adds Python fragments to
# it: both load orders must leave both kinds of op usable.
_LOAD_ORDERS = {
    "python_ops_first": """
        import torch, qlora_kernels
        assert qlora_kernels.extension_available()
    """,
    "extension_first": """
        import glob, os, torch
        library = glob.glob(os.path.join({root!r}, "qlora_kernels", "_C*.so"))[0]
        torch.ops.load_library(library)
        assert hasattr(torch.ops.qlora_kernels, "multi_tensor_optimizer_step")
        import qlora_kernels
        assert qlora_kernels.extension_available()
    """,
}


@pytest.mark.parametrize("order", sorted(_LOAD_ORDERS))
def test_cpp_library_and_python_fragments_coexist(order):
    script = textwrap.dedent(_LOAD_ORDERS[order]).format(root=ROOT) + textwrap.dedent(
        """
        from qlora_kernels.optim import PagedAdamW8bit
        w = torch.randn(64, 64)
        packed, absmax, _, _ = torch.ops.qlora_kernels.quantize_nf4(w, 64, False)  # a Python custom op
        p = torch.nn.Parameter(torch.randn(64, 64))
        p.grad = torch.randn(64, 64)
        PagedAdamW8bit([p]).step()  # the C++ op
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_import_without_the_extension_and_a_clear_error_when_an_optimizer_needs_it():
    script = textwrap.dedent(
        """
        import sys, importlib.abc

        class HideExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "qlora_kernels._C":
                    raise ImportError("hidden by the test")
                return None

        sys.meta_path.insert(0, HideExtension())
        import torch, qlora_kernels
        from qlora_kernels import paged
        from qlora_kernels.optim import PagedAdamW8bit
        assert not qlora_kernels.extension_available()
        t = paged.zeros(3)
        assert not paged.is_paged(t) and paged.bytes_in_use() == 0
        try:
            PagedAdamW8bit([torch.nn.Parameter(torch.zeros(3))])
        except RuntimeError as error:
            assert "qlora_kernels._C" in str(error) and "pip install" in str(error), error
            print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_an_extension_path_that_does_not_load_is_an_error_not_a_fallback(tmp_path):
    """QLORA_KERNELS_EXTENSION (make test-asan's sanitizer build) must be the build that runs: a bad path raises
    instead of quietly loading the installed one."""
    not_a_library = tmp_path / "_C.so"
    not_a_library.write_text("not an ELF file")
    for path in (str(tmp_path / "missing.so"), str(not_a_library)):
        env = {**os.environ, "QLORA_KERNELS_EXTENSION": path}
        result = subprocess.run([sys.executable, "-c", "import qlora_kernels"], capture_output=True, text=True,
                                cwd=ROOT, env=env, timeout=300)
        assert result.returncode != 0 and "ImportError" in result.stderr, result.stderr[-2000:]
        assert "QLORA_KERNELS_EXTENSION" in result.stderr or path in result.stderr, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_managed_allocation_is_a_cuda_tensor_freed_when_it_dies():
    before = paged.bytes_in_use()
    t = paged.zeros(1000, 3, dtype=torch.float16, device="cuda")
    assert t.is_cuda and t.shape == (1000, 3) and t.dtype == torch.float16 and t.is_contiguous()
    assert paged.is_paged(t) and paged.is_paged(t[10:20]) and paged.is_paged(t.view(-1))
    assert (t == 0).all()
    assert paged.bytes_in_use() == before + 6000
    t.add_(2)
    assert t.sum().item() == 6000
    assert not paged.is_paged(torch.zeros(3, device="cuda")) and not paged.is_paged(t.clone())
    view = t[5]
    del t
    gc.collect()
    assert paged.bytes_in_use() == before + 6000  # a view keeps the storage alive
    del view
    gc.collect()
    assert paged.bytes_in_use() == before


@pytest.mark.gpu
def test_prefetch_evict_round_trip_keeps_the_data():
    t = paged.empty(4096, 33, device="cuda")
    expected = torch.arange(t.numel(), dtype=torch.float32, device="cuda").view(4096, 33)
    t.copy_(expected)
    paged.evict(t)
    torch.cuda.current_stream().synchronize()
    assert torch.equal(t.cpu(), expected.cpu())  # readable where it now lives
    paged.prefetch(t)
    t.mul_(2)  # queued after the prefetch on the same stream
    torch.cuda.synchronize()
    assert torch.equal(t, expected * 2)
    for _ in range(3):
        paged.evict(t)
        paged.prefetch(t)
    assert torch.equal(t, expected * 2)


@pytest.mark.gpu
def test_refuses_more_than_the_card_has_free():
    free, _ = torch.cuda.mem_get_info()
    before = paged.bytes_in_use()
    with pytest.raises(torch.OutOfMemoryError, match="free"):
        paged.empty(free + (1 << 30), dtype=torch.uint8, device="cuda")
    assert paged.bytes_in_use() == before


@pytest.mark.gpu
def test_non_paged_cuda_tensors_cannot_be_paged():
    with pytest.raises(ValueError, match="unified memory"):
        paged.prefetch(torch.zeros(4, device="cuda"))
    with pytest.raises(ValueError, match="unified memory"):
        paged.evict(torch.zeros(4, device="cuda"))


@pytest.mark.gpu
def test_empty_paged_tensor():
    t = paged.zeros(0, 5, device="cuda")
    assert t.shape == (0, 5) and t.is_cuda
