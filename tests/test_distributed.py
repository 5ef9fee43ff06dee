"""DDP and FSDP2 (fully_shard) training of QLoRA models on 2 CPU processes over gloo, the 4-bit base replicated
(``fully_shard_qlora(shard_base=False)``; the sharded base, the default, is tests/test_sharded_base.py's).

One spawned process group runs every distributed case (tests/distributed_workers.py: rank_main; starting processes
is the slow part) and saves what each rank saw; the tests below compare that with single-process runs on the same
data, computed here. Every launch is bounded: a rank that fails takes the others down at once, a hang is killed at the
launch's timeout, and each process group has a 60 s collective timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels import distributed as qkd

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("transformers")

import distributed_workers as workers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
# Float32 runs on 2 ranks versus one: only the order of additions differs (the averaged gradient of two half batches,
# reduce-scattered or all-reduced). Seen: ≤ 1.5e-8 (stack, SGD), ≤ 7e-7 (Llama, AdamW), for updates of about 0.03.
TOLERANCE = {"stack": dict(rtol=1e-5, atol=1e-6), "llama": dict(rtol=1e-5, atol=5e-6)}


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory) -> Path:
    return workers.make_llama_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


class RankResults(dict):
    """One rank's results by case; a case that raised fails the test reading it, with the rank's traceback."""

    def __getitem__(self, case: str):
        found = super().__getitem__(case)
        if isinstance(found, workers.CaseFailed):
            pytest.fail(f"case {case!r} raised on its rank:\n{found}")
        return found


@pytest.fixture(scope="module")
def ranks(llama_checkpoint, tmp_path_factory) -> list[RankResults]:
    """What each of the 2 ranks saw (see distributed_workers.rank_main)."""
    workdir = tmp_path_factory.mktemp("ranks")
    started = time.monotonic()
    workers.launch(workers.rank_main, WORLD_SIZE, args=(str(workdir), str(llama_checkpoint)), timeout=240)
    print(f"2-rank run: {time.monotonic() - started:.1f} s")
    return [RankResults(torch.load(workdir / f"rank{rank}.pt", weights_only=False)) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single(llama_checkpoint) -> dict[str, dict]:
    """The same training runs in this one process, on the whole batch."""
    return {"stack": workers.run_stack("single"), "llama": workers.run_llama("single", llama_checkpoint)}


def assert_same_tensors(actual: dict, expected: dict, exact: bool = False, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        if exact:
            assert torch.equal(actual[name], expected[name]), f"{name} differs"
        else:
            torch.testing.assert_close(actual[name], expected[name], msg=lambda m: f"{name}: {m}", **tolerance)


def assert_same_base(actual: dict, expected: dict) -> None:
    """Base snapshots (distributed_workers.base_storage) equal: every tensor byte for byte, every storage's type and
    dtype."""
    assert actual.keys() == expected.keys() and len(expected) > 0
    for name, value in expected.items():
        if isinstance(value, str):
            assert actual[name] == value, f"{name}: {value} became {actual[name]}"
        else:
            assert torch.equal(actual[name], value), f"{name} differs"


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -------------------------------------------------------------------------------- same result as one process


@pytest.mark.parametrize("kind", ["stack", "llama"])
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_ranks_reach_the_single_process_parameters(ranks, single, kind, engine):
    """Each rank trains on half the batch; with gradients averaged, the LoRA weights after 3 steps (SGD with momentum
    for the stack, AdamW for the Llama) are the single-process run's on the whole batch, on both ranks."""
    expected = single[kind]["lora"]
    assert max_difference(expected, single[kind]["lora_before"]) > 0.01, "training did not move the weights"
    for rank in range(WORLD_SIZE):
        run = ranks[rank][f"{kind} {engine}"]
        assert_same_tensors(run["lora"], expected, **TOLERANCE[kind])
    print(f"{kind} {engine}: max |difference| {max_difference(ranks[0][f'{kind} {engine}']['lora'], expected):.2e}")


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "fsdp_bf16"])
def test_the_fused_path_runs_under_ddp_and_fsdp(ranks, single, engine):
    """Every patched peft layer (14) calls the fused op once per training step, wrapped or not."""
    assert single["llama"]["fused_calls_per_step"] == workers.NUM_LORA_LAYERS
    assert ranks[0][f"llama {engine}"]["fused_calls_per_step"] == workers.NUM_LORA_LAYERS


