"""The base of the paged optimizers: state layout, paging, validation, state_dict, and the fused step call.

Per parameter, ``state`` holds ``step`` (a Python int, so bias corrections are computed on the host without reading
device memory) and, per moment (``exp_avg``, plus ``exp_avg_sq`` for AdamW):

- 32-bit: a float32 tensor of the parameter's shape;
- 8-bit (``optim_bits=8`` and at least ``min_8bit_size`` elements): uint8 codes of the parameter's shape on
  bitsandbytes' dynamic maps (signed for ``exp_avg``, unsigned for ``exp_avg_sq``) and a float32
  ``<moment>_absmax`` with one scale per 256 elements.

Moments of parameters with at least ``page_threshold`` elements on a CUDA device live in unified memory
(:mod:`qlora_kernels.paged`); they are prefetched to the GPU on the current stream at every step, and
:meth:`evict_state` sends them to host memory on request. On the CPU paging is a no-op.

A step makes one call to the extension per parameter group: on CUDA one kernel launch for all the group's
tensors, on the current stream, with no host synchronisation.

What a group may hold: any parameters; only those with a gradient are stepped, and only trainable ones
(``requires_grad``) are checked at construction, so ``model.parameters()`` of a QLoRA model (frozen uint8 4-bit
storage included) is accepted as by torch's and bitsandbytes' optimizers. FSDP2's DTensor parameters are stepped
through their local shards; their state is the local shard's (see :meth:`PagedOptimizer.state_dict`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import Any, Callable, Iterable, Optional

import torch

from .. import paged
from .._extension import require_extension
from ..reference import dynamic_map

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANTIZATION_BLOCK = 256  # elements per absmax scale of the 8-bit state (the kernels' chunk size)
FLOAT32_MAX = torch.finfo(torch.float32).max  # the kernels compute in float32: larger hyperparameters overflow
MAX_STEP = 2**62  # step counters beyond this are refused (the extension takes int64 steps; nothing real gets near)
# The key under which state_dict() records the optimizer class in each saved param group, so that a state saved by
# another optimizer is refused at load instead of being misread.
CLASS_KEY = "qlora_kernels_optimizer"

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None


def _is_dtensor(tensor: Any) -> bool:
    return _DTensor is not None and isinstance(tensor, _DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels update: a DTensor's local shard (a view of its storage), else the tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


SHARD_KEY = "shard"  # in the saved state of a DTensor parameter: which shard the moments are (see state_dict)


def _shard_marker(p: torch.Tensor) -> torch.Tensor:
    """int64 [mesh coordinate..., local numel] of a DTensor parameter's local shard."""
    coordinate = p.device_mesh.get_coordinate() or []
    return torch.tensor([*coordinate, _local(p).numel()], dtype=torch.int64)


def check_unsupported(owner: str, **options: tuple[Any, Any, str]) -> None:
    """Refuse options (bitsandbytes' or torch's keyword arguments) that would change the algorithm in ways these
    optimizers do not implement: each value is (given, the only accepted value, what to do instead)."""
    for name, (given, accepted, instead) in options.items():
        if not (given is accepted or given == accepted):
            raise ValueError(f"{owner} does not support {name}={given!r} (only {accepted!r}); {instead}")


def _check_cuda_kernels(device: torch.device) -> None:
    if device.type == "cuda" and not torch.ops.qlora_kernels._built_with_cuda():
        raise RuntimeError(
            "qlora_kernels._C was built without its CUDA kernels (torch had no CUDA or nvcc was not found at build "
            "time); rebuild it with `pip install --no-build-isolation -e .` where both are available"
        )


def _check_number(name: str, value: Any, group_index: Optional[int] = None) -> float:
    where = "" if group_index is None else f" (param group {group_index})"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.device.type != "cpu":
            raise TypeError(
                f"{name} must be a Python number or a one-element CPU tensor{where}: reading a "
                f"{value.device.type} tensor would synchronise the device at every step"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number{where}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name} must be a finite number >= 0{where}, got {value}")
    if value > FLOAT32_MAX:
        raise ValueError(
            f"{name} must be at most {FLOAT32_MAX:.6g} (the kernels compute in float32){where}, got {value}"
        )
    return value


