"""Models, training runs and a bounded process launcher for tests/test_distributed.py.

The spawned ranks import this module by name (spawn pickles functions by reference), so it holds everything they run.
Each training run takes an ``engine``: "single" (one process, the whole batch), "ddp", "fsdp" (float32) or
"fsdp_bf16" (FSDP2 with ``MixedPrecisionPolicy(param_dtype=bf16)``), both FSDP2 ones with the 4-bit base replicated
(``shard_base=False``; tests/sharded_workers.py runs the sharded base); the distributed ones give each rank its slice of
the same batch, so with equal slices their averaged gradients are the single run's.
"""

from __future__ import annotations

import datetime
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels import distributed as qkd

ENGINES = ("single", "ddp", "fsdp", "fsdp_bf16")
PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=60)  # a collective whose peer died fails instead of hanging

# --------------------------------------------------------------------------------------------------- launcher


def launch(fn: Callable, world_size: int, args: tuple = (), timeout: float = 120.0, backend: str = "gloo") -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined in a process group.

    Bounded: if a rank fails, the others are terminated and its traceback is raised here
    (torch.multiprocessing.ProcessRaisedException); if they have not all finished within ``timeout`` seconds, all are
    killed and TimeoutError is raised.
    """
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as rendezvous:
        init_method = f"file://{Path(rendezvous) / 'init'}"  # a fresh file: no port to collide with other runs
        context = mp.start_processes(
            _rank_entry, args=(fn, world_size, backend, init_method, args), nprocs=world_size, join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{world_size} ranks of {fn.__name__} did not finish within {timeout:.0f} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()


def _rank_entry(rank: int, fn: Callable, world_size: int, backend: str, init_method: str, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a small CPU: no oversubscription
    if backend == "nccl":
        torch.cuda.set_device(rank)  # before the group: nccl binds each rank to the current device
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=PROCESS_GROUP_TIMEOUT)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------ models


class Block(nn.Module):
    """A QLoRALinear, then a frozen LayerNorm (a frozen float parameter FSDP2 shards) and tanh."""

    def __init__(self, features: int, quant_storage: torch.dtype) -> None:
        super().__init__()
        weight = torch.randn(features, features) / features**0.5
        w4 = qk.NF4Weight.quantize(weight, quant_storage=quant_storage)
        self.linear = qk.QLoRALinear(w4, bias=0.1 * torch.randn(features), r=4, lora_alpha=8)
        with torch.no_grad():
            self.linear.lora_B.normal_(std=0.1)  # B = 0 at init would hide lora_A's gradient in the first step
        self.norm = nn.LayerNorm(features)
        self.norm.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.norm(self.linear(x)))


class Stack(nn.Module):
    """QLoRALinear blocks in an nn.ModuleList, the first storing its packed bytes as uint8, the second as bf16 (the
    storage that FSDP mixed precision would value-cast if it treated it as a parameter)."""

    def __init__(self, features: int = 64, storages: tuple = (torch.uint8, torch.bfloat16)) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(features, storage) for storage in storages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def make_stack(base_seed: int = 0, lora_seed: int | None = None, device: str | torch.device = "cpu") -> Stack:
    """The stack with its NF4 bases drawn from ``base_seed`` and its LoRA weights from ``lora_seed`` (default: the
    same); identical on every rank for the same seeds."""
    torch.manual_seed(base_seed)
    model = Stack()
    if lora_seed is not None:
        generator = torch.Generator().manual_seed(lora_seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.to(device)


def stack_batch(device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).to(device)


def stack_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).float().pow(2).mean()


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
NUM_LORA_LAYERS = len(LLAMA_TARGETS) * LLAMA["num_hidden_layers"]


def make_llama_checkpoint(path: Path) -> Path:
    """A tiny random Llama saved in float32: every rank loads the same weights, hence the same NF4 bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(path)
    return path


