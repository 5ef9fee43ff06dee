"""Element offsets past 2^31 in the fused linear's kernels, through Triton's interpreter, without allocating 2^31
elements.

A strided view whose largest offset (index · stride) passes 2^31 elements lives in an anonymous ``MAP_NORESERVE``
mapping of ~8.7 GB: only the pages holding the view's elements are ever written (a few hundred KB); the rest reads as
zeros. The view starts 2^31 + 2^24 elements into the mapping, so an offset computed in int32, which wraps to a
negative number no smaller than -2^31, still lands inside the mapping: the kernel then reads zeros instead of the
view's values and its result differs from the same call on a contiguous copy. With int64 offsets the two agree bit
for bit (same kernel, same configuration, same data).
"""

from __future__ import annotations

import mmap

import pytest
import torch

import qlora_kernels as qk
from tests.helpers import interpreting

if not interpreting():  # on a GPU the same views would need real 8.7 GB allocations of device memory
    pytest.skip("the mapped-view trick needs CPU tensors through Triton's interpreter", allow_module_level=True)

from qlora_kernels.triton_kernels import lora_linear  # noqa: E402

INT32_LIMIT = 2**31
BEFORE = INT32_LIMIT + 2**24  # elements mapped before a view's first element (a wrapped offset is >= -2^31)
AFTER = INT32_LIMIT + 2**26  # elements mapped after it
DTYPE = torch.float16  # 2 bytes an element: the mapping is (BEFORE + AFTER) · 2 bytes of address space
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python < 3.12 lacks the name; Linux's value


@pytest.fixture(scope="module")
def mapped() -> torch.Tensor:
    """A flat float16 tensor over an anonymous, unreserved mapping (untouched pages cost no memory)."""
    size = (BEFORE + AFTER) * DTYPE.itemsize
    try:
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    except OSError as exc:  # no address space for it here
        pytest.skip(f"cannot map {size / 2**30:.1f} GiB of address space: {exc}")
    flat = torch.frombuffer(area, dtype=DTYPE)
    yield flat
    del flat
    area.close()


def strided_view(flat: torch.Tensor, values: torch.Tensor, start: int, strides: tuple[int, int]) -> torch.Tensor:
    """A 2-D view of ``flat`` with ``strides`` (elements) starting ``start`` elements after the mapped origin,
    holding ``values``."""
    view = torch.as_strided(flat, tuple(values.shape), strides, storage_offset=BEFORE + start)
    view.copy_(values)
    return view


def stride_past_limit(extent: int) -> int:
    """An int32-sized stride (so Triton types it i32) with (extent - 1) · stride just past 2^31."""
    stride = INT32_LIMIT // (extent - 1) + 2**20
    assert stride < INT32_LIMIT and INT32_LIMIT <= (extent - 1) * stride < AFTER
    return stride


def problem(M: int, N: int, K: int, r: int):
    torch.manual_seed(0)
    w4 = qk.NF4Weight.quantize(torch.randn(N, K), 64, True)
    x = torch.randn(M, K).to(DTYPE)
    lora_A = (torch.randn(r, K) / K**0.5).to(DTYPE)
    lora_B = torch.randn(N, r).to(DTYPE)
    storage = (w4.packed_bytes(), w4.absmax, w4.nested_absmax, w4.offset, w4.nested_quant_map, w4.blocksize)
    return storage, x, lora_A, lora_B


def forward(storage, x, lora_A, lora_B):
    return lora_linear.nf4_lora_linear_fwd(x, *storage, lora_A, lora_B, 2.0, None, 0.0, None)


def test_forward_reads_x_and_lora_b_with_offsets_past_2_31(mapped):
    # x [M, K] column-strided (a transposed activation): k · stride_xk > 2^31 at the last column (the forward GEMM's
    # x tile); lora_B [N, r] column-strided: r · stride > 2^31 (the GEMM's LoRA-B initialisation).
    M, N, K, r = 3, 32, 64, 16
    storage, x, lora_A, lora_B = problem(M, N, K, r)
    y_ref, s_ref = forward(storage, x, lora_A, lora_B)
    x_far = strided_view(mapped, x, 0, (1, stride_past_limit(K)))
    b_far = strided_view(mapped, lora_B, 64, (1, stride_past_limit(r)))
    assert x_far.stride(1) * (K - 1) >= INT32_LIMIT and b_far.stride(1) * (r - 1) >= INT32_LIMIT
    y, s = forward(storage, x_far, lora_A, b_far)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def test_backward_reads_lora_b_with_offsets_past_2_31(mapped):
    # dS = dY · B runs the thin rows kernel over Bᵀ: r · stride_wr > 2^31.
    M, N, K, r = 3, 32, 64, 16
    storage, x, lora_A, lora_B = problem(M, N, K, r)
    _, s = forward(storage, x, lora_A, lora_B)
    grad_y = torch.randn(M, N).to(DTYPE)

    def backward(b):
        return lora_linear.nf4_lora_linear_bwd(grad_y, x, s, *storage, lora_A, b, 2.0, 0.0, None, need_bias=True)

    expected = backward(lora_B)
    b_far = strided_view(mapped, lora_B, 128, (1, stride_past_limit(r)))
    for got, want, name in zip(backward(b_far), expected, ("grad_x", "grad_A", "grad_B", "grad_bias")):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
