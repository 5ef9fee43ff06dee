"""Hostile and careless use of the paged optimizers (issue 12's optimizer findings, issue 16's drop-in call).

Each test here failed before its fix: an infinite gradient under Lion (finite, as bitsandbytes), flags of torch's optimizers silently ignored,
states of another optimizer accepted, duplicate parameters raced, NaN/negative statistics and absurd steps loaded,
hyperparameters beyond float32, deepcopy/pickle that could not step, a QLoRA model's ``model.parameters()`` refused,
bitsandbytes' keyword arguments unknown. A property-based test then mutates a good state dict at random: loading
must raise a ValueError/TypeError, or load a state that steps exactly like the original.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_kernels.optim import PagedAdamW, PagedAdamW8bit, PagedLion, PagedLion8bit
from qlora_kernels.optim import reference as optim_reference

ALL = [PagedAdamW8bit, PagedAdamW, PagedLion8bit, PagedLion]


def params_of(shapes, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype) * 0.1) for s in shapes]


def set_grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)


def trained(optimizer_class, shapes=((64, 80), (33,)), steps=2, **kwargs):
    params = params_of(shapes)
    optimizer = optimizer_class(params, **kwargs)
    for seed in range(steps):
        set_grads(params, seed)
        optimizer.step()
    return params, optimizer


# ------------------------------------------------------------------------------------------ non-finite gradients


@pytest.mark.parametrize("infinity", [float("inf"), float("-inf")])
@pytest.mark.parametrize("optimizer_class", [PagedLion8bit, PagedLion])
def test_lion_infinite_gradient_stays_finite_like_bitsandbytes(optimizer_class, infinity):
    """Before: one infinite gradient element left an infinite momentum, whose 8-bit block decoded to NaN a step
    later: 256 parameters NaN for good, where bitsandbytes' Lion8bit and Lion stay finite. Now the element takes the
    finite sign step, its momentum is held at the float32 limit, every parameter stays finite over later steps, and
    the kernel matches the reference bit for bit."""
    p = torch.nn.Parameter(torch.randn(4096) * 0.1)
    reference_p = p.detach().clone()
    before = p.detach().clone()
    optimizer = optimizer_class([p], lr=1e-3, weight_decay=0.1)
    reference_state = {}
    optimizer._init_state(p.detach(), reference_state)
    for step in range(3):
        grad = torch.randn(4096, generator=torch.Generator().manual_seed(step))
        if step == 0:
            grad[5] = infinity
        p.grad = grad
        optimizer.step()
        optim_reference.lion_step(reference_p, grad, reference_state, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
        assert torch.isfinite(p).all(), f"step {step}: {int((~torch.isfinite(p)).sum())} parameters not finite"
        torch.testing.assert_close(p.detach(), reference_p, rtol=0, atol=0)  # bit for bit
        if step == 0:
            sign = 1.0 if infinity > 0 else -1.0
            expected = before[5] * torch.tensor(1.0 - 1e-3 * 0.1) - torch.tensor(1e-3) * sign
            assert p[5].item() == expected.item()
    state = optimizer.state[p]
    moments = state["exp_avg_absmax"] if optimizer_class is PagedLion8bit else state["exp_avg"]
    assert torch.isfinite(moments).all()


def test_lion_nan_gradient_makes_its_parameter_nan():
    """A NaN gradient element is not a direction: its parameter becomes NaN (as torch's AdamW makes it), the others
    keep stepping."""
    p = torch.nn.Parameter(torch.randn(512))
    optimizer = PagedLion([p], lr=1e-3)
    grad = torch.randn(512)
    grad[7] = float("nan")
    p.grad = grad
    optimizer.step()
    assert torch.isnan(p[7]) and int(torch.isnan(p).sum()) == 1


# ------------------------------------------------------------------------------------------ torch's flags


@pytest.mark.parametrize("flag", ["maximize", "amsgrad"])
def test_flags_of_torch_adamw_are_refused_not_ignored(flag):
    params = params_of([(64, 30)])
    theirs = torch.optim.AdamW(params, lr=1e-2, **{flag: True})
    set_grads(params, 0)
    theirs.step()
    target = PagedAdamW(params_of([(64, 30)]))
    with pytest.raises(ValueError, match=flag):
        target.load_state_dict(theirs.state_dict())
    assert not target.state
    with pytest.raises(ValueError, match=flag):
        PagedAdamW8bit(params_of([(4,)]), **{flag: True})
    with pytest.raises(ValueError, match=flag):
        PagedAdamW(params_of([(4,)])).add_param_group({"params": params_of([(3,)]), flag: True})


def test_torch_adam_with_coupled_weight_decay_is_refused():
    params = params_of([(8, 8)])
    theirs = torch.optim.Adam(params, lr=1e-2, weight_decay=0.1)
    set_grads(params, 0)
    theirs.step()
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        PagedAdamW(params_of([(8, 8)])).load_state_dict(theirs.state_dict())


# ------------------------------------------------------------------------------------------ foreign states


@pytest.mark.parametrize(
    "saved_by, loaded_by",
    [(PagedAdamW, PagedLion), (PagedLion, PagedAdamW), (PagedAdamW8bit, PagedLion8bit), (PagedLion8bit, PagedLion),
     (PagedAdamW, PagedAdamW8bit)],
)
def test_state_saved_by_another_optimizer_is_refused(saved_by, loaded_by):
    # Tiny parameters: 32-bit state everywhere, so only the class tells the two apart for (PagedAdamW, PagedAdamW8bit).
    _, optimizer = trained(saved_by, shapes=[(7, 5)])
    target = loaded_by(params_of([(7, 5)]))
    with pytest.raises(ValueError, match=f"saved by {saved_by.__name__}"):
        target.load_state_dict(optimizer.state_dict())
    assert not target.state


def test_untagged_state_with_entries_this_optimizer_does_not_keep_is_refused():
    """A torch.optim.AdamW state (no class tag) loads into PagedAdamW, but not into Lion (exp_avg_sq), and an SGD
    state neither (no betas; given betas, its momentum_buffer)."""
    params = params_of([(7, 5)])
    theirs = torch.optim.AdamW(params)
    set_grads(params, 0)
    theirs.step()
    PagedAdamW(params_of([(7, 5)])).load_state_dict(theirs.state_dict())
    with pytest.raises(ValueError, match="exp_avg_sq"):
        PagedLion(params_of([(7, 5)])).load_state_dict(theirs.state_dict())
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sgd.step()
    with pytest.raises(ValueError, match="needs 'betas'"):
        PagedLion(params_of([(7, 5)])).load_state_dict(sgd.state_dict())
    sgd_state = sgd.state_dict()
    sgd_state["param_groups"][0].update(betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="momentum_buffer"):
        PagedLion(params_of([(7, 5)])).load_state_dict(sgd_state)


# ------------------------------------------------------------------------------------------ duplicates


def test_duplicate_parameters_are_refused():
    p, q = params_of([(300,), (3,)])
    with pytest.raises(ValueError, match=r"params\[2\].*params\[0\]"):
        PagedAdamW8bit([p, q, p])
    optimizer = PagedAdamW8bit([p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        optimizer.add_param_group({"params": [p]})
    assert len(optimizer.param_groups) == 1


def test_parameters_sharing_memory_are_refused_at_step():
    base = torch.randn(600)
    first, second = torch.nn.Parameter(base[:400]), torch.nn.Parameter(base[300:])  # overlapping views
    disjoint = torch.nn.Parameter(torch.randn(1000)[500:])  # a view of another tensor: fine
    optimizer = PagedAdamW8bit([disjoint, first, second], min_8bit_size=100)
    for p in (first, second, disjoint):
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"params\[1\] and params\[2\].*share memory"):
        optimizer.step()
    assert not optimizer.state and torch.equal(base[:400], first)
    second.grad = None
    optimizer.step()  # one of them at a time is fine
    assert set(optimizer.state) == {first, disjoint}


# ------------------------------------------------------------------------------------------ loaded statistics


@pytest.mark.parametrize(
    "optimizer_class, key, index, value",
    [
        (PagedAdamW, "exp_avg", 3, float("nan")),
        (PagedAdamW, "exp_avg", 3, float("inf")),
        (PagedAdamW, "exp_avg_sq", 3, -1e-3),
        (PagedAdamW, "exp_avg_sq", 0, float("nan")),
        (PagedAdamW8bit, "exp_avg_absmax", 1, float("nan")),
        (PagedAdamW8bit, "exp_avg_sq_absmax", 0, -1.0),
        (PagedLion8bit, "exp_avg_absmax", 0, float("inf")),
        (PagedLion, "exp_avg", 0, float("-inf")),
    ],
)
def test_nonfinite_or_negative_statistics_are_refused(optimizer_class, key, index, value):
    _, optimizer = trained(optimizer_class, shapes=[(64, 80)])
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][0][key].view(-1)[index] = value
    target = optimizer_class(params_of([(64, 80)]))
    with pytest.raises(ValueError, match=key):
        target.load_state_dict(saved)
    assert not target.state


@pytest.mark.parametrize("step", [1e30, 2**62, -1, 2.5, float("nan"), "3", True, torch.tensor([1.0, 2.0])])
def test_bad_step_counts_are_refused_at_load(step):
    _, optimizer = trained(PagedAdamW8bit)
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][0]["step"] = step
    with pytest.raises(ValueError, match="step"):
        PagedAdamW8bit(params_of([(64, 80), (33,)])).load_state_dict(saved)


def test_step_count_set_out_of_range_is_refused_before_it_is_incremented():
    params, optimizer = trained(PagedAdamW8bit)
    optimizer.state[params[0]]["step"] = 10**30
    before = [p.detach().clone() for p in params]
    set_grads(params, 7)
    with pytest.raises(ValueError, match="step"):
        optimizer.step()
    assert optimizer.state[params[0]]["step"] == 10**30 and optimizer.state[params[1]]["step"] == 2
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_a_step_the_extension_refuses_leaves_the_step_counts_alone():
    """beta1 = 1 - 1e-12 and lr = 1e30: lr / (1 - beta1^1) overflows float32; the op refuses, nothing advances."""
    params, optimizer = trained(PagedAdamW8bit)
    optimizer.param_groups[0]["lr"] = 1e30
    optimizer.param_groups[0]["betas"] = (1 - 1e-12, 0.999)
    optimizer.state[params[0]]["step"] = 0
    set_grads(params, 3)
    with pytest.raises(ValueError, match="float32"):
        optimizer.step()
    assert optimizer.state[params[0]]["step"] == 0 and optimizer.state[params[1]]["step"] == 2


# ------------------------------------------------------------------------------------------ float32 range


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(lr=1e39), "lr"), (dict(eps=1e39), "eps"), (dict(weight_decay=1e39), "weight_decay"),
     (dict(lr=1e20, weight_decay=1e20), "lr \\* weight_decay")],
)
def test_hyperparameters_beyond_float32_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW8bit(params_of([(4,)]), **kwargs)
    params, optimizer = trained(PagedAdamW8bit)
    before = [p.detach().clone() for p in params]
    optimizer.param_groups[0].update(kwargs)
    set_grads(params, 5)
    with pytest.raises(ValueError, match=match):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_the_op_refuses_values_beyond_float32():
    op = torch.ops.qlora_kernels.multi_tensor_optimizer_step
    p, g, m, v = torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3)
    code = torch.zeros(256)
    with pytest.raises(ValueError, match="float32"):
        op("adamw", [p], [g], [m], [v], [torch.empty(0)], [torch.empty(0)], [1], 1e39, 0.9, 0.999, 1e-8, 0.0, code,
           code)
    with pytest.raises(ValueError, match="float32"):
        op("lion", [p], [g], [m], [], [torch.empty(0)], [], [1], 1e20, 0.9, 0.99, 0.0, 1e20, code, code)


# ------------------------------------------------------------------------------------------ copies


@pytest.mark.parametrize("optimizer_class", ALL)
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_an_optimizer_step_like_the_original(optimizer_class, how):
    """Before, a deepcopied, pickled or torch.save'd optimizer failed at step() ('_empty_cache')."""
    params, optimizer = trained(optimizer_class, shapes=[(64, 80), (33,)], min_8bit_size=1000)
    model = torch.nn.ParameterList(params)
    if how == "deepcopy":
        model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    elif how == "pickle":
        model_copy, optimizer_copy = pickle.loads(pickle.dumps((model, optimizer)))
    else:
        buffer = io.BytesIO()
        torch.save((model, optimizer), buffer)
        buffer.seek(0)
        model_copy, optimizer_copy = torch.load(buffer, weights_only=False)
    assert optimizer_copy.min_8bit_size == 1000
    for ps, opt in ((list(model), optimizer), (list(model_copy), optimizer_copy)):
        set_grads(ps, 11)
        opt.step()
    for p, q in zip(model, model_copy):
        assert torch.equal(p, q)
    assert optimizer_copy.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


# ------------------------------------------------------------------------------------------ odd groups and tensors


def test_empty_groups_zero_element_and_non_contiguous_tensors():
    empty = torch.nn.Parameter(torch.zeros(0, 7))
    weight = torch.nn.Parameter(torch.randn(80, 64).t())  # (64, 80), not contiguous
    twin = torch.nn.Parameter(weight.detach().contiguous())
    optimizer = PagedAdamW8bit([{"params": []}, {"params": [empty, weight]}])
    optimizer.add_param_group({"params": []})
    other = PagedAdamW8bit([twin])
    for seed in range(3):
        grad = torch.randn(80, 64, generator=torch.Generator().manual_seed(seed)).t()  # non-contiguous grad
        weight.grad, twin.grad, empty.grad = grad, grad.contiguous(), torch.zeros(0, 7)
        optimizer.step()
        other.step()
    assert torch.equal(weight, twin) and not weight.is_contiguous()
    assert optimizer.state[empty]["step"] == 3
    PagedAdamW8bit([{"params": []}, {"params": [empty, weight]}, {"params": []}]).load_state_dict(
        optimizer.state_dict()
    )


def test_frozen_parameters_on_another_device_are_accepted():
    trainable = torch.nn.Parameter(torch.randn(10))
    frozen = torch.nn.Parameter(torch.zeros(10, device="meta"), requires_grad=False)
    optimizer = PagedAdamW([trainable, frozen])
    trainable.grad = torch.randn(10)
    optimizer.step()
    assert frozen not in optimizer.state


# ------------------------------------------------------------------------------------------ issue 16: drop-in


def test_model_parameters_of_a_bitsandbytes_qlora_model():
    """The README's line on a model whose frozen uint8 4-bit storage is in model.parameters(): before, TypeError."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    base = base.to("cpu")  # bitsandbytes quantizes at the move to a device
    model = torch.nn.ModuleDict({"base": base, "lora_A": torch.nn.Linear(64, 8, bias=False),
                                 "lora_B": torch.nn.Linear(8, 64, bias=False)})
    model.requires_grad_(False)
    model["lora_A"].requires_grad_(True)
    model["lora_B"].requires_grad_(True)
    assert any(p.dtype == torch.uint8 for p in model.parameters())
    packed_before = base.weight.detach().clone()
    optimizer = PagedAdamW8bit(model.parameters(), lr=2e-4)
    x = torch.randn(4, 64)
    for _ in range(2):
        loss = (base(x) + model["lora_B"](model["lora_A"](x))).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(base.weight, packed_before)
    assert set(optimizer.state) == {model["lora_A"].weight, model["lora_B"].weight}


def test_a_trainable_parameter_of_an_unsupported_dtype_is_still_refused():
    with pytest.raises(TypeError, match=r"params\[1\].*float64"):
        PagedAdamW8bit([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])


BNB_TWINS = [("PagedAdamW", PagedAdamW), ("PagedAdamW8bit", PagedAdamW8bit), ("PagedLion", PagedLion),
             ("PagedLion8bit", PagedLion8bit)]


@pytest.mark.parametrize("bnb_name, ours", BNB_TWINS)
def test_bitsandbytes_signature_is_accepted_with_its_defaults(bnb_name, ours):
    """Every parameter of bitsandbytes' class, by keyword and by position, at bitsandbytes' defaults."""
    bnb = pytest.importorskip("bitsandbytes")
    signature = inspect.signature(getattr(bnb.optim, bnb_name).__init__)
    defaults = {n: p.default for n, p in signature.parameters.items() if n not in ("self", "params")}
    ours_names = [n for n in inspect.signature(ours.__init__).parameters if n not in ("self", "params")]
    assert ours_names[: len(defaults)] == list(defaults), "positional order differs from bitsandbytes'"
    p = torch.nn.Parameter(torch.randn(5000))
    for optimizer in (ours([p], **defaults), ours([p], *defaults.values())):
        p.grad = torch.randn(5000)
        optimizer.step()
        assert optimizer.param_groups[0]["lr"] == defaults["lr"]
        want_8bit = bnb_name.endswith("8bit")
        assert (optimizer.state[p]["exp_avg"].dtype == torch.uint8) == want_8bit


def test_bitsandbytes_options_are_honoured_or_refused():
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    optimizer = PagedAdamW([p], optim_bits=8, min_8bit_size=100, is_paged=False)
    optimizer.step()
    assert optimizer.state[p]["exp_avg"].dtype == torch.uint8 and optimizer.page_threshold is None
    lion = PagedLion([p], optim_bits=8)
    lion.step()
    assert lion.state[p]["exp_avg"].dtype == torch.uint8
    for kwargs, name in [
        (dict(percentile_clipping=5), "percentile_clipping"), (dict(block_wise=False), "block_wise"),
        (dict(amsgrad=True), "amsgrad"), (dict(args=object()), "args"), (dict(max_unorm=1.0), "max_unorm"),
        (dict(skip_zeros=True), "skip_zeros"), (dict(maximize=True), "maximize"), (dict(optim_bits=4), "optim_bits"),
    ]:
        with pytest.raises(ValueError, match=name):
            PagedAdamW8bit([p], **kwargs)
    with pytest.raises(TypeError, match="is_paged"):
        PagedLion8bit([p], is_paged="no")


# ------------------------------------------------------------------------------------------ property-based

SHAPES = [(40, 30), (9,)]  # 8-bit state for the first (min_8bit_size=1000 below), float32 for the second


def fresh(seed=3):
    params = params_of(SHAPES, seed=seed)
    return params, PagedAdamW8bit(params, min_8bit_size=1000)


_GOOD = {}


def good_state_dict():
    if not _GOOD:
        params, optimizer = fresh(seed=0)
        for seed in range(2):
            set_grads(params, seed)
            optimizer.step()
        _GOOD["state_dict"] = optimizer.state_dict()
    return copy.deepcopy(_GOOD["state_dict"])


TENSOR_MUTATIONS = st.one_of(
    st.tuples(st.just("value"), st.sampled_from([float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e30, 255.0])),
    st.tuples(st.just("numel"), st.integers(min_value=0, max_value=1300)),
    st.tuples(st.just("dtype"), st.sampled_from([torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool])),
    st.tuples(st.just("drop"), st.none()),
    st.tuples(st.just("strided"), st.none()),
    st.tuples(st.just("broadcast"), st.none()),
)
STEPS = st.one_of(st.integers(min_value=-5, max_value=2**64), st.floats(), st.none(), st.text(max_size=3),
                  st.booleans())
GROUP_CHANGES = st.sampled_from([("lr", -1.0), ("lr", 1e39), ("lr", 3e-4), ("betas", (1.0, 0.5)), ("eps", "x"),
                                 ("weight_decay", float("nan")), ("params", [0, 0]), ("params", [0]),
                                 ("maximize", True), ("maximize", False), ("amsgrad", True)])


def mutate_tensor(tensor, kind, value):
    if kind == "value":
        tensor = tensor.clone()
        flat = tensor.view(-1)
        flat[0] = value if tensor.is_floating_point() else int(min(max(value, 0), 255)) if value == value else 0
        return tensor
    if kind == "numel":
        return torch.zeros(value, dtype=tensor.dtype)
    if kind == "dtype":
        return tensor.to(value)
    if kind == "strided":  # the same values through a non-contiguous view
        return torch.stack([tensor, tensor], dim=-1)[..., 0]
    return tensor.view(-1)[:1].expand(tensor.numel())  # "broadcast": a stride-0 view of the first value


@settings(max_examples=120, deadline=None)
@given(
    param_id=st.sampled_from([0, 1]),
    key=st.sampled_from(["exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"]),
    tensor_mutation=st.none() | TENSOR_MUTATIONS,
    step=st.none() | STEPS.map(lambda s: ("step", s)),
    group_change=st.none() | GROUP_CHANGES,
)
def test_mutated_state_dicts_are_refused_or_step_like_the_reference(param_id, key, tensor_mutation, step,
                                                                     group_change):
    """Either a ValueError/TypeError with nothing loaded, or a state equal to what the dict says that steps
    bit for bit like the pure-torch reference from that same state, to finite parameters."""
    saved = good_state_dict()
    state = saved["state"][param_id]
    if tensor_mutation is not None:
        kind, value = tensor_mutation
        if kind == "drop":
            state.pop(key, None)
        elif key in state:
            state[key] = mutate_tensor(state[key], kind, value)
        else:  # an absmax for a float32 moment: an entry this state does not have
            state[key] = torch.zeros(1)
    if step is not None:
        state["step"] = step[1]
    if group_change is not None:
        saved["param_groups"][0][group_change[0]] = group_change[1]
    params, target = fresh()
    try:
        target.load_state_dict(saved)
    except (ValueError, TypeError):
        assert not target.state
        return
    group = target.param_groups[0]
    references = []
    for i, p in enumerate(params):
        loaded = target.state[p]
        assert loaded["step"] == saved["state"][i]["step"]
        for name, value in loaded.items():
            if torch.is_tensor(value):
                assert value.is_contiguous()
                assert torch.equal(value.view(-1), saved["state"][i][name].reshape(-1).to(value.dtype))
        references.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in loaded.items()}, p.detach().clone()))
    set_grads(params, 9)
    target.step()
    for p, (reference_state, reference_p) in zip(params, references):
        optim_reference.adamw_step(reference_p, p.grad, reference_state, lr=group["lr"], betas=group["betas"],
                                   eps=group["eps"], weight_decay=group["weight_decay"])
        assert torch.equal(p.detach(), reference_p) and torch.isfinite(p).all()
