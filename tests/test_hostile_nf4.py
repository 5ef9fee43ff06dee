"""Hostile and careless NF4 input (issue 12): malformed checkpoints, strided and broadcast views, mutated weights,
direct op calls. Each case either raises a ValueError/TypeError naming what is wrong before any kernel runs, or
gives the correct result; never a crash, never a wrong number. Both backends: the torch reference and the Triton
kernels (through the interpreter on CPU)."""

from __future__ import annotations

import json

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import reference

QS = "weight.quant_state.bitsandbytes__nf4"


def _state(rows=6, cols=100, double_quant=True, blocksize=64):
    w = torch.randn(rows, cols)
    return w, qk.NF4Weight.quantize(w, blocksize=blocksize, double_quant=double_quant).state_dict("weight")


def _with_meta(sd, **changes):
    meta = json.loads(bytes(sd[QS].tolist()))
    for key, value in changes.items():
        if value is _DROP:
            meta.pop(key)
        else:
            meta[key] = value
    out = dict(sd)
    out[QS] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


_DROP = object()


# ------------------------------------------------------------------------------------ out-of-bounds reads


@pytest.mark.parametrize("key", ["weight.absmax", "weight", "weight.nested_absmax", "weight.nested_quant_map"])
def test_stride0_view_in_a_checkpoint_is_refused(key, tmp_path):
    _, sd = _state(rows=8, cols=4096)  # 512 blocks: two nested blocks
    t = sd[key]
    sd[key] = t.reshape(-1)[:1].expand(t.numel()).reshape(t.shape)  # right count, stride 0: reads past 1 element
    path = tmp_path / "ckpt.pt"
    torch.save(sd, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded[key].stride()[0] == 0  # the view survives a weights_only load
    name = {"weight": "packed"}.get(key, key.removeprefix("weight."))
    with pytest.raises(ValueError, match=f"{name} must be a contiguous"):
        qk.NF4Weight.from_state_dict(loaded, "weight")


def test_in_bounds_strided_view_is_refused_not_read_in_the_wrong_order():
    _, sd = _state(double_quant=False)
    absmax = sd["weight.absmax"]
    wide = torch.stack([absmax, torch.full_like(absmax, 1e6)], dim=1).reshape(-1)
    sd["weight.absmax"] = wide[::2]  # the same values, every other element: stride 2
    assert torch.equal(sd["weight.absmax"], absmax)
    with pytest.raises(ValueError, match="absmax must be a contiguous"):
        qk.NF4Weight.from_state_dict(sd, "weight")
    with pytest.raises(ValueError, match="absmax must be a contiguous"):
        qk.NF4Weight.from_state_dict({**sd, "weight.absmax": absmax.reshape(2, -1).t()}, "weight")


def test_qlora_linear_load_state_dict_refuses_a_strided_absmax():
    layer = qk.QLoRALinear.from_linear(torch.nn.Linear(100, 6))
    sd = layer.state_dict()
    a = sd["weight.absmax"]
    sd["weight.absmax"] = a[:1].expand(a.numel())
    with pytest.raises(RuntimeError, match="absmax must be a contiguous"):
        layer.load_state_dict(sd)


@pytest.mark.parametrize("field", ["packed", "absmax", "nested_absmax", "offset", "shape", "blocksize"])
def test_weight_fields_cannot_be_replaced_after_validation(field):
    w4 = qk.NF4Weight.quantize(torch.randn(6, 600))
    short = torch.zeros(1, dtype=getattr(getattr(w4, field), "dtype", torch.uint8))
    with pytest.raises(AttributeError, match="immutable"):
        setattr(w4, field, short)
    assert getattr(w4, field) is not short


def test_a_buffer_swapped_on_the_layer_is_revalidated_before_use(backend, device):
    layer = qk.QLoRALinear.from_linear(torch.nn.Linear(600, 6)).to(device)
    layer.weight_nested_absmax = layer.weight_nested_absmax[:0]  # shorter than the weight needs
    with pytest.raises(ValueError, match="nested_absmax must be float32"):
        layer(torch.randn(2, 600, device=device))


@pytest.mark.parametrize("op", ["dequantize", "linear"])
def test_direct_op_calls_check_the_storage(op, backend, device):
    """torch.ops.qlora_kernels.* below the public API: a short absmax or a strided packed never reaches a kernel."""
    w4 = qk.NF4Weight.quantize(torch.randn(8, 192, device=device), double_quant=False)
    cases = {
        "short absmax": (w4.packed_bytes(), w4.absmax[:-1], "absmax must be float32 \\[24\\]"),
        "strided packed": (
            torch.stack([w4.packed_bytes(), w4.packed_bytes()], 1).reshape(-1)[::2], w4.absmax, "packed must be a contiguous"
        ),
        "short packed": (w4.packed_bytes()[:-1], w4.absmax, "packed must hold"),
    }
    for packed, absmax, message in cases.values():
        with pytest.raises(ValueError, match=message):
            if op == "dequantize":
                torch.ops.qlora_kernels.dequantize_nf4(packed, absmax, None, None, None, 64, [8, 192], torch.float32)
            else:
                x = torch.randn(3, 192, device=device)
                a, b = torch.randn(4, 192, device=device), torch.randn(8, 4, device=device)
                torch.ops.qlora_kernels.nf4_lora_linear_fwd(x, packed, absmax, None, None, None, 64, a, b, 1.0, None, 0.0, None)


# ----------------------------------------------------------------------------------------- silently wrong


def test_absmax_shaped_blocks_by_one_decodes_per_block(backend, device):
    """[blocks, 1] with the right element count: each block keeps its own absmax (it used to broadcast)."""
    w = torch.randn(4, 256, device=device)
    w4 = qk.NF4Weight.quantize(w, double_quant=False)
    expected = w4.dequantize()
    column = qk.NF4Weight(w4.packed, w4.absmax.reshape(-1, 1), w4.shape, w4.dtype, 64)
    assert torch.equal(column.dequantize(), expected)
    flat = reference.dequantize_nf4(w4.packed, w4.absmax.reshape(-1, 1), None, None, 64, (4, 256), torch.float32)
    assert torch.equal(flat, expected.cpu() if device.type == "cpu" else flat)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("absmax", float("nan"), "absmax holds NaN"),
        ("absmax", float("inf"), "absmax holds NaN or Inf"),
        ("absmax", -1.0, "absmax holds negative"),
    ],
)
def test_non_finite_or_negative_statistics_are_refused(field, value, message):
    _, sd = _state(double_quant=False)
    sd["weight.absmax"] = sd["weight.absmax"].clone()
    sd["weight.absmax"][3] = value
    with pytest.raises(ValueError, match=message):
        qk.NF4Weight.from_state_dict(sd, "weight")


