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


class PagedOptimizer(torch.optim.Optimizer):
    """Common machinery of :class:`PagedAdamW`, :class:`PagedAdamW8bit`, :class:`PagedLion8bit` (not used directly).

    Subclasses set ``algorithm`` ("adamw" or "lion"), ``moment_names`` and call ``__init__`` with their defaults.
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
        page_threshold: int,
    ) -> None:
        require_extension(type(self).__name__)
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits!r}")
        for name, value in (("min_8bit_size", min_8bit_size), ("page_threshold", page_threshold)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.optim_bits = optim_bits
        self.min_8bit_size = min_8bit_size
        self.page_threshold = page_threshold
        self._code_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._empty_cache: dict[torch.device, torch.Tensor] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------ param groups

    def _check_hyperparameters(
        self, group: dict, group_index: Optional[int]
    ) -> tuple[float, float, float, float, float]:
        """(lr, beta1, beta2, eps, weight_decay) of ``group``, or a ValueError/TypeError naming the bad one."""
        lr = _check_number("lr", group["lr"], group_index)
        beta1, beta2 = _check_betas(group["betas"], group_index)
        eps = _check_number("eps", group.get("eps", 0.0), group_index)
        weight_decay = _check_number("weight_decay", group["weight_decay"], group_index)
        return lr, beta1, beta2, eps, weight_decay

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group (torch.optim.Optimizer API), checking its parameters and hyperparameters."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group_index = len(self.param_groups) - 1
        try:
            self._check_hyperparameters(group, group_index)
            device = None
            for i, p in enumerate(group["params"]):
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
        return p.device.type == "cuda" and p.numel() >= self.page_threshold

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
        state["step"] = 0
        dtype = torch.uint8 if self._is_8bit(p) else torch.float32
        for name in self.moment_names:
            state[name] = self._new_moment(p, dtype)
            if dtype == torch.uint8:
                state[name + "_absmax"] = torch.zeros(
                    -(-p.numel() // QUANTIZATION_BLOCK), dtype=torch.float32, device=p.device
                )

    def _move_state(self, p: torch.Tensor, state: dict) -> None:
        """Bring ``state`` to ``p``'s device (after ``model.to(...)``), paged where p's moments should be."""
        for name in self.moment_names:
            state[name] = self._moment_from(p, state[name], state[name].dtype)
            if name + "_absmax" in state:
                state[name + "_absmax"] = state[name + "_absmax"].to(p.device)

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
        with_grad = []
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
            if p.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(f"{where} is {p.dtype}; float32, float16 and bfloat16 parameters only")
            if grad.dtype != p.dtype or grad.shape != p.shape:
                raise TypeError(
                    f"the grad of {where} is {grad.dtype}{tuple(grad.shape)}, the parameter {p.dtype}{tuple(p.shape)}"
                )
            if device is None:
                device = p.device
            if p.device != device or grad.device != device:
                raise ValueError(
                    f"param group {group_index} mixes devices ({device}, and {p.device} with its grad on "
                    f"{grad.device} at {where}); one group, one device"
                )
            with_grad.append(p)
        if not with_grad:
            return
        _check_cuda_kernels(device)

        params, grads, steps = [], [], []
        moments: dict[str, list[torch.Tensor]] = {name: [] for name in self.moment_names}
        absmaxes: dict[str, list[torch.Tensor]] = {name: [] for name in self.moment_names}
        copy_back = []
        for p in with_grad:
            state = self.state[p]
            if not state:
                self._init_state(p, state)
            elif state[self.moment_names[0]].device != p.device:
                self._move_state(p, state)
            state["step"] += 1
            if p.is_contiguous():
                params.append(p)
            else:  # the kernel walks memory linearly: update a contiguous copy and write it back
                contiguous = p.contiguous()
                copy_back.append((p, contiguous))
                params.append(contiguous)
            grads.append(p.grad.contiguous())
            steps.append(state["step"])
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
        for p, contiguous in copy_back:
            p.copy_(contiguous)

    # ------------------------------------------------------------------------------------------ state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state from :meth:`state_dict` exactly: moments keep their dtype (uint8 codes, float32 values), go
        to their parameter's device and into unified memory where this optimizer pages them. The loaded tensors are
        copies, so stepping never changes ``state_dict``. (torch's loader would cast them to the parameter dtype.)
        A ``torch.optim.AdamW`` state dict loads into the 32-bit optimizers. Nothing changes if it raises."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise TypeError("state_dict must be a dict with 'state' and 'param_groups', as state_dict() returns")
        state_dict = state_dict.copy()
        for pre_hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}"
            )
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param group {index} has {len(group['params'])} params, the state dict's {len(saved['params'])}"
                )
            self._check_hyperparameters(saved, index)
        id_to_param = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
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

    def _load_param_state(self, p: torch.Tensor, saved: dict, param_id: Any) -> dict:
        where = f"the saved state of parameter {param_id!r}"
        step = saved.get("step")
        if isinstance(step, torch.Tensor):
            step = step.item()
        if step is None or float(step) != int(step) or int(step) < 0:
            raise ValueError(f"{where} has no valid 'step' (got {saved.get('step')!r})")
        state: dict[str, Any] = {"step": int(step)}
        want_8bit = self._is_8bit(p)
        blocks = -(-p.numel() // QUANTIZATION_BLOCK)
        for name in self.moment_names:
            moment = saved.get(name)
            if not isinstance(moment, torch.Tensor) or moment.numel() != p.numel():
                raise ValueError(f"{where} needs '{name}' with {p.numel()} elements, got {moment!r:.80}")
            is_8bit = moment.dtype == torch.uint8
            if is_8bit != want_8bit:
                kind = "8-bit" if want_8bit else "32-bit"
                raise ValueError(
                    f"{where} has {'8-bit' if is_8bit else moment.dtype} '{name}', but {type(self).__name__} keeps "
                    f"{kind} state for this parameter ({p.numel()} elements, min_8bit_size={self.min_8bit_size})"
                )
            if is_8bit:
                absmax = saved.get(name + "_absmax")
                if not isinstance(absmax, torch.Tensor) or absmax.numel() != blocks:
                    raise ValueError(f"{where} needs '{name}_absmax' with {blocks} elements")
                state[name] = self._moment_from(p, moment, torch.uint8)
                state[name + "_absmax"] = absmax.to(device=p.device, dtype=torch.float32, copy=True).reshape(blocks)
            else:
                if not moment.is_floating_point():
                    raise ValueError(f"{where} has '{name}' of dtype {moment.dtype}; expected float32")
                state[name] = self._moment_from(p, moment, torch.float32)
        return state
