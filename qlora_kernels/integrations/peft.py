"""One-call patch of a peft LoRA model over bitsandbytes 4-bit (NF4) layers onto the fused kernels.

    model = get_peft_model(model_loaded_in_4bit, LoraConfig(...))
    model = qk.patch_peft_model(model)   # in place; returns the model, model.qlora_kernels_patched = layers switched

Only the ``forward`` of each LoRA layer instance is replaced (by a small callable object); modules, parameters,
adapter names and peft's own state stay as they were, so ``save_pretrained``, ``PeftModel.from_pretrained``,
``merge_and_unload``, ``disable_adapter()`` and ``set_adapter`` behave as in stock peft, and the adapters saved are
ordinary peft adapters. Each call decides for itself: it runs :func:`qlora_kernels.nf4_lora_linear` when exactly one
adapter of the layer is active, that adapter is plain LoRA (not DoRA or another variant, no LoRA bias), adapters are
enabled and not merged, and no per-sample ``adapter_names`` (or other extra argument) is given; otherwise it runs
peft's own forward. Every patched layer counts the calls of each kind (:func:`lora_call_counts`), and warns once
per layer and reason when a call falls back for a reason the caller did not choose (a DoRA adapter made active
later, an input dtype the kernels do not take, ...).

Under ``torch.compile`` the NF4 view of each base layer is built before tracing (at patch time), because
bitsandbytes' ``Params4bit`` is a tensor subclass whose ``__torch_function__`` dynamo cannot trace through: building
the view inside a compiled region used to end in a RecursionError inside bitsandbytes.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from ..functional import nf4_lora_linear
from ..nf4 import NF4Weight, in_bnb_cpu_layout
from ..nn import restore_bnb_nf4_layout

__all__ = ["patch_peft_model", "unpatch_peft_model", "lora_call_counts", "reset_lora_call_counts", "LoraCallCounts"]

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PATCHED_ATTRIBUTE = "qlora_kernels_patched"

# Why a call ran peft's forward, when the caller asked for that: no warning for these.
ADAPTERS_DISABLED = "adapters disabled"
ADAPTER_MERGED = "adapter merged"
EXTRA_ARGUMENTS = "extra forward arguments (adapter_names, ...)"
NOT_ONE_ACTIVE = "not exactly one active adapter"
CHOSEN_FALLBACKS = frozenset({ADAPTERS_DISABLED, ADAPTER_MERGED, EXTRA_ARGUMENTS, NOT_ONE_ACTIVE})


def _lora_layer_classes() -> tuple[type, ...]:
    """The peft LoRA layer classes whose forward the fused path reproduces: the plain ``lora.Linear`` (what peft
    uses for a Linear4bit when the model was not loaded through transformers' 4-bit loader, e.g. quantized by hand)
    and ``lora.bnb.Linear4bit`` (what it uses for models loaded with ``load_in_4bit``)."""
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as exc:
        raise ImportError(f"patch_peft_model needs the `peft` package, which failed to import: {exc}") from exc
    classes: list[type] = [lora_layer.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb

        if hasattr(lora_bnb, "Linear4bit"):
            classes.append(lora_bnb.Linear4bit)
    except ImportError:  # pragma: no cover - peft without bitsandbytes support
        pass
    return tuple(classes)


def _is_bnb_linear4bit(module: Any) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a test dependency
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def _base_is_nf4(base: nn.Module) -> bool:
    quant_state = getattr(base.weight, "quant_state", None)
    quant_type = quant_state.quant_type if quant_state is not None else getattr(base.weight, "quant_type", None)
    return quant_type == "nf4"


def _adapter_blocker(layer: nn.Module, name: str) -> Optional[str]:
    """Why adapter ``name`` of ``layer`` cannot take the fused path whatever the input, or None when it can."""
    if name in layer.lora_variant or layer.use_dora.get(name, False):
        variant = layer.lora_variant.get(name)
        kind = "DoRA" if layer.use_dora.get(name, False) or "Dora" in type(variant).__name__ else "a LoRA variant"
        return f"adapter {name!r} is {kind}"
    if type(layer.lora_A[name]) is not nn.Linear or type(layer.lora_B[name]) is not nn.Linear:
        return f"adapter {name!r} has LoRA modules other than nn.Linear"
    if layer.lora_B[name].bias is not None:
        return f"adapter {name!r} has a LoRA bias"
    if type(layer.lora_dropout[name]) not in (nn.Identity, nn.Dropout):
        return f"adapter {name!r} uses a dropout module other than nn.Dropout"
    return None


class Route(NamedTuple):
    """How one call runs: on the fused path (``adapter`` and ``weight`` set) or peft's (``fallback`` says why)."""

    adapter: Optional[str] = None
    weight: Optional[NF4Weight] = None
    fallback: Optional[str] = None


@dataclass
class LoraCallCounts:
    """Forward calls of patched LoRA layers since patching (or the last reset), summed over layers. Calls made
    inside a ``torch.compile``'d graph are not counted (a Python counter there would force a recompilation at every
    call); ``fallbacks`` maps each reason peft's forward ran to its number of calls."""

    layers: int = 0
    fused: int = 0
    peft: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)


