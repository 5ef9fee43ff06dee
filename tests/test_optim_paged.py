"""Paged optimizers (qlora_kernels.optim) through the real extension qlora_kernels._C.

On the CPU: bit-exact against the pure-torch reference (qlora_kernels/optim/reference.py), 40-step trajectories
against bitsandbytes' PagedAdamW8bit / PagedLion8bit and torch.optim.AdamW, state size, exact resume, schedulers,
bad input, NaN. With a GPU (`gpu` marker): CUDA against the CPU kernel bit for bit, against bitsandbytes on CUDA,
paging of the state, one launch per group and no host synchronisation inside step().

The bounds against bitsandbytes are measured, not guessed: on CPU bitsandbytes requantizes its 8-bit state with a
lookup table that picks a farther level for a few % of values (test_adamw8bit_first_step_matches_bitsandbytes
shows ours is never farther), which leaves ‖ours − bnb‖ / ‖bnb − start‖ ≈ 2.2–4.6e-3 for AdamW after 40 steps
(1.0–1.5e-2 for Lion here, whose sign update flips with the momentum's sign). A missing weight decay gives 6e-2 (Lion
with the decay used here: 0.29), half of it 3e-2, absmax blocks of 128 instead of 256 2.4e-2, a 1 % lr error
1e-2, beta2 = 0.99 instead of 0.999 9e-3: all outside the bounds. Subtler errors are caught by the bit-exact
comparison with the reference.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import paged
from qlora_kernels.optim import PagedAdamW, PagedAdamW8bit, PagedLion, PagedLion8bit
from qlora_kernels.optim import reference as optim_reference
from qlora_kernels.reference import dynamic_map

HAS_CUDA = torch.cuda.is_available()

# Awkward shapes: 8-bit state (>= 4096 elements) with a partial last block, exactly one block multiple, a 3-D
# tensor; float32 state below 4096 elements; a single element; an empty tensor.
SHAPES = [(64, 300), (4096,), (7, 33, 31), (777,), (33,), (1,), (0, 5)]
ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
LION = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=1.0)
BNB_ADAMW8_BOUND = 7e-3
BNB_LION8_BOUND = 4e-2
FLOAT32_STATE_BOUND = 1e-5  # float32 state: rounding only (measured 1e-7–2.4e-7, 1.3e-6 for a 1-element tensor)


def make_params(shapes=SHAPES, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter((torch.randn(s, generator=generator) * 0.1).to(device=device, dtype=dtype))
        for s in shapes
    ]


def clone_params(params, device=None):
    return [torch.nn.Parameter(p.detach().clone().to(device or p.device)) for p in params]


def gradient_sequence(shapes, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=generator) for s in shapes] for _ in range(steps)]


def run(optimizer, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.to(device=p.device, dtype=p.dtype)
        optimizer.step()


def relative_to_movement(ours, theirs, start):
    moved = (theirs.double() - start.double()).norm().item()
    return (ours.double().cpu() - theirs.double().cpu()).norm().item() / max(moved, 1e-30)


def reference_state(p, optimizer):
    """The state the optimizer would create for ``p``, for the pure-torch reference."""
    state = {}
    optimizer._init_state(p.detach(), state)
    return state


def bnb():
    return pytest.importorskip("bitsandbytes")


# ------------------------------------------------------------------------------------------- package surface


def test_extension_is_built_and_optim_is_exported():
    assert qk.extension_available(), "the optimizer tests need qlora_kernels._C (pip install --no-build-isolation -e .)"
    assert qk.optim.PagedAdamW8bit is PagedAdamW8bit
    assert issubclass(PagedAdamW8bit, torch.optim.Optimizer)


# ------------------------------------------------------------------------------------- the 8-bit level search


def edge_values(code: torch.Tensor) -> torch.Tensor:
    mids = optim_reference.midpoints(code)
    near = torch.cat([code, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 3.0, -3.0, 1e-30, -1e-30, 1e-45, -1e-45,
                            float("inf"), float("-inf")])
    return torch.cat([near, special, torch.rand(20000) * 2 - 1, (torch.rand(2000) * 2 - 1) * 1e-4])


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("binary_search", [True, False], ids=["cuda_binary_search", "cpu_bucket_search"])
def test_level_search_is_the_nearest_level(signed, binary_search):
    code = dynamic_map(signed)
    values = edge_values(code)
    ours = torch.ops.qlora_kernels._nearest_code_indices(values, code, signed, binary_search)
    expected = torch.bucketize(values, optim_reference.midpoints(code), right=False)
    if signed:  # a negative value never rounds to the +0 level
        expected = torch.where((values < 0) & (code[expected] >= 0), expected - 1, expected)
    assert torch.equal(ours.long(), expected)
    nan = torch.ops.qlora_kernels._nearest_code_indices(torch.tensor([float("nan")]), code, signed, binary_search)
    assert nan.item() == 0


# --------------------------------------------------------------------------- bit-exact against the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("optimizer_class", [PagedAdamW8bit, PagedAdamW, PagedLion8bit, PagedLion])
def test_matches_reference_bit_for_bit(optimizer_class, dtype):
    params = make_params(dtype=dtype)
    ref_params = [p.detach().clone() for p in params]
    hyper = LION if optimizer_class in (PagedLion8bit, PagedLion) else ADAMW
    optimizer = optimizer_class(params, **hyper)
    ref_states = [reference_state(p, optimizer) for p in params]
    for grads in gradient_sequence(SHAPES, 25):
        for p, ref_p, ref_state, g in zip(params, ref_params, ref_states, grads):
            g = g.to(dtype)
            p.grad = g
            if optimizer_class.algorithm == "lion":
                optim_reference.lion_step(ref_p, g, ref_state, **hyper)
            else:
                optim_reference.adamw_step(ref_p, g, ref_state, **hyper)
        optimizer.step()
    for p, ref_p, ref_state in zip(params, ref_params, ref_states):
        assert torch.equal(p.detach(), ref_p), f"{tuple(p.shape)}: {(p.detach().float() - ref_p.float()).abs().max()}"
        state = optimizer.state[p]
        assert state.keys() == ref_state.keys()
        for key, value in ref_state.items():
            if isinstance(value, torch.Tensor):
                assert state[key].dtype == value.dtype and torch.equal(state[key], value), (tuple(p.shape), key)
            else:
                assert state[key] == value


def test_tiny_negative_first_moment_keeps_its_sign():
    """|m| far below its block's absmax rounds to the zero level, except that a negative one takes the smallest
    negative level: the sign of m is the direction of the next updates."""
    p = torch.nn.Parameter(torch.zeros(4096))
    optimizer = PagedAdamW8bit([p])
    grad = torch.ones(4096)
    grad[7], grad[8] = -1e-9, 1e-9
    p.grad = grad
    optimizer.step()
    code = dynamic_map(True)
    values = code[optimizer.state[p]["exp_avg"].long()]
    assert values[7] < 0 and values[7] == code[code < 0].max()
    assert values[8] == 0


def test_state_kinds_follow_min_8bit_size():
    params = make_params([(4095,), (4096,)])
    optimizer = PagedAdamW8bit(params, min_8bit_size=4096)
    run(optimizer, params, gradient_sequence([(4095,), (4096,)], 1))
    small, large = (optimizer.state[p] for p in params)
    assert small["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in small
    assert large["exp_avg"].dtype == torch.uint8 and large["exp_avg_sq"].dtype == torch.uint8
    assert large["exp_avg_absmax"].shape == (16,) and large["exp_avg_sq_absmax"].shape == (16,)


# ------------------------------------------------------------------------------------- against the references


def assert_tracks(make_ours, make_theirs, hyper, bound_8bit, bound_float32=FLOAT32_STATE_BOUND, device="cpu"):
    """40 steps of both optimizers from the same start on the same gradients: each tensor's distance between the
    two trajectories, relative to how far it moved, stays under the bound for its kind of state. (No empty tensor:
    how bitsandbytes treats one is not the question here.)"""
    shapes = [s for s in SHAPES if math.prod(s) > 0]
    params = make_params(shapes, device=device)
    theirs = clone_params(params)
    start = [p.detach().clone() for p in params]
    grads = gradient_sequence(shapes, 40)
    run(make_ours(params, **hyper), params, grads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: "paged optimizers are not supported on CPU"
        run(make_theirs(theirs, **hyper), theirs, grads)
    for p, q, s in zip(params, theirs, start):
        bound = bound_8bit if p.numel() >= 4096 else bound_float32
        assert relative_to_movement(p, q, s) < bound, tuple(p.shape)


def test_paged_adamw_tracks_torch_adamw():
    assert_tracks(PagedAdamW, torch.optim.AdamW, ADAMW, bound_8bit=FLOAT32_STATE_BOUND)


def test_adamw8bit_tracks_bitsandbytes_over_40_steps():
    assert_tracks(PagedAdamW8bit, bnb().optim.PagedAdamW8bit, ADAMW, bound_8bit=BNB_ADAMW8_BOUND)


def test_lion8bit_tracks_bitsandbytes_over_40_steps():
    assert_tracks(PagedLion8bit, bnb().optim.PagedLion8bit, LION, bound_8bit=BNB_LION8_BOUND)


def test_adamw8bit_first_step_matches_bitsandbytes():
    """One step: the same parameters and absmax; where bitsandbytes' CPU quantizer picks another level, ours is the
    nearer one (bitsandbytes' CUDA kernel rounds to nearest too)."""
    bitsandbytes = bnb()
    params = make_params([(64, 300)])
    theirs = clone_params(params)
    start = params[0].detach().clone()
    grads = gradient_sequence([(64, 300)], 1)
    optimizer = PagedAdamW8bit(params, **ADAMW)
    run(optimizer, params, grads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = bitsandbytes.optim.PagedAdamW8bit(theirs, **ADAMW)
        run(other, theirs, grads)
    assert relative_to_movement(params[0], theirs[0], start) < 1e-6
    ours, bnb_state = optimizer.state[params[0]], other.state[theirs[0]]
    g = grads[0][0].reshape(-1)
    for name, bnb_name, absmax_name, signed, exact in (
        ("exp_avg", "state1", "absmax1", True, (1 - 0.9) * g),
        ("exp_avg_sq", "state2", "absmax2", False, (1 - 0.999) * g * g),
    ):
        assert torch.equal(ours[name + "_absmax"], bnb_state[absmax_name])
        code = dynamic_map(signed)
        scaled = exact / ours[name + "_absmax"].repeat_interleave(256)[: g.numel()]
        our_error = (code[ours[name].reshape(-1).long()] - scaled).abs()
        bnb_error = (code[bnb_state[bnb_name].reshape(-1).long()] - scaled).abs()
        assert (our_error <= bnb_error + 1e-7).all(), name
        assert (ours[name].reshape(-1) == bnb_state[bnb_name].reshape(-1)).float().mean() > 0.9


# ------------------------------------------------------------------------------------------------ the state


def test_state_bytes_per_parameter():
    shapes = [(16, 4096), (4096, 16), (300, 301)]
    expected_bytes = ((PagedAdamW8bit, 2 + 2 * 4 / 256), (PagedAdamW, 8.0), (PagedLion8bit, 1 + 4 / 256))
    for optimizer_class, expected in expected_bytes:
        params = make_params(shapes)
        optimizer = optimizer_class(params)
        run(optimizer, params, gradient_sequence(shapes, 1))
        state_bytes = sum(
            t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
        )
        per_parameter = state_bytes / sum(p.numel() for p in params)
        assert per_parameter == pytest.approx(expected, rel=2e-3), optimizer_class.__name__


def test_state_dict_round_trip_resumes_exactly():
    shapes = SHAPES
    grads = gradient_sequence(shapes, 20)
    params = make_params(shapes)
    optimizer = PagedAdamW8bit(params, **ADAMW)
    run(optimizer, params, grads[:10])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_params = clone_params(params)
    run(optimizer, params, grads[10:])

    buffer.seek(0)
    saved = torch.load(buffer)
    saved_copy = copy.deepcopy(saved)
    resumed = PagedAdamW8bit(resumed_params, **ADAMW)
    resumed.load_state_dict(saved)
    for p in resumed_params:
        if p.numel() >= 4096:
            assert resumed.state[p]["exp_avg"].dtype == torch.uint8  # torch's loader would cast it to float
    run(resumed, resumed_params, grads[10:])
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            other = resumed.state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    # Loading copies: stepping the resumed optimizer left the loaded dict as it was.
    for key, value in saved["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, saved_copy["state"][key][name]) if torch.is_tensor(tensor) else True
    assert resumed.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


def test_torch_adamw_state_dict_loads_into_paged_adamw():
    shapes = [(64, 30), (7,)]
    grads = gradient_sequence(shapes, 10)
    params = make_params(shapes)
    theirs = torch.optim.AdamW(params, **ADAMW)
    run(theirs, params, grads[:5])
    ours_params = clone_params(params)
    ours = PagedAdamW(ours_params, **ADAMW)
    ours.load_state_dict(theirs.state_dict())
    start = [p.detach().clone() for p in params]
    run(theirs, params, grads[5:])
    run(ours, ours_params, grads[5:])
    for p, q, s in zip(ours_params, params, start):
        assert relative_to_movement(p, q, s) < FLOAT32_STATE_BOUND


def test_load_state_dict_rejects_mismatches_and_changes_nothing():
    params = make_params([(64, 300), (10,)])
    optimizer = PagedAdamW8bit(params)
    run(optimizer, params, gradient_sequence([(64, 300), (10,)], 2))
    good = optimizer.state_dict()
    before = copy.deepcopy(good)

    other = make_params([(64, 300), (10,)])
    target = PagedAdamW8bit(other)
    with pytest.raises(ValueError, match="param groups"):
        target.load_state_dict({"state": good["state"], "param_groups": good["param_groups"] * 2})
    wrong_shape = copy.deepcopy(good)
    wrong_shape["state"][0]["exp_avg"] = wrong_shape["state"][0]["exp_avg"][:10]
    with pytest.raises(ValueError, match="exp_avg"):
        target.load_state_dict(wrong_shape)
    with pytest.raises(ValueError, match="saved by PagedAdamW8bit"):  # another optimizer's state
        PagedAdamW(other).load_state_dict(good)
    untagged = copy.deepcopy(good)
    for group in untagged["param_groups"]:
        del group["qlora_kernels_optimizer"]
    with pytest.raises(ValueError, match="8-bit"):  # 8-bit state into a 32-bit optimizer, even without the tag
        PagedAdamW(other).load_state_dict(untagged)
    assert not target.state
    for key in good["state"]:
        for name, value in good["state"][key].items():
            assert torch.equal(value, before["state"][key][name]) if torch.is_tensor(value) else True


def test_paging_is_a_noop_on_cpu():
    params = make_params([(400, 300)])
    optimizer = PagedAdamW8bit(params, page_threshold=1)
    run(optimizer, params, gradient_sequence([(400, 300)], 2))
    assert not paged.is_paged(optimizer.state[params[0]]["exp_avg"])
    optimizer.evict_state()
    optimizer.prefetch_state()
    run(optimizer, params, gradient_sequence([(400, 300)], 1, seed=5))
    assert optimizer.state[params[0]]["step"] == 3


# --------------------------------------------------------------------------------------- torch.optim API


def test_lr_scheduler_drives_the_step_like_torch():
    params = make_params([(50, 40), (9,)])
    theirs = clone_params(params)
    start = [p.detach().clone() for p in params]
    ours_opt = PagedAdamW(params, **ADAMW)
    their_opt = torch.optim.AdamW(theirs, **ADAMW)
    schedulers = [
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)) for opt in (ours_opt, their_opt)
    ]
    for grads in gradient_sequence([(50, 40), (9,)], 30):
        for opt, ps, scheduler in ((ours_opt, params, schedulers[0]), (their_opt, theirs, schedulers[1])):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
            scheduler.step()
    assert ours_opt.param_groups[0]["lr"] == their_opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 31)
    for p, q, s in zip(params, theirs, start):
        assert relative_to_movement(p, q, s) < FLOAT32_STATE_BOUND
    # A constant lr would end elsewhere: the schedule really reached the kernel.
    constant = clone_params([torch.nn.Parameter(s) for s in start])
    run(PagedAdamW(constant, **ADAMW), constant, gradient_sequence([(50, 40), (9,)], 30))
    assert relative_to_movement(constant[0], theirs[0], start[0]) > 0.1


