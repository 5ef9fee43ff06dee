"""Parity with bitsandbytes 0.50.2 (which runs on CPU): same bytes from quantize, same weights from dequantize,
same state-dict keys both ways, zero-copy views of its storage."""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import reference
from tests.helpers import interpreting, max_ulp_diff

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

# K % 64 != 0, a single row, odd N*K, a single element, aligned, more than 256 blocks (several nested blocks).
SHAPES = [(70, 130), (1, 64), (33, 77), (1, 1), (128, 256), (513, 100)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bnb_reference_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' own pure-torch NF4 dequantization (its "default" backend), absmax decoded as it decodes it.

    bitsandbytes 0.50.2's native CPU kernel (AVX-512 path) decodes rows whose width is a multiple of 32 but not of 64
    (K = 96, 160, ...) with the wrong absmax for half of the row; its pure-torch kernel and its CUDA kernel do not.
    Tests at such widths compare against this function.
    """
    from bitsandbytes.backends.default import ops as default_ops

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", default_ops._dequantize_4bit_compute)
    code = F.get_4bit_type("nf4", device=packed.device)
    return compute(packed.reshape(-1).view(torch.uint8), absmax.float(), code, state.blocksize, state.shape, state.dtype)


def _near_tie(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Elements within float32 rounding of a decision midpoint, where two correct quantizers may differ."""
    mids = reference.midpoints(code).double().cpu()
    return ((scaled.double().cpu()[:, None] - mids[None, :]).abs() <= 4e-7 * (1 + mids.abs()[None, :])).any(dim=1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_gives_bitsandbytes_bytes(shape, dtype, double_quant, backend, device):
    w = torch.randn(shape, dtype=dtype, device=device)
    ours = qk.NF4Weight.quantize(w, blocksize=64, double_quant=double_quant)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")

    # NF4 codes: identical except at exact ties (none expected with random data; checked, not assumed).
    codes_ours = reference.unpack_nf4_codes(ours.packed, w.numel())
    codes_bnb = reference.unpack_nf4_codes(packed, w.numel())
    differ = codes_ours != codes_bnb
    if differ.any():
        _, absmax32, _, _ = reference.quantize_nf4(w, 64, False)
        scaled = w.reshape(-1).float() / absmax32[torch.arange(w.numel(), device=w.device) // 64]
        assert bool(_near_tie(scaled[differ], reference.nf4_code()).all()), "codes differ away from a tie"
    assert ours.packed.shape == packed.shape and ours.packed.dtype == packed.dtype

    if not double_quant:
        assert torch.equal(ours.absmax, state.absmax)
        return
    assert torch.equal(ours.offset, state.offset.reshape(()))
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    # absmax codes: ours are the nearest level (bitsandbytes' CUDA rule). bitsandbytes' CPU library finds the
    # level through an approximate lookup table and sometimes lands a few levels off; where the bytes differ,
    # ours must be strictly the better code.
    dyn = reference.dynamic_map(True, device)
    _, absmax32, _, _ = reference.quantize_nf4(w, 64, False)
    nested = state.state2.absmax.repeat_interleave(256)[: absmax32.numel()]
    target = ((absmax32 - state.offset) / nested.clamp(min=1e-38)).double()
    differ = ours.absmax != state.absmax
    err_ours = (dyn.double()[ours.absmax.long()] - target).abs()
    err_bnb = (dyn.double()[state.absmax.long()] - target).abs()
    degenerate = nested == 0  # every absmax of the nested block equals the mean: any code decodes to the offset
    assert bool((err_ours[differ & ~degenerate] < err_bnb[differ & ~degenerate]).all())
    assert int((differ & ~degenerate).sum()) <= max(2, 0.01 * differ.numel())  # measured: about 0.2%


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_equals_bitsandbytes(shape, dtype, double_quant, backend, device):
    w = torch.randn(shape, dtype=dtype, device=device)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    want = F.dequantize_4bit(packed, state)
    got = qk.NF4Weight.from_bnb(packed, state).dequantize()
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    if backend == "triton" and interpreting() and dtype == torch.bfloat16:
        assert max_ulp_diff(got, want) <= 1  # the interpreter truncates fp32 -> bf16
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(48, 96), (3, 160), (70, 130), (1, 33)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_equals_bitsandbytes_reference_kernel(shape, double_quant, backend, device):
    w = torch.randn(shape, device=device)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(qk.NF4Weight.from_bnb(packed, state).dequantize(), bnb_reference_dequantize(packed, state))


@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024, 4096])
def test_other_blocksizes_match_bitsandbytes(blocksize):
    w = torch.randn(40, 330)
    ours = qk.NF4Weight.quantize(w, blocksize=blocksize, double_quant=False)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(qk.NF4Weight.from_bnb(packed, state).dequantize(), F.dequantize_4bit(packed, state))


def _linear4bit(n, k, quant_storage, double_quant, dtype=torch.float32):
    dense = torch.nn.Linear(k, n, bias=False)
    layer = bnb.nn.Linear4bit(
        k, n, bias=False, compute_dtype=dtype, compress_statistics=double_quant, quant_type="nf4",
        quant_storage=quant_storage,
    )
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_is_a_zero_copy_view(quant_storage, double_quant):
    layer = _linear4bit(48, 96, quant_storage, double_quant)
    w4 = qk.NF4Weight.from_bnb(layer)
    qs = layer.weight.quant_state
    assert w4.packed.data_ptr() == layer.weight.data_ptr() and w4.packed.dtype == quant_storage
    assert w4.absmax.data_ptr() == qs.absmax.data_ptr()
    if double_quant:
        assert w4.nested_absmax.data_ptr() == qs.state2.absmax.data_ptr()
    assert type(w4.packed) is torch.Tensor
    assert torch.equal(w4.dequantize(), bnb_reference_dequantize(layer.weight.data, qs))
    # Same object through the Params4bit and through (packed, quant_state).
    assert torch.equal(qk.NF4Weight.from_bnb(layer.weight).dequantize(), w4.dequantize())
    # Shared storage: a change to bitsandbytes' bytes shows in ours.
    before = w4.dequantize()
    layer.weight.data.view(torch.uint8).view(-1)[0] ^= 0xFF
    after = w4.dequantize()
    assert not torch.equal(before, after)
    assert torch.equal(after, bnb_reference_dequantize(layer.weight.data, qs))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_linear4bit_checkpoint_loads_into_ours(double_quant, quant_storage):
    layer = _linear4bit(30, 70, quant_storage, double_quant)
    sd = layer.state_dict()
    w4 = qk.NF4Weight.from_state_dict(sd, prefix="weight")
    assert w4.double_quant == double_quant and w4.shape == torch.Size([30, 70])
    assert torch.equal(w4.dequantize(), F.dequantize_4bit(layer.weight.data, layer.weight.quant_state))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_our_state_dict_loads_into_bitsandbytes(double_quant, dtype):
    w = torch.randn(45, 67, dtype=dtype)
    w4 = qk.NF4Weight.quantize(w, double_quant=double_quant)
    sd = w4.state_dict(prefix="weight")
    layer_sd = _linear4bit(45, 67, torch.uint8, double_quant).state_dict()
    assert set(sd) == set(layer_sd), "our keys must be exactly bitsandbytes' keys"
    stats = {k[len("weight.") :]: v for k, v in sd.items() if k != "weight"}
    param = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    assert param.quant_state.quant_type == "nf4" and param.quant_state.shape == w4.shape
    assert torch.equal(F.dequantize_4bit(param.data, param.quant_state), w4.dequantize())
    # Round trip through our own loader.
    again = qk.NF4Weight.from_state_dict(sd)
    assert torch.equal(again.dequantize(), w4.dequantize())


def test_state_dict_survives_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    w4 = qk.NF4Weight.quantize(torch.randn(20, 100))
    path = tmp_path / "w.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in w4.state_dict("layer.weight").items()}, str(path))
    loaded = qk.NF4Weight.from_state_dict(safetensors.load_file(str(path)), prefix="layer.weight")
    assert torch.equal(loaded.dequantize(), w4.dequantize())


def test_dynamic_maps_equal_bitsandbytes():
    assert torch.equal(reference.dynamic_map(True), F.create_dynamic_map(signed=True))
    assert torch.equal(reference.dynamic_map(False), F.create_dynamic_map(signed=False))
    assert torch.equal(reference.nf4_code(), F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_quantize_and_dequantize_match_bitsandbytes(dtype, double_quant):
    w = torch.randn(4096, 4096 + 96, dtype=dtype, device="cuda")
    ours = qk.NF4Weight.quantize(w, double_quant=double_quant)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    assert (ours.packed == packed).float().mean().item() > 1 - 1e-6
    if double_quant:
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert (ours.absmax == state.absmax).float().mean().item() > 1 - 1e-4
    else:
        assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(qk.NF4Weight.from_bnb(packed, state).dequantize(), F.dequantize_4bit(packed, state))