# ------------------------------------------------------------------------------------------- the 4-bit base


@pytest.mark.parametrize("case", ["stack ddp", "stack fsdp", "stack fsdp_bf16", "llama ddp", "llama fsdp",
                                  "llama fsdp_bf16", "llama fsdp_bf16 bf16-storage"])
def test_training_leaves_the_base_bit_identical(ranks, case):
    """The packed bytes and every quantization statistic, compared as raw bytes, and each storage's type and dtype,
    are what they were before wrapping and training, on both ranks; under mixed precision (param_dtype=bf16) too,
    also for packed bytes stored as bf16 (the stack's second layer, the Llama's 'bf16-storage' case), which a
    parameter cast would have value-converted."""
    for rank in range(WORLD_SIZE):
        run = ranks[rank][case]
        assert_same_base(run["base_after"], run["base_before"])
    kinds = {v for k, v in ranks[0][case]["base_after"].items() if k.endswith(":kind")}
    if case.endswith("bf16-storage"):
        assert kinds == {"Params4bit torch.bfloat16"}
    elif case.startswith("stack"):
        assert "Tensor torch.bfloat16" in kinds


def test_mixed_precision_trains_like_float32(ranks, single):
    """With param_dtype=bf16 the LoRA master weights stay float32 and training follows the float32 run: the stack's
    weights within 5% of the update (SGD; seen: 1%), the Llama's per-rank losses within 0.1% (AdamW's sign-like
    steps make bf16 weights differ by about one step, so the losses are the meaningful comparison there)."""
    for case in ("stack fsdp_bf16", "llama fsdp_bf16"):
        assert ranks[0][case]["trainable_dtypes"] == ["torch.float32"]
    stack_bf16, stack_fp32 = ranks[0]["stack fsdp_bf16"]["lora"], single["stack"]["lora"]
    update = max_difference(stack_fp32, single["stack"]["lora_before"])
    assert 0 < max_difference(stack_bf16, stack_fp32) < 0.05 * update
    for rank in range(WORLD_SIZE):
        bf16_losses = torch.tensor(ranks[rank]["llama fsdp_bf16"]["losses"])
        fp32_losses = torch.tensor(ranks[rank]["llama fsdp"]["losses"])
        torch.testing.assert_close(bf16_losses, fp32_losses, rtol=1e-3, atol=0)
        assert not torch.equal(bf16_losses, fp32_losses), "bf16 compute did not happen"


def test_fsdp_shards_lora_and_frozen_floats_but_not_the_4bit_storage(ranks):
    """After fully_shard_qlora: LoRA weights and frozen float parameters (norms, embeddings) are DTensors holding
    half the rows on each rank; QLoRALinear's NF4 buffers and bitsandbytes' Params4bit stay whole, plain, unsharded."""
    stack = ranks[0]["stack layout"]
    assert stack["blocks.0.linear.lora_A"] == "DTensor (2, 64) torch.float32 grad=True"
    assert stack["blocks.0.linear.lora_B"] == "DTensor (32, 4) torch.float32 grad=True"
    assert stack["blocks.0.norm.weight"] == "DTensor (32,) torch.float32 grad=False"
    assert stack["blocks.0.linear.weight_packed"] == "Tensor (2048, 1) torch.uint8 grad=False"
    assert stack["blocks.1.linear.weight_packed"] == "Tensor (1024, 1) torch.bfloat16 grad=False"
    llama = ranks[0]["llama layout"]
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    assert llama[f"{prefix}.base_layer.weight"] == "Params4bit (2048, 1) torch.uint8 grad=False"
    assert llama[f"{prefix}.lora_A.default.weight"] == "DTensor (4, 64) torch.float32 grad=True"
    assert llama["base_model.model.model.embed_tokens.weight"] == "DTensor (48, 64) torch.float32 grad=False"
    base_weights = [v for k, v in llama.items() if k.endswith("base_layer.weight")]
    assert len(base_weights) == workers.NUM_LORA_LAYERS and all(v.startswith("Params4bit") for v in base_weights)
    assert all(v.startswith("DTensor") for k, v in llama.items() if "lora_" in k)