def test_param_groups_hyperparameters_and_params_without_grad():
    a, b, c = make_params([(64, 70), (64, 70), (5,)])
    optimizer = PagedAdamW8bit([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 0.0, "weight_decay": 0.0}])
    optimizer.add_param_group({"params": [c], "lr": 1e-3})
    b_before, c_before = b.detach().clone(), c.detach().clone()
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    optimizer.step()
    assert torch.equal(b, b_before)  # lr 0 and no decay: untouched, though its state advanced
    assert optimizer.state[b]["step"] == 1
    assert torch.equal(c, c_before) and c not in optimizer.state  # no grad: no state, no step
    optimizer.zero_grad()
    assert a.grad is None and b.grad is None


def test_non_contiguous_parameter_updates_like_its_contiguous_copy():
    base = torch.randn(300, 64)
    strided = torch.nn.Parameter(base.clone().t())  # (64, 300), not contiguous
    contiguous = torch.nn.Parameter(base.clone().t().contiguous())
    assert not strided.is_contiguous()
    grads = gradient_sequence([(64, 300)], 5)
    run(PagedAdamW8bit([strided]), [strided], grads)
    run(PagedAdamW8bit([contiguous]), [contiguous], grads)
    assert torch.equal(strided, contiguous)


def test_step_bumps_version_counters_and_returns_closure_loss():
    params = make_params([(64, 70)])
    optimizer = PagedAdamW8bit(params)
    params[0].grad = torch.randn(64, 70)
    version = params[0]._version
    assert optimizer.step(lambda: torch.tensor(3.0)).item() == 3.0
    assert params[0]._version > version


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
        (dict(betas=(0.9,)), TypeError, "betas"),
        (dict(lr="1e-3"), TypeError, "lr"),
        (dict(min_8bit_size=-1), ValueError, "min_8bit_size"),
        (dict(page_threshold=1.5), ValueError, "page_threshold"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        PagedAdamW8bit(make_params([(4,)]), **kwargs)


def test_bad_hyperparameter_set_later_raises_at_step_and_changes_nothing():
    params = make_params([(64, 70)])
    optimizer = PagedAdamW8bit(params)
    params[0].grad = torch.randn(64, 70)
    optimizer.param_groups[0]["lr"] = -1.0
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match="lr"):
        optimizer.step()
    assert torch.equal(params[0], before) and not optimizer.state


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_trainable_parameters_of_unsupported_dtypes_raise(dtype):
    p = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    with pytest.raises(TypeError, match="params\\[0\\]"):
        PagedAdamW8bit([p])


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float64])
def test_frozen_parameters_of_any_dtype_are_kept_and_never_stepped(dtype):
    """As torch's and bitsandbytes' optimizers do: model.parameters() of a QLoRA model holds frozen uint8 storage."""
    frozen = torch.nn.Parameter(torch.ones(4, dtype=dtype), requires_grad=False)
    trainable = torch.nn.Parameter(torch.zeros(4))
    optimizer = PagedAdamW8bit([frozen, trainable])
    trainable.grad = torch.ones(4)
    optimizer.step()
    assert frozen not in optimizer.state and torch.equal(frozen, torch.ones(4, dtype=dtype))
    assert optimizer.state[trainable]["step"] == 1