def make_llama(checkpoint: Path, quant_storage: torch.dtype = torch.uint8, lora_seed: int = 1,
               device: str | torch.device = "cpu") -> nn.Module:
    """The checkpoint loaded 4-bit by transformers + bitsandbytes (as QLoRA users load), peft LoRA on every linear of
    the decoder, patched onto the fused kernels."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=quant_storage,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM.from_pretrained(checkpoint, quantization_config=quantization, dtype=torch.float32,
                                                device_map={"": torch.device(device)})
        torch.manual_seed(lora_seed)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS))
    generator = torch.Generator().manual_seed(lora_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init would hide lora_A's gradient in the first step
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    patched = qk.patch_peft_model(model)
    # The count of layers switched: the return value, or (once patch_peft_model returns the model) its attribute.
    count = patched if isinstance(patched, int) else getattr(model, "qlora_kernels_patched", None)
    assert count == NUM_LORA_LAYERS, f"patch_peft_model switched {count} layers, expected {NUM_LORA_LAYERS}"
    return model.train()


def llama_batch(device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.randint(0, LLAMA["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(0)).to(device)


def llama_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


# ------------------------------------------------------------------------------------------------ inspection


def unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def trainable_full(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter as a whole float32 CPU tensor (FSDP2's shards gathered), by name."""
    out = {}
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().float().cpu().clone()
    return out


def trainable_dtypes(model: nn.Module) -> list[str]:
    """The dtypes the trainable parameters are kept in (FSDP2's sharded master weights)."""
    return sorted({str(p.dtype) for p in unwrap(model).parameters() if p.requires_grad})


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().clone()


