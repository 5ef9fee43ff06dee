"""What the 2 ranks of tests/test_optim_fsdp.py run (spawned processes import this module by name)."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels import distributed as qkd

OPTIMIZERS = {"PagedAdamW8bit": qk.optim.PagedAdamW8bit, "PagedAdamW": qk.optim.PagedAdamW,
              "PagedLion8bit": qk.optim.PagedLion8bit}
HYPER = {"PagedAdamW8bit": dict(lr=1e-2, weight_decay=0.1), "PagedAdamW": dict(lr=1e-2, weight_decay=0.1),
         "PagedLion8bit": dict(lr=1e-3, weight_decay=0.5)}
FEATURES = 64
STEPS = 4


def make_mlp() -> nn.Sequential:
    """Weights of 64 x 64: half of one is 2048 elements, whole 256-element blocks, so a rank's 8-bit blocks are the
    single process's blocks and the sharded run can be compared with it closely."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.Tanh(), nn.Linear(FEATURES, FEATURES))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, FEATURES, generator=generator), torch.randn(8, FEATURES, generator=generator)


def local_values(model: nn.Module) -> list[torch.Tensor]:
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in model.parameters()]


def full_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }


def train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        (model(x) - y).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def run_mlp(name: str, rank: int = 0, world_size: int = 1) -> dict:
    """STEPS steps (one process, or FSDP2 on world_size ranks each taking its slice of the batch), then a resume
    check: from a state_dict() taken at STEPS // 2, a fresh optimizer must redo the last steps exactly."""
    model = make_mlp()
    x, y = batch()
    if world_size > 1:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        rows = x.shape[0] // world_size
        x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
    optimizer = OPTIMIZERS[name](model.parameters(), min_8bit_size=1000, **HYPER[name])
    train(model, optimizer, x, y, STEPS // 2)
    saved_state, saved_params = copy.deepcopy(optimizer.state_dict()), local_values(model)
    train(model, optimizer, x, y, STEPS - STEPS // 2)
    result = {"params": full_values(model), "after": local_values(model),
              "state_shapes": {n: (tuple(optimizer.state[p]["exp_avg"].shape), optimizer.state[p]["exp_avg"].dtype)
                               for n, p in model.named_parameters()}}
    with torch.no_grad():
        for p, value in zip(model.parameters(), saved_params):
            (p.to_local() if hasattr(p, "to_local") else p).copy_(value)
    resumed = OPTIMIZERS[name](model.parameters(), min_8bit_size=1000, **HYPER[name])
    resumed.load_state_dict(saved_state)
    train(model, resumed, x, y, STEPS - STEPS // 2)
    result["resumed"] = local_values(model)
    return result


def run_qlora_stack(rank: int = 0, world_size: int = 1) -> dict:
    """The package's own FSDP2 path (fully_shard_qlora, 4-bit base replicated) with PagedAdamW8bit over
    model.parameters(), the README's call, frozen 4-bit storage and frozen LayerNorms included."""
    import distributed_workers as workers

    # The fused linear through the pure-torch reference: this checks the optimizer on FSDP2's parameters, not
    # the linear's CPU kernels (tested on their own), and does not depend on how the extension was built.
    previous = os.environ.get("QLORA_KERNELS_BACKEND")
    os.environ["QLORA_KERNELS_BACKEND"] = "torch"
    try:
        return _run_qlora_stack(workers, rank, world_size)
    finally:
        if previous is None:
            del os.environ["QLORA_KERNELS_BACKEND"]
        else:
            os.environ["QLORA_KERNELS_BACKEND"] = previous


def _run_qlora_stack(workers, rank: int, world_size: int) -> dict:
    model = workers.make_stack()
    x = workers.stack_batch()
    if world_size > 1:
        qkd.fully_shard_qlora(model)
        rows = x.shape[0] // world_size
        x = x[rank * rows:(rank + 1) * rows]
    optimizer = qk.optim.PagedAdamW(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        workers.stack_loss(model, x).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"params": {n: v for n, v in full_values(model).items() if "lora" in n}}


def mixed_up_checkpoints(rank: int, world_size: int, workdir: str) -> dict:
    """The per-rank state is refused on another rank: directly (rank r loads rank 1-r's file), and through
    torch.distributed.checkpoint, which keeps one copy of non-DTensor tensors for all ranks. Returns, per way,
    the error message (None where the load was accepted) and whether the rank's moments stayed its own."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    model = make_mlp()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    x, y = batch()
    rows = x.shape[0] // world_size
    x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]

    def new_optimizer():
        return qk.optim.PagedAdamW8bit(model.parameters(), min_8bit_size=1000, lr=1e-2)

    optimizer = new_optimizer()
    train(model, optimizer, x, y, 1)
    own = {k: v.clone() for k, v in optimizer.state[model[0].weight].items() if torch.is_tensor(v)}
    torch.save(optimizer.state_dict(), f"{workdir}/optim{rank}.pt")
    dist.barrier()
    result = {}
    try:
        new_optimizer().load_state_dict(torch.load(f"{workdir}/optim{1 - rank}.pt", weights_only=False))
        result["swapped"] = None
    except ValueError as error:
        result["swapped"] = str(error)
    dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=f"{workdir}/dcp")
    fresh = new_optimizer()
    template = {"optim": get_optimizer_state_dict(model, fresh)}
    dcp.load(template, checkpoint_id=f"{workdir}/dcp")
    try:
        set_optimizer_state_dict(model, fresh, template["optim"])
        result["dcp"] = None
        loaded = fresh.state[model[0].weight]
        result["dcp_kept_own_moments"] = all(torch.equal(loaded[k], v) for k, v in own.items())
    except ValueError as error:
        result["dcp"] = str(error)
    return result


def rank_main(rank: int, world_size: int, workdir: str) -> None:
    results = {name: run_mlp(name, rank, world_size) for name in OPTIMIZERS}
    results["qlora_stack"] = run_qlora_stack(rank, world_size)
    results["mixed_up"] = mixed_up_checkpoints(rank, world_size, workdir)
    torch.save(results, f"{workdir}/rank{rank}.pt")
