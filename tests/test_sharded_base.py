"""FSDP2 with the NF4 base sharded across the ranks (``fully_shard_qlora``, ``shard_base=True``), on CPU over gloo.

Two launches (tests/sharded_workers.py): 2 ranks (the 4-block QLoRALinear stack under several engines, the patched
peft Llama, the checkpoints of both) and 4 ranks (the stack, its checkpoints, then a rank that dies). Each rank saves
what it saw; the tests compare it with one process on the whole batch, computed here. Every launch is bounded by a
timeout, every process group by a 60 s collective timeout.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels import distributed as qkd
from qlora_kernels import sharding

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("transformers")

import distributed_workers as dw  # noqa: E402
import sharded_workers as sw  # noqa: E402

# Float32 on several ranks versus one: only the order of additions differs (seen: ≤ 7e-8 for the stack's weights after
# 2 AdamW steps, ≤ 1e-9 for its gradients).
TOLERANCE = dict(rtol=1e-5, atol=5e-6)


class RankResults(dict):
    def __getitem__(self, case: str):
        found = super().__getitem__(case)
        if isinstance(found, dw.CaseFailed):
            pytest.fail(f"case {case!r} raised on its rank:\n{found}")
        return found


def launch(fn, world_size: int, workdir, *args, timeout: float) -> list[RankResults]:
    started = time.monotonic()
    dw.launch(fn, world_size, args=(str(workdir),) + tuple(str(a) for a in args), timeout=timeout)
    print(f"{world_size}-rank run: {time.monotonic() - started:.1f} s")
    ranks = [RankResults(torch.load(workdir / f"rank{r}.pt", weights_only=False)) for r in range(world_size)]
    print("rank 0, per case (wall s, CPU s of the process so far):",
          {k: (round(wall, 1), round(cpu, 1)) for k, (wall, cpu) in dict.__getitem__(ranks[0], "timings").items()})
    return ranks


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    return dw.make_llama_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def two(llama_checkpoint, tmp_path_factory) -> list[RankResults]:
    return launch(sw.two_rank_main, 2, tmp_path_factory.mktemp("two"), llama_checkpoint, timeout=300)


@pytest.fixture(scope="module")
def four_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("four")


@pytest.fixture(scope="module")
def four(four_dir) -> list[RankResults]:
    return launch(sw.four_rank_main, 4, four_dir, timeout=300)


@pytest.fixture(scope="module")
def single(llama_checkpoint) -> dict:
    return {"stack": sw.run_training("stack", "single", 0, 1),
            "llama": sw.run_training("llama", "single", 0, 1, llama_checkpoint)}


def assert_close_dicts(actual: dict, expected: dict, exact: bool = False, **tolerance) -> None:
    assert actual.keys() == expected.keys() and expected
    for name in expected:
        if exact:
            assert torch.equal(actual[name], expected[name]), f"{name} differs"
        else:
            torch.testing.assert_close(actual[name], expected[name], msg=lambda m: f"{name}: {m}", **tolerance)


def assert_same_base(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys() and expected
    for name, value in expected.items():
        if isinstance(value, str):
            assert actual[name] == value, f"{name}: {value} became {actual[name]}"
        else:
            assert torch.equal(actual[name], value), f"{name} differs"


# ------------------------------------------------------------------------------------------- bytes per rank


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_holds_one_world_th_of_the_base(two, four, world_size):
    """Per rank and per sharded tensor (packed bytes, absmax): ceil(n / world) elements, so the rank's bytes are
    total / world plus less than one element per tensor, well within one block; the rest of the storage (the layers'
    whole tensors) is freed: the layers' packed buffers read as empty while sharded."""
    ranks = {2: two, 4: four}[world_size]
    for rank in range(world_size):
        found = ranks[rank]["stack sharded"]["bytes"]
        assert found["layers"] == len(sw.STORAGES) and found["full"] > 0
        for name, (local, full) in found["per_field"].items():
            assert full / world_size <= local < full / world_size + 4, name  # < one element of up to 4 bytes
        assert found["full"] / world_size <= found["shard"] < found["full"] / world_size + 4 * len(found["per_field"])
        assert found["resident_idle"] == found["shard"], "whole storage left allocated while sharded"
        assert ranks[rank]["stack sharded"]["packed_shapes_while_sharded"] == [(0,)]
        assert ranks[rank]["stack sharded"]["idle_after"] == found["shard"], "storage not freed after the step"
    print(f"{world_size} ranks: base {found['full']} B whole, {found['shard']} B per rank")