def test_params_of_one_group_on_different_devices_raise():
    with pytest.raises(ValueError, match="different devices"):
        PagedAdamW8bit([torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4, device="meta"))])


def test_sparse_gradient_raises_before_touching_state():
    params = make_params([(10, 4), (64, 70)])
    optimizer = PagedAdamW8bit(params)
    params[1].grad = torch.randn(64, 70)
    params[0].grad = torch.randn(10, 4).to_sparse()
    before = params[1].detach().clone()
    with pytest.raises(TypeError, match="sparse"):
        optimizer.step()
    assert torch.equal(params[1], before) and not optimizer.state


def test_gradient_of_another_dtype_raises():
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    try:
        p.grad_dtype = None  # torch >= 2.10 refuses a float32 grad on a bfloat16 tensor unless told to allow it
        p.grad = torch.zeros(8)
    except (AttributeError, RuntimeError):
        pytest.skip("this torch cannot give a bfloat16 parameter a float32 gradient")
    with pytest.raises(TypeError, match="grad"):
        PagedAdamW8bit([p]).step()


def test_the_op_checks_its_arguments():
    p, g = torch.zeros(300), torch.zeros(300)
    m, v = torch.zeros(300, dtype=torch.uint8), torch.zeros(300, dtype=torch.uint8)
    absmax = torch.zeros(2)
    code = dynamic_map(True)
    op = torch.ops.qlora_kernels.multi_tensor_optimizer_step
    with pytest.raises(ValueError, match="exp_avg_absmaxes"):
        op("adamw", [p], [g], [m], [v], [torch.zeros(1)], [absmax], [1], 1e-3, 0.9, 0.999, 1e-8, 0.0, code, code)
    with pytest.raises(ValueError, match="steps"):
        op("adamw", [p], [g], [m], [v], [absmax], [absmax], [0], 1e-3, 0.9, 0.999, 1e-8, 0.0, code, code)
    with pytest.raises(ValueError, match="algorithm"):
        op("adam", [p], [g], [m], [v], [absmax], [absmax], [1], 1e-3, 0.9, 0.999, 1e-8, 0.0, code, code)
    with pytest.raises(ValueError, match="unsigned_code"):
        op("adamw", [p], [g], [m], [v], [absmax], [absmax], [1], 1e-3, 0.9, 0.999, 1e-8, 0.0, code, code[:10])


