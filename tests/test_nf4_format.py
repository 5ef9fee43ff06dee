"""NF4 format: the reference and the Triton kernels agree with each other and with the format's definition."""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import ops, reference
from tests.helpers import interpreting, max_ulp_diff, nan_filled

SHAPES = [(70, 130), (1, 64), (33, 77), (1, 1), (128, 256), (513, 100)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_codebook_is_sorted_with_exact_zero():
    code = reference.nf4_code()
    assert code.dtype == torch.float32 and code.numel() == 16
    assert bool((code[1:] > code[:-1]).all())
    assert code[reference.NF4_ZERO_CODE].item() == 0.0 and code[0].item() == -1.0 and code[15].item() == 1.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_reference_roundtrip_error_is_bounded_by_codebook_gaps(shape, blocksize):
    # Every element is decoded to its nearest level: |w - deq| <= half the widest gap (0.1609..) * absmax of its block.
    w = torch.randn(shape)
    packed, absmax, _, _ = reference.quantize_nf4(w, blocksize, False)
    deq = reference.dequantize_nf4(packed, absmax, None, None, blocksize, shape, torch.float32)
    block_absmax = absmax[torch.arange(w.numel()) // blocksize].reshape(shape)
    half_gap = (reference.nf4_code()[1:] - reference.nf4_code()[:-1]).max().item() / 2
    assert bool(((w - deq).abs() <= half_gap * block_absmax + 1e-7).all())


def test_packing_puts_first_element_in_high_nibble_and_pads_odd_numel_with_zero_code():
    w = torch.tensor([[1.0, -1.0, 0.0]])  # codes 15, 0, 7 (+ pad nibble 7)
    packed, absmax, _, _ = reference.quantize_nf4(w, 64, False)
    assert packed.tolist() == [0xF0, 0x77]
    assert absmax.tolist() == [1.0]


def test_all_zero_block_packs_as_zero_code():
    packed, absmax, _, _ = reference.quantize_nf4(torch.zeros(2, 64), 64, False)
    assert bool((packed == 0x77).all()) and absmax.tolist() == [0.0, 0.0]


def test_tie_on_a_midpoint_goes_to_lower_code():
    code = reference.nf4_code()
    mid = ((code[8] + code[9]) / 2).item()
    w = torch.tensor([[1.0, mid]])  # absmax 1 -> scaled values exactly 1.0 and the midpoint
    packed, _, _, _ = reference.quantize_nf4(w, 64, False)
    assert packed.tolist() == [(15 << 4) | 8]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_triton_quantize_matches_reference(shape, dtype, double_quant, backend, device):
    w = torch.randn(shape, dtype=dtype, device=device)
    got = ops.quantize_nf4(w, 64, double_quant)
    want = reference.quantize_nf4(w, 64, double_quant)
    for name, g, r in zip(("packed", "absmax", "nested_absmax", "offset"), got, want):
        if r is None:
            assert g.numel() == 0, name
        else:
            assert torch.equal(g, r), name


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_matches_reference(shape, dtype, double_quant, backend, device):
    w4 = qk.NF4Weight.quantize(torch.randn(shape, device=device), blocksize=32, double_quant=double_quant)
    got = w4.dequantize(dtype)
    want = reference.dequantize_nf4(
        w4.packed, w4.absmax, w4.nested_absmax, w4.offset, 32, shape, dtype, w4.nested_quant_map
    )
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    if backend == "triton" and interpreting() and dtype == torch.bfloat16:
        assert max_ulp_diff(got, want) <= 1  # the interpreter truncates fp32 -> bf16 instead of rounding
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_every_blocksize_roundtrips_through_both_backends(blocksize, backend, device):
    w = torch.randn(37, 301, device=device)
    w4 = qk.NF4Weight.quantize(w, blocksize=blocksize)
    ref = reference.quantize_nf4(w, blocksize, True)
    assert torch.equal(w4.packed_bytes(), ref[0]) and torch.equal(w4.absmax, ref[1])
    torch.testing.assert_close(
        w4.dequantize(torch.float32),
        reference.dequantize_nf4(*ref, blocksize, w.shape, torch.float32),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("fill", [0x00, 0xFF])
def test_triton_quantize_writes_every_output_element(fill, triton_device):
    device = triton_device
    from qlora_kernels.triton_kernels import nf4 as tnf4

    w = torch.randn(33, 77, device=device)
    numel = w.numel()
    out_packed = torch.full(((numel + 1) // 2,), fill, dtype=torch.uint8, device=device)
    out_absmax = nan_filled((-(-numel // 64),), torch.float32, device)
    packed, absmax, _, _ = tnf4.quantize_nf4(w, 64, False, out_packed=out_packed, out_absmax=out_absmax)
    ref_packed, ref_absmax, _, _ = reference.quantize_nf4(w, 64, False)
    assert packed.data_ptr() == out_packed.data_ptr()
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(33, 77), (1, 1), (513, 100)])
def test_triton_dequantize_writes_every_output_element(dtype, shape, triton_device):
    device = triton_device
    from qlora_kernels.triton_kernels import nf4 as tnf4

    w4 = qk.NF4Weight.quantize(torch.randn(shape, device=device))
    out = nan_filled(shape, dtype, device)
    got = tnf4.dequantize_nf4(
        w4.packed_bytes(), w4.absmax, w4.nested_absmax, w4.offset, 64, shape, dtype, w4.nested_quant_map, out=out
    )
    assert got.data_ptr() == out.data_ptr()
    assert not bool(torch.isnan(got).any())
    want = reference.dequantize_nf4(w4.packed, w4.absmax, w4.nested_absmax, w4.offset, 64, shape, dtype)
    assert max_ulp_diff(got, want) <= 1 if dtype == torch.bfloat16 else torch.equal(got, want)


def test_cpu_tensors_need_the_interpreter_for_triton(monkeypatch):
    from qlora_kernels.triton_kernels import _common

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _common.check_launchable(torch.zeros(2))


def test_unknown_backend_setting_is_refused(monkeypatch):
    monkeypatch.setenv("QLORA_KERNELS_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="QLORA_KERNELS_BACKEND"):
        qk.NF4Weight.quantize(torch.randn(4, 64))


@pytest.mark.parametrize("double_quant", [False, True])
def test_custom_ops_pass_opcheck(double_quant):
    w = torch.randn(20, 70)
    torch.library.opcheck(torch.ops.qlora_kernels.quantize_nf4.default, (w, 64, double_quant))
    packed, absmax, nested, offset = torch.ops.qlora_kernels.quantize_nf4(w, 64, double_quant)
    args = (packed, absmax, nested if double_quant else None, offset if double_quant else None, None, 64, [20, 70],
            torch.bfloat16)
    torch.library.opcheck(torch.ops.qlora_kernels.dequantize_nf4.default, args)


def test_dequantize_compiles_without_graph_breaks():
    w4 = qk.NF4Weight.quantize(torch.randn(16, 96))
    compiled = torch.compile(lambda: w4.dequantize(torch.float32) * 2, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(), w4.dequantize(torch.float32) * 2)