@pytest.mark.parametrize("world_size", [2, 4])
def test_peak_base_memory_is_the_shards_plus_one_layer(two, four, world_size):
    """Over a forward + backward, the base's resident bytes on a rank (measured from the storages) peak at its shards
    plus one layer gathered whole: under the replicated total. With reshard_after_forward=False every layer stays
    gathered from its forward to its backward, so the peak is the shards plus the whole base."""
    ranks = {2: two, 4: four}[world_size]
    for rank in range(world_size):
        run = ranks[rank]["stack sharded"]
        b = run["bytes"]
        assert run["step_peak"] == b["shard"] + b["max_layer"]
        assert run["step_peak"] < b["full"], "no saving over the replicated base"
        assert run["after_backward"] == b["shard"], "a layer stayed gathered after backward"
    if world_size == 2:
        keep = two[0]["stack sharded_keep"]
        assert keep["step_peak"] == keep["bytes"]["shard"] + keep["bytes"]["full"]
    print(f"{world_size} ranks: peak {run['step_peak']} B per rank, replicated {b['full']} B")


# ------------------------------------------------------------------------------------ same as one process


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_base_trains_like_one_process(two, four, single, world_size):
    """Each rank on its slice of the batch: the mean of the ranks' first losses is the one-process loss, the LoRA
    gradients (reduce-scattered, gathered here) are the one-process gradients, and after 2 AdamW steps the weights
    are the one-process weights, on every rank."""
    ranks = {2: two, 4: four}[world_size]
    expected = single["stack"]
    losses = torch.tensor([ranks[r]["stack sharded"]["first_loss"] for r in range(world_size)])
    torch.testing.assert_close(losses.mean(), torch.tensor(expected["first_loss"]), rtol=1e-6, atol=0)
    for rank in range(world_size):
        run = ranks[rank]["stack sharded"]
        assert_close_dicts(run["grads"], expected["grads"], **TOLERANCE)
        assert_close_dicts(run["lora"], expected["lora"], **TOLERANCE)
        assert_same_base(run["base_after"], run["base_before"])
    assert max((expected["lora"][k] - dw.trainable_full(sw.make_deep_stack())[k]).abs().max()
               for k in expected["lora"]) > 1e-3, "training did not move the weights"


def test_sharded_and_replicated_base_give_identical_training(two):
    """Sharding moves bytes, never values: the same 2 ranks with the base replicated reach bit-identical gradients
    and weights."""
    for rank in range(2):
        sharded, replicated = two[rank]["stack sharded"], two[rank]["stack replicated"]
        assert replicated["bytes"] == {}
        assert_close_dicts(sharded["grads"], replicated["grads"], exact=True)
        assert_close_dicts(sharded["lora"], replicated["lora"], exact=True)
        assert sharded["losses"] == replicated["losses"]
        keep = two[rank]["stack sharded_keep"]
        assert_close_dicts(keep["lora"], replicated["lora"], exact=True)


def test_mixed_precision_leaves_the_sharded_base_bit_identical(two):
    """param_dtype=bf16: the base (packed bytes stored as bf16 in two blocks) is gathered as raw bytes, never cast;
    training follows the float32 run (per-rank losses within 1%; AdamW's sign-like steps make bf16 weights differ by
    about one step, so the losses are the meaningful comparison), and bf16 compute did happen."""
    for rank in range(2):
        run = two[rank]["stack sharded_bf16"]
        assert_same_base(run["base_after"], run["base_before"])
        assert "Tensor torch.bfloat16" in {v for k, v in run["base_after"].items() if k.endswith(":kind")}
        bf16_losses = torch.tensor(run["losses"])
        fp32_losses = torch.tensor(two[rank]["stack sharded"]["losses"])
        torch.testing.assert_close(bf16_losses, fp32_losses, rtol=1e-2, atol=0)
        assert not torch.equal(bf16_losses, fp32_losses), "bf16 compute did not happen"


