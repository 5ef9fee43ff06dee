"""The C++ CPU backend (qlora_kernels/cpu_kernels.py on csrc/nf4_cpu.cpp) against the reference, the executable spec.

Quantize and dequantize must be bit-identical to the reference (and so to bitsandbytes' bytes); the fused linear,
forward and backward, within DESIGN.md's tolerances of a float64 reference, on awkward shapes (M = 0 and 1, K % 64
≠ 0, odd K and odd element counts, several tiles with a partial one), every path (decode-GEMV, tiled BLAS, the
portable scalar code with AVX2 turned off, the AVX-512 decode-GEMV and the AVX2 one on a CPU with AVX-512), dropout,
bias, the need_* flags and all three float dtypes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import cpu_kernels, ops, reference
from tests.helpers import assert_close_normwise

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="qlora_kernels._C lacks the C++ CPU kernels")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def simd_level(level: int):
    """Allow vector code up to ``level`` (2 AVX-512, 1 AVX2, 0 scalar; a level the CPU lacks falls back)."""
    previous = torch.ops.qk_cpu.set_simd_level(level)
    try:
        yield
    finally:
        torch.ops.qk_cpu.set_simd_level(previous)


def simd(enabled: bool):
    """Run the vector paths (when the CPU has them) or the portable scalar ones."""
    return simd_level(2 if enabled else 0)


SIMD = pytest.mark.parametrize("use_simd", [True, False], ids=["simd", "scalar"])

# ------------------------------------------------------------------------------------------------ NF4 format

FORMAT_SHAPES = [(1, 1), (3, 5), (7, 96), (33, 130), (64, 64), (2, 4096), (5, 321)]


@SIMD
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_quantize_and_dequantize_are_the_reference_bit_for_bit(blocksize, double_quant, use_simd):
    with simd(use_simd):
        for shape in FORMAT_SHAPES:
            for dtype in DTYPES:
                w = torch.randn(shape, dtype=dtype) * 3
                if shape == (64, 64):
                    w[:2] = 0  # all-zero blocks pack as 0x77
                expected = reference.quantize_nf4(w, blocksize, double_quant)
                got = cpu_kernels.quantize_nf4(w, blocksize, double_quant)
                for e, g in zip(expected, got):
                    if e is None:
                        assert g is None
                        continue
                    assert g.dtype == e.dtype and g.shape == e.shape and torch.equal(g, e), (shape, dtype)
                for out_dtype in DTYPES + (torch.float64,):
                    want = reference.dequantize_nf4(*expected, blocksize, shape, out_dtype)
                    have = cpu_kernels.dequantize_nf4(*expected, blocksize, shape, out_dtype)
                    assert have.dtype == out_dtype and have.shape == want.shape
                    assert torch.equal(have, want), (shape, dtype, out_dtype)


def test_quantize_nan_and_inf_like_the_reference():
    w = torch.randn(4, 64)
    w[0, 3] = float("nan")
    w[1, 5] = float("inf")
    w[2, 7] = -float("inf")
    for e, g in zip(reference.quantize_nf4(w, 64, False), cpu_kernels.quantize_nf4(w, 64, False)):
        if e is not None:
            assert torch.equal(e.view(torch.uint8) if e.dtype == torch.uint8 else e.nan_to_num(), g.nan_to_num()
                               if g.dtype != torch.uint8 else g)


def test_dequantize_accepts_other_storage_dtypes_and_shaped_absmax():
    w = torch.randn(16, 128)
    packed, absmax, nested, offset = reference.quantize_nf4(w, 64, True)
    want = reference.dequantize_nf4(packed, absmax, nested, offset, 64, (16, 128), torch.bfloat16)
    as_bf16 = packed.view(torch.bfloat16).reshape(-1, 1)  # bitsandbytes' quant_storage=bf16, shape [n, 1]
    got = cpu_kernels.dequantize_nf4(as_bf16, absmax.reshape(-1, 1), nested, offset.reshape(1), 64, (16, 128),
                                     torch.bfloat16)
    assert torch.equal(got, want)


def test_bytes_and_values_match_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    for shape in [(64, 128), (33, 320), (3, 4096)]:
        for dtype in DTYPES:
            w = torch.randn(shape, dtype=dtype)
            q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
            packed, absmax, _, _ = cpu_kernels.quantize_nf4(w, 64, False)
            assert torch.equal(packed, q.reshape(-1).view(torch.uint8))
            assert torch.equal(absmax, state.absmax.float())
            mine = cpu_kernels.dequantize_nf4(packed, absmax, None, None, 64, shape, dtype)
            assert torch.equal(mine, bnbf.dequantize_4bit(q, state))


# ------------------------------------------------------------------------------------------------ fused linear

# (M, N, K, r, blocksize): decode-GEMV (M <= GEMV_MAX_ROWS) aligned and not, tiled BLAS, zero rows.
LINEAR_CASES = [
    (1, 64, 128, 4, 64),
    (1, 17, 130, 3, 64),  # K % 64 != 0: blocks span rows
    (3, 40, 96, 8, 128),
    (5, 9, 63, 2, 64),  # odd K, odd element count
    (2, 24, 256, 4, 256),
    (13, 70, 192, 5, 64),  # tiled path
    (20, 33, 65, 4, 128),  # tiled, odd K
    (0, 8, 64, 2, 64),
]


def _storage(n: int, k: int, blocksize: int, double_quant: bool):
    packed, absmax, nested, offset = reference.quantize_nf4(torch.randn(n, k), blocksize, double_quant)
    code = reference.dynamic_map(True) if double_quant else None
    return packed, absmax, nested, offset, code


def _check_linear(case, dtype, double_quant, dropout, with_bias, need=(True, True, True, True)):
    m, n, k, r, blocksize = case
    storage = _storage(n, k, blocksize, double_quant)
    x = torch.randn(m, k, dtype=dtype)
    lora_a = torch.randn(r, k, dtype=dtype) / k**0.5
    lora_b = torch.randn(n, r, dtype=dtype)
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    seed = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64)
    scale = 0.75
    y, s = cpu_kernels.nf4_lora_linear_fwd(x, *storage, blocksize, lora_a, lora_b, scale, bias, dropout, seed)
    d = torch.float64
    y_ref, s_ref = reference.nf4_lora_linear_fwd(
        x.to(d), *storage, blocksize, lora_a.to(d), lora_b.to(d), scale, None if bias is None else bias.to(d),
        dropout, seed,
    )
    assert y.dtype == dtype and s.dtype == torch.float32
    if m:
        assert_close_normwise(y, y_ref, dtype)
        assert_close_normwise(s, s_ref, dtype)
    grad_y = torch.randn(m, n, dtype=dtype)
    need_x, need_a, need_b, need_bias = need
    need_bias = need_bias and with_bias
    got = cpu_kernels.nf4_lora_linear_bwd(
        grad_y, x, s, *storage, blocksize, lora_a, lora_b, scale, dropout, seed, need_x, need_a, need_b, need_bias
    )
    want = reference.nf4_lora_linear_bwd(
        grad_y.to(d), x.to(d), s_ref, *storage, blocksize, lora_a.to(d), lora_b.to(d), scale, dropout, seed,
        need_x, need_a, need_b, need_bias,
    )
    for g, w, like in zip(got, want, (x, lora_a, lora_b, x)):
        if w is None:
            assert g is None
            continue
        assert g.dtype == like.dtype and g.shape == w.shape
        if m:
            assert_close_normwise(g, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_fused_linear_matches_float64_reference(case, dtype):
    for double_quant, dropout, with_bias in [(True, 0.0, False), (False, 0.3, True), (True, 0.5, True)]:
        _check_linear(case, dtype, double_quant, dropout, with_bias)


@pytest.mark.parametrize("case", [(1, 24, 128, 4, 64), (4, 9, 96, 3, 64), (11, 30, 130, 4, 128)], ids=str)
def test_fused_linear_scalar_path(case):
    with simd(False):
        for dtype in (torch.float32, torch.bfloat16):
            _check_linear(case, dtype, True, 0.25, True)


def test_fused_linear_many_tiles_and_a_partial_one(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "TILE_ELEMENTS", 7 * 192)  # 7 rows per tile: 70 = 10 tiles, 33 = 4 + 5 rows
    for case in [(13, 70, 192, 5, 64), (9, 33, 192, 4, 64)]:
        _check_linear(case, torch.float32, True, 0.2, True)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_gemv_and_tiled_paths_agree(m, monkeypatch):
    storage = _storage(72, 512, 64, True)
    x = torch.randn(m, 512)
    a, b = torch.randn(4, 512), torch.randn(72, 4)
    gemv = cpu_kernels.nf4_lora_linear_fwd(x, *storage, 64, a, b, 0.5, None, 0.0, None)[0]
    monkeypatch.setattr(cpu_kernels, "GEMV_MAX_ROWS", 0)
    tiled = cpu_kernels.nf4_lora_linear_fwd(x, *storage, 64, a, b, 0.5, None, 0.0, None)[0]
    assert_close_normwise(gemv, tiled, torch.float32)


# The decode-GEMV's shapes: M = 1..7 (passes of 4, 2 and 1 rows), blocksize 64 and larger (several 64-weight groups
# a block), an odd block count (the AVX-512 loop takes blocks in pairs), r = 1, 16, 20 and 33 (the LoRA epilogue's
# partial vectors), with and without bias, every output dtype.
GEMV_CASES = [(1, 40, 4096, 16, 64), (7, 24, 192, 20, 64), (3, 17, 512, 1, 256), (6, 8, 1024, 33, 128),
              (2, 5, 64, 4, 64)]


@pytest.mark.parametrize("level", [2, 1, 0], ids=["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("case", GEMV_CASES, ids=str)
def test_gemv_at_every_simd_level_matches_the_reference(case, level):
    with simd_level(level):
        used = torch.ops.qk_cpu.simd_level()
        assert used <= level
        if level == 2 and _cpu_has("avx512f") and _cpu_has("avx2"):
            assert used == 2  # the AVX-512 decode-GEMV runs on a CPU that has it
        for dtype in DTYPES:
            for double_quant, with_bias in [(True, False), (False, True)]:
                _check_linear(case, dtype, double_quant, 0.0, with_bias, need=(True, False, False, False))


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


def test_simd_level_is_checked():
    for bad in (-1, 3):
        with pytest.raises(RuntimeError, match="simd level"):
            torch.ops.qk_cpu.set_simd_level(bad)


@pytest.mark.parametrize("need", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, True), (False, False, False, False)], ids=str)
def test_backward_computes_only_what_is_needed(need):
    _check_linear((3, 16, 64, 2, 64), torch.float32, True, 0.1, True, need)


@pytest.mark.parametrize("seed", [0, 7, -1, 2**40 + 3, -(2**62)])
def test_dropout_mask_is_the_reference_bit_for_bit(seed):
    t = torch.tensor([seed], dtype=torch.int64)
    for dtype in DTYPES:
        x = torch.randn(37, 131, dtype=dtype)
        for p in (0.1, 0.5, 0.9):
            assert torch.equal(cpu_kernels._dropout(x, p, t), reference.lora_dropout(x, p, t))


def test_float64_goes_to_the_reference():
    storage = _storage(8, 64, 64, False)
    x = torch.randn(2, 64, dtype=torch.float64)
    a, b = torch.randn(2, 64, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    got = cpu_kernels.nf4_lora_linear_fwd(x, *storage, 64, a, b, 1.0, None, 0.0, None)
    want = reference.nf4_lora_linear_fwd(x, *storage, 64, a, b, 1.0, None, 0.0, None)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ------------------------------------------------------------------------------------------------ backend choice


def test_backend_setting_chooses_the_module(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("QLORA_KERNELS_BACKEND", raising=False)
    assert ops._nf4_module(cpu) is cpu_kernels and ops._lora_linear_module(cpu) is cpu_kernels
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "cpu")
    assert ops._nf4_module(cpu) is cpu_kernels and ops._lora_linear_module(cpu) is cpu_kernels
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "torch")
    assert ops._nf4_module(cpu) is reference and ops._lora_linear_module(cpu) is reference


def test_cpu_setting_without_the_kernels_raises(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "auto")
    assert ops._nf4_module(torch.device("cpu")) is reference
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="C\\+\\+ CPU kernels"):
        ops._nf4_module(torch.device("cpu"))


def test_public_api_autograd_under_auto_matches_reference(monkeypatch):
    import qlora_kernels as qk

    w4 = qk.NF4Weight.quantize(torch.randn(48, 96), blocksize=64, double_quant=True)
    results = {}
    for setting in ("auto", "torch"):
        monkeypatch.setenv("QLORA_KERNELS_BACKEND", setting)
        torch.manual_seed(1)
        x = torch.randn(2, 3, 96, requires_grad=True)
        a = torch.randn(4, 96, requires_grad=True)
        b = torch.randn(48, 4, requires_grad=True)
        bias = torch.randn(48, requires_grad=True)
        y = qk.nf4_lora_linear(x, w4, a, b, 0.5, bias=bias, dropout=0.2)
        y.square().sum().backward()
        results[setting] = (y, x.grad, a.grad, b.grad, bias.grad)
    for got, want in zip(results["auto"], results["torch"]):
        assert_close_normwise(got, want, torch.float32)


def test_fused_linear_under_cpu_autocast_matches_the_bf16_call():
    """Under torch.autocast("cpu", bf16) (what accelerate wraps a bf16=True Trainer's forward in) the op computes in
    bf16 like an explicit bf16 call: the kernels run with autocast off, so their float32 BLAS products are not
    recast (before: 'self and mat2 must have the same dtype' for M above the GEMV path)."""
    torch.manual_seed(0)
    w4 = qk.NF4Weight.quantize(torch.randn(128, 64))
    x, a, b = torch.randn(64, 64), torch.randn(8, 64), torch.randn(128, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = qk.nf4_lora_linear(x.requires_grad_(), w4, a, b, 2.0)
    y.float().sum().backward()
    want = qk.nf4_lora_linear(x.detach().bfloat16(), w4, a.bfloat16(), b.bfloat16(), 2.0)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------- fused calls, every element written


@contextlib.contextmanager
def nan_filled_allocations():
    """torch.empty (and at::empty inside the C++ kernels) hands out NaN-filled memory: an output element a kernel
    forgets to write stays NaN and fails the comparison."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.utils.deterministic.fill_uninitialized_memory = previous[1]


# (M, N, K, r, blocksize): row chunks that do not divide N (N = 1031 over K = 128 runs in parallel, 65-row chunks),
# a single output row, r not a multiple of 8 (the epilogue's scalar tail), blocks of 128 (two 64-groups each), K % 64
# != 0 (the row-buffer path), and the tiled path.
WRITE_CASES = [(1, 1031, 128, 16, 64), (3, 1, 256, 5, 64), (8, 77, 192, 12, 64), (2, 129, 384, 8, 128),
               (5, 43, 100, 3, 64), (9, 1031, 128, 16, 64)]


@pytest.mark.parametrize("case", WRITE_CASES, ids=str)
def test_fused_calls_write_every_output_element(case):
    m, n, k, r, blocksize = case
    with nan_filled_allocations():
        assert torch.isnan(torch.empty(4)).all()  # the premise of this test
        for dtype in DTYPES:
            _check_linear(case, dtype, True, 0.0, True)
            _check_linear(case, dtype, False, 0.25, False)


def test_strided_operands_match_the_reference():
    storage = _storage(40, 96, 64, True)
    x = torch.randn(96, 6).T  # [6, 96], K not the innermost stride
    a = torch.randn(96, 4).T / 96**0.5
    b = torch.randn(4, 40).T
    bias = torch.randn(80)[::2]
    for m in (1, 6):  # the decode-GEMV and (GEMV_MAX_ROWS = 0 below) the tiled path see the same strided views
        for rows in (8, 0):
            cpu_kernels.GEMV_MAX_ROWS, saved = rows, cpu_kernels.GEMV_MAX_ROWS
            try:
                y, s = cpu_kernels.nf4_lora_linear_fwd(x[:m], *storage, 64, a, b, 0.5, bias, 0.0, None)
            finally:
                cpu_kernels.GEMV_MAX_ROWS = saved
            d = torch.float64
            y_ref, s_ref = reference.nf4_lora_linear_fwd(x[:m].to(d), *storage, 64, a.to(d), b.to(d), 0.5,
                                                         bias.to(d), 0.0, None)
            assert_close_normwise(y, y_ref, torch.float32)
            assert_close_normwise(s, s_ref, torch.float32)
    grad_y = torch.randn(12, 6).T[:, ::2]  # [6, 6] of a wider buffer: not contiguous either
    storage = _storage(6, 96, 64, False)
    b6 = torch.randn(4, 6).T
    _, s = cpu_kernels.nf4_lora_linear_fwd(x, *storage, 64, a, b6, 0.5, None, 0.0, None)
    got = cpu_kernels.nf4_lora_linear_bwd(grad_y, x, s, *storage, 64, a, b6, 0.5, 0.0, None, True, True, True, True)
    d = torch.float64
    want = reference.nf4_lora_linear_bwd(grad_y.to(d), x.to(d), s.to(d), *storage, 64, a.to(d), b6.to(d), 0.5, 0.0,
                                         None, True, True, True, True)
    for g, w in zip(got, want):
        assert_close_normwise(g, w, torch.float32)


# ------------------------------------------------------------------------------------------ eager fast path


def _layer_problem(m: int, with_bias: bool = True):
    torch.manual_seed(3)
    w4 = qk.NF4Weight.quantize(torch.randn(48, 160), blocksize=64, double_quant=True)
    x = torch.randn(m, 160, requires_grad=True)
    a = torch.randn(4, 160, requires_grad=True)
    b = torch.randn(48, 4, requires_grad=True)
    bias = torch.randn(48, requires_grad=True) if with_bias else None
    return w4, x, a, b, bias


def _run_layer(w4, x, a, b, bias, dropout):
    leaves = [t for t in (x, a, b, bias) if t is not None]
    for t in leaves:
        t.grad = None
    torch.manual_seed(11)  # the dropout seed
    y = qk.nf4_lora_linear(x, w4, a, b, 0.5, bias=bias, dropout=dropout)
    y.backward(torch.randn_like(y))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_eager_fast_path_matches_the_custom_op(m, dropout, monkeypatch):
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "cpu")
    problem = _layer_problem(m)
    fast = _run_layer(*problem, dropout)
    monkeypatch.setattr(ops, "_plain_eager_call", lambda *tensors: False)
    through_op = _run_layer(*problem, dropout)
    for got, want in zip(fast, through_op):
        assert torch.equal(got, want)  # the same kernels, called the same way


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_fast_path_only_in_plain_eager(monkeypatch):
    """Plain eager calls on the C++ kernels bypass the custom op's dispatch; under a dispatch mode, the profiler or
    another backend the op runs (traces and modes see qlora_kernels::nf4_lora_linear_fwd / _bwd)."""
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "cpu")
    calls = []
    real = ops.nf4_lora_linear_fwd

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(ops, "nf4_lora_linear_fwd", counting)
    w4, x, a, b, bias = _layer_problem(3)
    qk.nf4_lora_linear(x, w4, a, b, 0.5, bias=bias).sum().backward()
    assert calls == []
    with _OpNames() as mode:
        qk.nf4_lora_linear(x, w4, a, b, 0.5, bias=bias).sum().backward()
    assert any("nf4_lora_linear_fwd" in name for name in mode.names)
    assert any("nf4_lora_linear_bwd" in name for name in mode.names)
    with torch.profiler.profile() as prof:
        qk.nf4_lora_linear(x, w4, a, b, 0.5, bias=bias).sum().backward()
    names = {e.name for e in prof.events()}
    assert "qlora_kernels::nf4_lora_linear_fwd" in names and "qlora_kernels::nf4_lora_linear_bwd" in names
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "torch")
    calls.clear()
    qk.nf4_lora_linear(x, w4, a, b, 0.5, bias=bias)
    assert calls == [1]


def test_eager_fast_path_refuses_double_backward(monkeypatch):
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "cpu")
    w4, x, a, b, bias = _layer_problem(2)
    y = qk.nf4_lora_linear(x, w4, a, b, 0.5, bias=bias)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        gx.sum().backward()
