"""One-call patch of a peft LoRA model over bitsandbytes 4-bit (NF4) layers onto the fused kernels.

    model = get_peft_model(model_loaded_in_4bit, LoraConfig(...))
    qk.patch_peft_model(model)        # in place; returns the number of layers switched

Only the ``forward`` of each LoRA layer instance is replaced (by a small callable object); modules, parameters,
adapter names and peft's own state stay as they were, so ``save_pretrained``, ``PeftModel.from_pretrained``,
``merge_and_unload``, ``disable_adapter()`` and ``set_adapter`` behave as in stock peft, and the adapters saved are
ordinary peft adapters. Each call decides for itself: it runs :func:`qlora_kernels.nf4_lora_linear` when exactly one
adapter of the layer is active, that adapter is plain LoRA (not DoRA or another variant, no LoRA bias), adapters are
enabled and not merged, and no per-sample ``adapter_names`` (or other extra argument) is given; otherwise it runs
peft's own forward.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..functional import nf4_lora_linear
from ..nf4 import NF4Weight, in_bnb_cpu_layout
from ..nn import restore_bnb_nf4_layout

__all__ = ["patch_peft_model", "unpatch_peft_model"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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

    # A deep copy or pickle of the model must not copy the cached view of the base storage.
    def __getstate__(self) -> dict[str, Any]:
        return {"layer": self.layer, "saved_cpu_packing": self.saved_cpu_packing, "_cache": None}

    def peft_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """peft's own forward of this layer."""
        return type(self.layer).forward(self.layer, x, *args, **kwargs)

    def fused_call(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[tuple[str, NF4Weight]]:
        """(adapter, base weight) when this call can take the fused path, else None (peft's forward runs).

        Runs at every call, so it reads each attribute once: the base is a Linear4bit with an NF4 weight (checked
        when patching; peft never swaps base layers), and touching its Params4bit costs microseconds a time.
        """
        layer = self.layer
        # adapter_names (mixed batches), variant arguments such as alora_offsets, or anything meant for the base.
        if args or (kwargs and any(value is not None for value in kwargs.values())):
            return None
        if layer.disable_adapters or layer.merged_adapters:
            return None
        lora_A = layer.lora_A
        active = [name for name in layer.active_adapters if name in lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if name in layer.lora_variant or layer.use_dora.get(name, False):
            return None
        if type(lora_A[name]) is not nn.Linear or type(layer.lora_B[name]) is not nn.Linear:
            return None
        if layer.lora_B[name].bias is not None or type(layer.lora_dropout[name]) not in (nn.Identity, nn.Dropout):
            return None
        weight = self.base_weight()
        if weight is None or x.dtype not in _FLOAT_DTYPES or x.device != weight.device:
            return None
        return name, weight

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
        if cached is None or cached[0] is not weight or cached[1] is not quant_state or cached[2] is not quant_state.absmax:
            self._cache = cached = (weight, quant_state, quant_state.absmax, NF4Weight.from_bnb(weight))
        return cached[3]

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fused = self.fused_call(x, args, kwargs)
        if fused is None:
            return self.peft_forward(x, *args, **kwargs)
        adapter, weight = fused
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


def _patched(module: nn.Module) -> Optional[FusedLoraForward]:
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, FusedLoraForward) else None


def patch_peft_model(model: nn.Module) -> int:
    """Switch every peft LoRA layer of ``model`` whose base layer is a bitsandbytes NF4 ``Linear4bit`` onto the fused
    kernels, in place. Returns the number of such layers now patched (layers patched by an earlier call count too,
    so a second call returns the same number). Warns and returns 0 when there is none.

    Layers created afterwards (a new adapter on new target modules) need another call. Left alone, with a warning:
    FP4 bases (FP4 is not NF4) and layers whose forward something else has already replaced on the instance (e.g.
    accelerate's offload hooks). A base that bitsandbytes rewrote into its CPU inference layout (an eval-mode
    forward on a CPU with AVX512-BF16) is restored with bitsandbytes' own inverse, and kept from being rewritten
    again while patched (so a merge_and_unload'ed base keeps the standard layout too).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a peft model), got {type(model).__name__}")
    lora_classes = _lora_layer_classes()
    patched, skipped = 0, []
    for name, module in model.named_modules():
        if type(module) not in lora_classes or not _is_bnb_linear4bit(getattr(module, "base_layer", None)):
            continue
        if _patched(module) is not None:
            patched += 1
            continue
        base = module.base_layer
        if not _base_is_nf4(base):
            skipped.append(f"{name} (FP4 base: FP4 is not NF4)")
        elif getattr(base.weight, "quant_state", None) is None:
            skipped.append(f"{name} (base not quantized yet)")
        elif "forward" in module.__dict__:
            skipped.append(f"{name} (forward already replaced on the instance)")
        else:
            restore_bnb_nf4_layout(base)
            module.forward = FusedLoraForward(module)
            patched += 1
    if skipped:
        shown = ", ".join(skipped[:5]) + (f", … ({len(skipped)} in all)" if len(skipped) > 5 else "")
        warnings.warn(f"patch_peft_model left {len(skipped)} LoRA layer(s) on peft's forward: {shown}", stacklevel=2)
    if patched == 0 and not skipped:
        warnings.warn(
            "patch_peft_model found no peft LoRA layer over a bitsandbytes Linear4bit (NF4) in "
            f"{type(model).__name__}; nothing was patched",
            stacklevel=2,
        )
    return patched


def unpatch_peft_model(model: nn.Module) -> int:
    """Undo :func:`patch_peft_model`: every patched layer runs peft's own forward again. Returns how many."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a peft model), got {type(model).__name__}")
    count = 0
    for module in model.modules():
        fused = _patched(module)
        if fused is None:
            continue
        del module.forward
        if fused.saved_cpu_packing is not None:
            module.base_layer.support_avx512bf16_for_cpu = fused.saved_cpu_packing
        count += 1
    return count