def test_missing_cuda_kernels_are_reported_clearly():
    from qlora_kernels.optim.optimizer import _check_cuda_kernels

    _check_cuda_kernels(torch.device("cpu"))
    if torch.ops.qlora_kernels._built_with_cuda():
        _check_cuda_kernels(torch.device("cuda"))
    else:
        with pytest.raises(RuntimeError, match="without its CUDA kernels"):
            _check_cuda_kernels(torch.device("cuda"))


# ------------------------------------------------------------------------------------------------------ NaN


@pytest.mark.parametrize("optimizer_class", [PagedAdamW8bit, PagedAdamW])
def test_nan_gradient_propagates_like_torch_adamw(optimizer_class):
    shapes = [(64, 300), (100,)]
    params = make_params(shapes)
    theirs = clone_params(params)
    grads = gradient_sequence(shapes, 2)
    for step_grads in grads:
        step_grads[0].view(-1)[5] = float("nan")
        step_grads[1][3] = float("nan")
    run(optimizer_class(params, **ADAMW), params, grads[:1])
    run(torch.optim.AdamW(theirs, **ADAMW), theirs, grads[:1])
    for p, q in zip(params, theirs):
        assert torch.equal(torch.isnan(p), torch.isnan(q))  # exactly the elements with a NaN gradient
        assert torch.isnan(p).sum() == 1
    optimizer = optimizer_class(params, **ADAMW)
    run(optimizer, params, grads)  # keeps running
    if optimizer_class is PagedAdamW8bit:  # the NaN poisons its 256-element block of the 8-bit moments
        assert torch.isnan(optimizer.state[params[0]]["exp_avg_absmax"][0])
        assert torch.isnan(params[0].view(-1)[:256]).all() and not torch.isnan(params[0].view(-1)[256:]).any()


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_extension_has_its_cuda_kernels():
    assert torch.ops.qlora_kernels._built_with_cuda(), "rebuild _C where nvcc is found (pip install -e .)"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("optimizer_class", [PagedAdamW8bit, PagedAdamW, PagedLion8bit])