def test_plain_fully_shard_breaks_bitsandbytes_storage_ours_does_not(ranks):
    """The known bitsandbytes + FSDP breakage, shown: torch's fully_shard without ignored_params turns a Params4bit
    into a DTensor shard without its quantization state; fully_shard_qlora leaves it whole, state attached."""
    found = ranks[0]["plain fully_shard"]
    assert found["fully_shard"] == "DTensor, quant_state lost"
    assert found["fully_shard_qlora"] == "Params4bit, quant_state kept"


def test_ddp_qlora_does_not_broadcast_the_base(ranks):
    """Rank 1 overwrites its NF4 bytes after wrapping: DDP's default broadcast puts rank 0's back before the forward
    (the whole 4-bit base sent every step); under ddp_qlora they stay as rank 1 left them."""
    assert ranks[1]["ddp buffer sync"] == {"ddp_qlora": True, "DistributedDataParallel": False}


def test_wrapping_twice_is_refused(ranks):
    errors = ranks[0]["errors"]
    assert errors["fully_shard_qlora twice"].startswith("ValueError: model is already sharded by fully_shard")
    assert errors["ddp_qlora of an FSDP2 model"].startswith("ValueError: model is sharded by fully_shard")
    assert errors["fully_shard_qlora of a DDP model"].startswith("ValueError: model is wrapped in DistributedData")


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("kind", ["stack", "llama"])
def test_sharded_checkpoint_restores_exactly(ranks, kind):
    """torch.distributed.checkpoint save/load of model + optimizer into a model whose LoRA weights differ and whose
    4-bit bytes were overwritten: LoRA weights equal, base bytes equal, and two more AdamW steps on both give equal
    weights (the optimizer state came back too), on both ranks."""
    for rank in range(WORLD_SIZE):
        run = ranks[rank][f"{kind} checkpoints"]
        assert_same_tensors(run["dcp_lora"], run["saved_lora"], exact=True)
        assert_same_base(run["dcp_base"], run["saved_base"])
        assert run["dcp_lora_types"] == ["DTensor"]
        assert_same_tensors(run["continued_restored_lora"], run["continued_lora"], exact=True)
        assert max_difference(run["continued_lora"], run["saved_lora"]) > 1e-3, "the two more steps did not train"


