"""QLoRALinear: initialisation, trainable parameters, forward/backward, dropout, state dict, merge, repr, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.nn import QLoRALinear

from helpers import assert_close_normwise

bnb = pytest.importorskip("bitsandbytes")


def make_layer(n=40, k=96, r=4, lora_alpha=8, bias=True, **kwargs) -> tuple[QLoRALinear, nn.Linear]:
    linear = nn.Linear(k, n, bias=bias)
    layer = QLoRALinear.from_linear(linear, r=r, lora_alpha=lora_alpha, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)  # a trained-looking adapter, so the LoRA path shows in outputs and gradients
    return layer, linear


def make_linear4bit(n=64, k=128, bias=True, quant_type="nf4") -> bnb.nn.Linear4bit:
    linear = nn.Linear(k, n, bias=bias)
    layer = bnb.nn.Linear4bit(k, n, bias=bias, quant_type=quant_type, compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


def dense_reference(layer: QLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's function in float64 from its parts."""
    w = layer.base_weight.dequantize(torch.float32).double()
    y = x.double() @ w.T + layer.scale * (x.double() @ layer.lora_A.double().T) @ layer.lora_B.double().T
    return y if layer.bias is None else y + layer.bias.double()


# --------------------------------------------------------------------------------------------------- init


def test_lora_init_is_peft_default():
    linear = nn.Linear(96, 40)
    w4 = qk.NF4Weight.quantize(linear.weight.detach())
    torch.manual_seed(7)
    layer = QLoRALinear(w4, linear.bias, r=8, lora_alpha=16)
    torch.manual_seed(7)
    expected_A = torch.empty(8, 96)
    nn.init.kaiming_uniform_(expected_A, a=math.sqrt(5))  # what peft's LoraLayer.reset_lora_parameters draws
    assert torch.equal(layer.lora_A.detach(), expected_A)
    assert torch.equal(layer.lora_B.detach(), torch.zeros(40, 8))
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(96)
    # B = 0: a new layer computes exactly its base layer.
    x = torch.randn(3, 96)
    expected = torch.nn.functional.linear(x, w4.dequantize(torch.float32), linear.bias)
    assert torch.allclose(layer(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scale(use_rslora, expected):
    layer, _ = make_layer(r=4, lora_alpha=16, use_rslora=use_rslora)
    assert layer.scale == expected


def test_trainable_parameters_are_exactly_lora_A_and_B():
    layer, _ = make_layer()
    assert [name for name, _ in layer.named_parameters()] == ["lora_A", "lora_B"]
    assert all(not b.requires_grad for b in layer.buffers())
    packed = layer.weight_packed.clone()
    bias = layer.bias.clone()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(4, 96, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and x.grad is not None
    optimizer.step()
    assert torch.equal(layer.weight_packed, packed) and torch.equal(layer.bias, bias)


# ------------------------------------------------------------------------------------------------ compute


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_dense_reference(bias):
    layer, _ = make_layer(bias=bias)
    x = torch.randn(2, 5, 96, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 5, 40) and y.dtype == torch.float32
    assert_close_normwise(y, dense_reference(layer, x), torch.float32)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    x64 = x.detach().double().requires_grad_()
    A64 = layer.lora_A.detach().double().requires_grad_()
    B64 = layer.lora_B.detach().double().requires_grad_()
    w = layer.base_weight.dequantize(torch.float32).double()
    ref = x64 @ w.T + layer.scale * (x64 @ A64.T) @ B64.T
    ref.backward(grad_out.double())
    assert_close_normwise(x.grad, x64.grad, torch.float32)
    assert_close_normwise(layer.lora_A.grad, A64.grad, torch.float32)
    assert_close_normwise(layer.lora_B.grad, B64.grad, torch.float32)


def test_dropout_only_in_training_mode():
    layer, _ = make_layer(lora_dropout=0.5)
    plain, _ = make_layer()
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(16, 96)
    layer.eval()
    assert torch.equal(layer(x), plain(x)), "eval mode must not drop"
    layer.train()
    trained = layer(x)
    assert not torch.allclose(trained, plain(x)), "training mode must drop on the LoRA path"


def test_autocast_computes_in_autocast_dtype():
    layer, _ = make_layer()
    x = torch.randn(3, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close_normwise(y, dense_reference(layer, x), torch.bfloat16)


def test_bad_forward_input():
    layer, _ = make_layer()
    with pytest.raises(ValueError, match="in_features=96"):
        layer(torch.randn(3, 95))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 96, dtype=torch.int64))


# --------------------------------------------------------------------------------------- devices and dtypes


def test_to_dtype_keeps_nf4_storage():
    layer, _ = make_layer(double_quant=False)  # float32 absmax: the buffer a blind cast would corrupt
    weight = layer.base_weight.dequantize(torch.float32)
    dtypes = {name: buf.dtype for name, buf in layer.named_buffers() if name != "bias"}
    layer.to(torch.float16)
    assert {name: buf.dtype for name, buf in layer.named_buffers() if name != "bias"} == dtypes
    assert torch.equal(layer.base_weight.dequantize(torch.float32), weight)
    assert layer.lora_A.dtype == torch.float16 and layer.bias.dtype == torch.float16
    x = torch.randn(3, 96, dtype=torch.float16)
    assert layer(x).dtype == torch.float16


# ------------------------------------------------------------------------------------------------ from_bnb


def test_from_bnb_shares_storage_and_matches_linear4bit():
    lin4 = make_linear4bit()
    layer = QLoRALinear.from_bnb(lin4, r=8, lora_alpha=16)
    assert layer.weight_packed.data_ptr() == lin4.weight.data_ptr()
    assert layer.weight_absmax.data_ptr() == lin4.weight.quant_state.absmax.data_ptr()
    assert layer.bias.data_ptr() == lin4.bias.data_ptr()
    x = torch.randn(5, 128)
    lin4.train()  # eval mode without grad would let bitsandbytes rewrite its storage (see the next test)
    assert_close_normwise(layer(x), lin4(x), torch.float32)


def test_from_bnb_restores_a_cpu_repacked_layer():
    lin4 = make_linear4bit()
    if not lin4.support_avx512bf16_for_cpu:
        pytest.skip("bitsandbytes rewrites storage only on CPUs with AVX512-BF16")
    lin4.eval()
    x = torch.randn(5, 128)
    with torch.no_grad():
        expected = lin4(x)
    assert lin4.weight.quant_state.packing_format_for_cpu
    layer = QLoRALinear.from_bnb(lin4)
    assert not lin4.weight.quant_state.packing_format_for_cpu
    assert_close_normwise(layer(x), expected, torch.bfloat16)  # bitsandbytes' CPU kernel computes in bf16


def test_from_bnb_rejects_fp4_and_other_modules():
    with pytest.raises(ValueError, match="FP4.*not NF4"):
        QLoRALinear.from_bnb(make_linear4bit(quant_type="fp4"))
    with pytest.raises(TypeError, match="linear4bit.*from_linear"):
        QLoRALinear.from_bnb(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="linear4bit must be a bitsandbytes Linear4bit"):
        QLoRALinear.from_bnb(bnb.nn.Linear8bitLt(64, 64))
    unquantized = bnb.nn.Linear4bit(64, 64, quant_type="nf4")
    with pytest.raises(ValueError, match="not quantized yet"):
        QLoRALinear.from_bnb(unquantized)


# ---------------------------------------------------------------------------------------------- state dict


def test_state_dict_uses_bitsandbytes_keys_and_round_trips():
    # K = 128: bitsandbytes 0.50.2's CPU dequantize misreads absmax when K % 64 == 32 (see README).
    layer, _ = make_layer(n=40, k=128)
    sd = layer.state_dict()
    assert set(sd) == {
        "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4", "bias", "lora_A", "lora_B",
    }
    other, _ = make_layer(n=40, k=128, double_quant=False)  # different base and statistics layout: all replaced on load
    result = other.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(other.weight_packed, layer.weight_packed)
    assert torch.equal(other.base_weight.dequantize(), layer.base_weight.dequantize())
    x = torch.randn(3, 128)
    assert torch.equal(other(x), layer(x))
    # bitsandbytes rebuilds the same weight from the saved entries.
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    params = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    dense = bnb.functional.dequantize_4bit(params.data, params.quant_state)
    assert torch.equal(dense, layer.base_weight.dequantize(torch.float32))


def test_linear4bit_checkpoint_loads_as_base():
    lin4 = make_linear4bit()
    layer = QLoRALinear.from_linear(nn.Linear(128, 64), r=4)
    result = layer.load_state_dict(lin4.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["lora_A", "lora_B"] and not result.unexpected_keys
    assert torch.equal(layer.base_weight.dequantize(), qk.NF4Weight.from_bnb(lin4).dequantize())
    assert torch.equal(layer.bias, lin4.bias.detach())


def test_state_dict_shape_mismatch_and_missing_base_are_errors():
    layer, _ = make_layer()
    small, _ = make_layer(n=32)
    with pytest.raises(RuntimeError, match="does not match this layer's"):
        layer.load_state_dict(small.state_dict())
    sd = {k: v for k, v in layer.state_dict().items() if not k.startswith("weight")}
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        layer.load_state_dict(sd)


# --------------------------------------------------------------------------------------------------- merge


def test_merged_weight_is_dense_sum():
    layer, _ = make_layer()
    expected = layer.base_weight.dequantize(torch.float32).double() + layer.scale * (
        layer.lora_B.double() @ layer.lora_A.double()
    )
    assert_close_normwise(layer.merged_weight(), expected, torch.float32)
    assert layer.merged_weight(torch.bfloat16).dtype == torch.bfloat16


def test_merge_requantizes_within_nf4_rounding():
    layer, _ = make_layer(n=64, k=128)
    merged = layer.merge()
    assert isinstance(merged, qk.NF4Weight) and merged.shape == layer.base_weight.shape
    assert merged.blocksize == 64 and merged.double_quant and merged.dtype == torch.float32
    exact = layer.merged_weight(torch.float32)
    error = (merged.dequantize(torch.float32) - exact).reshape(-1, 64).abs().amax(dim=1)
    block_absmax = exact.reshape(-1, 64).abs().amax(dim=1)
    # Half the widest NF4 gap (-1 .. -0.696) is 0.152; double quantization of absmax adds a little.
    assert bool((error <= 0.16 * block_absmax).all())
    # ... and the rounding is real: a merge is not the exact merged weight.
    assert not torch.equal(merged.dequantize(torch.float32), exact)


def test_merge_of_untrained_adapter_gives_back_the_base_bytes():
    layer = QLoRALinear.from_linear(nn.Linear(96, 40), double_quant=False)  # B = 0
    merged = layer.merge()
    assert torch.equal(merged.packed, layer.base_weight.packed)
    assert torch.equal(merged.absmax, layer.base_weight.absmax)


# ---------------------------------------------------------------------------------------------------- repr


def test_repr():
    layer, _ = make_layer(r=4, lora_alpha=8)
    text = repr(layer)
    for part in ("QLoRALinear(", "in_features=96", "out_features=40", "bias=True", "r=4", "lora_alpha=8",
                 "scale=2", "blocksize=64", "double_quant"):
        assert part in text, text


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(r=0), ValueError, "r must be an int >= 1"),
        (dict(r=2.5), TypeError, "r must be an int"),
        (dict(r=True), TypeError, "r must be an int"),
        (dict(lora_alpha=0), ValueError, "lora_alpha must be a positive"),
        (dict(lora_alpha=-1.0), ValueError, "lora_alpha must be a positive"),
        (dict(lora_alpha="16"), TypeError, "lora_alpha"),
        (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be a probability in \[0, 1\)"),
        (dict(lora_dropout=-0.1), ValueError, "lora_dropout"),
        (dict(use_rslora=1), TypeError, "use_rslora"),
        (dict(blocksize=48), ValueError, "blocksize"),
    ],
)
def test_from_linear_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        QLoRALinear.from_linear(nn.Linear(96, 40), **kwargs)


def test_from_linear_rejects_non_linear_modules():
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear, got Conv1d"):
        QLoRALinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="use QLoRALinear.from_bnb"):
        QLoRALinear.from_linear(make_linear4bit())
    with pytest.raises(TypeError, match="weight must be an NF4Weight"):
        QLoRALinear(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \(40,\)"):
        QLoRALinear(qk.NF4Weight.quantize(torch.randn(40, 96)), torch.zeros(41))