def test_cuda_matches_cpu_bit_for_bit(optimizer_class, dtype):
    """The same arithmetic on both devices (no FMA contraction, IEEE sqrt and division on both)."""
    params = make_params(dtype=dtype)
    cuda_params = clone_params(params, device="cuda")
    hyper = LION if optimizer_class is PagedLion8bit else ADAMW
    grads = gradient_sequence(SHAPES, 20)
    cpu_opt, cuda_opt = optimizer_class(params, **hyper), optimizer_class(cuda_params, **hyper)
    run(cpu_opt, params, grads)
    run(cuda_opt, cuda_params, grads)
    for p, q in zip(params, cuda_params):
        assert torch.equal(p, q.cpu()), f"{tuple(p.shape)}: {(p.float() - q.cpu().float()).abs().max()}"
        for key, value in cpu_opt.state[p].items():
            if torch.is_tensor(value):
                assert torch.equal(value, cuda_opt.state[q][key].cpu()), key


@pytest.mark.gpu
def test_cuda_adamw8bit_tracks_bitsandbytes_cuda():
    assert_tracks(PagedAdamW8bit, bnb().optim.PagedAdamW8bit, ADAMW, BNB_ADAMW8_BOUND, device="cuda")


@pytest.mark.gpu
def test_cuda_lion8bit_tracks_bitsandbytes_cuda():
    assert_tracks(PagedLion8bit, bnb().optim.PagedLion8bit, LION, BNB_LION8_BOUND, device="cuda")


