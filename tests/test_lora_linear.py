"""Fused NF4 + LoRA linear: reference, Triton kernels (interpreted without a GPU), custom ops, autograd, functional API.

Every result is compared with a float64 evaluation of the reference (``reference.nf4_lora_linear_fwd``/``_bwd`` on
float64 tensors), which is itself checked against torch autograd of the plain formula. Kernel outputs are written
into NaN-filled buffers so an element a kernel forgets fails the comparison.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import pytest
import torch
import triton
import triton.language as tl

import qlora_kernels as qk
from qlora_kernels import functional, ops, reference
from qlora_kernels.triton_kernels.lora_linear_tiles import dropout_keep
from tests.helpers import assert_close_normwise, interpreting, nan_filled

HALF_DTYPES_ON_INTERPRETER = (torch.float32, torch.float16)  # the interpreter's bf16 dot is wrong: bf16 on a GPU


@dataclasses.dataclass
class Case:
    M: int
    N: int
    K: int
    r: int
    blocksize: int
    double_quant: bool
    bias: bool
    dropout: float

    def __str__(self) -> str:
        return (
            f"M{self.M}-N{self.N}-K{self.K}-r{self.r}-bs{self.blocksize}{'-dq' if self.double_quant else ''}"
            f"{'-bias' if self.bias else ''}{f'-p{self.dropout}' if self.dropout else ''}"
        )


# Awkward shapes: M = 1, odd K (rows starting on a low nibble), K % 64 != 0, K % blocksize != 0 (blocks spanning rows: the per-element decode path),
# blocksize 32 (two absmax per 64-wide tile) and 128 (one absmax over two tiles), r = 1, r not a power of two,
# r > 64 (several r-chunks in the GEMMs), r = 256, odd N, bias and dropout on and off.
CASES = [
    Case(1, 48, 67, 1, 32, True, False, 0.0),
    Case(37, 80, 200, 8, 32, False, True, 0.1),
    Case(37, 96, 128, 16, 128, True, True, 0.0),
    Case(20, 64, 256, 24, 32, True, False, 0.25),
    Case(5, 33, 130, 16, 128, False, True, 0.0),
    Case(70, 40, 96, 72, 32, True, False, 0.0),
    Case(17, 32, 64, 256, 64, True, True, 0.1),
    Case(33, 25, 75, 4, 64, True, True, 0.0),  # odd K and odd N·K (a pad nibble) on the large-M path
]


@dataclasses.dataclass
class Problem:
    case: Case
    w4: qk.NF4Weight
    x: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    bias: Optional[torch.Tensor]
    seed: Optional[torch.Tensor]
    grad_y: torch.Tensor

    def storage(self) -> tuple:
        w4 = self.w4
        return w4.packed_bytes(), w4.absmax, w4.nested_absmax, w4.offset, w4.nested_quant_map, w4.blocksize


def make_problem(case: Case, dtype: torch.dtype, device, x: Optional[torch.Tensor] = None) -> Problem:
    w4 = qk.NF4Weight.quantize(torch.randn(case.N, case.K, device=device), case.blocksize, case.double_quant)
    if x is None:
        x = torch.randn(case.M, case.K, device=device, dtype=dtype)
    # LoRA scaled so that both paths matter in the sum (B is zero at initialisation in real training, not here).
    lora_A = (torch.randn(case.r, case.K, device=device) / case.K**0.5).to(dtype)
    lora_B = torch.randn(case.N, case.r, device=device).to(dtype)
    bias = torch.randn(case.N, device=device).to(dtype) if case.bias else None
    seed = torch.tensor([987654321012345], device=device) if case.dropout else None
    grad_y = torch.randn(case.M, case.N, device=device).to(dtype)
    return Problem(case, w4, x, lora_A, lora_B, bias, seed, grad_y)


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.double()


SCALE = 0.75


def gold(p: Problem, x: Optional[torch.Tensor] = None, grad_y: Optional[torch.Tensor] = None):
    """(y, s, grad_x, grad_A, grad_B, grad_bias) of the float64 reference."""
    x = p.x if x is None else x
    grad_y = p.grad_y if grad_y is None else grad_y
    y, s = reference.nf4_lora_linear_fwd(
        x.double(), *p.storage(), p.lora_A.double(), p.lora_B.double(), SCALE, _f64(p.bias), p.case.dropout, p.seed
    )
    grads = reference.nf4_lora_linear_bwd(
        grad_y.double(), x.double(), s, *p.storage(), p.lora_A.double(), p.lora_B.double(), SCALE,
        p.case.dropout, p.seed, True, True, True, p.bias is not None,
    )
    return (y, s, *grads)


@pytest.fixture(autouse=True)
def _fused_route(monkeypatch):
    # These tests are the fused GEMMs' (on a GPU the first call of a large-M shape would otherwise time them against
    # dequantize + cuBLAS and might check the latter's output instead); test_dense_route.py tests the dense route.
    monkeypatch.setenv("QLORA_KERNELS_ROUTE", "fused")


def _skip_interpreted_bf16(dtype: torch.dtype, backend: str = "triton") -> None:
    if backend == "triton" and dtype == torch.bfloat16 and interpreting():
        pytest.skip("bfloat16 through Triton needs a GPU (the interpreter's bf16 dot is wrong)")


# ----------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_reference_matches_autograd_of_the_formula(case):
    # The reference's hand-written backward against torch autograd of y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + b, float64.
    p = make_problem(case, torch.float64, "cpu")
    w = p.w4.dequantize(torch.float32).double()
    x, A, B = (t.clone().requires_grad_() for t in (p.x, p.lora_A, p.lora_B))
    b = p.bias.clone().requires_grad_() if p.bias is not None else None
    if case.dropout:
        keep = reference.dropout_keep_mask(p.seed, case.M, case.K, case.dropout)
        dropped = x * keep / (1 - case.dropout)
    else:
        dropped = x
    y = x @ w.T + SCALE * (dropped @ A.T) @ B.T + (b if b is not None else 0)
    y.backward(p.grad_y)
    y_ref, s, gx, gA, gB, gb = gold(p)
    torch.testing.assert_close(y_ref, y.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, (dropped @ A.T).detach(), rtol=1e-12, atol=1e-12)
    for got, want in ((gx, x.grad), (gA, A.grad), (gB, B.grad), (gb, None if b is None else b.grad)):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dropout_mask_statistics_and_seeding():
    seed = torch.tensor([12345])
    keep = reference.dropout_keep_mask(seed, 256, 1000, 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    # Neighbours are independent: P(both kept or both dropped) = p² + (1-p)².
    agree = (keep[:, 1:] == keep[:, :-1]).float().mean().item()
    assert abs(agree - (0.3**2 + 0.7**2)) < 0.01
    assert torch.equal(keep, reference.dropout_keep_mask(seed.clone(), 256, 1000, 0.3))
    other = reference.dropout_keep_mask(seed + 1, 256, 1000, 0.3)
    assert abs((keep == other).float().mean().item() - (0.3**2 + 0.7**2)) < 0.01
    # A seed above 2^32 changes the mask through its high half alone.
    assert not torch.equal(keep, reference.dropout_keep_mask(seed + (1 << 32), 256, 1000, 0.3))


def test_mul_u32_is_exact_modulo_2_32():
    a = torch.randint(0, 2**32, (4096,), dtype=torch.int64)
    for c in (0x85EBCA6B, 0xC2B2AE35, 0xFFFFFFFF, 1):
        got = reference._mul_u32(a, c)
        assert got.tolist() == [(int(v) * c) % 2**32 for v in a]


@triton.jit
def _dropout_keep_test_kernel(seed_ptr, out_ptr, base, n, threshold, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = dropout_keep(base + offs.to(tl.int64), seed_ptr, threshold)
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < n)


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1, 2**40 + 12345, 2**62 - 3])
@pytest.mark.parametrize("base", [0, 2**32 - 100, 5 * 2**32 + 17])
def test_triton_dropout_mask_equals_reference_bit_for_bit(seed, base, device):
    n = 1000
    seed_t = torch.tensor([seed], device=device)
    index = base + torch.arange(n, device=device)
    for p in (0.05, 0.5, 0.9):
        threshold = reference.dropout_threshold(p)
        out = nan_filled((n,), torch.int8, device)
        _dropout_keep_test_kernel[(triton.cdiv(n, 256),)](seed_t, out, base, n, threshold, BLOCK=256)
        want = (reference.dropout_hash(index, seed_t) >> 8) >= threshold
        assert torch.equal(out.bool(), want), f"p={p}"


# ---------------------------------------------------------------------------------- Triton launchers directly


def _launchers():
    from qlora_kernels.triton_kernels import lora_linear

    return lora_linear


def _run_launchers(p: Problem, config=None, x: Optional[torch.Tensor] = None):
    L = _launchers()
    x = p.x if x is None else x
    c, dev, dt = p.case, p.x.device, p.x.dtype
    y = nan_filled((c.M, c.N), dt, dev)
    s = nan_filled((c.M, c.r), torch.float32, dev)
    got_y, got_s = L.nf4_lora_linear_fwd(
        x, *p.storage(), p.lora_A, p.lora_B, SCALE, p.bias, c.dropout, p.seed, out=y, out_s=s, config=config
    )
    assert got_y is y and got_s is s
    outs = dict(
        out_x=nan_filled((c.M, c.K), dt, dev), out_A=nan_filled((c.r, c.K), dt, dev),
        out_B=nan_filled((c.N, c.r), dt, dev), out_bias=nan_filled((c.N,), dt, dev) if c.bias else None,
    )
    grads = L.nf4_lora_linear_bwd(
        p.grad_y, x, s, *p.storage(), p.lora_A, p.lora_B, SCALE, c.dropout, p.seed, True, True, True, c.bias,
        **outs, config=config,
    )
    for g, o in zip(grads, outs.values()):
        assert g is o
    return (y, s, *grads)


def _compare(got, want, dtype: torch.dtype) -> None:
    names = ("y", "s", "grad_x", "grad_A", "grad_B", "grad_bias")
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == (torch.float32 if name == "s" else dtype), name
        try:
            assert_close_normwise(g, w, dtype)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_launchers_match_reference(case, dtype, device):
    _skip_interpreted_bf16(dtype)
    p = make_problem(case, dtype, device)
    _compare(_run_launchers(p), gold(p), dtype)


# Each GEMM configuration family under the interpreter: plain and swapped operand order, grouped tile order, tiles
# narrower and wider than a quantization block, several K steps.
FORCED_CONFIGS = [
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, SWAP_AB=True),
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SWAP_AB=False),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, SWAP_AB=True),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SWAP_AB=False),
]


def _config_id(config: dict) -> str:
    return "-".join(f"{k.removeprefix('BLOCK_')}{int(v)}" for k, v in config.items())


@pytest.mark.parametrize("config", FORCED_CONFIGS, ids=_config_id)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=str)
def test_every_gemm_configuration_family(case, config, device):
    if device.type == "cuda":
        config = {**config, "num_warps": 4, "num_stages": 2}
    p = make_problem(case, torch.float32, device)
    _compare(_run_launchers(p, config=config), gold(p), torch.float32)


def test_cases_cover_split_and_unsplit_thin_passes():
    # The partial-sum path (several splits summed by the consumer) and the direct path are both exercised above.
    from qlora_kernels.triton_kernels import lora_linear_thin as thin

    if not interpreting():
        pytest.skip("split plans are sized for the interpreter here")
    dev = torch.device("cpu")
    rows = {thin.rows_plan(c.M, c.K, c.r, dev).splits > 1 for c in CASES}
    cols_a = {thin.cols_plan(c.M, c.K, c.r, dev).splits > 1 for c in CASES}
    cols_b = {thin.cols_plan(c.M, c.N, c.r, dev).splits > 1 for c in CASES}
    assert rows == {True, False} and cols_a | cols_b == {True, False}


def test_launchers_accept_strided_inputs(device):
    # x with a row stride wider than K, lora_A / lora_B as transposed views: the kernels take strides, no copies.
    case = Case(19, 40, 96, 8, 32, True, True, 0.1)
    p = make_problem(case, torch.float32, device)
    x = torch.randn(case.M, case.K + 7, device=device)[:, 3 : 3 + case.K]
    p.lora_A = p.lora_A.t().contiguous().t()
    p.lora_B = p.lora_B.t().contiguous().t()
    assert not x.is_contiguous() and not p.lora_A.is_contiguous() and not p.lora_B.is_contiguous()
    _compare(_run_launchers(p, x=x), gold(p, x=x), torch.float32)


def test_launchers_zero_rows(device):
    case = Case(0, 24, 64, 4, 64, True, True, 0.1)
    p = make_problem(case, torch.float32, device)
    y, s, gx, gA, gB, gb = _run_launchers(p)
    assert y.shape == (0, 24) and gx.shape == (0, 64)
    for g in (gA, gB, gb):
        assert torch.equal(g, torch.zeros_like(g))


def test_triton_path_never_dequantizes_the_weight(monkeypatch, device):
    # Forward and backward decode NF4 inside the GEMMs: the dequantize functions must not run.
    from qlora_kernels.triton_kernels import nf4 as triton_nf4

    def forbidden(*args, **kwargs):
        raise AssertionError("the weight was dequantized")

    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "triton")
    monkeypatch.setattr(reference, "dequantize_nf4", forbidden)
    monkeypatch.setattr(triton_nf4, "dequantize_nf4", forbidden)
    p = make_problem(Case(9, 32, 64, 4, 64, True, False, 0.1), torch.float32, device)
    x = p.x.clone().requires_grad_()
    A, B = p.lora_A.clone().requires_grad_(), p.lora_B.clone().requires_grad_()
    qk.nf4_lora_linear(x, p.w4, A, B, SCALE, dropout=0.1).sum().backward()
    assert x.grad is not None and A.grad is not None and B.grad is not None


@pytest.mark.parametrize("name, bad, error", [
    ("x rank", lambda p: p.x[0], "x must be 2-D"),
    ("packed size", lambda p: p.storage()[0][:-1], "packed must be uint8"),
    ("lora_A rank", lambda p: p.lora_A[:, :-1], "lora_A must be"),
])
def test_launchers_check_shapes_before_launch(name, bad, error, device):
    p = make_problem(Case(4, 16, 64, 4, 64, False, False, 0.0), torch.float32, device)
    x, storage, A = p.x, list(p.storage()), p.lora_A
    if name == "x rank":
        x = bad(p)
    elif name == "packed size":
        storage[0] = bad(p)
    else:
        A = bad(p)
    with pytest.raises(ValueError, match=error):
        _launchers().nf4_lora_linear_fwd(x, *storage, A, p.lora_B, SCALE, None, 0.0, None)


# ------------------------------------------------------------------------------------------ functional API


def _functional_grads(p: Problem, x: torch.Tensor, scale=SCALE):
    x = x.detach().clone().requires_grad_()
    A, B = p.lora_A.clone().requires_grad_(), p.lora_B.clone().requires_grad_()
    bias = p.bias.clone().requires_grad_() if p.bias is not None else None
    y = qk.nf4_lora_linear(x, p.w4, A, B, scale, bias=bias, dropout=p.case.dropout)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    return y, grad_y, x.grad, A.grad, B.grad, None if bias is None else bias.grad


def _functional_seed(device) -> torch.Tensor:
    # The functional draws its seed as the first random number after the test's torch.manual_seed.
    return torch.randint(0, functional._SEED_HIGH, (1,), device=device, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[6]], ids=str)
def test_functional_3d_input_matches_reference(case, dtype, backend, device):
    _skip_interpreted_bf16(dtype, backend)
    p = make_problem(case, dtype, device)
    x3 = p.x.reshape(1, case.M, case.K) if case.M % 2 else p.x.reshape(2, case.M // 2, case.K)
    if case.dropout:
        torch.manual_seed(1234)
        p.seed = _functional_seed(device)
        torch.manual_seed(1234)
    y, grad_y, gx, gA, gB, gb = _functional_grads(p, x3)
    want = gold(p, grad_y=grad_y.reshape(case.M, case.N))
    assert y.shape == (*x3.shape[:-1], case.N) and y.dtype == dtype
    got = (y.reshape(case.M, case.N), None, gx.reshape(case.M, case.K), gA, gB, gb)
    _compare(got, (want[0], None, *want[2:]), dtype)


def test_functional_non_contiguous_input(backend, device):
    case = Case(6, 40, 96, 8, 32, True, True, 0.0)
    p = make_problem(case, torch.float32, device)
    x = torch.randn(2, case.K, 3, device=device).transpose(1, 2)  # [2, 3, K], K not the innermost stride
    y, grad_y, gx, gA, gB, gb = _functional_grads(p, x)
    want = gold(p, x=x.reshape(case.M, case.K), grad_y=grad_y.reshape(case.M, case.N))
    got = (y.reshape(case.M, case.N), None, gx.reshape(case.M, case.K), gA, gB, gb)
    _compare(got, (want[0], None, *want[2:]), torch.float32)


def test_functional_zero_rows(backend, device):
    case = Case(0, 24, 64, 4, 64, True, True, 0.1)
    p = make_problem(case, torch.float32, device)
    y, _, gx, gA, gB, gb = _functional_grads(p, torch.empty(2, 0, case.K, device=device))
    assert y.shape == (2, 0, case.N) and gx.shape == (2, 0, case.K)
    for g in (gA, gB, gb):
        assert torch.equal(g, torch.zeros_like(g))


def test_functional_only_needed_gradients(backend, device):
    # A frozen input (the first layer's x in QLoRA) or frozen LoRA matrices: only what autograd asks for.
    p = make_problem(Case(8, 32, 64, 4, 64, True, True, 0.0), torch.float32, device)
    A = p.lora_A.clone().requires_grad_()
    y = qk.nf4_lora_linear(p.x, p.w4, A, p.lora_B, SCALE, bias=p.bias)
    y.backward(p.grad_y)
    assert_close_normwise(A.grad, gold(p)[3], torch.float32)
    x = p.x.clone().requires_grad_()
    qk.nf4_lora_linear(x, p.w4, p.lora_A, p.lora_B, SCALE, bias=p.bias).backward(p.grad_y)
    assert_close_normwise(x.grad, gold(p)[2], torch.float32)


def test_dropout_is_reproducible_from_torch_seed(backend, device):
    p = make_problem(Case(16, 32, 64, 8, 64, True, False, 0.5), torch.float32, device)
    run = lambda: qk.nf4_lora_linear(p.x, p.w4, p.lora_A, p.lora_B, SCALE, dropout=0.5)  # noqa: E731
    torch.manual_seed(7)
    first = run()
    torch.manual_seed(7)
    again = run()
    torch.manual_seed(8)
    other = run()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_dropout_mask_is_not_stored_for_backward(backend, device):
    # Saved for backward: x (needed for dA) and r-wide / weight-sized tensors; nothing else of x's size.
    case = Case(32, 24, 64, 4, 64, True, False, 0.3)
    p = make_problem(case, torch.float32, device)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = p.x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = qk.nf4_lora_linear(x, p.w4, p.lora_A.requires_grad_(), p.lora_B, SCALE, dropout=case.dropout)
    y.sum().backward()
    assert saved.count((case.M, case.K)) == 1, saved
    assert all(math.prod(s) <= case.M * case.K for s in saved), saved


def test_autocast_uses_the_autocast_dtype(backend, device):
    dtype = torch.float16 if backend == "triton" and interpreting() else torch.bfloat16
    p = make_problem(Case(8, 32, 64, 4, 64, True, True, 0.0), torch.float32, device)
    with torch.autocast(device.type, dtype=dtype):
        y = qk.nf4_lora_linear(p.x, p.w4, p.lora_A, p.lora_B.to(dtype), SCALE, bias=p.bias.half())
    assert y.dtype == dtype
    cast = make_problem(p.case, dtype, device)
    cast.w4, cast.x, cast.bias = p.w4, p.x.to(dtype), p.bias.to(dtype)
    cast.lora_A, cast.lora_B = p.lora_A.to(dtype), p.lora_B.to(dtype)
    assert_close_normwise(y, gold(cast)[0], dtype)


# ------------------------------------------------------------------------------------------------- errors


def _args(device):
    p = make_problem(Case(4, 16, 64, 4, 64, False, True, 0.0), torch.float32, device)
    return dict(x=p.x, w4=p.w4, lora_A=p.lora_A, lora_B=p.lora_B, scale=SCALE, bias=p.bias, dropout=0.0)


BAD_INPUTS = [
    ("x fp16, lora_A fp32", dict(x=lambda a: a["x"].half()), TypeError,
     r"x is torch.float16 but lora_A is torch.float32"),
    ("lora_B bf16", dict(lora_B=lambda a: a["lora_B"].bfloat16()), TypeError, r"lora_B is torch.bfloat16"),
    ("bias fp16", dict(bias=lambda a: a["bias"].half()), TypeError, r"bias is torch.float16"),
    ("x int", dict(x=lambda a: a["x"].long()), TypeError, r"x must be float16, bfloat16 or float32"),
    ("x float64", dict(x=lambda a: a["x"].double()), TypeError, r"x must be float16, bfloat16 or float32"),
    ("w4 dense", dict(w4=lambda a: a["w4"].dequantize()), TypeError, r"w4 must be an NF4Weight"),
    ("K mismatch", dict(x=lambda a: a["x"][:, :-1]), ValueError, r"x must be \[\.\.\., K=64\]"),
    ("x 0-d", dict(x=lambda a: a["x"][0, 0]), ValueError, r"x must be \[\.\.\., K=64\]"),
    ("lora_A not [r, K]", dict(lora_A=lambda a: a["lora_A"][:, :32]), ValueError, r"lora_A must be \[r, K=64\]"),
    ("lora_A 1-D", dict(lora_A=lambda a: a["lora_A"][0]), ValueError, r"lora_A must be 2-D"),
    ("rank 257", dict(lora_A=lambda a: torch.zeros(257, 64), lora_B=lambda a: torch.zeros(16, 257)), ValueError,
     r"1 <= r <= 256"),
    ("lora_B not [N, r]", dict(lora_B=lambda a: a["lora_B"].t()), ValueError, r"lora_B must be \[N=16, r=4\]"),
    ("bias not [N]", dict(bias=lambda a: a["bias"][:-1]), ValueError, r"bias must be \[N=16\]"),
    ("scale nan", dict(scale=lambda a: float("nan")), ValueError, r"scale must be a finite"),
    ("scale inf", dict(scale=lambda a: float("inf")), ValueError, r"scale must be a finite"),
    ("scale str", dict(scale=lambda a: "2"), ValueError, r"scale must be a finite"),
    ("scale tensor", dict(scale=lambda a: torch.tensor(2.0)), ValueError, r"scale must be a finite"),
    ("dropout 1", dict(dropout=lambda a: 1.0), ValueError, r"dropout must be a probability in \[0, 1\)"),
    ("dropout negative", dict(dropout=lambda a: -0.1), ValueError, r"dropout must be a probability"),
    ("dropout None", dict(dropout=lambda a: None), ValueError, r"dropout must be a probability"),
]


@pytest.mark.parametrize("name, change, error, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_before_any_launch(name, change, error, message, monkeypatch, device):
    args = _args(device)
    args.update({k: f(args) for k, f in change.items()})

    def launched(*a, **k):
        raise AssertionError("an op ran before the arguments were checked")

    monkeypatch.setattr(ops, "nf4_lora_linear_fwd", launched)
    with pytest.raises(error, match=message):
        qk.nf4_lora_linear(**args)


def test_mixed_devices_raise(device):
    if device.type != "cuda":
        pytest.skip("needs a second device type")
    args = _args(device)
    args["lora_A"] = args["lora_A"].cpu()
    with pytest.raises(ValueError, match="one device"):
        qk.nf4_lora_linear(**args)


# ---------------------------------------------------------------------------------- custom ops: opcheck, compile


def _op_args(p: Problem, requires_grad: bool):
    A, B = p.lora_A.clone(), p.lora_B.clone()
    x = p.x.clone()
    bias = None if p.bias is None else p.bias.clone()
    if requires_grad:
        for t in (x, A, B, bias):
            if t is not None:
                t.requires_grad_()
    w4 = p.w4
    return (x, w4.packed_bytes(), w4.absmax, w4.nested_absmax, w4.offset, w4.nested_quant_map, w4.blocksize, A, B,
            SCALE, bias, p.case.dropout, p.seed)


OPCHECK_CASES = [Case(5, 24, 64, 4, 32, True, True, 0.2), Case(3, 16, 40, 2, 64, False, False, 0.0)]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck(case, backend, device):
    p = make_problem(case, torch.float32, device)
    torch.library.opcheck(ops.nf4_lora_linear_fwd, _op_args(p, requires_grad=True))
    _, s = ops.nf4_lora_linear_fwd(*_op_args(p, requires_grad=False))
    args = (p.grad_y, p.x, s, *p.storage(), p.lora_A, p.lora_B, SCALE, case.dropout, p.seed)
    args = (*args, True, True, True, case.bias)
    torch.library.opcheck(ops.nf4_lora_linear_bwd, args)
    torch.library.opcheck(ops.nf4_lora_linear_bwd, (*args[:-4], False, True, False, False))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_torch_compile_fullgraph_forward_and_backward(dropout, backend, device):
    # fullgraph=True fails on any graph break; AOT autograd traces the backward (our bwd op) into its own graph.
    torch._dynamo.reset()
    p = make_problem(Case(6, 24, 64, 4, 32, True, True, dropout), torch.float32, device)

    def loss_fn(x, A, B, bias):
        y = qk.nf4_lora_linear(x, p.w4, A, B, SCALE, bias=bias, dropout=dropout)
        return (y * y).sum()

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (p.x.reshape(2, 3, -1), p.lora_A, p.lora_B, p.bias)]
        torch.manual_seed(3)
        loss = fn(*leaves)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    eager = grads(loss_fn)
    compiled = grads(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
    for g, e in zip(compiled, eager):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ GPU, realistic


def _first_candidate(M: int, aligned_rows: bool = True) -> dict:
    # The GEMM tables' first candidates (the same tile for fwd and dX): forcing them keeps the GPU tests to a few
    # compilations instead of autotuning every candidate (the benchmark autotunes, and checks results first).
    from qlora_kernels.triton_kernels import lora_linear_gemm as gemm

    c = gemm.gemm_configs("fwd", M <= gemm.SMALL_M, aligned_rows, every_candidate=True)[0]
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


# Llama-3-8B-like projections (q/o 4096×4096, up/gate 14336×4096, down 4096×14336), decode and training rows.
GPU_SHAPES = [(1, 4096, 4096, 0.0), (16, 14336, 4096, 0.0), (4096, 4096, 4096, 0.1), (4096, 14336, 4096, 0.0),
              (4096, 4096, 14336, 0.0)]


@pytest.mark.gpu
@pytest.mark.parametrize("M, N, K, dropout", GPU_SHAPES, ids=lambda v: str(v))
def test_gpu_bf16_realistic_shapes(M, N, K, dropout):
    torch.manual_seed(0)
    p = make_problem(Case(M, N, K, 16, 64, True, False, dropout), torch.bfloat16, "cuda")
    p.lora_B = p.lora_B * 0.1  # training-like magnitudes: the LoRA path a small correction
    _compare(_run_launchers(p, config=_first_candidate(M)), gold(p), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6]], ids=str)
def test_gpu_bf16_awkward_shapes(case):
    p = make_problem(case, torch.bfloat16, "cuda")
    config = _first_candidate(case.M, case.K % case.blocksize == 0)
    _compare(_run_launchers(p, config=config), gold(p), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor_fullgraph():
    torch._dynamo.reset()
    p = make_problem(Case(256, 512, 1024, 16, 64, True, True, 0.1), torch.bfloat16, "cuda")

    def loss_fn(x, A, B, bias):
        return qk.nf4_lora_linear(x, p.w4, A, B, SCALE, bias=bias, dropout=0.1).float().square().sum()

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (p.x, p.lora_A, p.lora_B, p.bias)]
        torch.manual_seed(3)
        fn(*leaves).backward()
        return [t.grad.float() for t in leaves]

    eager = grads(loss_fn)
    compiled = grads(torch.compile(loss_fn, fullgraph=True))
    for g, e in zip(compiled, eager):
        assert_close_normwise(g, e, torch.bfloat16)
