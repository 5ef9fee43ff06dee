"""Property-based hostile input (issue 12): hypothesis generates NF4 checkpoints, corrupts one entry in one of many
ways (stride-0 and strided views, truncation, padding, wrong dtypes, non-finite statistics, quant-state JSON fields
of the wrong type or value, non-tensors, benign reshapes) and loads them through both backends.

The property: a ValueError or TypeError that names the corrupted entry, raised before any kernel runs; or, when the
corruption is harmless (a [blocks, 1] absmax, a float dtype named in the JSON), exactly the right numbers. Never
another exception, never a crash, never a wrong number. Budget: well under a minute on 2 cores."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import qlora_kernels as qk  # noqa: E402

from helpers import interpreting  # noqa: E402

QS = "weight.quant_state.bitsandbytes__nf4"
BACKENDS = ["torch"] + (["triton"] if interpreting() or torch.cuda.is_available() else [])
TENSOR_KEYS = ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map"]
# Which words an error about each entry must contain (the argument's name as the storage check spells it).
NAMES = {
    "weight": ("packed", "'weight'"),
    "weight.absmax": ("absmax",),
    "weight.quant_map": ("quant_map",),
    "weight.nested_absmax": ("nested_absmax", "double-quantized"),
    "weight.nested_quant_map": ("nested_quant_map", "double-quantized"),
    QS: (QS, "nested_offset", "offset", "blocksize", "shape", "dtype", "absmax", "packed"),
}

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=5),
    st.lists(st.integers(-5, 2**40), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@contextmanager
def _backend(name: str):
    old = os.environ.get("QLORA_KERNELS_BACKEND")
    os.environ["QLORA_KERNELS_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("QLORA_KERNELS_BACKEND", None)
        else:
            os.environ["QLORA_KERNELS_BACKEND"] = old


def _corrupt(draw, sd: dict, double_quant: bool):
    """(corrupted state dict, the entry touched)."""
    keys = [k for k in TENSOR_KEYS if double_quant or "nested" not in k]
    kind = draw(st.sampled_from(
        ["stride0", "strided", "transposed", "truncate", "pad", "dtype", "nonfinite", "negative", "non_tensor",
         "drop", "column", "json_field", "json_drop", "json_blob", "json_float_dtype"]
    ))
    out = dict(sd)
    if kind.startswith("json"):
        meta = json.loads(bytes(sd[QS].tolist()))
        field = draw(st.sampled_from(sorted(meta)))
        if kind == "json_field":
            value = draw(JSON_VALUES)
            if value == meta[field] and type(value) is type(meta[field]):
                value = [value]  # make sure it changed
            if field == "nested_offset" and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)  # another finite offset is another valid checkpoint, not a corruption
            meta[field] = value
        elif kind == "json_drop":
            meta.pop(field)
        elif kind == "json_float_dtype":
            dtype = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
            meta["dtype"] = dtype
            out[QS] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
            return out, QS
        if kind == "json_blob":
            blob = draw(st.binary(max_size=40))
            out[QS] = torch.tensor(list(blob), dtype=torch.uint8)
        else:
            out[QS] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        return out, QS
    key = draw(st.sampled_from(keys))
    t = sd[key]
    flat = t.reshape(-1)
    if kind == "stride0":
        if t.numel() < 2:
            kind = "truncate"
        else:
            out[key] = flat[:1].expand(t.numel()).reshape(t.shape)
    if kind == "strided":
        if t.numel() < 2:
            kind = "pad"
        else:
            out[key] = torch.stack([flat, flat], 1).reshape(-1)[::2].reshape(t.shape)
    if kind == "transposed":
        if t.numel() % 2 or t.numel() < 4:
            kind = "pad"
        else:
            out[key] = flat.reshape(2, -1).t()
    if kind == "truncate":
        out[key] = flat[: draw(st.integers(0, max(0, t.numel() - 1)))]
    if kind == "pad":
        out[key] = torch.cat([flat, flat[:1].repeat(draw(st.integers(1, 300)))])
    if kind == "dtype":
        dtype = draw(st.sampled_from([d for d in (torch.uint8, torch.float16, torch.float64, torch.int32) if d != t.dtype]))
        out[key] = t.to(dtype)
    if kind in ("nonfinite", "negative"):
        if not t.is_floating_point() or key == "weight":
            return _corrupt(draw, sd, double_quant)
        bad = flat.clone()
        index = draw(st.integers(0, bad.numel() - 1))
        bad[index] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")])) if kind == "nonfinite" else -1.0
        if kind == "negative" and key in ("weight.quant_map", "weight.nested_quant_map"):
            # a changed codebook entry is refused as "not the NF4 codebook" (quant_map) or accepted as a custom
            # nested map whose numbers we cannot predict: only quant_map is a defined corruption here
            if key == "weight.nested_quant_map":
                return _corrupt(draw, sd, double_quant)
        out[key] = bad.reshape(t.shape)
    if kind == "non_tensor":
        out[key] = draw(st.sampled_from([None, 3, [1, 2], "absmax"]))
    if kind == "drop":
        out.pop(key)
    if kind == "column":
        out[key] = flat.reshape(-1, 1)  # harmless: right count and order, other shape
        return out, key
    return out, key


@st.composite
def corrupted_checkpoints(draw):
    rows = draw(st.integers(1, 9))
    cols = draw(st.integers(1, 300))
    blocksize = draw(st.sampled_from([32, 64, 128]))
    double_quant = draw(st.booleans())
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    w4 = qk.NF4Weight.quantize(weight, blocksize=blocksize, double_quant=double_quant)
    corrupted, key = _corrupt(draw, w4.state_dict("weight"), double_quant)
    return w4, corrupted, key


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(corrupted_checkpoints(), st.sampled_from(BACKENDS))
def test_corrupted_checkpoints_are_refused_by_name_or_load_right(case, backend):
    w4, corrupted, key = case
    with _backend(backend):
        try:
            loaded = qk.NF4Weight.from_state_dict(corrupted, "weight")
            values = loaded.dequantize(torch.float32)
        except (ValueError, TypeError) as exc:
            message = str(exc)
            assert any(name in message for name in NAMES[key]), f"error about {key!r} does not name it: {message}"
            return
    # Loaded: then the change was harmless (a [blocks, 1] absmax, an optional JSON field dropped for its default, a
    # float dtype name, a shape of the same element count) and the numbers must be exactly the original ones.
    assert torch.equal(values.reshape(-1), w4.dequantize(torch.float32).reshape(-1)), f"{key!r} changed the numbers"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    st.integers(1, 5), st.integers(1, 130), st.sampled_from([32, 64]), st.booleans(), st.sampled_from(BACKENDS),
    st.sampled_from(["row_stride", "col_stride", "expanded", "leading_dims"]),
)
def test_strided_and_broadcast_activations_give_the_right_numbers(m, k, blocksize, double_quant, backend, layout):
    """The README promises x of any strides: every layout gives the contiguous input's result (to float32 rounding:
    a GEMM library may order a transposed operand's sums differently)."""
    g = torch.Generator().manual_seed(m * 1000 + k)
    w4 = qk.NF4Weight.quantize(torch.randn(7, k, generator=g), blocksize=blocksize, double_quant=double_quant)
    a, b = torch.randn(3, k, generator=g), torch.randn(7, 3, generator=g)
    base = torch.randn(m, k, generator=g)
    if layout == "row_stride":
        x = torch.stack([base, base], -1).reshape(m, 2 * k)[:, ::2]
    elif layout == "col_stride":
        x = base.t().contiguous().t()
    elif layout == "expanded":
        base = base[:1].expand(m, k)
        x = base
    else:
        x = base.reshape(1, m, k)
    with _backend(backend):
        got = qk.nf4_lora_linear(x, w4, a, b, 0.5)
        want = qk.nf4_lora_linear(base.contiguous(), w4, a, b, 0.5)
    torch.testing.assert_close(got.reshape(m, 7), want, rtol=1e-5, atol=1e-5)