@pytest.mark.parametrize("kind", ["stack", "llama"])
def test_full_state_dict_round_trip(ranks, kind):
    """get_model_state_dict(full_state_dict=True, cpu_offload=True) gathers whole CPU tensors on rank 0 only, under
    the usual names (bitsandbytes' keys for the bases); set_model_state_dict(full_state_dict=True) loads them on every
    rank exactly. The Llama needs strict=False, for bitsandbytes' own reason (its Linear4bit does not read back the
    quant-state keys it writes); then only those are unexpected, nothing is missing."""
    run = ranks[0][f"{kind} checkpoints"]
    assert run["full_types"] == ["Tensor cpu"]
    assert ranks[1][f"{kind} checkpoints"]["full_keys"] == []
    assert set(run["saved_lora"]) <= set(run["full_keys"])
    base_key = "blocks.0.linear.weight" if kind == "stack" else (
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    assert {base_key, f"{base_key}.absmax", f"{base_key}.quant_state.bitsandbytes__nf4"} <= set(run["full_keys"])
    assert run["full_missing_keys"] == []
    if kind == "stack":
        assert run["full_unexpected_keys"] == []
    else:
        assert run["full_unexpected_keys"] and all(
            re.search(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__nf4)$", k)
            for k in run["full_unexpected_keys"])
    for rank in range(WORLD_SIZE):
        run = ranks[rank][f"{kind} checkpoints"]
        assert_same_tensors(run["full_lora"], run["saved_lora"], exact=True)
        assert_same_base(run["full_base"], run["saved_base"])


# -------------------------------------------------------------------------------- one process, no process group


def test_default_shard_units_are_the_decoder_layers(llama_checkpoint):
    llama = workers.make_llama(llama_checkpoint)
    assert qkd.default_shard_units(llama) == list(llama.base_model.model.model.layers)
    stack = workers.make_stack()
    assert qkd.default_shard_units(stack) == list(stack.blocks)
    # Without a ModuleList of layers: each QLoRA layer.
    loose = nn.Sequential(qk.QLoRALinear.from_linear(nn.Linear(64, 64)), nn.ReLU(),
                          qk.QLoRALinear.from_linear(nn.Linear(64, 64)))
    assert qkd.default_shard_units(loose) == [loose[0], loose[2]]
    assert len(qkd.qlora_layers(llama)) == workers.NUM_LORA_LAYERS


def test_frozen_quantized_params_are_the_bitsandbytes_storages(llama_checkpoint):
    import bitsandbytes as bnb

    llama = workers.make_llama(llama_checkpoint)
    found = qkd.frozen_quantized_params(llama)
    expected = {m.weight for m in llama.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert found == expected and len(found) == workers.NUM_LORA_LAYERS
    assert qkd.frozen_quantized_params(workers.make_stack()) == set()  # QLoRALinear keeps its storage in buffers


def test_fully_shard_qlora_rejects_bad_input():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        qkd.fully_shard_qlora("model")
    with pytest.raises(ValueError, match="holds no QLoRA layer"):
        qkd.fully_shard_qlora(nn.Sequential(nn.Linear(4, 4)))
    frozen = workers.make_stack().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        qkd.fully_shard_qlora(frozen)
    with pytest.raises(TypeError, match="MixedPrecisionPolicy"):
        qkd.fully_shard_qlora(workers.make_stack(), mp_policy=torch.bfloat16)
    with pytest.raises(ValueError, match="units must be submodules"):
        qkd.fully_shard_qlora(workers.make_stack(), units=[nn.Linear(2, 2)])
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        qkd.fully_shard_qlora(workers.make_stack())


def test_ddp_qlora_rejects_bad_input():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        qkd.ddp_qlora(None)
    with pytest.raises(ValueError, match="no trainable parameter"):
        qkd.ddp_qlora(workers.make_stack().requires_grad_(False))
    with pytest.raises(ValueError, match="buffer broadcast off"):
        qkd.ddp_qlora(workers.make_stack(), broadcast_buffers=True)


def test_qlora_linear_state_dict_works_with_torch_state_dict_api():
    """torch.distributed.checkpoint's get/set_model_state_dict resolve every state-dict key by attribute access;
    QLoRALinear's bitsandbytes-named base keys resolve through ``layer.weight`` (as bitsandbytes' Params4bit does)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = workers.make_stack()
    layer = model.blocks[0].linear
    assert torch.equal(layer.weight.absmax, layer.weight_absmax)
    assert torch.equal(layer.weight.quant_state.bitsandbytes__nf4,
                       layer.base_weight.state_dict()["weight.quant_state.bitsandbytes__nf4"])
    with pytest.raises(AttributeError, match="no state-dict entry 'weight.nonsense'"):
        layer.weight.nonsense
    state = get_model_state_dict(model)
    assert state.keys() == model.state_dict().keys()
    other = workers.make_stack(lora_seed=5)
    workers.corrupt_base(other)
    set_model_state_dict(other, state)  # strict
    assert_same_base(workers.base_storage(other), workers.base_storage(model))
    assert_same_tensors(workers.trainable_full(other), workers.trainable_full(model), exact=True)


# -------------------------------------------------------------------------------------------------- launcher


def test_launch_stops_all_ranks_when_one_fails():
    """Rank 1 raises while rank 0 is busy for an hour: the launch reports rank 1's error and stops rank 0 at once."""
    import torch.multiprocessing as mp

    started = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 gives up"):
        workers.launch(workers.fail_on_rank_1, WORLD_SIZE, timeout=60)
    assert time.monotonic() - started < 30


def test_launch_kills_ranks_that_hang():
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 5 s"):
        workers.launch(workers.hang, WORLD_SIZE, timeout=5)
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------------------------------- example


def run_bounded(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a command (torchrun) with its output in a file; on timeout, SIGTERM it (torchrun then stops its ranks,
    which run in sessions of their own), SIGKILL what is left of its process group, and fail with the output."""
    log_path = cwd / "output.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=30)
            finally:
                with contextlib.suppress(ProcessLookupError):  # gone already, the usual case
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            pytest.fail(f"{' '.join(command)} did not finish within {timeout} s:\n{log_path.read_text()}")
    return subprocess.CompletedProcess(command, process.returncode, log_path.read_text(), "")


def test_fsdp_example_smoke_run(tmp_path):
    """torchrun --nproc_per_node=2 examples/fsdp_qlora.py --smoke: FSDP2 over gloo, loss printed, adapter saved by
    rank 0 as an ordinary peft adapter with trained weights."""
    safetensors = pytest.importorskip("safetensors.torch")
    out = tmp_path / "adapter"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "examples" / "fsdp_qlora.py"), "--smoke", "--out", str(out)]
    result = run_bounded(command, tmp_path, timeout=240)
    log = result.stdout
    assert result.returncode == 0, log
    assert "14 LoRA layers on the fused path; FSDP2 over 2 ranks (gloo, cpu, float32)" in log, log
    assert re.search(r"training loss: [\d.]+ .* -> [\d.]+", log), log
    assert len(re.findall(r"^  step +\d+  loss [\d.]+$", log, flags=re.M)) >= 2, log
    weights = safetensors.load_file(out / "adapter_model.safetensors")
    lora_A = [v for k, v in weights.items() if "lora_A" in k]
    lora_B = [v for k, v in weights.items() if "lora_B" in k]
    assert len(lora_A) == 14 and len(lora_B) == 14
    assert all(v.shape[0] == 4 for v in lora_A), "saved a shard instead of the whole tensor"
    assert any(v.abs().sum() > 0 for v in lora_B), "the adapter saved is untrained"


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_nccl_world_size_one_smoke(llama_checkpoint, tmp_path):
    """On one GPU over nccl: FSDP2 (float32) and DDP of the stack match the single-process run, the patched Llama
    trains under bf16 mixed precision with its base bit-identical and the fused path taken, and the sharded and full
    checkpoints restore exactly."""
    workers.launch(workers.gpu_main, 1, args=(str(tmp_path), str(llama_checkpoint)), timeout=300, backend="nccl")
    found = torch.load(tmp_path / "gpu.pt", weights_only=False)
    for engine in ("ddp", "fsdp"):
        assert_same_tensors(found[f"stack {engine}"]["lora"], found["stack single"]["lora"], rtol=1e-4, atol=1e-5)
    llama = found["llama fsdp_bf16"]
    assert llama["fused_calls_per_step"] == workers.NUM_LORA_LAYERS
    assert_same_base(llama["base_after"], llama["base_before"])
    assert torch.isfinite(torch.tensor(llama["losses"])).all()
    checkpoints = found["llama checkpoints"]
    assert_same_tensors(checkpoints["dcp_lora"], checkpoints["saved_lora"], exact=True)
    assert_same_tensors(checkpoints["full_lora"], checkpoints["saved_lora"], exact=True)
    assert_same_tensors(checkpoints["continued_restored_lora"], checkpoints["continued_lora"], exact=True)
