"""The frozen NF4 base of QLoRA layers, sharded across ranks the way FSDP2 shards parameters.

Each rank keeps 1/world of every layer's packed bytes and of its (double-quantized) absmax; a layer's whole storage
is all-gathered just before its forward, freed after it, gathered again just before its backward and freed after
that. :func:`qlora_kernels.distributed.fully_shard_qlora` sets this up (``shard_base=True``, the default); this module
holds the machinery.

How, in one paragraph: the layer keeps its own storage tensors (``QLoRALinear``'s buffers, bitsandbytes'
``Params4bit`` and ``quant_state.absmax``), so every view of them (the ``NF4Weight`` the layer computes with, the
tensors autograd saved for backward) stays valid. What changes is their *storage*: resized to 0 bytes while the layer
is sharded, resized back and filled by an all-gather (straight into it, no copy) before use, exactly FSDP2's trick
for its unsharded parameters. While sharded, the layer's registered tensors are also given shape (0,), so that
reading them outside forward and backward (``print``, ``.cpu()``, a state-dict walk) sees an empty tensor instead of
freed memory; :func:`unsharded` gathers every base for code that wants to read it.

- Which tensors: the packed bytes ``[(N·K + 1) // 2 / itemsize, 1]`` and absmax ``[blocks]``, each cut like
  ``torch.chunk`` along dim 0 into ``world`` pieces of ``ceil(n / world)`` elements (DTensor's ``Shard(0)``), the
  rank's piece zero-padded so that all pieces have one size. The rest (nested absmax: 4 bytes per 256 blocks; the
  offset; the two codebooks) is small and stays whole on every rank.
- Collectives: one all-gather per sharded tensor, on a process group of its own (so their order never interleaves
  with FSDP2's), on bytes (``uint8`` views), so no storage dtype needs collective support and nothing is ever cast:
  mixed precision never sees the 4-bit storage.
- Backward: a hook on the layer's output gathers before its backward; the storage is freed when the gradient
  reaches the layer's input (an identity autograd function on the input), or, when the input needs no gradient
  (the first layers of a network), at the end of the backward pass.
- State dicts: under bitsandbytes' keys (``weight``, ``weight.absmax``, …) as before; the two sharded tensors appear
  as ``DTensor``s with ``Shard(0)`` on the FSDP mesh, so ``torch.distributed.checkpoint`` saves and loads each rank's
  piece, and ``get_model_state_dict(full_state_dict=True)`` gathers whole tensors that bitsandbytes loads. Loading
  accepts the same DTensors or whole tensors (each rank copies its piece).
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .nf4 import NF4Weight
from .nn import QLoRALinear

__all__ = ["ShardedNF4Base", "ShardedBases", "TensorShard", "chunk_range", "shard_qlora_bases", "sharded_bases",
           "unsharded", "nf4_storage_bytes"]

_QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
NESTED_BLOCKSIZE = 256


def chunk_range(numel: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """``(start, length, chunk)``: where rank ``rank``'s piece of a dim-0 split of ``numel`` rows into ``world_size``
    pieces starts, how many rows it has, and the common (padded) piece size ``ceil(numel / world_size)``: the split of
    ``torch.chunk`` and of DTensor's ``Shard(0)`` (the last pieces may be shorter, or empty)."""
    if numel < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need numel >= 0 and 0 <= rank < world_size, got {numel}, {rank}, {world_size}")
    chunk = -(-numel // world_size)
    start = min(rank * chunk, numel)
    return start, max(0, min(chunk, numel - start)), chunk


def nf4_storage_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> dict[str, int]:
    """Bytes of one NF4 weight of ``numel`` elements by part: ``packed`` (codes), ``absmax`` (uint8 per block with
    double quantization, float32 otherwise), ``replicated`` (nested absmax, offset and codebooks, kept whole on every
    rank when sharded)."""
    blocks = -(-numel // blocksize)
    replicated = 16 * 4  # NF4 codebook
    if double_quant:
        replicated += 4 * (-(-blocks // NESTED_BLOCKSIZE)) + 4 + 256 * 4
    return {"packed": (numel + 1) // 2, "absmax": blocks * (1 if double_quant else 4), "replicated": replicated}


def _owns_its_storage(t: torch.Tensor) -> bool:
    return (t.storage_offset() == 0 and t.is_contiguous()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


class TensorShard:
    """One frozen tensor of a layer's base split across the ranks; this rank keeps its piece.

    ``tensor`` is the layer's own tensor (its storage is freed and refilled in place); ``holders`` are the tensor
    objects registered on the layer that alias it, given shape (0,) while the storage is freed.
    """

    def __init__(self, name: str, tensor: torch.Tensor, holders: list[torch.Tensor], rank: int, world_size: int,
                 group: Any) -> None:
        if tensor.dim() == 0 or tensor.numel() != tensor.shape[0]:
            raise ValueError(f"{name}: only tensors of shape [n] or [n, 1] are sharded, got {tuple(tensor.shape)}")
        if not _owns_its_storage(tensor):
            raise ValueError(
                f"{name} shares its storage with other tensors (offset {tensor.storage_offset()}, storage of "
                f"{tensor.untyped_storage().nbytes()} bytes for {tensor.numel() * tensor.element_size()}); sharding "
                "frees that storage, so give the layer a base of its own first (e.g. rebuild it from a clone)"
            )
        self.name = name
        self.storage = tensor.untyped_storage()
        self.shape, self.stride, self.dtype, self.device = tensor.shape, tensor.stride(), tensor.dtype, tensor.device
        self.numel = tensor.numel()
        self.holders = [tensor] + [h for h in holders if h is not tensor]
        self.rank, self.world_size, self.group = rank, world_size, group
        self.start, self.length, self.chunk = chunk_range(self.numel, world_size, rank)
        self.local = torch.zeros(self.chunk, dtype=self.dtype, device=self.device)
        self.local[: self.length].copy_(tensor.detach().reshape(-1)[self.start: self.start + self.length])
        self.gathered = True

    @property
    def itemsize(self) -> int:
        return self.local.element_size()

    @property
    def full_nbytes(self) -> int:
        return self.numel * self.itemsize

    def _set_holders(self, size: tuple, stride: tuple) -> None:
        # An in-place metadata change, not a data write: keep autograd's version counters as they are, or the tensors
        # saved for backward (views of these) would be refused as "modified by an inplace operation".
        with torch.no_grad():
            for holder in self.holders:
                with torch.autograd._unsafe_preserve_version_counter(holder):
                    holder.set_(self.storage, 0, size, stride)

    def free(self) -> None:
        if self.gathered:
            self._set_holders((0,), (1,))
            self.storage.resize_(0)
            self.gathered = False

    def gather(self) -> None:
        """All-gather the pieces straight into the tensor's own storage (sized for the padded pieces)."""
        import torch.distributed as dist

        if self.gathered:
            return
        padded_bytes = self.chunk * self.world_size * self.itemsize
        self.storage.resize_(padded_bytes)
        output = torch.empty(0, dtype=torch.uint8, device=self.device).set_(self.storage, 0, (padded_bytes,))
        # torch 2.13 renames all_gather_into_tensor to all_gather_single; older versions have only the former.
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        all_gather(output, self.local.view(torch.uint8), group=self.group)
        self._set_holders(tuple(self.shape), tuple(self.stride))
        self.gathered = True

    def dtensor(self, mesh: Any) -> torch.Tensor:
        """This rank's piece as a DTensor ``Shard(0)`` of the whole tensor's shape (a view of the piece: loading into
        it in place, as ``torch.distributed.checkpoint`` does, writes the piece)."""
        from torch.distributed.tensor import DTensor, Shard

        local = self.local[: self.length].view((self.length,) + tuple(self.shape[1:]))
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=self.shape, stride=self.stride)

    def load(self, value: Any) -> None:
        """Set this rank's piece from ``value``: a DTensor of the whole shape (its local piece is taken; with the
        same placement, it is ours already after an in-place load) or the whole tensor (this rank's rows are taken)."""
        from torch.distributed.tensor import DTensor

        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{self.name} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(self.shape) or value.dtype != self.dtype:
            raise ValueError(f"{self.name} must be {self.dtype} {tuple(self.shape)}, got {value.dtype} "
                             f"{tuple(value.shape)}")
        if isinstance(value, DTensor):
            from torch.distributed.tensor import Shard

            local = value.to_local()
            same_layout = (tuple(value.placements) == (Shard(0),) and value.device_mesh.size() == self.world_size
                           and local.numel() == self.length)
            if not same_layout:  # saved from another layout: take the whole tensor (a collective)
                value = value.full_tensor()
            else:
                if local.untyped_storage().data_ptr() != self.local.untyped_storage().data_ptr():
                    self.local[: self.length].copy_(local.reshape(-1))
                return
        self.local[: self.length].copy_(value.detach().reshape(-1)[self.start: self.start + self.length])


class ShardedNF4Base:
    """The sharded NF4 base of one QLoRA layer (a ``QLoRALinear``, or a peft LoRA layer over a bitsandbytes
    ``Linear4bit``), with the hooks that gather it around the layer's forward and backward."""

    def __init__(self, layer: nn.Module, name: str, mesh: Any, group: Any, bases: "ShardedBases",
                 reshard_after_forward: bool = True) -> None:
        import torch.distributed as dist

        self.layer, self.name, self.mesh, self.group, self.bases = layer, name, mesh, group, bases
        self.reshard_after_forward = reshard_after_forward
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        if isinstance(layer, QLoRALinear):
            owner = layer  # the module whose state dict holds the base's keys
            weight = layer.base_weight
            extra_holders: dict[str, list[torch.Tensor]] = {"packed": [], "absmax": []}
        else:
            owner = layer.base_layer
            weight = NF4Weight.from_bnb(owner)
            state = owner.weight.quant_state
            extra_holders = {"packed": [owner.weight], "absmax": [state.absmax]}
        self.owner = owner
        self.weight = weight
        # Plain tensors only: FSDP2's parameters (the LoRA pair) are DTensors by now, and never alias the base.
        registered = [t for t in list(owner.parameters(recurse=False)) + list(owner.buffers(recurse=False))
                      if not hasattr(t, "to_local")]
        self.fields: dict[str, TensorShard] = {}
        for field, key in (("packed", "weight"), ("absmax", "weight.absmax")):
            tensor = getattr(weight, field)
            ptr = tensor.untyped_storage().data_ptr()
            holders = [t for t in registered if t.numel() > 0 and t.untyped_storage().data_ptr() == ptr]
            holders += [t for t in extra_holders[field] if all(t is not h for h in holders)]
            # The layer's own tensor, not the NF4Weight's view of it, is the one whose storage we manage.
            base_tensor = holders[0] if holders else tensor
            self.fields[key] = TensorShard(f"{name}.{key}", base_tensor, holders, rank, world_size, group)
        self._loaded_keys: list[str] = []
        self._final_callback_queued = False
        self._handles = [
            layer.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            layer.register_forward_hook(self._post_forward, with_kwargs=True),
            # Functions, not bound methods: torch tags the hooks it is given with an attribute.
            owner.register_state_dict_post_hook(functools.partial(ShardedNF4Base._state_dict_post_hook, self)),
            owner.register_load_state_dict_post_hook(functools.partial(ShardedNF4Base._load_post_hook, self)),
        ]

    # ------------------------------------------------------------------------------------------------ memory

    @property
    def gathered(self) -> bool:
        return all(f.gathered for f in self.fields.values())

    @property
    def full_nbytes(self) -> int:
        """Bytes of the sharded tensors, whole (what replication keeps on every rank)."""
        return sum(f.full_nbytes for f in self.fields.values())

    @property
    def shard_nbytes(self) -> int:
        """Bytes this rank keeps for the sharded tensors (its padded pieces)."""
        return sum(f.local.numel() * f.itemsize for f in self.fields.values())

    @property
    def replicated_nbytes(self) -> int:
        """Bytes of the small tensors every rank keeps whole (nested absmax, offset, codebooks)."""
        w = self.weight
        tensors = [w.quant_map, w.nested_absmax, w.offset, w.nested_quant_map]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def resident_nbytes(self) -> int:
        """Bytes of this layer's sharded tensors held by this rank right now: its pieces, plus the whole storage
        while gathered (measured from the storages themselves)."""
        return self.shard_nbytes + sum(f.storage.nbytes() for f in self.fields.values())

    # ----------------------------------------------------------------------------------------- gather / free

    def unshard(self) -> None:
        if not self.gathered:
            for f in self.fields.values():
                f.gather()
            self.bases.record()

    def reshard(self) -> None:
        if any(f.gathered for f in self.fields.values()):
            for f in self.fields.values():
                f.free()
            self.bases.record()

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.unshard()
        if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            args = (_ReshardAfterBackward.apply(args[0], self),) + tuple(args[1:])
        return args, kwargs

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        outputs = [t for t in torch.utils._pytree.tree_leaves(output)
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        if torch.is_grad_enabled() and outputs:
            for t in outputs:
                t.register_hook(self._pre_backward)
            if self.reshard_after_forward:
                self.reshard()
        else:
            self.reshard()
        return output

    def _pre_backward(self, grad: torch.Tensor) -> None:
        self.unshard()
        if not self._final_callback_queued:
            self._final_callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._final_callback_queued = False
        self.reshard()

    # -------------------------------------------------------------------------------------------- state dict

    def _state_dict_post_hook(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        for key, field in self.fields.items():
            state_dict[prefix + key] = field.dtensor(self.mesh)

    def load_from(self, state_dict: dict, prefix: str, error_msgs: list) -> None:
        """Take this layer's base entries out of ``state_dict`` (keys under ``prefix``, the owner's): the sharded
        tensors into this rank's pieces, nested absmax and offset into the layer's whole tensors. Called by the
        owner's parent's load pre-hook, so the owner's own loader never sees them."""
        self.reshard()  # the next forward gathers what was loaded
        self._loaded_keys = []
        meta_key = prefix + _QUANT_STATE_KEY
        if meta_key in state_dict:
            try:
                self._check_meta(state_dict[meta_key])
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"While loading the sharded NF4 base {prefix}weight: {exc}")
                return
        for key, field in self.fields.items():
            if prefix + key in state_dict:
                value = state_dict.pop(prefix + key)
                try:
                    field.load(value)
                except (ValueError, TypeError) as exc:
                    error_msgs.append(f"While loading the sharded NF4 base {prefix}{key}: {exc}")
                self._loaded_keys.append(prefix + key)
        nested_key = prefix + "weight.nested_absmax"
        if self.weight.nested_absmax is not None and nested_key in state_dict:
            value = state_dict.pop(nested_key)
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            if tuple(value.shape) != tuple(self.weight.nested_absmax.shape) or value.dtype != torch.float32:
                error_msgs.append(f"{nested_key} must be float32 {tuple(self.weight.nested_absmax.shape)}, got "
                                  f"{value.dtype} {tuple(value.shape)}")
            else:
                with torch.no_grad():
                    self.weight.nested_absmax.copy_(value)
            if isinstance(self.layer, QLoRALinear):
                self._loaded_keys.append(nested_key)

    def _check_meta(self, packed_json: torch.Tensor) -> None:
        meta = json.loads(bytes(packed_json.cpu().to(torch.uint8).tolist()).decode("utf-8"))
        w = self.weight
        expected = {"quant_type": "nf4", "blocksize": w.blocksize, "shape": list(w.shape),
                    "dtype": str(w.dtype).removeprefix("torch.")}
        for field, value in expected.items():
            if meta.get(field) != value:
                raise ValueError(f"the checkpoint's {field} is {meta.get(field)!r}, this layer's {value!r}")
        if (w.offset is None) != ("nested_offset" not in meta):
            raise ValueError("the checkpoint and this layer differ in double quantization")
        if w.offset is not None:
            with torch.no_grad():
                w.offset.fill_(float(meta["nested_offset"]))

    def _load_post_hook(self, module: nn.Module, incompatible_keys: Any) -> None:
        loaded = set(self._loaded_keys)
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in loaded]
        incompatible_keys.unexpected_keys[:] = [k for k in incompatible_keys.unexpected_keys if k not in loaded]
        self._loaded_keys = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _ReshardAfterBackward(torch.autograd.Function):
    """Identity on a layer's input; its backward runs once the gradient has gone through the whole layer, the moment
    to free the layer's gathered base."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: ShardedNF4Base) -> torch.Tensor:
        ctx.base = base
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.base.reshard()
        return grad, None


class ShardedBases:
    """Every sharded base of one model, with this rank's byte counts (measured from the storages)."""

    def __init__(self) -> None:
        self.layers: list[ShardedNF4Base] = []
        self.peak_resident_nbytes = 0

    @property
    def full_nbytes(self) -> int:
        """The sharded tensors' bytes, whole: what every rank would hold if replicated."""
        return sum(b.full_nbytes for b in self.layers)

    @property
    def shard_nbytes(self) -> int:
        return sum(b.shard_nbytes for b in self.layers)

    @property
    def replicated_nbytes(self) -> int:
        return sum(b.replicated_nbytes for b in self.layers)

    def resident_nbytes(self) -> int:
        return sum(b.resident_nbytes() for b in self.layers)

    def record(self) -> None:
        self.peak_resident_nbytes = max(self.peak_resident_nbytes, self.resident_nbytes())

    def reset_peak(self) -> None:
        self.peak_resident_nbytes = self.resident_nbytes()

    def max_layer_full_nbytes(self) -> int:
        return max((b.full_nbytes for b in self.layers), default=0)

    def _load_pre_hook(self, bases: list[tuple[str, ShardedNF4Base]]):
        def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
            for child_name, base in bases:
                base.load_from(state_dict, f"{prefix}{child_name}.", error_msgs)
        return hook


def _parents(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    found = {}
    for module in model.modules():
        for name, child in module.named_children():
            found[id(child)] = (module, name)
    return found


def shard_qlora_bases(model: nn.Module, layers: list[nn.Module], mesh: Any,
                      reshard_after_forward: bool = True) -> ShardedBases:
    """Shard the NF4 base of each of ``layers`` (QLoRA layers of ``model``) over the ranks of the 1-D ``mesh``, in
    place; every rank must call it with the same model. Returns the model's :class:`ShardedBases`, also reachable by
    :func:`sharded_bases`."""
    import torch.distributed as dist

    if getattr(model, "qlora_sharded_bases", None) is not None:
        raise ValueError("the model's NF4 bases are sharded already")
    ranks = dist.get_process_group_ranks(mesh.get_group())
    group = dist.new_group(ranks=ranks)  # a group of its own: our all-gathers never interleave with FSDP2's
    names = {id(m): n for n, m in model.named_modules()}
    parents = _parents(model)
    bases = ShardedBases()
    by_parent: dict[int, tuple[nn.Module, list]] = {}
    for layer in layers:
        base = ShardedNF4Base(layer, names.get(id(layer), "?"), mesh, group, bases, reshard_after_forward)
        if id(base.owner) not in parents:
            raise ValueError(f"{type(base.owner).__name__} is the model itself: shard a model that contains it")
        parent, child_name = parents[id(base.owner)]
        by_parent.setdefault(id(parent), (parent, []))[1].append((child_name, base))
        bases.layers.append(base)
        base.reshard()
    for parent, children in by_parent.values():
        parent.register_load_state_dict_pre_hook(bases._load_pre_hook(children))
    model.qlora_sharded_bases = bases
    bases.reset_peak()
    return bases


def sharded_bases(model: nn.Module) -> Optional[ShardedBases]:
    """The :class:`ShardedBases` of a model sharded by ``fully_shard_qlora(shard_base=True)``, else None."""
    return getattr(model, "qlora_sharded_bases", None)


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Gather every sharded NF4 base of ``model`` whole for the ``with`` block (a collective: every rank enters it),
    e.g. to read or merge the base; freed again on exit. A forward run inside the block frees its layers' bases as
    usual. A no-op for a model whose base is not sharded."""
    bases = sharded_bases(model)
    if bases is None:
        yield model
        return
    for base in bases.layers:
        base.unshard()
    try:
        yield model
    finally:
        for base in bases.layers:
            base.reshard()