@pytest.mark.gpu
def test_cuda_paged_adamw_tracks_torch_adamw():
    assert_tracks(PagedAdamW, torch.optim.AdamW, ADAMW, FLOAT32_STATE_BOUND, device="cuda")


@pytest.mark.gpu
def test_cuda_state_is_paged_above_the_threshold_and_stays_paged_after_load():
    shapes = [(512, 256), (64, 64)]  # 131072 elements (paged) and 4096 (8-bit, not paged)
    params = make_params(shapes, device="cuda")
    optimizer = PagedAdamW8bit(params)
    run(optimizer, params, gradient_sequence(shapes, 2))
    big, small = (optimizer.state[p] for p in params)
    assert paged.is_paged(big["exp_avg"]) and paged.is_paged(big["exp_avg_sq"])
    assert not paged.is_paged(small["exp_avg"]) and not paged.is_paged(big["exp_avg_absmax"])

    optimizer.evict_state()  # pages go to the host; the next step brings them back
    run(optimizer, params, gradient_sequence(shapes, 1, seed=7))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = clone_params(params)
    resumed = PagedAdamW8bit(resumed_params)
    resumed.load_state_dict(torch.load(buffer, map_location="cpu"))
    assert paged.is_paged(resumed.state[resumed_params[0]]["exp_avg"])
    assert torch.equal(resumed.state[resumed_params[0]]["exp_avg"], big["exp_avg"])
    grads = gradient_sequence(shapes, 3, seed=9)
    run(optimizer, params, grads)
    run(resumed, resumed_params, grads)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