def test_non_finite_nested_statistics_are_refused():
    _, sd = _state()
    bad = sd["weight.nested_absmax"].clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="nested_absmax holds NaN"):
        qk.NF4Weight.from_state_dict({**sd, "weight.nested_absmax": bad}, "weight")
    with pytest.raises(ValueError, match="nested_absmax holds negative"):
        qk.NF4Weight.from_state_dict({**sd, "weight.nested_absmax": -sd["weight.nested_absmax"]}, "weight")
    with pytest.raises(ValueError, match="offset holds NaN or Inf"):
        qk.NF4Weight.from_state_dict(_with_meta(sd, nested_offset=float("inf")), "weight")
    nested_map = sd["weight.nested_quant_map"].clone()
    nested_map[5] = float("inf")
    with pytest.raises(ValueError, match="nested_quant_map holds NaN or Inf"):
        qk.NF4Weight.from_state_dict({**sd, "weight.nested_quant_map": nested_map}, "weight")


# ------------------------------------------------------------------------------- unclear or broken errors


@pytest.mark.parametrize("payload", [b"[1, 2, 3]", b'"nf4"', b"42", b"null"])
def test_quant_state_json_that_is_not_an_object(payload):
    _, sd = _state()
    sd[QS] = torch.tensor(list(payload), dtype=torch.uint8)
    with pytest.raises(ValueError, match=f"{QS} must hold a JSON object"):
        qk.NF4Weight.from_state_dict(sd, "weight")


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"blocksize": "64"}, r"\['blocksize'\] must be an integer"),
        ({"blocksize": 64.0}, r"\['blocksize'\] must be an integer"),
        ({"blocksize": True}, r"\['blocksize'\] must be an integer"),
        ({"shape": "6x100"}, r"\['shape'\] must be a list"),
        ({"shape": [6.5, 100]}, r"\['shape'\] must hold ints"),
        ({"shape": [6, 100, 1]}, r"\['shape'\] must be \[N, K\]"),
        ({"shape": [2**40, 2**40]}, r"more than the supported 2\^62"),
        ({"shape": [-6, -100]}, r"N, K >= 1"),
        ({"dtype": 5}, r"\['dtype'\] must be a string"),
        ({"dtype": "int8"}, r"must be one of"),
        ({"nested_offset": "0.1"}, r"\['nested_offset'\] must be a number"),
        ({"nested_blocksize": [256]}, r"\['nested_blocksize'\] must be an integer"),
        ({"blocksize": _DROP}, r"lacks 'blocksize'"),
    ],
)
def test_quant_state_fields_of_the_wrong_type_name_the_field(changes, message):
    _, sd = _state()
    with pytest.raises((ValueError, TypeError), match=message):
        qk.NF4Weight.from_state_dict(_with_meta(sd, **changes), "weight")


def test_quant_state_that_is_not_a_byte_tensor():
    _, sd = _state()
    with pytest.raises(ValueError, match="1-D uint8 tensor of JSON bytes"):
        qk.NF4Weight.from_state_dict({**sd, QS: sd[QS].float()}, "weight")
    with pytest.raises(TypeError, match=r"state_dict\['weight.absmax'\] must be a torch.Tensor"):
        qk.NF4Weight.from_state_dict({**sd, "weight.absmax": [1, 2, 3]}, "weight")


def test_absurd_shapes_do_not_wrap():
    w4 = qk.NF4Weight.quantize(torch.randn(4, 64))
    for shape in ([2**62, 4], [2**32, 2**32], [2**63 - 1, 1]):
        with pytest.raises(ValueError, match="more than the supported"):
            qk.NF4Weight(w4.packed, w4.absmax, shape, torch.float32, 64, w4.nested_absmax, w4.offset)
    with pytest.raises(TypeError, match="shape must hold ints"):
        qk.NF4Weight(w4.packed, w4.absmax, (4.0, 64), torch.float32, 64, w4.nested_absmax, w4.offset)
