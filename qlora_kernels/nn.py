"""``QLoRALinear``: a drop-in linear layer with a frozen NF4 base weight and a trainable LoRA pair.

    y = x · deq(W)ᵀ + scale · (dropout(x) · Aᵀ) · Bᵀ + bias,   scale = lora_alpha / r  (or / √r with rsLoRA)

computed by :func:`qlora_kernels.nf4_lora_linear`. The trainable parameters are exactly ``lora_A`` [r, K] and
``lora_B`` [N, r] (float32 master weights, as peft keeps them); the NF4 base and the bias are buffers, so an optimizer
never sees them while ``.to()``, ``.cuda()`` and ``state_dict()`` still carry them.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .functional import compute_dtype, nf4_lora_linear
from .nf4 import NF4Weight, check_blocksize, in_bnb_cpu_layout

# Buffer name of each NF4Weight field. The names cannot be bitsandbytes' state-dict keys ("weight.absmax" holds a
# dot), so the buffers are non-persistent and _save_to_state_dict/_load_from_state_dict write and read those keys.
_BASE_BUFFERS = {
    "packed": "weight_packed",
    "absmax": "weight_absmax",
    "nested_absmax": "weight_nested_absmax",
    "offset": "weight_offset",
    "quant_map": "weight_quant_map",
    "nested_quant_map": "weight_nested_quant_map",
}


def _check_lora_arguments(r: Any, lora_alpha: Any, lora_dropout: Any, use_rslora: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r must be an int >= 1, got {type(r).__name__} {r!r}")
    if r < 1:
        raise ValueError(f"r must be an int >= 1, got {r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise TypeError(f"lora_alpha must be a positive number, got {type(lora_alpha).__name__} {lora_alpha!r}")
    if not (math.isfinite(lora_alpha) and lora_alpha > 0):
        raise ValueError(f"lora_alpha must be a positive finite number, got {lora_alpha}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real):
        raise TypeError(f"lora_dropout must be a probability in [0, 1), got {type(lora_dropout).__name__}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be a probability in [0, 1), got {lora_dropout}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")


def lora_scale(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """peft's LoRA scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rank-stabilized LoRA."""
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else r)


def bnb_cpu_repacked(linear4bit: nn.Module) -> bool:
    """True when bitsandbytes has rewritten this Linear4bit's storage into its CPU inference layout.

    bitsandbytes does so, in place, at an eval-mode forward whose input needs no grad on a CPU with AVX512-BF16 (for
    example the first decoder layer of a model loaded with ``from_pretrained``, which starts in eval mode): the bytes
    are reordered and absmax is kept in bf16. That is not NF4 as the kernels read it.
    """
    return in_bnb_cpu_layout(getattr(getattr(linear4bit, "weight", None), "quant_state", None))


def restore_bnb_nf4_layout(linear4bit: nn.Module) -> None:
    """Bring a Linear4bit rewritten into bitsandbytes' CPU inference layout back to its NF4 storage, in place, with
    bitsandbytes' own inverse (the one its ``state_dict()`` applies before saving). Since bitsandbytes computes with
    bf16 absmax once rewritten, the restored weight is the one bitsandbytes itself would now save, not bit for bit the
    weight before the rewrite. No-op for a layer in the standard layout."""
    if not bnb_cpu_repacked(linear4bit):
        return
    from bitsandbytes import functional as bnb_functional

    inverse = getattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:  # pragma: no cover - depends on the bitsandbytes version
        raise ValueError(
            "this Linear4bit is in bitsandbytes' CPU inference layout and this bitsandbytes version offers no inverse; "
            "reload the layer before running it in eval mode"
        )
    weight = linear4bit.weight
    weight.data, weight.quant_state = inverse(weight.data, weight.quant_state)