def _check_betas(betas: Any, group_index: Optional[int] = None) -> tuple[float, float]:
    where = "" if group_index is None else f" (param group {group_index})"
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2){where}, got {betas!r}")
    checked = []
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise TypeError(f"betas[{i}] must be a number{where}, got {type(beta).__name__}")
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1){where}, got {beta}")
        checked.append(float(beta))
    return checked[0], checked[1]


def _check_no_shared_memory(group_index: int, group: dict, with_grad: list) -> None:
    """Refuse two contiguous parameters of one step whose memory overlaps (views of one tensor): the fused kernel
    would update the shared elements from two threads at once. (Non-contiguous ones are updated through copies.)"""
    index_of = {id(p): i for i, p in enumerate(group["params"])}
    spans = sorted(
        (local_p.data_ptr(), local_p.data_ptr() + local_p.numel() * local_p.element_size(), index_of[id(p)])
        for p, local_p, _ in with_grad
        if local_p.numel() > 0 and local_p.is_contiguous()
    )
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(
                f"params[{first}] and params[{second}] of param group {group_index} share memory (views of one "
                "tensor); the fused step would update the shared elements twice at once"
            )


class PagedOptimizer(torch.optim.Optimizer):
    """Common machinery of :class:`PagedAdamW`, :class:`PagedAdamW8bit`, :class:`PagedLion8bit` (not used directly).

    Subclasses set ``algorithm`` ("adamw" or "lion"), ``moment_names`` and call ``__init__`` with their defaults.
    ``page_threshold=None`` pages nothing (bitsandbytes' ``is_paged=False``).
    """

    algorithm: str = "adamw"
    moment_names: tuple[str, ...] = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable,
        defaults: dict,
        *,
        optim_bits: int,
        min_8bit_size: int,
        page_threshold: Optional[int],
    ) -> None:
        require_extension(type(self).__name__)
        if isinstance(optim_bits, bool) or optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits!r}")
        for name, value in (("min_8bit_size", min_8bit_size), ("page_threshold", page_threshold)):
            if value is None and name == "page_threshold":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.optim_bits = optim_bits
        self.min_8bit_size = min_8bit_size
        self.page_threshold = page_threshold
        self._reset_caches()
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        self._code_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._empty_cache: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        """What pickle, ``copy.deepcopy`` and ``torch.save(optimizer)`` keep: torch's three entries plus this
        optimizer's settings (the per-device caches are rebuilt)."""
        state = super().__getstate__()
        state.update(optim_bits=self.optim_bits, min_8bit_size=self.min_8bit_size, page_threshold=self.page_threshold)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_caches()
        # Unified memory does not survive pickling or deepcopy (the copies are ordinary tensors): put the moments
        # that should be paged back into it.
        for p, param_state in self.state.items():
            moment = param_state.get(self.moment_names[0]) if isinstance(param_state, dict) else None
            if isinstance(moment, torch.Tensor) and self._is_paged(_local(p)) and not paged.is_paged(moment):
                self._move_state(p, param_state)

    # ------------------------------------------------------------------------------------------ param groups

    def _check_hyperparameters(
        self, group: dict, group_index: Optional[int]
    ) -> tuple[float, float, float, float, float]:
        """(lr, beta1, beta2, eps, weight_decay) of ``group``, or a ValueError/TypeError naming the bad one.

        Flags of torch's optimizers that these do not implement (``maximize``, ``amsgrad``, Adam's coupled weight
        decay) are refused when set, so that a group copied or loaded from torch never has them silently ignored."""
        where = "" if group_index is None else f" (param group {group_index})"
        for key in ("lr", "betas", "weight_decay", *(("eps",) if self.algorithm == "adamw" else ())):
            if key not in group:
                raise ValueError(f"{type(self).__name__} needs '{key}' in every param group{where}; this one has "
                                 f"{sorted(k for k in group if k != 'params')} (another optimizer's?)")
        for flag, instead in (("maximize", "negate the loss to maximize it"), ("amsgrad", "use amsgrad=False")):
            if group.get(flag, False):
                raise ValueError(f"{type(self).__name__} does not support {flag}={group[flag]!r}{where}; {instead}")
        lr = _check_number("lr", group["lr"], group_index)
        beta1, beta2 = _check_betas(group["betas"], group_index)
        eps = _check_number("eps", group.get("eps", 0.0), group_index)
        weight_decay = _check_number("weight_decay", group["weight_decay"], group_index)
        if weight_decay and not group.get("decoupled_weight_decay", True):  # torch.optim.Adam's L2 penalty
            raise ValueError(
                f"{type(self).__name__} decays weights decoupled (AdamW); decoupled_weight_decay=False with "
                f"weight_decay={weight_decay}{where} is Adam's L2 penalty, which it does not implement"
            )
        if abs(1.0 - lr * weight_decay) > FLOAT32_MAX:
            raise ValueError(f"lr * weight_decay = {lr * weight_decay:.6g} overflows float32{where}")
        return lr, beta1, beta2, eps, weight_decay

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group (torch.optim.Optimizer API), checking its parameters and hyperparameters.

        Parameters that do not require grad (a QLoRA model's frozen 4-bit storage, frozen embeddings) are kept in the
        group and never stepped unless they get a gradient; trainable ones must be float32/float16/bfloat16 on a
        CPU or CUDA device, one device per group, and none may be listed twice (two updates of one tensor would
        race in the fused kernel)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif params is not None and not isinstance(params, (set, frozenset)):  # torch's own error for sets
            params = list(params)
            seen: dict[int, int] = {}
            for i, p in enumerate(params):
                if isinstance(p, torch.Tensor):
                    if id(p) in seen:
                        raise ValueError(
                            f"params[{i}] of param group {len(self.param_groups)} is params[{seen[id(p)]}] again; "
                            "list each parameter once"
                        )
                    seen[id(p)] = i
        param_group = {**param_group, "params": params}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group_index = len(self.param_groups) - 1
        try:
            self._check_hyperparameters(group, group_index)
            device = None
            for i, p in enumerate(group["params"]):
                if not p.requires_grad:
                    continue  # never stepped unless it gets a grad; step() checks it then
                if p.dtype not in _SUPPORTED_DTYPES:
                    raise TypeError(
                        f"params[{i}] of param group {group_index} is {p.dtype}; {type(self).__name__} updates "
                        "float32, float16 and bfloat16 parameters"
                    )
                if device is None:
                    device = p.device
                elif p.device != device:
                    raise ValueError(
                        f"params of param group {group_index} are on different devices ({device} and {p.device} "
                        f"at params[{i}]); put each device's parameters in their own group"
                    )
                if p.device.type not in ("cpu", "cuda"):
                    raise ValueError(f"params[{i}] of param group {group_index} is on {p.device}; cpu or cuda only")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    # ----------------------------------------------------------------------------------------------- state

    def _is_8bit(self, p: torch.Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _is_paged(self, p: torch.Tensor) -> bool:
        return self.page_threshold is not None and p.device.type == "cuda" and p.numel() >= self.page_threshold

    def _new_moment(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self._is_paged(p):
            return paged.zeros(tuple(p.shape), dtype=dtype, device=p.device)
        return torch.zeros(p.shape, dtype=dtype, device=p.device)

    def _moment_from(self, p: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A fresh copy of ``value`` as ``p``'s moment: on p's device, paged when p's moments are."""
        moment = self._new_moment(p, dtype)
        moment.copy_(value.reshape(p.shape))
        return moment

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        """Fresh state for ``p``: 8-bit or not by its whole size (a DTensor's global numel, so every rank and every
        world size decides alike), allocated for the tensor the kernel updates (a DTensor's local shard)."""
        local_p = _local(p)
        state["step"] = 0
        dtype = torch.uint8 if self._is_8bit(p) else torch.float32
        for name in self.moment_names:
            state[name] = self._new_moment(local_p, dtype)
            if dtype == torch.uint8:
                state[name + "_absmax"] = torch.zeros(
                    -(-local_p.numel() // QUANTIZATION_BLOCK), dtype=torch.float32, device=local_p.device
                )

    def _move_state(self, p: torch.Tensor, state: dict) -> None:
        """Bring ``state`` to ``p``'s device (after ``model.to(...)``), paged where p's moments should be."""
        local_p = _local(p)
        for name in self.moment_names:
            state[name] = self._moment_from(local_p, state[name], state[name].dtype)
            if name + "_absmax" in state:
                state[name + "_absmax"] = state[name + "_absmax"].to(local_p.device)

    def _codes(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Cached per device: building them on a GPU copies from pageable host memory, which would synchronise.
        if device not in self._code_cache:
            self._code_cache[device] = (dynamic_map(True, device), dynamic_map(False, device))
        return self._code_cache[device]

    def _empty(self, device: torch.device) -> torch.Tensor:
        if device not in self._empty_cache:
            self._empty_cache[device] = torch.empty(0, dtype=torch.float32, device=device)
        return self._empty_cache[device]

    def _paged_moments(self) -> Iterable[torch.Tensor]:
        for state in self.state.values():
            for name in self.moment_names:
                moment = state.get(name)
                if isinstance(moment, torch.Tensor) and paged.is_paged(moment):
                    yield moment

    def evict_state(self) -> None:
        """Send every paged moment to host memory (asynchronously, on the current stream), e.g. to free GPU memory
        for evaluation or generation; the next :meth:`step` brings them back."""
        for moment in self._paged_moments():
            paged.evict(moment)

    def prefetch_state(self) -> None:
        """Bring every paged moment back to its GPU ahead of time (asynchronously, on the current stream)."""
        for moment in self._paged_moments():
            paged.prefetch(moment)

    # ------------------------------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimization step for every parameter with a gradient; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            self._step_group(group_index, group)
        return loss

    def _step_group(self, group_index: int, group: dict) -> None:
        lr, beta1, beta2, eps, weight_decay = self._check_hyperparameters(group, group_index)
        # Check everything before touching any state, so a bad gradient leaves the optimizer as it was.
        with_grad = []  # (parameter as listed, the tensor the kernel updates, its gradient's tensor)
        device = None
        for i, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            where = f"params[{i}] of param group {group_index}"
            if grad.is_sparse or grad.layout != torch.strided:
                raise TypeError(
                    f"{type(self).__name__} does not support sparse gradients ({where} has a {grad.layout} grad)"
                )
            if _is_dtensor(p) != _is_dtensor(grad) or (_is_dtensor(p) and p.placements != grad.placements):
                raise TypeError(
                    f"the grad of {where} must be sharded like the parameter (a DTensor with the same placements "
                    "when the parameter is one)"
                )
            local_p, local_grad = _local(p), _local(grad)
            if local_p.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(f"{where} is {p.dtype}; float32, float16 and bfloat16 parameters only")
            if local_grad.dtype != local_p.dtype or local_grad.shape != local_p.shape:
                raise TypeError(
                    f"the grad of {where} is {grad.dtype}{tuple(local_grad.shape)}, the parameter "
                    f"{p.dtype}{tuple(local_p.shape)}"
                )
            if device is None:
                device = local_p.device
            if local_p.device != device or local_grad.device != device:
                raise ValueError(
                    f"param group {group_index} mixes devices ({device}, and {local_p.device} with its grad on "
                    f"{local_grad.device} at {where}); one group, one device"
                )
            state = self.state.get(p)
            if state:
                step = state.get("step")
                if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < MAX_STEP:
                    raise ValueError(f"the state of {where} has step={step!r}; expected an int in [0, {MAX_STEP})")
            with_grad.append((p, local_p, local_grad))
        if not with_grad:
            return
        _check_cuda_kernels(device)
        _check_no_shared_memory(group_index, group, with_grad)

        params, grads, steps = [], [], []
        moments: dict[str, list[torch.Tensor]] = {name: [] for name in self.moment_names}
        absmaxes: dict[str, list[torch.Tensor]] = {name: [] for name in self.moment_names}
        copy_back = []
        states = []
        for p, local_p, local_grad in with_grad:
            state = self.state[p]
            if not state:
                self._init_state(p, state)
            elif state[self.moment_names[0]].device != local_p.device:
                self._move_state(p, state)
            states.append(state)
            if local_p.is_contiguous():
                params.append(local_p)
            else:  # the kernel walks memory linearly: update a contiguous copy and write it back
                contiguous = local_p.contiguous()
                copy_back.append((local_p, contiguous))
                params.append(contiguous)
            grads.append(local_grad.contiguous())
            steps.append(state["step"] + 1)
            for name in self.moment_names:
                moments[name].append(state[name])
                absmaxes[name].append(state.get(name + "_absmax", self._empty(device)))
        signed_code, unsigned_code = self._codes(device)
        adamw = self.algorithm == "adamw"
        torch.ops.qlora_kernels.multi_tensor_optimizer_step(
            self.algorithm,
            params,
            grads,
            moments["exp_avg"],
            moments["exp_avg_sq"] if adamw else [],
            absmaxes["exp_avg"],
            absmaxes["exp_avg_sq"] if adamw else [],
            steps,
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            signed_code,
            unsigned_code,
        )
        # The step counts advance only once the extension has accepted the call (it checks before it writes).
        for state, step in zip(states, steps):
            state["step"] = step
        for local_p, contiguous in copy_back:
            local_p.copy_(contiguous)

    # ------------------------------------------------------------------------------------------ state_dict

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with each param group tagged with this optimizer's class (``qlora_kernels_optimizer``)
        so that :meth:`load_state_dict` of another optimizer refuses it.

        Under FSDP2 the moments are the local shard's (an 8-bit state's absmax blocks follow the local shard, so they
        cannot form one global DTensor): one state dict per rank, saved and loaded per rank (``torch.save``) with the
        same world size and sharding. Each DTensor parameter's state carries ``shard`` (its mesh coordinate and local
        size), and loading refuses another rank's shard, so a checkpointer that mixes ranks up (for instance
        ``torch.distributed.checkpoint``, which keeps one copy of plain tensors) fails loudly instead of loading
        another rank's moments."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group[CLASS_KEY] = type(self).__name__
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for index, p in enumerate(params):
            if _is_dtensor(p) and index in state_dict["state"]:
                # torch's state_dict shares the per-parameter dicts with self.state: add to a copy
                state_dict["state"][index] = {**state_dict["state"][index], SHARD_KEY: _shard_marker(p)}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state from :meth:`state_dict` exactly: moments keep their dtype (uint8 codes, float32 values), go
        to their parameter's device and into unified memory where this optimizer pages them. The loaded tensors are
        copies, so stepping never changes ``state_dict``. (torch's loader would cast them to the parameter dtype.)
        A ``torch.optim.AdamW`` state dict loads into the 32-bit optimizers (not with ``maximize`` or ``amsgrad``);
        a state saved by another of these optimizers, or holding entries this one does not keep, non-finite or
        negative statistics, or an out-of-range step, is refused with a ValueError. Nothing changes if it raises."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise TypeError("state_dict must be a dict with 'state' and 'param_groups', as state_dict() returns")
        state_dict = state_dict.copy()
        for pre_hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict["state"], dict) or not isinstance(state_dict["param_groups"], (list, tuple)):
            raise TypeError("state_dict['state'] must be a dict and state_dict['param_groups'] a list")
        saved_groups = deepcopy(list(state_dict["param_groups"]))
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}"
            )
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
                raise TypeError(f"param group {index} of the state dict must be a dict with a 'params' list")
            saved_class = saved.pop(CLASS_KEY, None)
            if saved_class is not None and saved_class != type(self).__name__:
                raise ValueError(
                    f"the state dict was saved by {saved_class}, not {type(self).__name__}: its state does not mean "
                    "the same here (build the optimizer it was saved from)"
                )
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param group {index} has {len(group['params'])} params, the state dict's {len(saved['params'])}"
                )
            self._check_hyperparameters(saved, index)
        saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        if len(set(saved_ids)) != len(saved_ids):
            raise ValueError("the state dict's param groups list a parameter id more than once")
        id_to_param = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        state: defaultdict = defaultdict(dict)
        for param_id, saved_state in state_dict["state"].items():
            if param_id not in id_to_param:
                raise ValueError(f"the state dict has state for parameter id {param_id!r}, which no group lists")
            p = id_to_param[param_id]
            state[p] = self._load_param_state(p, saved_state, param_id)
        for group, saved in zip(self.param_groups, saved_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
        self.__setstate__({"state": state, "param_groups": saved_groups})
        for post_hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            post_hook(self)

    def _load_step(self, saved: dict, where: str) -> int:
        step = saved.get("step")
        if isinstance(step, torch.Tensor):
            if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
                raise ValueError(f"{where} has a 'step' tensor of shape {tuple(step.shape)} and dtype {step.dtype}")
            step = step.item()
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise ValueError(f"{where} needs an integer 'step', got {saved.get('step')!r:.80}")
        if not (math.isfinite(step) and step == int(step) and 0 <= step < MAX_STEP):
            raise ValueError(f"{where} has step={step!r}; expected an integer in [0, {MAX_STEP})")
        return int(step)

    def _load_param_state(self, p: torch.Tensor, saved: dict, param_id: Any) -> dict:
        where = f"the saved state of parameter {param_id!r}"
        if not isinstance(saved, dict):
            raise TypeError(f"{where} must be a dict, got {type(saved).__name__}")
        kept = {"step", SHARD_KEY, *self.moment_names, *(name + "_absmax" for name in self.moment_names)}
        foreign = sorted(str(key) for key in saved if key not in kept)
        if foreign:
            raise ValueError(
                f"{where} has {foreign}, which {type(self).__name__} does not keep: it was saved by another "
                f"optimizer (this one keeps {sorted(kept)})"
            )
        if SHARD_KEY in saved:
            marker = saved[SHARD_KEY]
            expected = _shard_marker(p) if _is_dtensor(p) else None
            if not isinstance(marker, torch.Tensor) or expected is None or not torch.equal(marker.cpu(), expected):
                raise ValueError(
                    f"{where} is the state of the shard {marker!r:.60} (mesh coordinate, local numel), but this rank "
                    f"holds {expected!r}: the state of FSDP2-sharded parameters is per rank; save and load "
                    "optimizer.state_dict() on each rank (torch.save), with the same world size and sharding"
                )
        state: dict[str, Any] = {"step": self._load_step(saved, where)}
        want_8bit = self._is_8bit(p)  # by the whole parameter's size, as _init_state decides
        p = _local(p)
        blocks = -(-p.numel() // QUANTIZATION_BLOCK)
        for name in self.moment_names:
            moment = saved.get(name)
            if not isinstance(moment, torch.Tensor) or moment.numel() != p.numel():
                raise ValueError(f"{where} needs '{name}' with {p.numel()} elements, got {moment!r:.80}")
            if moment.layout != torch.strided or _is_dtensor(moment):
                raise ValueError(f"{where} has '{name}' as a {moment.layout} {type(moment).__name__}; a dense tensor")
            is_8bit = moment.dtype == torch.uint8
            if is_8bit != want_8bit:
                kind = "8-bit" if want_8bit else "32-bit"
                raise ValueError(
                    f"{where} has {'8-bit' if is_8bit else moment.dtype} '{name}', but {type(self).__name__} keeps "
                    f"{kind} state for this parameter ({p.numel()} elements, min_8bit_size={self.min_8bit_size})"
                )
            # A second moment is a running mean of squares: negative or NaN values would make the next steps NaN.
            nonnegative = name == "exp_avg_sq"
            if is_8bit:
                absmax = saved.get(name + "_absmax")
                if not isinstance(absmax, torch.Tensor) or absmax.numel() != blocks or not absmax.is_floating_point():
                    raise ValueError(f"{where} needs a floating-point '{name}_absmax' with {blocks} elements")
                absmax = absmax.to(device=p.device, dtype=torch.float32, copy=True).reshape(blocks).contiguous()
                self._check_statistics(absmax, f"{where}: '{name}_absmax'", nonnegative=True)
                state[name] = self._moment_from(p, moment, torch.uint8)
                state[name + "_absmax"] = absmax
            else:
                if not moment.is_floating_point():
                    raise ValueError(f"{where} has '{name}' of dtype {moment.dtype}; expected float32")
                state[name] = self._moment_from(p, moment, torch.float32)
                self._check_statistics(state[name], f"{where}: '{name}'", nonnegative=nonnegative)
        return state

    @staticmethod
    def _check_statistics(values: torch.Tensor, what: str, nonnegative: bool) -> None:
        # One read of the device at load time, never during a step.
        bad = ~torch.isfinite(values)
        if nonnegative:
            bad |= values < 0
        if bool(bad.any()):
            count = int(bad.sum())
            rule = "finite and >= 0" if nonnegative else "finite"
            raise ValueError(f"{what} has {count} value(s) that are not {rule} (a corrupt or diverged checkpoint)")
