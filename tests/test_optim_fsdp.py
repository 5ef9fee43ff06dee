"""The paged optimizers on FSDP2's DTensor parameters: 2 gloo ranks on the CPU (issue 16).

Before, a step over ``fully_shard``'s parameters failed ("mixed torch.Tensor and DTensor"). Now each rank steps its
local shard: the sharded runs reach the single process's parameters (torch's fully_shard on an MLP whose shards are
whole 8-bit blocks; the package's fully_shard_qlora on QLoRA layers), every rank's state is its shard's, a
per-rank state_dict() resumes exactly, and another rank's state (directly, or mixed up by torch.distributed.checkpoint)
is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import optim_fsdp_workers as fsdp_workers  # noqa: E402

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import distributed_workers as workers  # noqa: E402

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("optim_fsdp")
    workers.launch(fsdp_workers.rank_main, WORLD_SIZE, args=(str(workdir),), timeout=240)
    return [torch.load(workdir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("name", list(fsdp_workers.OPTIMIZERS))
def test_sharded_steps_reach_the_single_process_parameters(ranks, name):
    single = fsdp_workers.run_mlp(name)
    start = {n: p.detach() for n, p in fsdp_workers.make_mlp().named_parameters()}
    for rank in ranks:
        for key, expected in single["params"].items():
            moved = (expected - start[key]).norm()
            error = (rank[name]["params"][key] - expected).norm()
            assert moved > 0 and error <= 1e-5 * moved, f"{name} {key}: {error / moved:.2e}"


@pytest.mark.parametrize("name", list(fsdp_workers.OPTIMIZERS))
def test_each_rank_keeps_its_shard_state_and_resumes_exactly(ranks, name):
    for rank in ranks:
        shapes = rank[name]["state_shapes"]
        assert shapes["0.weight"] == ((32, 64), torch.uint8 if name.endswith("8bit") else torch.float32)
        assert shapes["0.bias"] == ((32,), torch.float32)  # under min_8bit_size: float32 state
        for after, resumed in zip(rank[name]["after"], rank[name]["resumed"]):
            assert torch.equal(after, resumed)


def test_fully_shard_qlora_with_the_readme_call(ranks):
    single = fsdp_workers.run_qlora_stack()
    for rank in ranks:
        for key, expected in single["params"].items():
            torch.testing.assert_close(rank["qlora_stack"]["params"][key], expected, rtol=1e-5, atol=1e-6)


def test_another_ranks_state_is_refused_directly_and_through_distributed_checkpoint(ranks):
    """The state is per rank (an 8-bit state's absmax blocks follow the local shard). torch.distributed.checkpoint
    keeps one copy of plain tensors for all ranks, so without the shard marker a rank would load another rank's
    moments (seen: rank 0 got rank 1's '0.weight' state, rank 1 rank 0's '0.bias'); now every mix-up is refused."""
    for rank in ranks:
        mixed_up = rank["mixed_up"]
        assert mixed_up["swapped"] is not None and "per rank" in mixed_up["swapped"]
        assert mixed_up["dcp"] is not None and "per rank" in mixed_up["dcp"], mixed_up