def check_bnb_linear4bit(linear4bit: Any, argument: str = "linear4bit") -> None:
    """Raise a clear TypeError/ValueError unless ``linear4bit`` is a quantized bitsandbytes NF4 ``Linear4bit``."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a test dependency
        bnb = None
    if bnb is None or not isinstance(linear4bit, bnb.nn.Linear4bit):
        hint = " (use QLoRALinear.from_linear for a float nn.Linear)" if isinstance(linear4bit, nn.Linear) else ""
        raise TypeError(f"{argument} must be a bitsandbytes Linear4bit, got {type(linear4bit).__name__}{hint}")
    weight = linear4bit.weight
    quant_type = getattr(weight, "quant_type", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        quant_type = quant_state.quant_type
    if quant_type != "nf4":
        raise ValueError(
            f"{argument} holds a {str(quant_type).upper()} weight, not NF4"
            + (": FP4 is a different 4-bit format (uniform-exponent levels), quantize with quant_type='nf4'"
               if quant_type == "fp4" else "")
        )
    if quant_state is None:
        raise ValueError(
            f"{argument} is not quantized yet: bitsandbytes quantizes a Linear4bit when it is moved to a device "
            "(.to('cpu') or .cuda())"
        )


class QLoRALinear(nn.Module):
    """A linear layer with a frozen NF4 base weight [N, K] (+ frozen bias) and a trainable LoRA pair.

    Build it with :meth:`from_linear` (quantizes a float ``nn.Linear``) or :meth:`from_bnb` (wraps a bitsandbytes
    ``Linear4bit`` without copying its storage), or directly from an :class:`NF4Weight`.

    LoRA is initialised as peft's default: ``lora_A`` Kaiming-uniform (a = √5), ``lora_B`` zeros, so a new layer
    computes exactly the base layer. ``lora_A`` and ``lora_B`` are float32 and are cast to the compute dtype (the
    input's, or the autocast dtype) at each call; gradients reach them in float32.

    The state dict holds ``weight`` and ``weight.absmax``, ``weight.quant_map``, … under bitsandbytes' keys (so a
    ``Linear4bit`` checkpoint's base loads with ``load_state_dict(sd, strict=False)``), ``bias`` when present,
    ``lora_A`` and ``lora_B``.
    """

    def __init__(
        self,
        weight: NF4Weight,
        bias: Optional[torch.Tensor] = None,
        r: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        _check_lora_arguments(r, lora_alpha, lora_dropout, use_rslora)
        out_features, in_features = weight.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (out_features,) or not bias.is_floating_point():
                raise ValueError(
                    f"bias must be a float tensor of shape ({out_features},), got "
                    f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}"
                )
            bias = bias.detach().to(weight.device)
        self.in_features = in_features
        self.out_features = out_features
        self.r = int(r)
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.scale = lora_scale(self.r, self.lora_alpha, use_rslora)
        self._set_base_weight(weight)
        self.register_buffer("bias", bias)
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, dtype=torch.float32, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, dtype=torch.float32, device=weight.device))
        self.reset_lora_parameters()

    # ------------------------------------------------------------------------------------------------ creation

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        blocksize: int = 64,
        double_quant: bool = True,
    ) -> "QLoRALinear":
        """Quantize a float ``nn.Linear``'s weight to NF4 (as bitsandbytes would, byte for byte) and add LoRA.

        The bias is copied and frozen. The new layer lives on the linear layer's device.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if type(linear).__module__.startswith("bitsandbytes"):
            raise TypeError(
                f"linear is a bitsandbytes {type(linear).__name__}, already quantized: use QLoRALinear.from_bnb "
                "for a Linear4bit"
            )
        if not linear.weight.is_floating_point():
            raise TypeError(f"linear.weight must be floating point, got {linear.weight.dtype}")
        _check_lora_arguments(r, lora_alpha, lora_dropout, use_rslora)
        check_blocksize(blocksize)
        weight = NF4Weight.quantize(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(weight, bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)

    @classmethod
    def from_bnb(
        cls,
        linear4bit: nn.Module,
        r: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> "QLoRALinear":
        """Wrap a quantized bitsandbytes NF4 ``Linear4bit``: the new layer's base buffers are views of the bnb
        layer's packed bytes and quantization statistics (no copy), and its bias buffer shares the bnb bias.

        A layer that bitsandbytes has rewritten into its CPU inference layout is first restored in place (see
        :func:`restore_bnb_nf4_layout`)."""
        check_bnb_linear4bit(linear4bit)
        _check_lora_arguments(r, lora_alpha, lora_dropout, use_rslora)
        restore_bnb_nf4_layout(linear4bit)
        weight = NF4Weight.from_bnb(linear4bit)
        bias = None if linear4bit.bias is None else linear4bit.bias.detach()
        return cls(weight, bias, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)

    def reset_lora_parameters(self) -> None:
        """peft's default LoRA initialisation: A Kaiming-uniform with a = √5 (as nn.Linear), B zeros."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    # -------------------------------------------------------------------------------------------- base weight

    def _set_base_weight(self, weight: NF4Weight) -> None:
        for field, buffer_name in _BASE_BUFFERS.items():
            # Non-persistent: the state dict gets these under bitsandbytes' keys from _save_to_state_dict.
            self.register_buffer(buffer_name, getattr(weight, field), persistent=False)
        self._base_dtype = weight.dtype
        self._blocksize = weight.blocksize
        self._base_cache: Optional[tuple[tuple, NF4Weight]] = (self._base_buffers(), weight)

    def _base_buffers(self) -> tuple:
        return tuple(getattr(self, name) for name in _BASE_BUFFERS.values())

    @property
    def weight(self) -> "_StateKeyView":
        """The NF4 base's state-dict entries, reachable by attribute along their keys: ``layer.weight.absmax``,
        ``layer.weight.quant_state.bitsandbytes__nf4``, … (the NF4Weight itself is :attr:`base_weight`).

        torch.distributed.checkpoint's ``get_model_state_dict`` (the state-dict API of FSDP2 and DDP) checks every key
        of ``state_dict()`` by resolving it from the model one dotted part at a time; bitsandbytes' ``Params4bit``
        offers these attributes for the same reason."""
        prefix = "weight"
        return _StateKeyView(self.base_weight.state_dict(prefix), prefix + ".")

    @property
    def base_weight(self) -> NF4Weight:
        """The frozen NF4 base weight, viewing this module's buffers (rebuilt only after they change, e.g. .to())."""
        buffers = self._base_buffers()
        cached = self._base_cache
        if cached is None or len(cached[0]) != len(buffers) or any(a is not b for a, b in zip(cached[0], buffers)):
            packed, absmax, nested_absmax, offset, quant_map, nested_quant_map = buffers
            weight = NF4Weight(
                packed,
                absmax,
                (self.out_features, self.in_features),
                self._base_dtype,
                self._blocksize,
                nested_absmax,
                offset,
                quant_map=quant_map,
                nested_quant_map=nested_quant_map,
            )
            self._base_cache = cached = (buffers, weight)
        return cached[1]

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype)/.half() would cast every floating buffer, which would corrupt the NF4 statistics (float32
        # absmax, codebooks) and packed bytes held in a float quant_storage. They may change device, never dtype.
        before = {name: getattr(self, name) for name in _BASE_BUFFERS.values() if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._base_cache = None  # drop the view of the old tensors so a move frees them
        return self

    # ------------------------------------------------------------------------------------------------- compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x · deq(W)ᵀ + scale · (dropout(x) · lora_Aᵀ) · lora_Bᵀ + bias`` for x [..., in_features], in the
        input's dtype (or the autocast dtype when autocast is on); dropout applies in training mode only."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x must have last dimension in_features={self.in_features}, got shape {tuple(x.shape)}")
        dtype = compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return nf4_lora_linear(
            x.to(dtype),
            self.base_weight,
            self.lora_A.to(dtype),
            self.lora_B.to(dtype),
            self.scale,
            bias=bias,
            dropout=self.lora_dropout if self.training else 0.0,
        )

    @torch.no_grad()
    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight ``deq(W) + scale · lora_B · lora_A`` [N, K], summed in float32 and cast once to ``dtype``
        (default: the base weight's original dtype). Not differentiable."""
        dtype = self._base_dtype if dtype is None else dtype
        merged = self.base_weight.dequantize(torch.float32)
        merged.addmm_(self.lora_B.float(), self.lora_A.float(), alpha=self.scale)
        return merged.to(dtype)

    @torch.no_grad()
    def merge(self) -> NF4Weight:
        """A new NF4Weight holding ``W + scale · B · A``, with this layer's blocksize, double quantization and
        storage dtype; this layer is left unchanged.

        Rounding: the float32 merged weight is quantized to NF4 afresh (new absmax per block), so each element lands
        on the nearest of 16 levels × its block's absmax, an error of up to about 0.15 × absmax (half the widest gap
        between NF4 levels) plus the 8-bit rounding of absmax under double quantization. LoRA updates are usually far
        smaller than that gap, so most of the adapter's effect can round away: keep the adapter separate when the
        exact function matters, use ``merged_weight()`` for a dense merge.
        """
        base = self.base_weight
        quantized = NF4Weight.quantize(
            self.merged_weight(torch.float32),
            blocksize=base.blocksize,
            double_quant=base.double_quant,
            quant_storage=base.quant_storage,
        )
        # Quantized from float32 to round once, but it stands for a weight of the original dtype.
        return NF4Weight(
            quantized.packed,
            quantized.absmax,
            base.shape,
            base.dtype,
            base.blocksize,
            quantized.nested_absmax,
            quantized.offset,
        )

    # --------------------------------------------------------------------------------------------- state dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, value in self.base_weight.state_dict(prefix + "weight").items():
            destination[key] = value if keep_vars else value.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        if key in state_dict:
            try:
                weight = NF4Weight.from_state_dict(state_dict, key)
                if weight.shape != (self.out_features, self.in_features):
                    raise ValueError(
                        f"shape {tuple(weight.shape)} does not match this layer's "
                        f"({self.out_features}, {self.in_features})"
                    )
                self._set_base_weight(weight.to(self.weight_packed.device))
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"While loading the NF4 base weight {key!r}: {exc}")
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # Module's loader reports every "weight.*" key as unexpected: they are ours, read above.
        ours = _base_state_keys(state_dict, key)
        unexpected_keys[:] = [k for k in unexpected_keys if k not in ours]

    # ------------------------------------------------------------------------------------------------- display

    def extra_repr(self) -> str:
        base = self.base_weight
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha:g}, scale={self.scale:g}, lora_dropout={self.lora_dropout:g}"
            f"{', rslora' if self.use_rslora else ''}, base=NF4(blocksize={base.blocksize}"
            f"{', double_quant' if base.double_quant else ''}, dtype={str(base.dtype).removeprefix('torch.')})"
        )


class _StateKeyView:
    """Flat state-dict entries seen as attributes along their dotted keys: with prefix ``"weight."``,
    ``view.quant_state.bitsandbytes__nf4`` is the entry ``"weight.quant_state.bitsandbytes__nf4"``."""

    def __init__(self, entries: Mapping[str, torch.Tensor], prefix: str) -> None:
        self._entries = entries
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # our own fields before they are set (copy, pickle) and Python's protocol names
            raise AttributeError(name)
        key = self._prefix + name
        if any(k.startswith(key + ".") for k in self._entries):
            return _StateKeyView(self._entries, key + ".")
        if key in self._entries:
            return self._entries[key]
        raise AttributeError(f"no state-dict entry {key!r}")

    def __repr__(self) -> str:
        return f"<state-dict entries {sorted(k for k in self._entries if k.startswith(self._prefix))}>"


def _base_state_keys(state_dict: Mapping[str, Any], key: str) -> set[str]:
    return {k for k in state_dict if k == key or k.startswith(key + ".")}
