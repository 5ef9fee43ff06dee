"""The large-M dense route of the fused linear (dequantize once + cuBLAS) and the per-shape choice between it and the
fused Triton GEMMs (triton_kernels/lora_linear_dense.py, triton_kernels/route.py).

Without a GPU the dense route runs its Triton parts (LoRA term, dequantize) under the interpreter and torch's CPU
matmul in place of cuBLAS; the choice is driven by an injected timer, since timing the interpreter means nothing.
Results are compared with the float64 reference in NaN-filled buffers, as in test_lora_linear.py.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import reference
from qlora_kernels.triton_kernels import lora_linear as L
from qlora_kernels.triton_kernels import lora_linear_dense as dense
from qlora_kernels.triton_kernels import lora_linear_thin as thin
from qlora_kernels.triton_kernels import nf4 as triton_nf4
from qlora_kernels.triton_kernels import route
from tests.helpers import assert_close_normwise, interpreting, nan_filled
from tests.test_lora_linear import SCALE, Case, _compare, gold, make_problem

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _fresh_routes(monkeypatch):
    monkeypatch.delenv("QLORA_KERNELS_ROUTE", raising=False)
    monkeypatch.delenv("QLORA_KERNELS_AUTOTUNE", raising=False)
    route.clear_cache()
    previous = route.set_timer(None)
    yield
    route.set_timer(previous)
    route.clear_cache()


@pytest.fixture
def calls(monkeypatch):
    """How often each route's big product ran: {"dense_fwd": n, "dense_dx": n} (the fused GEMM is the rest)."""
    counts = {"dense_fwd": 0, "dense_dx": 0}
    for name in counts:
        original = getattr(dense, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(dense, name, spy)
    return counts


def _skip_interpreted_bf16(dtype):
    if dtype == torch.bfloat16 and interpreting():
        pytest.skip("bfloat16 through Triton needs a GPU (the interpreter's bf16 dot is wrong)")


def run_launchers(p, x=None, out_y=None):
    """(y, s, grad_x, grad_A, grad_B, grad_bias) of the two launchers, every output a NaN-filled buffer."""
    x = p.x if x is None else x
    c, dev, dt = p.case, p.x.device, p.x.dtype
    y = nan_filled((c.M, c.N), dt, dev) if out_y is None else out_y
    s = nan_filled((c.M, c.r), torch.float32, dev)
    got_y, got_s = L.nf4_lora_linear_fwd(
        x, *p.storage(), p.lora_A, p.lora_B, SCALE, p.bias, c.dropout, p.seed, out=y, out_s=s
    )
    assert got_y is y and got_s is s
    outs = dict(
        out_x=nan_filled((c.M, c.K), dt, dev), out_A=nan_filled((c.r, c.K), dt, dev),
        out_B=nan_filled((c.N, c.r), dt, dev), out_bias=nan_filled((c.N,), dt, dev) if c.bias else None,
    )
    grads = L.nf4_lora_linear_bwd(
        p.grad_y, x, s, *p.storage(), p.lora_A, p.lora_B, SCALE, c.dropout, p.seed, True, True, True, c.bias, **outs
    )
    for g, o in zip(grads, outs.values()):
        assert g is o
    return (y, s, *grads)


# M = 17 (the first dense-eligible M), larger odd M, K % 64 != 0 (and K % blocksize != 0: the fused per-element
# path), odd K and odd N·K (a pad nibble), odd N, r not a power of two, r > 64 (two r-chunks in the LoRA term),
# blocksizes 32 / 64 / 128, bias and dropout on and off, with and without double quantization.
DENSE_CASES = [
    Case(17, 40, 64, 8, 64, True, True, 0.0),
    Case(37, 80, 200, 8, 32, False, True, 0.1),
    Case(45, 33, 130, 16, 128, True, False, 0.25),
    Case(70, 40, 96, 72, 32, True, False, 0.0),
    Case(33, 25, 75, 4, 64, True, True, 0.1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_dense_route_matches_reference(case, dtype, calls, monkeypatch, triton_device):
    _skip_interpreted_bf16(dtype)
    monkeypatch.setenv("QLORA_KERNELS_ROUTE", "dense")
    p = make_problem(case, dtype, triton_device)
    _compare(run_launchers(p), gold(p), dtype)
    assert calls == {"dense_fwd": 1, "dense_dx": 1}


def test_dense_route_strided_inputs_and_output(calls, monkeypatch, triton_device):
    # x with a row stride wider than K, lora_A / lora_B as transposed views, y a column slice of a wider buffer.
    monkeypatch.setenv("QLORA_KERNELS_ROUTE", "dense")
    case = Case(19, 40, 96, 8, 32, True, True, 0.1)
    p = make_problem(case, torch.float32, triton_device)
    x = torch.randn(case.M, case.K + 7, device=triton_device)[:, 3 : 3 + case.K]
    p.lora_A = p.lora_A.t().contiguous().t()
    p.lora_B = p.lora_B.t().contiguous().t()
    y = nan_filled((case.M, case.N + 5), torch.float32, triton_device)[:, 2 : 2 + case.N]
    assert not x.is_contiguous() and not y.is_contiguous()
    _compare(run_launchers(p, x=x, out_y=y), gold(p, x=x), torch.float32)
    assert calls == {"dense_fwd": 1, "dense_dx": 1}


def test_decode_m_and_forced_configs_stay_fused(calls, monkeypatch, triton_device):
    monkeypatch.setenv("QLORA_KERNELS_ROUTE", "dense")
    p = make_problem(Case(16, 32, 64, 4, 64, True, True, 0.1), torch.float32, triton_device)
    _compare(run_launchers(p), gold(p), torch.float32)
    assert calls == {"dense_fwd": 0, "dense_dx": 0}
    p = make_problem(Case(40, 32, 64, 4, 64, True, False, 0.0), torch.float32, triton_device)
    config = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, SWAP_AB=True)
    if triton_device.type == "cuda":
        config = {**config, "num_warps": 4, "num_stages": 2}
    L.nf4_lora_linear_fwd(p.x, *p.storage(), p.lora_A, p.lora_B, SCALE, None, 0.0, None, config=config)
    assert calls["dense_fwd"] == 0


def test_autograd_through_the_ops_takes_the_dense_route(calls, monkeypatch, triton_device):
    # The public entry point (custom ops + autograd, 3-D x) with the dense route forced: forward and dX both dense.
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("QLORA_KERNELS_ROUTE", "dense")
    case = Case(40, 48, 96, 8, 64, True, True, 0.0)
    p = make_problem(case, torch.float32, triton_device)
    x = p.x.reshape(2, 20, case.K).clone().requires_grad_()
    A, B = p.lora_A.clone().requires_grad_(), p.lora_B.clone().requires_grad_()
    bias = p.bias.clone().requires_grad_()
    y = qk.nf4_lora_linear(x, p.w4, A, B, SCALE, bias=bias)
    y.backward(p.grad_y.reshape(2, 20, case.N))
    assert calls == {"dense_fwd": 1, "dense_dx": 1}
    want = gold(p)
    got = (y.reshape(case.M, case.N), None, x.grad.reshape(case.M, case.K), A.grad, B.grad, bias.grad)
    _compare(got, (want[0], None, *want[2:]), torch.float32)


# ------------------------------------------------------------------------------- the two routes agree


def _forced(route_name, p, monkeypatch):
    monkeypatch.setenv("QLORA_KERNELS_ROUTE", route_name)
    return run_launchers(p)


@pytest.mark.parametrize("zero_weight", [True, False], ids=["zero-weight", "random-weight"])
def test_routes_share_s_dropout_mask_and_lora_grads(zero_weight, calls, monkeypatch, triton_device):
    # Both thin passes split their reduction here (partial sums summed by the GEMM or by the LoRA-term kernel), so
    # the summation order is what is tested. With a zero weight y and dX are the LoRA term alone: then they agree
    # to float32 rounding (the rank-wide dot runs in other tiles), and dX's zeros are exactly the dropped elements
    # of the reference mask.
    case = Case(40, 96, 130, 8, 64, True, True, 0.3)
    dev = triton_device
    if interpreting():
        assert thin.rows_plan(case.M, case.K, case.r, dev).splits > 1
        assert thin.rows_plan(case.M, case.N, case.r, dev).splits > 1
    p = make_problem(case, torch.float32, dev)
    if zero_weight:
        p.w4 = qk.NF4Weight.quantize(torch.zeros(case.N, case.K, device=dev), case.blocksize, case.double_quant)
    fused, dense_out = _forced("fused", p, monkeypatch), _forced("dense", p, monkeypatch)
    assert calls == {"dense_fwd": 1, "dense_dx": 1}
    names = ("y", "s", "grad_x", "grad_A", "grad_B", "grad_bias")
    for name, a, b in zip(names, fused, dense_out):
        if name in ("s", "grad_A", "grad_B", "grad_bias"):
            assert torch.equal(a, b), name
        elif zero_weight:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    want = gold(p)
    _compare(fused, want, torch.float32)
    _compare(dense_out, want, torch.float32)
    if zero_weight:
        keep = reference.dropout_keep_mask(p.seed, case.M, case.K, case.dropout)
        for grad_x in (fused[2], dense_out[2]):
            assert torch.equal(grad_x != 0, keep)


# ------------------------------------------------------------------------------- the choice


def test_route_key_follows_the_autotune_key():
    key = route.route_key("fwd", 3000, 4096, 1024, 16, torch.bfloat16, 64, True, has_bias=True, has_dropout=True)
    assert key == route.RouteKey("fwd", 4096, 4096, 1024, 16, torch.bfloat16, 64, True, True, False)
    for M in (17, 31, 32, 33, 1000, 4096, 5000, 8192, 100000):
        assert route.m_bucket(M) == L._m_bucket(M)
    # The rank bucket is the GEMMs' padded rank; the flag that cannot change a stage is dropped from its key.
    assert {route.route_key("dx", 64, 8, 8, r, torch.float16, 64, False).rank_bucket for r in (1, 9, 16)} == {16}
    assert route.route_key("dx", 64, 8, 8, 17, torch.float16, 64, False).rank_bucket == 32
    dx = route.route_key("dx", 64, 8, 8, 4, torch.float16, 64, False, has_bias=True, has_dropout=True)
    assert (dx.has_bias, dx.has_dropout) == (False, True)
    base = ("fwd", 64, 8, 8, 4, torch.float16, 64, False)
    variants = {route.route_key(*base), route.route_key(*base, has_bias=True),
                route.route_key("fwd", 64, 8, 8, 4, torch.bfloat16, 64, False),
                route.route_key("fwd", 64, 8, 8, 4, torch.float16, 128, False),
                route.route_key("fwd", 64, 8, 8, 4, torch.float16, 64, True),
                route.route_key("fwd", 65, 8, 8, 4, torch.float16, 64, False)}
    assert len(variants) == 6
    with pytest.raises(ValueError, match="kind must be"):
        route.route_key("bwd", 64, 8, 8, 4, torch.float16, 64, False)


class ScriptedTimer:
    """A timer that runs every candidate once (they must work and write the outputs) and answers scripted times."""

    def __init__(self, times):
        self.times = dict(times)
        self.calls = 0

    def __call__(self, candidates):
        self.calls += 1
        assert set(candidates) == {"fused", "dense"}
        for fn in candidates.values():
            fn()
        return self.times


CHOICE_CASE = Case(40, 48, 128, 8, 64, True, True, 0.1)


def test_choice_follows_the_injected_timer_and_is_cached(calls, triton_device):
    p = make_problem(CHOICE_CASE, torch.float32, triton_device)
    want = gold(p)
    fwd_key = route.route_key("fwd", 40, 48, 128, 8, torch.float32, 64, True, has_bias=True)
    dx_key = route.route_key("dx", 40, 48, 128, 8, torch.float32, 64, True, has_dropout=True)

    slow_dense = ScriptedTimer({"fused": 1.0, "dense": 2.0})
    with route.use_timer(slow_dense):
        _compare(run_launchers(p), want, torch.float32)
        assert slow_dense.calls == 2  # one measurement per direction
        assert route.cached_choices() == {fwd_key: "fused", dx_key: "fused"}
        assert calls == {"dense_fwd": 1, "dense_dx": 1}  # inside the measurement only
        _compare(run_launchers(p), want, torch.float32)
        assert slow_dense.calls == 2 and calls == {"dense_fwd": 1, "dense_dx": 1}  # cached: no new measurement
    assert route.measured_times()[fwd_key] == {"fused": 1.0, "dense": 2.0}

    route.clear_cache()
    fast_dense = ScriptedTimer({"fused": 3.0, "dense": 2.0})
    with route.use_timer(fast_dense):
        _compare(run_launchers(p), want, torch.float32)
    assert fast_dense.calls == 2
    assert route.cached_choices() == {fwd_key: "dense", dx_key: "dense"}
    assert calls == {"dense_fwd": 3, "dense_dx": 3}  # measured once, then run once

    # Another shape bucket is measured on its own; a timer given to choose() directly wins over the hook.
    other = route.route_key("fwd", 5000, 48, 128, 8, torch.float32, 64, True)
    assert route.choose(other, {"fused": lambda: None, "dense": lambda: None}, triton_device,
                        timer=lambda c: {"fused": 1.0, "dense": 0.5}) == "dense"
    # A tie goes to the fused route (M = 6000 would share 5000's bucket, 8192: a new N makes a new key).
    tie = route.route_key("fwd", 5000, 64, 128, 8, torch.float32, 64, True)
    assert route.choose(tie, {"fused": lambda: None, "dense": lambda: None}, triton_device,
                        timer=lambda c: {"fused": 1.0, "dense": 1.0}) == "fused"


def test_env_overrides_and_no_measurement_without_a_timer(calls, monkeypatch, triton_device):
    p = make_problem(CHOICE_CASE, torch.float32, triton_device)
    prefers_dense = ScriptedTimer({"fused": 9.0, "dense": 1.0})
    route.set_timer(prefers_dense)
    monkeypatch.setenv("QLORA_KERNELS_ROUTE", "fused")
    run_launchers(p)
    assert prefers_dense.calls == 0 and calls == {"dense_fwd": 0, "dense_dx": 0}
    monkeypatch.setenv("QLORA_KERNELS_ROUTE", "dense")
    route.set_timer(None)
    run_launchers(p)
    assert calls == {"dense_fwd": 1, "dense_dx": 1} and route.cached_choices() == {}
    monkeypatch.setenv("QLORA_KERNELS_ROUTE", "sometimes")
    with pytest.raises(ValueError, match="QLORA_KERNELS_ROUTE must be auto, fused or dense"):
        run_launchers(p)
    # auto with QLORA_KERNELS_AUTOTUNE=0: the fused route, nothing measured.
    monkeypatch.setenv("QLORA_KERNELS_ROUTE", "auto")
    monkeypatch.setenv("QLORA_KERNELS_AUTOTUNE", "0")
    route.set_timer(prefers_dense)
    run_launchers(p)
    assert prefers_dense.calls == 0 and calls == {"dense_fwd": 1, "dense_dx": 1} and route.cached_choices() == {}
    # auto on a CPU without a timer: no real measurement is possible, the fused route, nothing cached.
    monkeypatch.delenv("QLORA_KERNELS_AUTOTUNE")
    route.set_timer(None)
    if triton_device.type == "cpu":
        run_launchers(p)
        assert calls == {"dense_fwd": 1, "dense_dx": 1} and route.cached_choices() == {}


def test_float32_under_tf32_is_not_measured(triton_device):
    # cuBLAS under a "high" float32 matmul precision uses TF32: the dense route would break the exact-float32
    # contract of the launchers, so auto keeps the fused GEMM (a forced route still applies).
    key = route.route_key("fwd", 64, 8, 8, 4, torch.float32, 64, False)
    timer = ScriptedTimer({"fused": 9.0, "dense": 1.0})
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert route.choose(key, {"fused": lambda: None, "dense": lambda: None}, triton_device, timer=timer) == "fused"
        assert timer.calls == 0
    finally:
        torch.set_float32_matmul_precision(previous)
    assert dense.dense_matches_contract(torch.bfloat16)


def test_out_of_memory_falls_back_to_the_fused_route(monkeypatch, triton_device):
    p = make_problem(CHOICE_CASE, torch.float32, triton_device)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("no room for the scratch weight")

    monkeypatch.setattr(dense, "dense_fwd", no_memory)
    monkeypatch.setattr(dense, "dense_dx", no_memory)
    monkeypatch.setenv("QLORA_KERNELS_ROUTE", "dense")
    _compare(run_launchers(p), gold(p), torch.float32)  # a cached or forced dense choice that finds no memory
    monkeypatch.delenv("QLORA_KERNELS_ROUTE")

    def timer(candidates):
        candidates["dense"]()
        return {"fused": 2.0, "dense": 1.0}

    key = route.route_key("fwd", 64, 8, 8, 4, torch.float16, 64, False)
    assert route.choose(key, {"fused": lambda: None, "dense": lambda: no_memory()}, triton_device,
                        timer=timer) == "fused"
    assert route.cached_choices()[key] == "fused"


# ------------------------------------------------------------------------------- memory, checks


def test_scratch_weight_is_per_call_and_freed(monkeypatch, triton_device):
    made = []
    original = triton_nf4.dequantize_nf4

    def spy(*args, **kwargs):
        w = original(*args, **kwargs)
        made.append((tuple(w.shape), w.dtype, weakref.ref(w)))
        return w

    monkeypatch.setattr(triton_nf4, "dequantize_nf4", spy)
    monkeypatch.setenv("QLORA_KERNELS_ROUTE", "dense")
    case = Case(24, 40, 96, 4, 64, True, False, 0.0)
    p = make_problem(case, torch.float16, triton_device)
    _compare(run_launchers(p), gold(p), torch.float16)
    gc.collect()
    assert [m[:2] for m in made] == [((case.N, case.K), torch.float16)] * 2  # once per direction, x's dtype
    assert all(ref() is None for *_, ref in made), "a dequantized weight outlived its call"


def test_dense_route_checks_before_any_launch(monkeypatch, triton_device):
    def launched(*args, **kwargs):
        raise AssertionError("something ran before the arguments were checked")

    monkeypatch.setattr(triton_nf4, "dequantize_nf4", launched)
    monkeypatch.setattr(dense, "_launch_lora_term", launched)
    monkeypatch.setenv("QLORA_KERNELS_ROUTE", "dense")
    p = make_problem(Case(32, 16, 64, 4, 64, False, False, 0.0), torch.float32, triton_device)
    with pytest.raises(ValueError, match="lora_A must be"):
        L.nf4_lora_linear_fwd(p.x, *p.storage(), p.lora_A[:, :-1], p.lora_B, SCALE, None, 0.0, None)
    storage = list(p.storage())
    storage[0] = storage[0][:-1]
    with pytest.raises(ValueError, match="packed must be uint8"):
        L.nf4_lora_linear_fwd(p.x, *storage, p.lora_A, p.lora_B, SCALE, None, 0.0, None)
    with pytest.raises(ValueError, match="s must be float32"):
        L.nf4_lora_linear_bwd(p.grad_y, p.x, torch.zeros(32, 4, dtype=torch.float16, device=triton_device),
                              *p.storage(), p.lora_A, p.lora_B, SCALE, 0.0, None)


def test_compile_cases_name_every_kernel_argument():
    # compile_check builds its sm_90 Case from these; a missing or misspelt argument would fail there, not here.
    cases = dense.compile_cases()
    assert len(cases) == 12 and len(dense.compile_cases(quick=True)) == 2
    for family, variant, kernel, args, constexprs, options in cases:
        assert family == "lora_term" and kernel is dense._lora_term_kernel
        assert set(args) | set(constexprs) == set(kernel.arg_names), variant
        assert not set(args) & set(constexprs) and options["num_warps"] in (1, 8)


# ------------------------------------------------------------------------------- the static model


def test_modelled_dense_route():
    from qlora_kernels.triton_kernels.sass_model import H200

    for kind in ("fwd", "dx"):
        for N, K in ((4096, 4096), (14336, 4096)):
            prev = 0.0
            for M in (1024, 4096, 8192):
                parts = dense.modelled_dense_route(kind, M, N, K, 16, H200)
                cublas = 2 * M * N * K / (0.8 * H200.dense_bf16_flops) * 1e6
                assert parts["cublas_only_us"] == pytest.approx(cublas)
                assert parts["gemm_us"] >= cublas
                # The dequantization: NF4 bytes in (~0.53 B per weight), N·K·2 bytes out.
                assert parts["dequantize_us"] == pytest.approx(N * K * 2.516 / H200.hbm_bytes_per_s * 1e6, rel=0.005)
                assert parts["scratch_bytes"] == N * K * 2
                total = dense.modelled_dense_route_us(kind, M, N, K, 16, H200)
                assert total == pytest.approx(parts["dequantize_us"] + parts["lora_term_us"] + parts["gemm_us"])
                assert total > prev
                prev = total
                if M >= 4096:  # at training shapes the route stays within 12 % of a plain cuBLAS GEMM
                    assert parts["over_cublas"] < 1.12
    assert dense.modelled_dense_route_us("fwd", 4096, 4096, 4096, 16) == dense.modelled_dense_route_us(
        "fwd", 4096, 4096, 4096, 16, H200)
    with pytest.raises(ValueError, match="kind must be"):
        dense.modelled_dense_route_us("fwd_bwd", 4096, 4096, 4096, 16)


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_real_measurement_on_a_training_shape_and_routes_agree():
    # One training-sized shape, bf16: the first call measures both routes with CUDA events and caches the faster;
    # then each route forced, compared with each other and with a float64 reference, s and LoRA grads bit-equal.
    device = torch.device("cuda")
    case = Case(4096, 4096, 4096, 16, 64, True, True, 0.1)
    p = make_problem(case, torch.bfloat16, device)
    key = route.route_key("fwd", case.M, case.N, case.K, case.r, torch.bfloat16, 64, True, has_bias=True)
    auto = run_launchers(p)
    choice = route.cached_choices()[key]
    times = route.measured_times()[key]
    assert choice in ("fused", "dense") and set(times) == {"fused", "dense"}
    assert times[choice] == min(times.values())
    print(f"route at {case}: {choice}; ms {times}")
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("QLORA_KERNELS_ROUTE", "fused")
        fused = run_launchers(p)
        mp.setenv("QLORA_KERNELS_ROUTE", "dense")
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        dense_out = run_launchers(p)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    finally:
        mp.undo()
    # The transient: one bf16 weight (32 MiB here) beside the launchers' own outputs and partial sums.
    outputs = 2 * (case.M * case.N + case.M * case.K + case.r * (case.N + case.K) + case.N) + 4 * case.M * case.r
    assert peak <= case.N * case.K * 2 + outputs + (64 << 20), peak
    for name, a, b in zip(("y", "s", "grad_x", "grad_A", "grad_B", "grad_bias"), fused, dense_out):
        if name in ("s", "grad_A", "grad_B", "grad_bias"):
            assert torch.equal(a, b), name
        else:
            assert_close_normwise(b, a.double(), torch.bfloat16, scale=0.5)
    for got in (auto, fused, dense_out):
        _compare(got, gold(p), torch.bfloat16)