def base_storage(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the frozen 4-bit bases as raw bytes (a value cast shows even where values would compare equal),
    plus each storage's type and dtype; checks that bitsandbytes' quantization state is still attached."""
    import bitsandbytes as bnb

    out: dict[str, Any] = {}
    for name, module in unwrap(model).named_modules():
        if isinstance(module, qk.QLoRALinear):
            for buffer in ("weight_packed", "weight_absmax", "weight_nested_absmax", "weight_offset",
                           "weight_quant_map", "weight_nested_quant_map"):
                tensor = getattr(module, buffer)
                out[f"{name}.{buffer}"] = _raw_bytes(tensor)
                out[f"{name}.{buffer}:kind"] = f"{type(tensor).__name__} {tensor.dtype}"
        elif isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            state = weight.quant_state
            out[f"{name}.weight:kind"] = f"{type(weight).__name__} {weight.dtype}"
            if state is None:
                raise AssertionError(f"{name}: the quantization state is gone")
            out[f"{name}.weight"] = _raw_bytes(weight)
            out[f"{name}.absmax"] = _raw_bytes(state.absmax)
            out[f"{name}.offset"] = _raw_bytes(state.offset)
            out[f"{name}.nested_absmax"] = _raw_bytes(state.state2.absmax)
            out[f"{name}.code"] = _raw_bytes(state.code)
    return out


def corrupt_base(model: nn.Module, bnb_quant_state: bool = True) -> None:
    """Overwrite every 4-bit base in place (packed and uint8 bytes inverted, float32 statistics raised by 1; shapes
    and the quant-state record kept), so that only a load that really restores them can make them equal to a saved
    model's again. ``bnb_quant_state=False`` leaves
    bitsandbytes' quantization statistics alone (only its packed bytes, a parameter, are loaded by load_state_dict)."""
    import bitsandbytes as bnb

    with torch.no_grad():
        for module in unwrap(model).modules():
            if isinstance(module, qk.QLoRALinear):
                tensors = [module.weight_packed, module.weight_absmax, module.weight_nested_absmax]
            elif isinstance(module, bnb.nn.Linear4bit):
                tensors = [module.weight.data] + ([module.weight.quant_state.absmax] if bnb_quant_state else [])
            else:
                continue
            for t in tensors:
                if t.dtype == torch.float32:  # a statistic: changed, but still a valid (finite, >= 0) absmax
                    t.add_(1.0)
                else:
                    t.view(torch.uint8).bitwise_not_()


class FusedCallCounter:
    """Counts calls of the fused op through the peft patch and QLoRALinear, while in its ``with`` block (it replaces
    the name those modules call, and puts the original back on exit)."""

    def __init__(self) -> None:
        import qlora_kernels.integrations.peft as peft_patch
        import qlora_kernels.nn as qk_nn

        self.count = 0
        self._callers = (peft_patch, qk_nn)

    def __enter__(self) -> "FusedCallCounter":
        from qlora_kernels.functional import nf4_lora_linear

        self._originals = [caller.nf4_lora_linear for caller in self._callers]

        def counted(*args, **kwargs):
            self.count += 1
            return nf4_lora_linear(*args, **kwargs)

        for caller in self._callers:
            caller.nf4_lora_linear = counted
        return self

    def __exit__(self, *exc_info) -> None:
        for caller, original in zip(self._callers, self._originals):
            caller.nf4_lora_linear = original


# --------------------------------------------------------------------------------------------------- training


def wrap(model: nn.Module, engine: str) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if engine == "single":
        return model
    if engine == "ddp":
        return qkd.ddp_qlora(model)
    # These engines keep the 4-bit base replicated (shard_base=False); tests/test_sharded_base.py covers the default,
    # sharded base.
    if engine == "fsdp":
        return qkd.fully_shard_qlora(model, shard_base=False)
    if engine == "fsdp_bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return qkd.fully_shard_qlora(model, mp_policy=policy, shard_base=False)
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


def rank_slice(batch: torch.Tensor, engine: str, rank: int, world_size: int) -> torch.Tensor:
    return batch if engine == "single" else batch.chunk(world_size)[rank]


def train(model: nn.Module, loss_fn: Callable, batch: torch.Tensor, optimizer: torch.optim.Optimizer,
          steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)


STEPS = 3


def run_stack(engine: str, rank: int = 0, world_size: int = 1, device: str = "cpu") -> dict[str, Any]:
    """Three SGD-with-momentum steps of the QLoRALinear stack: trained LoRA weights, the base bytes before and after."""
    model = make_stack(device=device)
    lora_before, base_before = trainable_full(model), base_storage(model)
    model = wrap(model, engine)
    x = rank_slice(stack_batch(device), engine, rank, world_size)
    losses = train(model, stack_loss, x, sgd(model), STEPS)
    return {"lora": trainable_full(model), "lora_before": lora_before, "base_before": base_before,
            "base_after": base_storage(model), "losses": losses, "trainable_dtypes": trainable_dtypes(model)}


def run_llama(engine: str, checkpoint: Path, rank: int = 0, world_size: int = 1, device: str = "cpu",
              quant_storage: torch.dtype = torch.uint8) -> dict[str, Any]:
    """Three AdamW steps of the patched tiny Llama: trained LoRA weights, base bytes, fused calls per forward."""
    model = make_llama(checkpoint, quant_storage=quant_storage, device=device)
    lora_before, base_before = trainable_full(model), base_storage(model)
    model = wrap(model, engine)
    ids = rank_slice(llama_batch(device), engine, rank, world_size)
    with FusedCallCounter() as counter:
        losses = train(model, llama_loss, ids, adamw(model), STEPS)
    return {"lora": trainable_full(model), "lora_before": lora_before, "base_before": base_before,
            "base_after": base_storage(model), "losses": losses, "fused_calls_per_step": counter.count / STEPS,
            "trainable_dtypes": trainable_dtypes(model)}


# ------------------------------------------------------------------------------------------------ checkpoints


def _builder(kind: str, checkpoint: Path | None, device: str) -> tuple[Callable[[int], nn.Module], Callable, Any]:
    """(build(lora_seed), loss_fn, batch) for the stack or the Llama; every build has the same base."""
    if kind == "stack":
        return (lambda seed: make_stack(0, seed, device=device)), stack_loss, stack_batch(device)
    return (lambda seed: make_llama(checkpoint, lora_seed=seed, device=device)), llama_loss, llama_batch(device)


def run_checkpoints(kind: str, rank: int, world_size: int, workdir: Path, checkpoint: Path | None = None,
                    device: str = "cpu") -> dict[str, Any]:
    """Train an FSDP2 model two steps, then restore it into other models whose LoRA weights differ and whose base
    bytes were overwritten: (1) a sharded checkpoint of model + optimizer (torch.distributed.checkpoint, a directory),
    then two more steps on both; (2) a full state dict, gathered to rank 0 on the CPU, saved, and loaded by all.

    bitsandbytes' Linear4bit does not read back the quantization-state keys it writes (even alone, without any
    distribution, ``linear4bit.load_state_dict(linear4bit.state_dict())`` reports them as unexpected), so the Llama
    loads with ``strict=False``: its packed bytes are loaded as a parameter; its statistics are restored by the sharded
    load, which reads into the model's own tensors, and kept as loaded from the base checkpoint by the full one."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict)

    build, loss_fn, batch = _builder(kind, checkpoint, device)
    batch = rank_slice(batch, "fsdp", rank, world_size)
    trained = wrap(build(1), "fsdp")
    optimizer = adamw(trained)
    train(trained, loss_fn, batch, optimizer, 2)
    out: dict[str, Any] = {"saved_lora": trainable_full(trained), "saved_base": base_storage(trained)}

    # (1) Sharded: each rank writes its shards; the replicated base is written once.
    sharded_dir = workdir / f"dcp_{kind}"
    model_sd, optim_sd = get_state_dict(trained, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=sharded_dir)
    restored_model = build(2)
    corrupt_base(restored_model)
    restored = wrap(restored_model, "fsdp")
    restored_optimizer = adamw(restored)
    model_sd, optim_sd = get_state_dict(restored, restored_optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=sharded_dir)
    options = StateDictOptions(strict=kind == "stack")
    set_state_dict(restored, restored_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)
    out["dcp_lora"] = trainable_full(restored)
    out["dcp_base"] = base_storage(restored)
    out["dcp_lora_types"] = sorted({type(p).__name__ for p in restored.parameters() if p.requires_grad})

    # (2) Full: gathered on rank 0 (on the CPU), written with torch.save, read back by every rank.
    full = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out["full_keys"] = sorted(full)
    out["full_types"] = sorted({f"{type(v).__name__} {v.device.type}" for v in full.values()})
    full_path = workdir / f"full_{kind}.pt"
    if rank == 0:
        torch.save(full, full_path)
    dist.barrier()
    loaded_model = build(3)
    corrupt_base(loaded_model, bnb_quant_state=False)
    loaded = wrap(loaded_model, "fsdp")
    incompatible = set_model_state_dict(loaded, torch.load(full_path, weights_only=True),
                                        options=StateDictOptions(full_state_dict=True, strict=kind == "stack"))
    out["full_missing_keys"] = sorted(incompatible.missing_keys)
    out["full_unexpected_keys"] = sorted(incompatible.unexpected_keys)
    out["full_lora"] = trainable_full(loaded)
    out["full_base"] = base_storage(loaded)

    # Training goes on identically from the sharded checkpoint (same data, same optimizer state).
    train(trained, loss_fn, batch, optimizer, 2)
    train(restored, loss_fn, batch, restored_optimizer, 2)
    out["continued_lora"] = trainable_full(trained)
    out["continued_restored_lora"] = trainable_full(restored)
    return out


# -------------------------------------------------------------------------------------------------- behaviour


def run_ddp_buffer_sync(rank: int) -> dict[str, bool]:
    """Whether a change to rank 1's NF4 bytes survives a DDP training step, under ddp_qlora and under DDP's default
    (which broadcasts every buffer from rank 0 before each forward: the whole 4-bit base of a QLoRALinear model)."""
    from torch.nn.parallel import DistributedDataParallel

    kept = {}
    for label, wrapper in (("ddp_qlora", qkd.ddp_qlora), ("DistributedDataParallel", DistributedDataParallel)):
        model = make_stack()
        wrapped = wrapper(model)
        packed = model.blocks[0].linear.weight_packed
        original = packed.clone()
        if rank == 1:
            with torch.no_grad():
                packed.bitwise_not_()
        stack_loss(wrapped, stack_batch()).backward()
        kept[label] = rank == 0 or not torch.equal(packed, original)
    return kept


def run_plain_fully_shard(checkpoint: Path) -> dict[str, str]:
    """What torch's fully_shard does to bitsandbytes' storage when it is not told to ignore it (the known
    bitsandbytes + FSDP breakage), versus fully_shard_qlora: the type of a base weight, and whether its quantization
    state is still attached."""
    from torch.distributed.fsdp import fully_shard

    found = {}
    for label in ("fully_shard", "fully_shard_qlora"):
        model = make_llama(checkpoint, quant_storage=torch.bfloat16)
        if label == "fully_shard":
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        else:
            qkd.fully_shard_qlora(model, shard_base=False)
        weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        found[label] = f"{type(weight).__name__}, quant_state {'kept' if hasattr(weight, 'quant_state') else 'lost'}"
    return found


def error_message(call: Callable) -> str:
    try:
        call()
    except (TypeError, ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def run_wrapped_twice() -> dict[str, str]:
    """The errors of wrapping a model twice."""
    model = qkd.fully_shard_qlora(make_stack())
    return {
        "fully_shard_qlora twice": error_message(lambda: qkd.fully_shard_qlora(model)),
        "ddp_qlora of an FSDP2 model": error_message(lambda: qkd.ddp_qlora(model)),
        "fully_shard_qlora of a DDP model": error_message(lambda: qkd.fully_shard_qlora(qkd.ddp_qlora(make_stack()))),
    }


def shard_layout(model: nn.Module) -> dict[str, str]:
    """Type, local shape and dtype of every parameter and buffer after fully_shard_qlora."""
    layout = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        local = t.to_local() if hasattr(t, "to_local") else t
        layout[name] = f"{type(t).__name__} {tuple(local.shape)} {t.dtype} grad={t.requires_grad}"
    return layout


def outcome(run: Callable[[], Any]) -> Any:
    """``run()``'s result, or its error as a traceback string (a failing case then fails its own tests, not every test
    of the run; a deterministic failure hits every rank alike, so the collectives stay in step)."""
    import traceback

    try:
        return run()
    except Exception:  # noqa: BLE001 - reported by the test that reads this case
        return CaseFailed(traceback.format_exc())


class CaseFailed(str):
    """The traceback of a case that raised, as stored in the rank's results."""