class FusedLoraForward:
    """The ``forward`` installed on a patched peft LoRA layer: the fused NF4 + LoRA path when the call allows it,
    peft's own forward otherwise."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        base = layer.base_layer
        # bitsandbytes rewrites a Linear4bit's storage into a CPU inference layout at its first eval-mode forward
        # under no_grad (on CPUs with AVX512-BF16), which the kernels cannot read and which cannot be undone without
        # loss. peft's forward still runs the base layer for disabled or merged adapters, so keep bitsandbytes off
        # that path while the layer is patched; unpatch restores the setting.
        self.saved_cpu_packing = getattr(base, "support_avx512bf16_for_cpu", None)
        if self.saved_cpu_packing is not None:
            base.support_avx512bf16_for_cpu = False
        self._cache: Optional[tuple[Any, Any, torch.Tensor, NF4Weight]] = None
        self.reset_counts()
        self.base_weight()  # built now, eagerly: see the module's docstring on torch.compile

    def reset_counts(self) -> None:
        self.fused_calls = 0
        self.peft_calls: dict[str, int] = {}
        self.warned: set[str] = set()

    # A deep copy or pickle of the model must not copy the cached view of the base storage.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def peft_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """peft's own forward of this layer."""
        return type(self.layer).forward(self.layer, x, *args, **kwargs)

    def route(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Route:
        """Where this call runs: the fused path when every condition of the module's docstring holds.

        Runs at every call, so it reads each attribute once: the base is a Linear4bit with an NF4 weight (checked
        when patching; peft never swaps base layers), and touching its Params4bit costs microseconds a time.
        """
        layer = self.layer
        # adapter_names (mixed batches), variant arguments such as alora_offsets, or anything meant for the base.
        if args or (kwargs and any(value is not None for value in kwargs.values())):
            return Route(fallback=EXTRA_ARGUMENTS)
        if layer.disable_adapters:
            return Route(fallback=ADAPTERS_DISABLED)
        if layer.merged_adapters:
            return Route(fallback=ADAPTER_MERGED)
        lora_A = layer.lora_A
        active = [name for name in layer.active_adapters if name in lora_A]
        if len(active) != 1:
            return Route(fallback=NOT_ONE_ACTIVE)
        name = active[0]
        blocker = _adapter_blocker(layer, name)
        if blocker is not None:
            return Route(fallback=blocker)
        if x.dtype not in _FLOAT_DTYPES:
            return Route(fallback=f"input dtype {x.dtype} (the kernels take float16, bfloat16, float32)")
        weight = self.base_weight()
        if weight is None:
            return Route(fallback="the base layer's storage is not NF4 the kernels can read")
        if x.device != weight.device:
            return Route(fallback=f"input on {x.device}, base weight on {weight.device}")
        return Route(adapter=name, weight=weight)

    def base_weight(self) -> Optional[NF4Weight]:
        """A zero-copy NF4Weight view of the base layer's storage, or None when it holds none it can read.

        The view is rebuilt when bitsandbytes replaces the storage: a move, peft's merge/unmerge (a new Params4bit),
        a switch to or from its CPU inference layout: each gives a new quant_state or a new absmax tensor.
        """
        weight = self.layer.base_layer.weight
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None or in_bnb_cpu_layout(quant_state):
            return None
        cached = self._cache
        absmax = quant_state.absmax
        if cached is None or cached[0] is not weight or cached[1] is not quant_state or cached[2] is not absmax:
            self._cache = cached = (weight, quant_state, absmax, _nf4_view_outside_compile(weight))
        return cached[3]

    def count(self, route: Route) -> None:
        """Count the call; warn once per reason for a fallback the caller did not choose. Eager calls only."""
        if route.fallback is None:
            self.fused_calls += 1
            return
        self.peft_calls[route.fallback] = self.peft_calls.get(route.fallback, 0) + 1
        if route.fallback not in CHOSEN_FALLBACKS and route.fallback not in self.warned:
            self.warned.add(route.fallback)
            warnings.warn(
                f"a LoRA layer patched by qlora_kernels runs peft's forward, not the fused kernels: {route.fallback}",
                stacklevel=3,
            )

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        route = self.route(x, args, kwargs)
        if not torch.compiler.is_compiling():
            self.count(route)
        if route.fallback is not None:
            return self.peft_forward(x, *args, **kwargs)
        adapter, weight = route.adapter, route.weight
        layer, base = self.layer, self.layer.base_layer
        # The dtype bitsandbytes' Linear4bit would compute in: its compute_dtype, chosen from the first input when
        # unset; under autocast, the autocast dtype (which its matmul ends up in too). The result is cast back to the
        # input's dtype, as Linear4bit and peft do.
        if not getattr(base, "compute_type_is_set", True):
            base.set_compute_type(x)
            base.compute_type_is_set = True
        dtype = base.compute_dtype or x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        dropout = layer.lora_dropout[adapter]
        p = dropout.p if dropout.training and type(dropout) is nn.Dropout else 0.0
        bias = base.bias
        y = nf4_lora_linear(
            x.to(dtype),
            weight,
            layer.lora_A[adapter].weight.to(dtype),
            layer.lora_B[adapter].weight.to(dtype),
            float(layer.scaling[adapter]),
            bias=None if bias is None else bias.to(dtype),
            dropout=p,
        )
        return y.to(x.dtype)


@torch.compiler.disable
def _nf4_view_outside_compile(weight: Any) -> NF4Weight:
    """``NF4Weight.from_bnb(weight)``, never traced by dynamo: its checks read tensor values, and dynamo cannot trace
    bitsandbytes' Params4bit. Reached inside a compiled region only when bitsandbytes replaced the base storage after
    patching (a move, or merge then unmerge); under ``fullgraph=True`` that is an error: call patch_peft_model (or
    the model, eagerly) again after such a change, before compiling."""
    return NF4Weight.from_bnb(weight)


def _patched(module: nn.Module) -> Optional[FusedLoraForward]:
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, FusedLoraForward) else None


