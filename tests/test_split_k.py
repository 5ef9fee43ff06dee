"""Split-K of the decode-sized GEMMs (M ≤ 16): the split count (``_common.split_count``), the GEMMs run with every
split count against the float64 reference (forward and dX, NaN-filled outputs, the per-element decode path, more
splits than reduction steps), the partial sums' kernel on its own, and that a split result is the same every run.

Runs under the interpreter here and compiled on a GPU (the sm_90 compile check covers the split-capable decode
candidates and ``_split_sum_kernel``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import triton

from qlora_kernels.triton_kernels import lora_linear as launch
from qlora_kernels.triton_kernels import lora_linear_gemm as gemm
from qlora_kernels.triton_kernels._common import MAX_SPLITS, split_count, split_limit
from tests.helpers import nan_filled
from tests.test_lora_linear import Case, _compare, _run_launchers, gold, make_problem


def _cost(tiles: int, reduce_tiles: int, splits: int, sms: int) -> int:
    per_split = -(-reduce_tiles // splits)
    return -(-(tiles * splits) // sms) * per_split


@pytest.mark.parametrize("tiles, reduce_tiles", list(itertools.product([1, 3, 16, 64, 128, 133, 224, 1000],
                                                                       [1, 2, 5, 16, 17, 128])))
def test_split_count_is_the_cheapest_and_leaves_no_split_empty(tiles, reduce_tiles):
    sms = 132
    splits = split_count(tiles, reduce_tiles, sms)
    assert 1 <= splits <= min(MAX_SPLITS, reduce_tiles)
    per_split = -(-reduce_tiles // splits)
    assert (splits - 1) * per_split < reduce_tiles  # the kernel's share of the last split is not empty
    best = min(_cost(tiles, reduce_tiles, s, sms) for s in range(1, min(MAX_SPLITS, reduce_tiles) + 1))
    assert _cost(tiles, reduce_tiles, splits, sms) == best
    if tiles * splits < sms:  # short of the SMs only where no split count at that cost reaches them
        assert all(tiles * s < sms for s in range(1, min(MAX_SPLITS, reduce_tiles) + 1)
                   if _cost(tiles, reduce_tiles, s, sms) == best)


def test_split_count_at_the_decode_shapes():
    # M = 1 through 4096 x 4096: 16x64x256 forward tiles (64 of them, 16 steps) split 4 ways, 256 programs; the
    # dX's 16x64x256 tiles (16 output tiles of K, 64 steps over N) 16 ways, 256 programs.
    assert split_count(64, 16, 132, split_limit(1, 4096)) == 4
    assert split_count(16, 64, 132, split_limit(1, 4096)) == 16
    assert split_count(1, 1, 132) == 1
    assert split_count(132, 16, 132) == 1


def test_split_limit_keeps_the_partial_sums_within_an_eighth_of_the_weight():
    for M, reduce_len in itertools.product([1, 2, 5, 16], [64, 256, 4096, 14336]):
        limit = split_limit(M, reduce_len)
        assert 1 <= limit <= MAX_SPLITS
        if limit > 1:
            assert 8 * limit * M <= reduce_len / 2 / 8  # partial-sum bytes per output column vs the weight's
    assert split_limit(16, 4096) == 2 and split_limit(1, 4096) == MAX_SPLITS


SPLIT_CASES = [
    Case(1, 256, 256, 4, 64, True, True, 0.0),
    Case(16, 64, 320, 16, 64, False, False, 0.1),
    Case(5, 33, 130, 16, 128, True, True, 0.0),  # K % blocksize != 0: the per-element decode path
]


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
@pytest.mark.parametrize("swap", [True, False])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
def test_split_gemms_match_the_reference(case, swap, splits, device):
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SWAP_AB=swap, SPLIT_K=True, splits=splits)
    if device.type == "cuda":
        config.update(num_warps=4, num_stages=2)
    p = make_problem(case, torch.float32, device)
    _compare(_run_launchers(p, config=config), gold(p), torch.float32)


def test_default_decode_launches_split(device):
    # The launches' own choice at M = 1 (no forced config) splits both GEMMs here, and matches the reference.
    case = SPLIT_CASES[0]
    for kind, out_cols, reduce_len in (("fwd", case.N, case.K), ("dx", case.K, case.N)):
        g = launch._gemm_launch(kind, case.M, out_cols, reduce_len, True, device, None)
        assert g.max_splits > 1 and all(c.kwargs["SPLIT_K"] for c in g.kernel.configs), kind
    p = make_problem(case, torch.float32, device)
    _compare(_run_launchers(p), gold(p), torch.float32)


def test_split_result_is_the_same_every_run(device):
    p = make_problem(SPLIT_CASES[1], torch.float32, device)
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SWAP_AB=True, SPLIT_K=True, splits=3)
    if device.type == "cuda":
        config.update(num_warps=4, num_stages=2)
    first, second = (_run_launchers(p, config=config) for _ in range(2))
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_sum_kernel_adds_the_splits_in_order_into_strided_output(dtype, device):
    splits, M, out_cols = 3, 5, 37
    parts = torch.randn(splits + 2, M, out_cols, device=device)  # a buffer with more slices than the splits used
    parts[splits:] = float("nan")  # slices past the split count are never read
    base = nan_filled((out_cols, 2 * M), dtype, device)
    out = base[:, ::2].t()  # [M, out_cols] with strides (2, 2 * M)
    block = 64
    gemm._split_sum_kernel[(triton.cdiv(M * out_cols, block),)](
        parts, out, M, out_cols, splits, out.stride(0), out.stride(1), BLOCK=block,
    )
    want = (parts[0] + parts[1] + parts[2]).to(dtype)
    assert torch.equal(out, want)
    assert torch.isnan(base[:, 1::2]).all()  # nothing written between the strided elements


def test_forced_splits_must_be_a_positive_int(device):
    p = make_problem(SPLIT_CASES[0], torch.float32, device)
    for bad in (0, -1, 2.0):
        config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SWAP_AB=True, SPLIT_K=True, splits=bad)
        with pytest.raises(ValueError, match="splits"):
            _run_launchers(p, config=config)
