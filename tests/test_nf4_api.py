"""NF4Weight's public surface: attributes, repr, .to, and clear errors for bad input before any kernel runs."""

from __future__ import annotations

import json

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import ops


@pytest.fixture
def no_kernels(monkeypatch):
    """Fail loudly if validation lets a call reach an op."""

    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched before the input was validated")

    monkeypatch.setattr(ops, "quantize_nf4", boom)
    monkeypatch.setattr(ops, "dequantize_nf4", boom)


def test_attributes_and_repr():
    w = torch.randn(70, 130, dtype=torch.bfloat16)
    w4 = qk.NF4Weight.quantize(w, blocksize=128)
    assert w4.shape == torch.Size([70, 130]) and w4.dtype == torch.bfloat16 and w4.blocksize == 128
    assert w4.packed.shape == (4550, 1) and w4.packed.dtype == torch.uint8
    assert w4.absmax.dtype == torch.uint8 and w4.absmax.numel() == 72 and w4.double_quant
    assert w4.nested_absmax.numel() == 1 and w4.offset.shape == ()
    assert w4.device == torch.device("cpu") and w4.numel == 9100
    assert w4.dequantize().dtype == torch.bfloat16
    text = repr(w4)
    assert "NF4Weight(shape=(70, 130)" in text and "bfloat16" in text and "blocksize=128" in text and "double_quant" in text


def test_quant_storage_reinterprets_the_same_bytes():
    w = torch.randn(64, 96)
    plain = qk.NF4Weight.quantize(w)
    for storage in (torch.bfloat16, torch.float16, torch.float32):
        w4 = qk.NF4Weight.quantize(w, quant_storage=storage)
        assert w4.packed.dtype == storage and w4.quant_storage == storage
        assert torch.equal(w4.packed_bytes(), plain.packed_bytes())
        assert torch.equal(w4.dequantize(), plain.dequantize())


def test_to_same_device_is_identity_and_copies_otherwise():
    w4 = qk.NF4Weight.quantize(torch.randn(8, 64))
    assert w4.to("cpu") is w4 and w4.cpu() is w4


def test_state_dict_json_matches_bitsandbytes_fields():
    w4 = qk.NF4Weight.quantize(torch.randn(5, 130, dtype=torch.float16))
    sd = w4.state_dict(prefix="w")
    meta = json.loads(bytes(sd["w.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["dtype"] == "float16"
    assert meta["shape"] == [5, 130] and meta["nested_blocksize"] == 256 and meta["nested_dtype"] == "float32"
    assert meta["nested_offset"] == w4.offset.item()


@pytest.mark.parametrize(
    "weight, error, match",
    [
        (torch.randint(0, 5, (4, 64)), TypeError, "float16, bfloat16 or float32"),
        (torch.randn(4, 64, dtype=torch.complex64), TypeError, "float16, bfloat16 or float32"),
        (torch.randn(4, 64, dtype=torch.float64), TypeError, "float16, bfloat16 or float32"),
        (torch.randn(64), ValueError, "2-D"),
        (torch.randn(2, 4, 64), ValueError, "2-D"),
        (torch.randn(0, 64), ValueError, "at least one element"),
        ([[1.0, 2.0]], TypeError, "torch.Tensor"),
    ],
)
def test_quantize_rejects_bad_weights(weight, error, match, no_kernels):
    with pytest.raises(error, match=match):
        qk.NF4Weight.quantize(weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_quantize_rejects_non_finite_weights(bad, no_kernels):
    w = torch.randn(4, 64)
    w[2, 7] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        qk.NF4Weight.quantize(w)


@pytest.mark.parametrize("blocksize", [16, 48, 8192, 0, -64, 64.0, True])
def test_quantize_rejects_bad_blocksizes(blocksize, no_kernels):
    with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 4096"):
        qk.NF4Weight.quantize(torch.randn(4, 64), blocksize=blocksize)


def test_quantize_rejects_storage_that_cannot_hold_the_bytes(no_kernels):
    with pytest.raises(ValueError, match="quant_storage"):
        qk.NF4Weight.quantize(torch.randn(3, 3), quant_storage=torch.float32)  # 5 bytes
    with pytest.raises(TypeError, match="quant_storage"):
        qk.NF4Weight.quantize(torch.randn(4, 64), quant_storage=torch.int32)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float64, "float16"])
def test_dequantize_rejects_non_float_dtypes(dtype):
    w4 = qk.NF4Weight.quantize(torch.randn(4, 64))
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16 or float32"):
        w4.dequantize(dtype)


def test_state_dict_with_missing_keys_is_refused():
    sd = qk.NF4Weight.quantize(torch.randn(4, 64)).state_dict()
    for key in ("weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"):
        broken = {k: v for k, v in sd.items() if k != key}
        with pytest.raises(ValueError, match="lacks"):
            qk.NF4Weight.from_state_dict(broken)
    broken = {k: v for k, v in sd.items() if k != "weight.nested_quant_map"}
    with pytest.raises(ValueError, match="nested_quant_map"):
        qk.NF4Weight.from_state_dict(broken)
    with pytest.raises(ValueError, match="prefix 'other'"):
        qk.NF4Weight.from_state_dict(sd, prefix="other")


def test_state_dict_of_another_quant_type_is_refused():
    sd = qk.NF4Weight.quantize(torch.randn(4, 64)).state_dict()
    meta = json.loads(bytes(sd.pop("weight.quant_state.bitsandbytes__nf4").tolist()))
    meta["quant_type"] = "fp4"
    blob = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="FP4 is not NF4"):
        qk.NF4Weight.from_state_dict({**sd, "weight.quant_state.bitsandbytes__fp4": blob})
    with pytest.raises(ValueError, match="expected 'nf4'"):
        qk.NF4Weight.from_state_dict({**sd, "weight.quant_state.bitsandbytes__nf4": blob})


def test_state_dict_with_wrong_sizes_is_refused():
    sd = qk.NF4Weight.quantize(torch.randn(4, 64)).state_dict()
    with pytest.raises(ValueError, match="packed must hold"):
        qk.NF4Weight.from_state_dict({**sd, "weight": sd["weight"][:-1]})
    with pytest.raises(ValueError, match="absmax must be"):
        qk.NF4Weight.from_state_dict({**sd, "weight.absmax": sd["weight.absmax"].float()})
    with pytest.raises(ValueError, match="quant_map is not the NF4 codebook"):
        qk.NF4Weight.from_state_dict({**sd, "weight.quant_map": torch.linspace(-1, 1, 16)})


def test_from_bnb_refuses_fp4_and_unquantized_sources():
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(torch.randn(8, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="FP4 is a different 4-bit format"):
        qk.NF4Weight.from_bnb(packed, state)
    with pytest.raises(ValueError, match="carries no bitsandbytes quant_state"):
        qk.NF4Weight.from_bnb(torch.nn.Linear(64, 8))
    layer = bnb.nn.Linear4bit(64, 8, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="FP4"):
        qk.NF4Weight.from_bnb(layer)


def test_from_bnb_refuses_bitsandbytes_cpu_inference_layout():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(torch.randn(8, 64), quant_type="nf4")
    state.packing_format_for_cpu = True  # what bitsandbytes sets when it rewrites the bytes for its CPU kernel
    with pytest.raises(ValueError, match="CPU inference layout"):
        qk.NF4Weight.from_bnb(packed, state)