def test_patched_peft_llama_trains_sharded_like_one_process(two, single):
    """The peft LoRA Llama over bitsandbytes 4-bit, patched onto the fused kernels: its 14 Params4bit bases sharded
    (the fused path still taken by every layer), loss and LoRA gradients as one process, the base unchanged."""
    expected = single["llama"]
    losses = torch.tensor([two[r]["llama sharded"]["first_loss"] for r in range(2)])
    torch.testing.assert_close(losses.mean(), torch.tensor(expected["first_loss"]), rtol=1e-5, atol=0)
    for rank in range(2):
        run = two[rank]["llama sharded"]
        assert run["fused_calls"] == dw.NUM_LORA_LAYERS == expected["fused_calls"]
        assert run["bytes"]["layers"] == dw.NUM_LORA_LAYERS
        assert run["bytes"]["full"] / 2 <= run["bytes"]["shard"] < run["bytes"]["full"] / 2 + 4 * 28
        assert_close_dicts(run["grads"], expected["grads"], rtol=1e-4, atol=1e-6)
        assert_close_dicts(run["lora"], expected["lora"], rtol=1e-4, atol=5e-6)
        assert_same_base(run["base_after"], run["base_before"])
        assert run["step_peak"] < run["bytes"]["shard"] + run["bytes"]["full"] / 2
    b = two[0]["llama sharded"]["bytes"]
    print(f"llama, 2 ranks: base {b['full']} B whole, {b['shard']} B per rank (+{b['replicated']} B replicated "
          f"statistics), peak {two[0]['llama sharded']['step_peak']} B over a step")


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("case", [(2, "stack"), (2, "llama"), (4, "stack")])
def test_sharded_checkpoint_round_trip_is_exact(two, four, case):
    """torch.distributed.checkpoint of model + optimizer: the base's packed bytes and absmax are saved as DTensor
    pieces (each rank its own), and loading into a model with other LoRA weights and overwritten base bytes restores
    both exactly; two more steps on each then agree bit for bit."""
    world_size, kind = case
    ranks = {2: two, 4: four}[world_size]
    for rank in range(world_size):
        run = ranks[rank][f"{kind} checkpoints"]
        entries = list(run["sharded_entry"].values())
        assert all(e.startswith("DTensor") for e in entries), entries
        assert_close_dicts(run["dcp_lora"], run["saved_lora"], exact=True)
        assert_same_base(run["dcp_base"], run["saved_base"])
        assert run["dcp_missing"] == []
        assert_close_dicts(run["continued_restored_lora"], run["continued_lora"], exact=True)
    packed, absmax = ranks[0][f"{kind} checkpoints"]["sharded_entry"].values()
    assert packed.startswith("DTensor (2048, 1) local (" + str(2048 // world_size) + ", 1)")


@pytest.mark.parametrize("case", [(2, "stack"), (2, "llama"), (4, "stack")])
def test_full_state_dict_is_whole_and_loads_into_bitsandbytes(two, four, llama_checkpoint, case):
    """get_model_state_dict(full_state_dict=True, cpu_offload=True) gathers the whole NF4 tensors under bitsandbytes'
    keys; bitsandbytes' Params4bit.from_prequantized reads them into the weight the model started from (its
    dequantization equals ours), and loading the full state dict back into a sharded model restores it exactly."""
    world_size, kind = case
    ranks = {2: two, 4: four}[world_size]
    run = ranks[0][f"{kind} checkpoints"]
    packed, absmax = run["full_entry"].values()
    assert packed.startswith("Tensor torch.uint8 (2048, 1)") and absmax == "Tensor torch.uint8 (64,)"
    if kind == "stack":
        layer = sw.make_deep_stack().blocks[0].linear
    else:
        layer = qk.QLoRALinear.from_bnb(dw.make_llama(llama_checkpoint).base_model.model.model.layers[0]
                                        .self_attn.q_proj.base_layer)
    torch.testing.assert_close(run["bnb_dequantized"], layer.base_weight.dequantize(torch.float32), rtol=0, atol=0)
    for rank in range(world_size):
        run = ranks[rank][f"{kind} checkpoints"]
        assert run["full_missing"] == []
        assert_close_dicts(run["full_lora"], run["saved_lora"], exact=True)
        assert_same_base(run["full_base"], run["saved_base"])
        if kind == "stack":
            assert run["full_unexpected"] == []


# ------------------------------------------------------------------------------------------------ a dead rank


def test_a_dead_rank_makes_the_others_fail_in_bounded_time(four, four_dir):
    """After the 4-rank cases, rank 3 exits without a word; the other ranks' next training step (its collectives:
    FSDP2's and the sharded base's all-gathers) raises instead of waiting forever, within the process group's 60 s
    timeout."""
    for rank in range(3):
        found = torch.load(four_dir / f"dead_rank{rank}.pt", weights_only=False)
        assert found["error"] is not None, f"rank {rank} trained on without its peer"
        assert found["seconds"] < 90, found
        print(f"rank {rank}: failed after {found['seconds']:.1f} s: {found['error'][:120]}")


# -------------------------------------------------------------------------------- one process, no process group


def test_chunk_range_is_torch_chunk():
    for numel in (1, 5, 64, 2049):
        for world_size in (1, 2, 3, 4, 8):
            pieces = torch.arange(numel).chunk(world_size)
            for rank in range(world_size):
                start, length, chunk = sharding.chunk_range(numel, world_size, rank)
                expected = pieces[rank] if rank < len(pieces) else torch.empty(0, dtype=torch.long)
                assert torch.equal(torch.arange(numel)[start:start + length], expected)
                assert chunk == -(-numel // world_size)
    with pytest.raises(ValueError, match="rank < world_size"):
        sharding.chunk_range(10, 2, 2)


def test_nf4_storage_bytes_match_a_quantized_weight():
    w4 = qk.NF4Weight.quantize(torch.randn(96, 160), blocksize=64, double_quant=True)
    parts = sharding.nf4_storage_bytes(96 * 160, 64, True)
    assert parts["packed"] == w4.packed.numel() and parts["absmax"] == w4.absmax.numel()
    replicated = sum(t.numel() * t.element_size() for t in (w4.quant_map, w4.nested_absmax, w4.offset,
                                                            w4.nested_quant_map))
    assert parts["replicated"] == replicated


def test_fully_shard_qlora_checks_shard_base():
    with pytest.raises(TypeError, match="shard_base must be a bool"):
        qkd.fully_shard_qlora(dw.make_stack(), shard_base="yes")
    assert qkd.sharded_bases(nn.Linear(2, 2)) is None
    with qkd.unsharded_bases(dw.make_stack()) as model:  # no sharded base: nothing to gather
        assert model.blocks[0].linear.weight_packed.numel() > 0


# -------------------------------------------------------------------------------------------------- the plan


def test_fsdp_example_plan_prints_a_70b_estimate_for_2_4_8_ranks():
    """python examples/fsdp_qlora.py --plan (no torchrun): a table per rank count; the base's per-rank pieces halve
    as the ranks double and are the whole base / ranks (to rounding); the assumptions are printed."""
    import re
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[1] / "examples" / "fsdp_qlora.py"
    result = subprocess.run([sys.executable, str(example), "--plan"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"2 ranks\s+4 ranks\s+8 ranks", out), out
    pieces = [float(v) for v in re.search(r"NF4 base, this rank's pieces\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
                                          out).groups()]
    whole = float(re.search(r"the NF4 base whole.*: ([\d.]+) GiB", out).group(1))
    for world_size, value in zip((2, 4, 8), pieces):
        assert abs(value - whole / world_size) <= 0.01, (world_size, value, whole)
    assert 30 < whole < 40, "a 70B NF4 base is about 35 GB"
    totals = [float(v) for v in re.search(r"total\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out).groups()]
    assert totals[0] > totals[1] > totals[2]
    for item in ("LoRA weights", "AdamW state", "activations (assumed", "Assumptions:", "micro-batch of 1 x 2048"):
        assert item in out, item


def test_tensor_shard_keeps_its_piece_and_frees_the_rest():
    """Without a process group: rank 1 of 3 keeps rows [4, 8) of 10 (padded to 4), freeing empties the layer's
    tensor and every registered alias (shape (0,), 0 bytes of storage), a whole tensor loads as this rank's rows,
    and wrong shapes or shared storage are refused with ValueError naming the tensor."""
    tensor = torch.arange(10, dtype=torch.uint8).reshape(10, 1)
    alias = tensor.view(-1)
    shard = sharding.TensorShard("layer.weight", tensor, [alias], rank=1, world_size=3, group=None)
    assert torch.equal(shard.local, torch.tensor([4, 5, 6, 7], dtype=torch.uint8))
    shard.free()
    assert tensor.shape == (0,) and alias.shape == (0,) and shard.storage.nbytes() == 0
    shard.load(torch.arange(100, 110, dtype=torch.uint8).reshape(10, 1))
    assert torch.equal(shard.local, torch.tensor([104, 105, 106, 107], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"layer.weight must be torch.uint8 \(10, 1\)"):
        shard.load(torch.zeros(9, 1, dtype=torch.uint8))
    with pytest.raises(TypeError, match="layer.weight must be a tensor"):
        shard.load([1, 2])
    with pytest.raises(ValueError, match="shares its storage"):
        sharding.TensorShard("layer.weight.absmax", torch.zeros(20)[4:], [], 0, 2, None)
    with pytest.raises(ValueError, match=r"shape \[n\] or \[n, 1\]"):
        sharding.TensorShard("w", torch.zeros(4, 4), [], 0, 2, None)