def _why_not_patchable(name: str, module: nn.Module) -> Optional[str]:
    """Why LoRA layer ``module`` (over a Linear4bit) is left on peft's forward, or None when it can be patched."""
    base = module.base_layer
    if not _base_is_nf4(base):
        return f"{name} (FP4 base: FP4 is not NF4)"
    if getattr(base.weight, "quant_state", None) is None:
        return f"{name} (base not quantized yet)"
    if "forward" in module.__dict__:
        return f"{name} (forward already replaced on the instance)"
    active = [adapter for adapter in module.active_adapters if adapter in module.lora_A]
    if len(active) != 1:
        return f"{name} ({len(active)} active adapters: the fused path takes exactly one)"
    blocker = _adapter_blocker(module, active[0])
    if blocker is not None:
        return f"{name} ({blocker}, which runs peft's forward)"
    return None


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a peft model), got {type(model).__name__}")


def patch_peft_model(model: nn.Module, *, strict: bool = False) -> nn.Module:
    """Switch every peft LoRA layer of ``model`` whose base layer is a bitsandbytes NF4 ``Linear4bit`` onto the fused
    kernels, in place, and return ``model``. ``model.qlora_kernels_patched`` is then the number of such layers now
    patched (layers patched by an earlier call count too, so patching twice changes nothing); the same number goes
    to the ``qlora_kernels.integrations.peft`` logger at INFO level.

    Left on peft's forward, with a warning (or a ValueError when ``strict``): FP4 bases (FP4 is not NF4), layers
    whose active adapter cannot take the fused path (DoRA or another LoRA variant, a LoRA bias, several active
    adapters) and layers whose forward something else has already replaced on the instance (e.g. accelerate's
    offload hooks). A model with no LoRA layer over a Linear4bit at all (not yet wrapped by peft, for example: a
    trainer given ``peft_config`` adds the adapters itself; see
    :class:`qlora_kernels.integrations.trainer.QLoRAKernelsCallback`) warns too, or raises when ``strict``.

    Layers created afterwards (a new adapter on new target modules) need another call, and so does a model about to
    be compiled with ``fullgraph=True`` after bitsandbytes replaced a base layer's storage (a move, merge then
    unmerge): the call rebuilds the kernels' view of that storage outside the compiled region. A base that bitsandbytes
    rewrote into its CPU inference layout (an eval-mode forward on a CPU with AVX512-BF16) is restored with
    bitsandbytes' own inverse, and kept from being rewritten again while patched (so a merge_and_unload'ed base keeps
    the standard layout too).
    """
    _check_model(model)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    lora_classes = _lora_layer_classes()
    patched, skipped = 0, []
    for name, module in model.named_modules():
        if type(module) not in lora_classes or not _is_bnb_linear4bit(getattr(module, "base_layer", None)):
            continue
        fused = _patched(module)
        if fused is not None:
            fused.base_weight()  # refresh the NF4 view now, outside any compiled region, if the storage changed
            patched += 1
            continue
        reason = _why_not_patchable(name, module)
        if reason is not None:
            skipped.append(reason)
            continue
        restore_bnb_nf4_layout(module.base_layer)
        module.forward = FusedLoraForward(module)
        patched += 1
    setattr(model, PATCHED_ATTRIBUTE, patched)
    logger.info(
        "patch_peft_model: %d LoRA layer(s) of %s on the fused NF4 + LoRA path, %d left on peft's forward",
        patched, type(model).__name__, len(skipped),
    )
    problem = None
    if skipped:
        shown = ", ".join(skipped[:5]) + (f", … ({len(skipped)} in all)" if len(skipped) > 5 else "")
        problem = f"patch_peft_model left {len(skipped)} LoRA layer(s) on peft's forward: {shown}"
    elif patched == 0:
        problem = (
            "patch_peft_model found no peft LoRA layer over a bitsandbytes Linear4bit (NF4) in "
            f"{type(model).__name__}; nothing was patched (patch after get_peft_model; when a trainer adds the "
            "adapters itself, e.g. SFTTrainer(peft_config=...), patch trainer.model or pass QLoRAKernelsCallback)"
        )
    if problem is not None:
        if strict:
            raise ValueError(f"{problem} (strict=True)")
        warnings.warn(problem, stacklevel=2)
    return model