def rank_main(rank: int, world_size: int, workdir: str, checkpoint: str) -> None:
    """Everything the 2-rank tests look at, in one process group (starting processes is the slow part); each rank
    saves what it saw to workdir/rank{rank}.pt, one entry per case."""
    workdir, checkpoint = Path(workdir), Path(checkpoint)
    cases: dict[str, Callable[[], Any]] = {}
    for engine in ("ddp", "fsdp", "fsdp_bf16"):
        cases[f"stack {engine}"] = lambda engine=engine: run_stack(engine, rank, world_size)
        cases[f"llama {engine}"] = lambda engine=engine: run_llama(engine, checkpoint, rank, world_size)
    cases["llama fsdp_bf16 bf16-storage"] = lambda: run_llama("fsdp_bf16", checkpoint, rank, world_size,
                                                              quant_storage=torch.bfloat16)
    cases["stack checkpoints"] = lambda: run_checkpoints("stack", rank, world_size, workdir)
    cases["llama checkpoints"] = lambda: run_checkpoints("llama", rank, world_size, workdir, checkpoint)
    cases["ddp buffer sync"] = lambda: run_ddp_buffer_sync(rank)
    cases["plain fully_shard"] = lambda: run_plain_fully_shard(checkpoint)
    cases["errors"] = run_wrapped_twice
    cases["stack layout"] = lambda: shard_layout(qkd.fully_shard_qlora(make_stack(), shard_base=False))
    cases["llama layout"] = lambda: shard_layout(qkd.fully_shard_qlora(make_llama(checkpoint), shard_base=False))
    results = {name: outcome(run) for name, run in cases.items()}
    torch.save(results, workdir / f"rank{rank}.pt")


