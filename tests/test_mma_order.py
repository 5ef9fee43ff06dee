"""The forward GEMM's MMA-order weight tiles (lora_linear_tiles.load_nf4_tile_mma_order): the same decoded weights
as the row-major tile, in the column order ``mma_order_columns`` says, x's columns following it in the GEMM.

Runs under the interpreter here (the register decode's twin) and compiled on a GPU (the asm); the sm_90 compile
check (tests/test_sm90_compile.py) checks that Triton 3.6 hands these tiles to wgmma without shared memory.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import qlora_kernels as qk
from qlora_kernels import reference as ref
from qlora_kernels.triton_kernels import lora_linear as launch
from qlora_kernels.triton_kernels import lora_linear_tiles as tiles
from qlora_kernels.triton_kernels._common import interpreting


@triton.jit
def _tiles_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, nested_code_ptr,
    mma_ptr, rows_ptr, cols_ptr, N, K, ld,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WARPS: tl.constexpr, BLOCKSIZE: tl.constexpr,
    HAS_DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr, DECODE: tl.constexpr,
):
    # Program (n, k) stores its MMA-order tile, the row-major tile of the same rows and columns, and the columns.
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    words = tiles.nf4_register_words(code_ptr, DECODE)
    n0, k0 = pid_n * BLOCK_N, pid_k * BLOCK_K
    offs_n = n0 + tl.arange(0, BLOCK_N)
    slots = k0 + tl.arange(0, BLOCK_K)
    w = tiles.load_nf4_tile_mma_order(
        packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, nested_code_ptr, n0, k0, N, K,
        BLOCK_N, BLOCK_K, WARPS, BLOCKSIZE, HAS_DOUBLE_QUANT, NESTED, DECODE, words,
    )
    r = tiles.load_nf4_tile(
        packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, nested_code_ptr, offs_n, k0, N, K,
        BLOCK_N, BLOCK_K, BLOCKSIZE, True, HAS_DOUBLE_QUANT, NESTED, DECODE, words,
    )
    at = offs_n[:, None] * ld + slots[None, :]
    tl.store(mma_ptr + at, w)
    tl.store(rows_ptr + at, r)
    tl.store(cols_ptr + slots, tiles.mma_order_columns(k0, BLOCK_K))


def _tiles(device, N, K, block_n, block_k, warps, double_quant, decode):
    torch.manual_seed(1)
    w4 = qk.NF4Weight.quantize(torch.randn(N, K, device=device), double_quant=double_quant)
    packed, absmax, nested, offset, nested_code, blocksize = w4.op_storage()
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    ld = grid[1] * block_k
    shape = (grid[0] * block_n, ld)
    mma, rows = (torch.full(shape, float("nan"), dtype=torch.bfloat16, device=device) for _ in range(2))
    cols = torch.full((ld,), -1, dtype=torch.int32, device=device)
    dummy = torch.zeros(1, device=device)
    _tiles_kernel[grid](
        packed, absmax, nested if nested is not None else dummy, offset if offset is not None else dummy,
        tiles.nf4_levels(device), nested_code if nested_code is not None else dummy, mma, rows, cols, N, K, ld,
        BLOCK_N=block_n, BLOCK_K=block_k, WARPS=warps, BLOCKSIZE=blocksize, HAS_DOUBLE_QUANT=double_quant,
        NESTED=256, DECODE=decode, num_warps=warps,
    )
    return mma, rows, cols.long()


DECODES = [tiles.DECODE_REGISTERS_TWIN.value] + ([] if interpreting() else [tiles.DECODE_REGISTERS_ASM.value])


@pytest.mark.parametrize("decode", DECODES, ids=["twin", "asm"][: len(DECODES)])
@pytest.mark.parametrize(
    "N, K, block_n, block_k, warps, double_quant",
    [(50, 192, 32, 128, 1, True), (64, 320, 64, 64, 2, False), (33, 64, 32, 32, 2, True),
     (16, 512, 16, 256, 1, True)],
    ids=str,
)
def test_mma_order_tile_is_the_row_major_tile_in_its_column_order(triton_device, N, K, block_n, block_k, warps,
                                                                  double_quant, decode):
    mma, rows, cols = _tiles(triton_device, N, K, block_n, block_k, warps, double_quant, decode)
    # Each tile's slots hold each of its columns once.
    for k0 in range(0, cols.numel(), block_k):
        assert sorted(cols[k0: k0 + block_k].tolist()) == list(range(k0, k0 + block_k))
    # Every element in range is the row-major tile's element of its column, bit for bit.
    inside = (cols < K).nonzero().squeeze(1)
    got = mma[:N][:, inside]
    want = rows[:N].gather(1, cols[inside].expand(N, -1))
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    # Rows and columns past the weight come back finite (the GEMM masks x there), never NaN from the fill.
    assert torch.isfinite(mma.float()).all()


@pytest.mark.parametrize("decode", ["auto", "twin"])  # auto: the asm on a GPU (the twin under the interpreter)
@pytest.mark.parametrize("M, N, K", [(1, 50, 192), (3, 96, 320), (16, 64, 64)], ids=str)
def test_forward_with_mma_order_tiles_matches_the_reference(triton_device, monkeypatch, M, N, K, decode):
    # The decode configuration forced onto the MMA-order path (swapped, register decode), with K not a multiple of
    # BLOCK_K and N not one of BLOCK_N, a column-strided x and a NaN-filled output: the float64 reference at
    # DESIGN.md's bf16 tolerance, and the row-major path's result to float32 summation order.
    monkeypatch.setenv("QLORA_KERNELS_NF4_DECODE", decode)
    torch.manual_seed(2)
    r = 8
    w4 = qk.NF4Weight.quantize(torch.randn(N, K, device=triton_device) * K**-0.5)
    storage = w4.op_storage()
    x = torch.randn(M, 2 * K, device=triton_device).to(torch.bfloat16)[:, ::2]  # column-strided
    a = (torch.randn(r, K, device=triton_device) * K**-0.5).to(torch.bfloat16)
    b = (torch.randn(N, r, device=triton_device) * r**-0.5).to(torch.bfloat16)
    bias = torch.randn(N, device=triton_device).to(torch.bfloat16)
    want, _ = ref.nf4_lora_linear_fwd(x.double(), *storage, a.double(), b.double(), 2.0, bias.double(), 0.0, None)
    outs = {}
    for name, swap in (("mma order", True), ("row major", False)):
        config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 1, "SWAP_AB": swap, "WARPS": 2,
                  "num_warps": 2, "num_stages": 1}
        out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=triton_device)
        outs[name], _ = launch.nf4_lora_linear_fwd(x, *storage, a, b, 2.0, bias, 0.0, None, out=out, config=config)
        err = ((outs[name].double() - want).norm() / want.norm()).item()
        assert err < 1e-2, (name, err)
    diff = (outs["mma order"].double() - outs["row major"].double()).norm() / want.norm()
    assert diff.item() < 1e-2


def test_unaligned_packed_bytes_take_the_row_major_path(triton_device, monkeypatch):
    # The MMA-order tiles read the packed bytes as int32 words: packed bytes that do not start on 16 bytes (a view
    # into a larger buffer) go through the byte loads instead, with the same result.
    monkeypatch.setenv("QLORA_KERNELS_NF4_DECODE", "twin")
    torch.manual_seed(3)
    M, N, K, r = 2, 32, 128, 8
    w4 = qk.NF4Weight.quantize(torch.randn(N, K, device=triton_device) * K**-0.5)
    packed, *rest = w4.op_storage()
    buffer = torch.zeros(packed.numel() + 16, dtype=torch.uint8, device=triton_device)
    shifted = buffer[4: 4 + packed.numel()]
    shifted.copy_(packed)
    assert shifted.data_ptr() % 16 and packed.data_ptr() % 16 == 0
    x = torch.randn(M, K, device=triton_device).to(torch.bfloat16)
    a = (torch.randn(r, K, device=triton_device) * K**-0.5).to(torch.bfloat16)
    b = (torch.randn(N, r, device=triton_device) * r**-0.5).to(torch.bfloat16)
    config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "SWAP_AB": True, "WARPS": 2,
              "num_warps": 2, "num_stages": 1}
    outs = [launch.nf4_lora_linear_fwd(x, p, *rest, a, b, 2.0, None, 0.0, None, config=config)[0]
            for p in (packed, shifted)]
    want, _ = ref.nf4_lora_linear_fwd(x.double(), packed, *rest, a.double(), b.double(), 2.0, None, 0.0, None)
    for out in outs:
        assert ((out.double() - want).norm() / want.norm()).item() < 1e-2
    assert ((outs[0].double() - outs[1].double()).norm() / want.norm()).item() < 1e-2
