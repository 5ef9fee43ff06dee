"""Multi-GPU QLoRA with PyTorch's own engines: FSDP2 (``fully_shard``) and DDP.

    model = ...                                      # QLoRALinear layers, or a peft model patched by patch_peft_model
    qk.distributed.fully_shard_qlora(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    # or
    ddp_model = qk.distributed.ddp_qlora(model)

Two plans for the frozen 4-bit base under FSDP2, chosen by ``fully_shard_qlora(shard_base=...)``:

- **sharded** (``shard_base=True``, the default): each rank keeps 1/world of every layer's packed bytes and absmax;
  a layer's whole storage is all-gathered just before its forward and its backward and freed after each, as FSDP2
  does for parameters (:mod:`qlora_kernels.sharding`). Per-rank memory for the base: total / world plus about one
  layer gathered at a time. The small statistics (nested absmax, offset, codebooks) stay whole on every rank.
- **replicated** (``shard_base=False``): the base stays whole and untouched on every rank; no collective for it.

In both, only the trainable tensors (the LoRA pairs, plus anything else that trains) and the frozen float tensors
(embeddings, norms) are FSDP2 parameters, sharded by it; DDP all-reduces the trainable ones.

- ``QLoRALinear`` keeps its NF4 storage in buffers. FSDP2 shards and casts parameters only (buffers are at most moved
  to the mesh's device), so the packed bytes and their statistics reach the kernels exactly as quantized, under any
  ``MixedPrecisionPolicy``; the sharded plan gathers them as raw bytes, so it never casts them either.
- bitsandbytes keeps a ``Linear4bit``'s storage in a ``Params4bit``: an ``nn.Parameter`` whose quantization state
  (absmax, codebook, shape) lives beside the tensor in a Python attribute. FSDP2 sharding it would split the packed
  bytes into a DTensor and drop that state; ``param_dtype=bf16`` would value-cast bytes stored as bf16 (the known
  bitsandbytes + FSDP breakage). :func:`fully_shard_qlora` hands these parameters to ``fully_shard`` as
  ``ignored_params`` (FSDP2 neither shards, casts, moves nor reduces them) and, in the sharded plan, shards their
  storage itself.
- DDP all-reduces the gradients of parameters that require grad, the LoRA tensors; by default it would also broadcast
  every buffer before each forward, which for ``QLoRALinear`` is the whole 4-bit base, every step. Every rank loads the
  same base, so :func:`ddp_qlora` turns that per-forward broadcast off. DDP keeps the base replicated.

Every rank must build the same model with the same base (same checkpoint, same quantization, same seed for the LoRA
initialisation): FSDP2 shards what each rank holds, it does not broadcast it.

Checkpoints: torch's own API, ``get_model_state_dict`` / ``set_model_state_dict`` / ``get_state_dict`` with
``StateDictOptions`` and ``torch.distributed.checkpoint`` (``dcp.save`` / ``dcp.load``): sharded or full
(``full_state_dict=True, cpu_offload=True``), under the usual key names (bitsandbytes' for the NF4 bases). With the
sharded base, its packed bytes and absmax appear in the state dict as ``DTensor`` pieces: DCP writes and reads each
rank's piece, and a full state dict gathers them into the whole tensors bitsandbytes loads
(``Params4bit.from_prequantized``). The replicated base is written once. For the adapter alone,
``StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)``. bitsandbytes' ``Linear4bit``
does not read back the quant-state keys it writes (``load_state_dict`` of its own state dict reports them as
unexpected, with or without distribution), so load peft + bitsandbytes models with ``StateDictOptions(strict=False)``.

While sharded, a layer's base tensors read as empty outside its forward and backward; ``with
qk.distributed.unsharded_bases(model):`` gathers them all (on every rank) for code that reads them.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .nn import QLoRALinear
from .sharding import ShardedBases, shard_qlora_bases, sharded_bases, unsharded

__all__ = ["fully_shard_qlora", "ddp_qlora", "frozen_quantized_params", "qlora_layers", "default_shard_units",
           "sharded_bases", "unsharded_bases", "ShardedBases"]

unsharded_bases = unsharded


# --------------------------------------------------------------------------------------------- what is what


def _is_bnb_linear4bit(module: Any) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is optional
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def _is_quantized_param(param: nn.Parameter) -> bool:
    """A parameter that holds quantized storage rather than values: bitsandbytes' Params4bit (its quantization state
    rides on the tensor as ``quant_state``) or Int8Params (``SCB``), or any integer parameter (packed bytes)."""
    if hasattr(param, "quant_state") or hasattr(param, "SCB"):
        return True
    return not (param.is_floating_point() or param.is_complex())


def frozen_quantized_params(model: nn.Module) -> set[nn.Parameter]:
    """The parameters of ``model`` that hold quantized storage (bitsandbytes' ``Params4bit`` and the like): the set to
    pass to ``fully_shard(..., ignored_params=...)`` so that FSDP2 leaves them whole, uncast and in place.

    Raises ValueError if one of them requires grad (quantized storage cannot be trained).
    """
    found = set()
    for name, param in model.named_parameters():
        if _is_quantized_param(param):
            if param.requires_grad:
                raise ValueError(f"{name} holds quantized storage ({param.dtype}) but requires grad; freeze it")
            found.add(param)
    return found


def _is_lora_over_linear4bit(module: nn.Module) -> bool:
    """A peft LoRA layer (patched or not) whose base layer is a bitsandbytes Linear4bit."""
    return hasattr(module, "lora_A") and _is_bnb_linear4bit(getattr(module, "base_layer", None))


def qlora_layers(model: nn.Module) -> list[nn.Module]:
    """The QLoRA layers of ``model``: every ``QLoRALinear`` and every peft LoRA layer over a bitsandbytes
    ``Linear4bit``, in ``model.modules()`` order."""
    return [m for m in model.modules() if isinstance(m, QLoRALinear) or _is_lora_over_linear4bit(m)]


def default_shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`fully_shard_qlora` shards one by one (each one FSDP2 unit, all-gathered as a whole), in
    ``model.modules()`` order.

    The children of the outermost ``nn.ModuleList`` whose children hold QLoRA layers (a transformer's decoder layers:
    one all-gather per layer, the usual FSDP2 granularity); without such a list, each QLoRA layer. The root module is
    not among them: it becomes the last unit, holding whatever is left (embeddings, final norm, head).
    """
    layers = set(qlora_layers(model))

    def holds_qlora(module: nn.Module) -> bool:
        return any(m in layers for m in module.modules())

    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if isinstance(module, nn.ModuleList):
            blocks = [child for child in module if holds_qlora(child)]
            if blocks:
                units.extend(blocks)
                return
        for child in module.children():
            visit(child)

    visit(model)
    if not units:
        units = [m for m in model.modules() if m in layers and m is not model]
    return units


# ------------------------------------------------------------------------------------------------------ FSDP2


def _check_not_wrapped(model: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise ValueError("model is wrapped in DistributedDataParallel; shard the model itself (model.module), not both")
    sharded = [name or "<root>" for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    if sharded:
        raise ValueError(
            f"model is already sharded by fully_shard ({', '.join(sharded[:3])}{', …' if len(sharded) > 3 else ''}); "
            "call fully_shard_qlora once, on a model not yet sharded"
        )


def _check_not_fsdp(model: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("model is sharded by fully_shard; FSDP2 already synchronizes gradients, do not wrap it in DDP")


def _default_mesh(model: nn.Module) -> Any:
    """A 1-D mesh over all ranks on the device type the model's trainable parameters are on (the model must be on its
    device before sharding anyway, since FSDP2 does not move ignored parameters)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device_types = {p.device.type for p in model.parameters() if p.requires_grad}
    if len(device_types) != 1:
        raise ValueError(f"the trainable parameters are on several device types {sorted(device_types)}; move the model "
                         "to its rank's device first")
    return init_device_mesh(device_types.pop(), (dist.get_world_size(),))


def _check_storage_on(model: nn.Module, quantized: Iterable[nn.Parameter], device: torch.device) -> None:
    """FSDP2 moves the tensors it manages to the mesh's device, but not ignored parameters: the bitsandbytes storage
    must already be there (bitsandbytes moves its quantization state along only through Module.to). One rule for both
    kinds of layer: the whole model on its device before sharding."""
    misplaced = {str(p.device) for p in quantized if p.device.type != device.type}
    misplaced |= {str(m.weight_packed.device) for m in model.modules() if isinstance(m, QLoRALinear)
                  and m.weight_packed.device.type != device.type}
    if misplaced:
        raise ValueError(
            f"the 4-bit base weights are on {', '.join(sorted(misplaced))} but the mesh is on {device.type}: move the "
            f"model to its rank's device first (model.to(device), or device_map={{'': device}} when loading)"
        )


def fully_shard_qlora(
    model: nn.Module,
    mesh: Optional[Any] = None,
    mp_policy: Optional[Any] = None,
    reshard_after_forward: bool = True,
    units: Optional[Iterable[nn.Module]] = None,
    shard_base: bool = True,
) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to a QLoRA model, layer by layer then the root, in place; returns ``model``.

    ``model`` holds ``QLoRALinear`` layers or is a peft LoRA model over bitsandbytes 4-bit layers (patched by
    :func:`qlora_kernels.patch_peft_model` or not). LoRA weights and the other parameters are sharded with their layer,
    so gradients are reduce-scattered and the optimizer state is sharded. The 4-bit base is sharded too
    (``shard_base=True``: 1/world of its bytes per rank, each layer gathered around its forward and backward) or kept
    whole on every rank (``shard_base=False``); see the module's docstring. Every rank must hold the same model, with
    the same base, on its device.

    Args:
        mesh: a 1-D ``DeviceMesh`` (default: all ranks of the default process group, on the device type of the
            model's trainable parameters).
        mp_policy: a ``MixedPrecisionPolicy``; ``param_dtype=torch.bfloat16`` computes LoRA in bf16 with float32
            master weights; the 4-bit storage is never cast.
        reshard_after_forward: as ``fully_shard``'s (free the gathered parameters after forward, gather again for
            backward).
        units: the modules to shard one by one before the root (default: :func:`default_shard_units`, e.g. the decoder
            layers).
        shard_base: shard the 4-bit storage across the mesh's ranks (default) or keep it replicated. Sharded, its
            per-rank byte counts are in :func:`sharded_bases` (``shard_nbytes``, ``peak_resident_nbytes``).

    After it, build the optimizer over ``model.parameters()`` (the sharded ones are DTensors) and save or load with
    ``torch.distributed.checkpoint`` (``get_model_state_dict``/``set_model_state_dict``, ``dcp.save``/``dcp.load``).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(f"reshard_after_forward must be a bool, got {type(reshard_after_forward).__name__}")
    if not isinstance(shard_base, bool):
        raise TypeError(f"shard_base must be a bool, got {type(shard_base).__name__}")
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(
            f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy, got {type(mp_policy).__name__}"
        )
    _check_not_wrapped(model)
    if not qlora_layers(model):
        raise ValueError(
            f"{type(model).__name__} holds no QLoRA layer (qlora_kernels.QLoRALinear, or a peft LoRA layer over a "
            "bitsandbytes Linear4bit): nothing for fully_shard_qlora to do; use torch's fully_shard for other models"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no trainable parameter: nothing to train, so nothing to shard")
    if units is None:
        units = default_shard_units(model)
    else:
        units = list(units)
        inside = set(model.modules())
        for unit in units:
            if not isinstance(unit, nn.Module) or unit not in inside or unit is model:
                raise ValueError("units must be submodules of model (not model itself: it is sharded last, as root)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group first (torchrun sets up "
            "the environment it reads)"
        )

    ignored = frozen_quantized_params(model)
    if mesh is None:
        mesh = _default_mesh(model)
    _check_storage_on(model, ignored, torch.device(mesh.device_type))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "ignored_params": ignored}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    # Bottom-up, as fully_shard requires: each call takes the parameters not yet owned by an earlier one.
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    if shard_base:
        if mesh.ndim != 1:
            raise ValueError(f"shard_base=True needs a 1-D mesh, got a {mesh.ndim}-D one")
        shard_qlora_bases(model, qlora_layers(model), mesh, reshard_after_forward=reshard_after_forward)
    return model


# ------------------------------------------------------------------------------------------------------- DDP


def ddp_qlora(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """Wrap a QLoRA model in ``torch.nn.parallel.DistributedDataParallel`` without the per-forward buffer broadcast.

    DDP's default broadcasts every buffer from rank 0 before each forward; a ``QLoRALinear`` base lives in buffers, so
    that would send the whole 4-bit model every step for nothing (every rank loads the same base). Turned off here
    (``forward_sync_buffers=False`` where torch has it, ``broadcast_buffers=False`` before). Gradients of the
    trainable parameters (the LoRA pairs) are all-reduced as usual; frozen tensors take no part. At construction DDP
    still broadcasts the parameters from rank 0 once, so all ranks start from the same LoRA weights (bitsandbytes'
    packed bytes, being parameters, go along that one time; with torch ≥ 2.13 QLoRALinear's buffers too).

    ``ddp_kwargs`` go to DistributedDataParallel (``device_ids=[local_rank]`` on GPUs). A model with other buffers that
    must stay in sync (BatchNorm statistics) needs DDP's default: wrap it yourself.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, DistributedDataParallel):
        raise ValueError("model is already wrapped in DistributedDataParallel")
    _check_not_fsdp(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no trainable parameter: nothing for DDP to synchronize")
    if "broadcast_buffers" in ddp_kwargs or "forward_sync_buffers" in ddp_kwargs:
        raise ValueError("ddp_qlora turns DDP's per-forward buffer broadcast off; wrap the model yourself to keep it")
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    # torch 2.13 deprecates broadcast_buffers in favour of forward_sync_buffers; older versions only have the former.
    sync_flag = "forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"
    ddp_kwargs[sync_flag] = False
    return DistributedDataParallel(model, **ddp_kwargs)