# ---------------------------------------------------------------------------------------- launcher behaviour


def fail_on_rank_1(rank: int, world_size: int) -> None:
    """Rank 1 fails; rank 0 goes on for an hour (a collective would notice the dead peer by itself, so it would not
    show that the launcher stops the other ranks)."""
    if rank == 1:
        raise RuntimeError("rank 1 gives up")
    time.sleep(3600)


def hang(rank: int, world_size: int) -> None:
    time.sleep(3600)


# -------------------------------------------------------------------------------------------------------- GPU


def gpu_main(rank: int, world_size: int, workdir: str, checkpoint: str) -> None:
    """The world-size-1 nccl smoke run on a GPU: the stack under each engine and the single run, the patched Llama
    under bf16 mixed precision, the Llama's checkpoints. Saved to workdir/gpu.pt."""
    workdir, checkpoint, device = Path(workdir), Path(checkpoint), f"cuda:{rank}"
    found = {f"stack {engine}": run_stack(engine, rank, world_size, device=device)
             for engine in ("single", "ddp", "fsdp")}
    found["llama fsdp_bf16"] = run_llama("fsdp_bf16", checkpoint, rank, world_size, device=device)
    found["llama checkpoints"] = run_checkpoints("llama", rank, world_size, workdir, checkpoint, device=device)
    torch.save(found, workdir / "gpu.pt")