@pytest.mark.gpu
def test_cuda_step_is_one_launch_per_group_without_host_sync():
    shapes = [(16, 4096), (4096, 16)] * 20 + [(300,)] * 5
    params = make_params(shapes, device="cuda", dtype=torch.bfloat16)
    groups = [{"params": params[:30]}, {"params": params[30:], "lr": 1e-4}]
    optimizer = PagedAdamW8bit(groups)
    grads = gradient_sequence(shapes, 2)
    run(optimizer, params, grads[:1])  # first step allocates the state
    for p, g in zip(params, grads[1]):
        p.grad = g.to(device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    launches = [e for e in profile.events() if "multi_tensor_step_kernel" in e.name]
    assert len(launches) == len(groups)


@pytest.mark.gpu
def test_cuda_state_follows_the_parameter_to_the_gpu():
    """Optimizer built on CPU parameters that later move to the GPU (model.cuda() keeps the Parameter objects)."""
    shapes = [(512, 256), (100,)]
    params = make_params(shapes)
    reference_params = clone_params(params, device="cuda")
    optimizer = PagedAdamW8bit(params)
    reference = PagedAdamW8bit(reference_params)
    grads = gradient_sequence(shapes, 4)
    run(optimizer, params, grads[:2])
    run(reference, reference_params, grads[:2])
    for p in params:
        p.data = p.data.cuda()
    run(optimizer, params, grads[2:])
    run(reference, reference_params, grads[2:])
    state = optimizer.state[params[0]]
    assert state["exp_avg"].is_cuda and paged.is_paged(state["exp_avg"]) and state["exp_avg_absmax"].is_cuda
    for p, q in zip(params, reference_params):
        assert torch.equal(p, q)


@pytest.mark.gpu
def test_cuda_nan_gradient_propagates_like_torch_adamw():
    params = make_params([(64, 300)], device="cuda")
    theirs = clone_params(params)
    grad = torch.randn(64, 300)
    grad[3, 4] = float("nan")
    run(PagedAdamW8bit(params), params, [[grad]])
    run(torch.optim.AdamW(theirs), theirs, [[grad]])
    assert torch.equal(torch.isnan(params[0]), torch.isnan(theirs[0]))
    assert math.isnan(params[0][3, 4].item())