def unpatch_peft_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_peft_model`: every patched layer runs peft's own forward again. Returns ``model``, with
    ``model.qlora_kernels_patched`` set to 0."""
    _check_model(model)
    count = 0
    for module in model.modules():
        fused = _patched(module)
        if fused is None:
            continue
        del module.forward
        if fused.saved_cpu_packing is not None:
            module.base_layer.support_avx512bf16_for_cpu = fused.saved_cpu_packing
        count += 1
    setattr(model, PATCHED_ATTRIBUTE, 0)
    logger.info("unpatch_peft_model: %d LoRA layer(s) of %s back on peft's forward", count, type(model).__name__)
    return model


def lora_call_counts(model: nn.Module) -> LoraCallCounts:
    """The calls of ``model``'s patched LoRA layers since patching or :func:`reset_lora_call_counts`: how many took the
    fused path and how many ran peft's forward, and why (see :class:`LoraCallCounts`)."""
    _check_model(model)
    counts = LoraCallCounts()
    for module in model.modules():
        fused = _patched(module)
        if fused is None:
            continue
        counts.layers += 1
        counts.fused += fused.fused_calls
        for reason, calls in fused.peft_calls.items():
            counts.peft += calls
            counts.fallbacks[reason] = counts.fallbacks.get(reason, 0) + calls
    return counts


def reset_lora_call_counts(model: nn.Module) -> None:
    """Zero the call counts of every patched layer of ``model`` (and warn again about fallbacks)."""
    _check_model(model)
    for module in model.modules():
        fused = _patched(module)
        if fused is not None:
            fused.reset_counts()
