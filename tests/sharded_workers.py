"""What the ranks of tests/test_sharded_base.py run: FSDP2 training with the NF4 base sharded across the ranks
(``fully_shard_qlora(shard_base=True)``), its byte counts, its checkpoints, and a rank that dies.

The spawned ranks import this module by name; models, the launcher and the inspection helpers come from
tests/distributed_workers.py.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels import distributed as qkd

import distributed_workers as dw

STEPS = 2
# Four blocks, packed bytes stored alternately as uint8 and bf16: sharded, a rank holds a quarter of them on 4 ranks
# and one block gathered at a time, so the peak is well under the replicated total.
STORAGES = (torch.uint8, torch.bfloat16, torch.uint8, torch.bfloat16)


def make_deep_stack(lora_seed: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = dw.Stack(features=64, storages=STORAGES)
    if lora_seed is not None:
        generator = torch.Generator().manual_seed(lora_seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def deep_stack_batch() -> torch.Tensor:
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(1))


def wrap(model: nn.Module, engine: str) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if engine == "single":
        return model
    if engine == "replicated":
        return qkd.fully_shard_qlora(model, shard_base=False)
    if engine == "sharded":
        return qkd.fully_shard_qlora(model)
    if engine == "sharded_bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return qkd.fully_shard_qlora(model, mp_policy=policy)
    if engine == "sharded_keep":  # gathered from forward until the end of the layer's backward
        return qkd.fully_shard_qlora(model, reshard_after_forward=False)
    raise ValueError(f"unknown engine {engine!r}")


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = grad.detach().float().cpu().clone()
    return out


def base_bytes(model: nn.Module) -> dict[str, Any]:
    bases = qkd.sharded_bases(model)
    if bases is None:
        return {}
    return {"shard": bases.shard_nbytes, "full": bases.full_nbytes, "replicated": bases.replicated_nbytes,
            "resident_idle": bases.resident_nbytes(), "peak": bases.peak_resident_nbytes,
            "max_layer": bases.max_layer_full_nbytes(), "layers": len(bases.layers),
            "per_field": {f"{b.name}.{k}": (f.local.numel() * f.itemsize, f.full_nbytes)
                          for b in bases.layers for k, f in b.fields.items()}}


def base_snapshot(model: nn.Module) -> dict[str, Any]:
    with qkd.unsharded_bases(model):
        return dw.base_storage(model)


def train_and_record(model: nn.Module, loss_fn: Callable, batch: torch.Tensor, steps: int = STEPS) -> dict[str, Any]:
    """First step by hand (loss, gradients, peak of the base's resident bytes over forward + backward), then the rest
    of the AdamW steps; the LoRA weights at the end."""
    optimizer = dw.adamw(model)
    bases = qkd.sharded_bases(model)
    if bases is not None:
        bases.reset_peak()
    with dw.FusedCallCounter() as counter:
        loss = loss_fn(model, batch)
        loss.backward()
    out: dict[str, Any] = {"first_loss": loss.item(), "grads": full_grads(model), "fused_calls": counter.count,
                           "step_peak": None if bases is None else bases.peak_resident_nbytes,
                           "after_backward": None if bases is None else bases.resident_nbytes()}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out["losses"] = [out["first_loss"]] + dw.train(model, loss_fn, batch, optimizer, steps - 1)
    out["lora"] = dw.trainable_full(model)
    return out


def run_training(kind: str, engine: str, rank: int, world_size: int, checkpoint: Path | None = None) -> dict:
    if kind == "stack":
        model, loss_fn, batch = make_deep_stack(), dw.stack_loss, deep_stack_batch()
    else:
        model, loss_fn, batch = dw.make_llama(checkpoint), dw.llama_loss, dw.llama_batch()
    base_before = dw.base_storage(model)
    model = wrap(model, engine)
    batch = batch if engine == "single" else batch.chunk(world_size)[rank]
    bytes_before = base_bytes(model)
    out = train_and_record(model, loss_fn, batch)
    out.update(bytes=bytes_before, base_before=base_before, base_after=base_snapshot(model),
               idle_after=None if qkd.sharded_bases(model) is None else qkd.sharded_bases(model).resident_nbytes(),
               packed_shapes_while_sharded=sorted({tuple(t.shape) for n, t in model.named_buffers()
                                                  if n.endswith("weight_packed")}))
    return out


# ------------------------------------------------------------------------------------------------ checkpoints


def build(kind: str, lora_seed: int, checkpoint: Path | None) -> nn.Module:
    return make_deep_stack(lora_seed) if kind == "stack" else dw.make_llama(checkpoint, lora_seed=lora_seed)


def run_checkpoints(kind: str, rank: int, world_size: int, workdir: Path, checkpoint: Path | None = None) -> dict:
    """Train a sharded model 2 steps; (1) torch.distributed.checkpoint of model + optimizer into a model whose LoRA
    weights and base bytes differ, then 2 more steps on both; (2) a full state dict (rank 0, CPU), loaded back by
    every rank, and read by bitsandbytes (Params4bit.from_prequantized) on rank 0."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict)

    loss_fn = dw.stack_loss if kind == "stack" else dw.llama_loss
    batch = (deep_stack_batch() if kind == "stack" else dw.llama_batch()).chunk(world_size)[rank]
    trained = wrap(build(kind, 1, checkpoint), "sharded")
    optimizer = dw.adamw(trained)
    dw.train(trained, loss_fn, batch, optimizer, 2)
    out: dict[str, Any] = {"saved_lora": dw.trainable_full(trained), "saved_base": base_snapshot(trained)}

    sharded_dir = workdir / f"dcp_{kind}_{world_size}"
    model_sd, optim_sd = get_state_dict(trained, optimizer)
    base_key = "blocks.0.linear.weight" if kind == "stack" else (
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    out["sharded_entry"] = {k: f"{type(model_sd[k]).__name__} {tuple(model_sd[k].shape)} local "
                               f"{tuple(model_sd[k].to_local().shape) if hasattr(model_sd[k], 'to_local') else ''}"
                            for k in (base_key, base_key + ".absmax")}
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=sharded_dir)
    out["dcp_files"] = sorted(p.name for p in sharded_dir.iterdir())
    restored_model = build(kind, 2, checkpoint)
    dw.corrupt_base(restored_model)
    restored = wrap(restored_model, "sharded")
    restored_optimizer = dw.adamw(restored)
    model_sd, optim_sd = get_state_dict(restored, restored_optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=sharded_dir)
    incompatible = set_state_dict(restored, restored_optimizer, model_state_dict=state["model"],
                                  optim_state_dict=state["optim"], options=StateDictOptions(strict=kind == "stack"))
    out["dcp_missing"] = sorted(incompatible.missing_keys)
    out["dcp_lora"] = dw.trainable_full(restored)
    out["dcp_base"] = base_snapshot(restored)

    full = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out["full_keys"] = sorted(full)
    full_path = workdir / f"full_{kind}_{world_size}.pt"
    if rank == 0:
        out["full_entry"] = {k: f"{type(full[k]).__name__} {full[k].dtype} {tuple(full[k].shape)}"
                             for k in (base_key, base_key + ".absmax")}
        out["bnb_dequantized"] = bnb_dequantize(full, base_key)
        torch.save(full, full_path)
    dist.barrier()
    loaded_model = build(kind, 3, checkpoint)
    dw.corrupt_base(loaded_model, bnb_quant_state=False)
    loaded = wrap(loaded_model, "sharded")
    incompatible = set_model_state_dict(loaded, torch.load(full_path, weights_only=True),
                                        options=StateDictOptions(full_state_dict=True, strict=kind == "stack"))
    out["full_missing"] = sorted(incompatible.missing_keys)
    out["full_unexpected"] = sorted(incompatible.unexpected_keys)
    out["full_lora"] = dw.trainable_full(loaded)
    out["full_base"] = base_snapshot(loaded)

    dw.train(trained, loss_fn, batch, optimizer, 2)
    dw.train(restored, loss_fn, batch, restored_optimizer, 2)
    out["continued_lora"] = dw.trainable_full(trained)
    out["continued_restored_lora"] = dw.trainable_full(restored)
    return out


def bnb_dequantize(full: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The weight bitsandbytes reads from a gathered state dict: Params4bit.from_prequantized, then its dequantize."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    quantized = {k[len(key) + 1:]: v for k, v in full.items() if k.startswith(key + ".")}
    param = bnb.nn.Params4bit.from_prequantized(data=full[key], quantized_stats=quantized, requires_grad=False,
                                                device="cpu")
    return F.dequantize_4bit(param.data, param.quant_state).float().cpu()


# ---------------------------------------------------------------------------------------------- rank mains


def outcome(run: Callable[[], Any], name: str = "", timings: dict | None = None) -> Any:
    started = time.monotonic()
    try:
        return run()
    except Exception:  # noqa: BLE001 - reported by the test that reads this case
        return dw.CaseFailed(traceback.format_exc())
    finally:
        if timings is not None:
            timings[name] = (time.monotonic() - started, time.process_time())


def two_rank_main(rank: int, world_size: int, workdir: str, checkpoint: str) -> None:
    workdir, checkpoint = Path(workdir), Path(checkpoint)
    cases: dict[str, Callable[[], Any]] = {
        "stack replicated": lambda: run_training("stack", "replicated", rank, world_size),
        "stack sharded": lambda: run_training("stack", "sharded", rank, world_size),
        "stack sharded_bf16": lambda: run_training("stack", "sharded_bf16", rank, world_size),
        "stack sharded_keep": lambda: run_training("stack", "sharded_keep", rank, world_size),
        "llama sharded": lambda: run_training("llama", "sharded", rank, world_size, checkpoint),
        "stack checkpoints": lambda: run_checkpoints("stack", rank, world_size, workdir),
        "llama checkpoints": lambda: run_checkpoints("llama", rank, world_size, workdir, checkpoint),
    }
    timings: dict[str, tuple[float, float]] = {}
    results = {name: outcome(run, name, timings) for name, run in cases.items()}
    results["timings"] = timings
    torch.save(results, workdir / f"rank{rank}.pt")


def four_rank_main(rank: int, world_size: int, workdir: str) -> None:
    workdir = Path(workdir)
    cases: dict[str, Callable[[], Any]] = {
        "stack sharded": lambda: run_training("stack", "sharded", rank, world_size),
        "stack checkpoints": lambda: run_checkpoints("stack", rank, world_size, workdir),
    }
    timings: dict[str, tuple[float, float]] = {}
    results = {name: outcome(run, name, timings) for name, run in cases.items()}
    results["timings"] = timings
    torch.save(results, workdir / f"rank{rank}.pt")
    die_and_record(rank, world_size, workdir, dying_rank=world_size - 1)


def die_and_record(rank: int, world_size: int, workdir: Path, dying_rank: int) -> None:
    """Rank ``dying_rank`` dies (os._exit) after one step of the sharded stack; the others go on to their next step,
    whose collectives have a peer missing. Each survivor records how long that took to fail and with what, then
    leaves at once (its process group is broken: no teardown)."""
    import torch.distributed as dist

    model = wrap(make_deep_stack(), "sharded")
    batch = deep_stack_batch().chunk(world_size)[rank]
    optimizer = dw.adamw(model)
    dw.train(model, dw.stack_loss, batch, optimizer, 1)
    dist.barrier()
    if rank == dying_rank:
        os._exit(0)
    time.sleep(1.0)  # let the peer be gone
    started = time.monotonic()
    try:
        dw.train(model, dw.stack_loss, batch, optimizer, 1)
        found: dict[str, Any] = {"error": None}
    except Exception as exc:  # noqa: BLE001 - what the test looks at
        found = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    found["seconds"] = time.monotonic() - started
    torch.save(found, workdir / f"dead_rank{rank}.pt")
    os._exit(0)
