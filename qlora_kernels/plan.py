"""Memory planner: how much GPU memory full fine-tuning, LoRA and QLoRA need for a given model and batch, and which
cards that fits.

    import qlora_kernels as qk
    p = qk.plan(model="llama-2-7b", method="qlora", r=16, targets="all-linear", batch=4, seq=2048,
                checkpointing=True, optimizer="paged_adamw_8bit", world_size=1)
    p.total_bytes, p.breakdown, p.verdicts, p.to_json()

    python -m qlora_kernels.plan llama-2-7b --method qlora --batch 4 --seq 2048 --checkpointing --json plan.json

The model is counted tensor by tensor, for a Llama-style decoder (RMSNorm, rotary attention with grouped KV heads,
SwiGLU MLP; Mistral and Qwen2 share the shapes) trained with Hugging Face transformers' SDPA attention:

- weights: every parameter in the compute dtype; under QLoRA the decoder's linear layers are NF4 instead (half a byte
  per weight) plus their quantization constants (absmax per 64 weights: float32, or with double quantization one
  byte plus a float32 per 256 blocks);
- LoRA weights, gradients and optimizer state: per trainable tensor, with the optimizer's own rules (8-bit state for
  tensors of at least 4096 elements, float32 below, as bitsandbytes and qk.optim do);
- activations: what each op of the decoder saves for backward (listed in :func:`_layer_activations` and
  :func:`_head_activations`, read off the autograd graph of transformers' Llama), and what the loss and the backward
  pass hold at the moment memory peaks.

``total_bytes`` is the predicted peak of the bytes torch allocates (``torch.cuda.max_memory_allocated``) during a
training step once the optimizer state exists; the verdicts add ``overhead_bytes`` for the CUDA context and the
caching allocator's slack. ``batch`` is the micro-batch per GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
import sys
from pathlib import Path
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

# qlora_kernels/__init__.py imports this module (for qk.plan), so `python -m qlora_kernels.plan` finds it already
# loaded and runpy warns that it runs it a second time as __main__; that is harmless here (main() uses only the
# __main__ copy), so that one warning is silenced.
warnings.filterwarnings("ignore", message="'qlora_kernels.plan' found in sys.modules", category=RuntimeWarning)

__all__ = ["plan", "Plan", "ModelShape", "PRESETS", "METHODS", "OPTIMIZERS", "GPU_SIZES", "model_shape"]

GiB = 1024**3
MiB = 1024**2

# ------------------------------------------------------------------------------------------------------ models


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that memory depends on."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for field in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"model {field} must be a positive int, got {value!r}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.heads % self.kv_heads:
            raise ValueError(f"model heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """The linear layers of one decoder layer: name -> (out_features, in_features)."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (self.q_dim, h), "k_proj": (self.kv_dim, h), "v_proj": (self.kv_dim, h),
            "o_proj": (h, self.q_dim),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }

    def parameter_count(self) -> int:
        linear = sum(n * k for n, k in self.linears().values())
        embeddings = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.layers * (linear + 2 * self.hidden) + self.hidden + embeddings


def _preset(name, hidden, intermediate, layers, heads, kv_heads, vocab, tie=False) -> ModelShape:
    return ModelShape(name, hidden, intermediate, layers, heads, kv_heads, vocab, tie_embeddings=tie)


PRESETS: dict[str, ModelShape] = {
    p.name: p
    for p in (
        _preset("llama-7b", 4096, 11008, 32, 32, 32, 32000),
        _preset("llama-13b", 5120, 13824, 40, 40, 40, 32000),
        _preset("llama-33b", 6656, 17920, 60, 52, 52, 32000),
        _preset("llama-65b", 8192, 22016, 80, 64, 64, 32000),  # the QLoRA paper's 65B
        _preset("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
        _preset("llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
        _preset("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
        _preset("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),
        _preset("llama-3-70b", 8192, 28672, 80, 64, 8, 128256),
        _preset("mistral-7b", 4096, 14336, 32, 32, 8, 32000),
        _preset("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064),
        _preset("qwen2.5-14b", 5120, 13824, 48, 40, 8, 152064),
        _preset("qwen2.5-32b", 5120, 27648, 64, 40, 8, 152064),
        _preset("qwen2.5-72b", 8192, 29568, 80, 64, 8, 152064),
    )
}


def _shape_from_config(config: Mapping[str, Any], name: str) -> ModelShape:
    try:
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        return ModelShape(
            name=config.get("_name_or_path") or name,
            hidden=hidden,
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            vocab=config["vocab_size"],
            head_dim=config.get("head_dim") or hidden // heads,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except KeyError as missing:
        raise ValueError(f"model config lacks {missing}: the planner needs a Llama-style decoder's config") from None


def model_shape(model: Any) -> ModelShape:
    """A :class:`ModelShape` from a preset name, a config.json path (or a folder holding one), a config dict or a
    transformers ``PretrainedConfig``."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str) and model.lower() in PRESETS:
        return PRESETS[model.lower()]
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"model must be a preset ({', '.join(sorted(PRESETS))}) or a config.json path, got {str(model)!r}"
            )
        return _shape_from_config(json.loads(path.read_text()), path.parent.name)
    if isinstance(model, Mapping):
        return _shape_from_config(model, "config")
    if hasattr(model, "to_dict") and hasattr(model, "hidden_size"):  # transformers.PretrainedConfig
        return _shape_from_config(model.to_dict(), getattr(model, "model_type", "config"))
    raise TypeError(
        "model must be a preset name, a config.json path, a config dict or a PretrainedConfig, "
        f"got {type(model).__name__}"
    )


# --------------------------------------------------------------------------------------------------- options

METHODS = ("full", "lora", "qlora", "qlora_no_dq")

# name -> (moments, 8-bit state, paged). State dtype of 32-bit optimizers: float32 for qk.optim / bitsandbytes,
# the parameter's dtype for torch's (see _optimizer_state).
OPTIMIZERS: dict[str, tuple[int, bool, bool]] = {
    "adamw": (2, False, False),             # torch.optim.AdamW: moments in the parameter's dtype
    "adamw_8bit": (2, True, False),         # bnb.optim.AdamW8bit
    "paged_adamw": (2, False, True),        # qk.optim.PagedAdamW / bnb PagedAdamW (32-bit)
    "paged_adamw_8bit": (2, True, True),    # qk.optim.PagedAdamW8bit / bnb PagedAdamW8bit
    "lion": (1, False, False),
    "lion_8bit": (1, True, False),
    "paged_lion_8bit": (1, True, True),
    "sgd": (0, False, False),               # no momentum
    "sgd_momentum": (1, False, False),
}
_OPTIMIZER_ALIASES = {"adamw_torch": "adamw", "adamw_fp32": "adamw", "adamw_32bit": "adamw",
                      "paged_adamw_32bit": "paged_adamw", "adamw_bnb_8bit": "adamw_8bit"}

TARGET_SETS = {
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qv": ("q_proj", "v_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}

# Memory of each card size as the driver reports it (nvidia-smi's total): RTX 4090, RTX A6000, H100 80GB, H200.
GPU_SIZES: dict[str, int] = {"24GB": 24564 * MiB, "48GB": 49140 * MiB, "80GB": 81559 * MiB, "141GB": 143771 * MiB}

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}

NF4_BLOCKSIZE = 64
DQ_BLOCKSIZE = 256       # absmax values per nested block under double quantization
OPTIM_BLOCKSIZE = 256    # 8-bit optimizer state: one float32 absmax per 256 elements
MIN_8BIT_SIZE = 4096     # smaller tensors keep float32 state in 8-bit optimizers


def _dtype_bytes(name: str, argument: str) -> int:
    key = str(name).replace("torch.", "").lower()
    if key not in _DTYPE_BYTES:
        raise ValueError(f"{argument} must be one of float32, bfloat16, float16, got {name!r}")
    return _DTYPE_BYTES[key]


def _positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{argument} must be >= 1, got {value}")
    return int(value)


def _resolve_targets(targets: Union[str, Sequence[str]]) -> tuple[str, ...]:
    names = TARGET_SETS["all-linear"]
    if isinstance(targets, str):
        if targets in TARGET_SETS:
            return TARGET_SETS[targets]
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"targets must be one of {sorted(TARGET_SETS)} or a list of module names, got {targets!r}")
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ValueError(f"targets holds unknown module names {unknown}; known: {list(names)}")
    return tuple(n for n in names if n in targets)


# ---------------------------------------------------------------------------------------------------- result


@dataclasses.dataclass
class Plan:
    """A memory plan: the predicted peak and what it is made of.

    ``breakdown`` maps each part to its bytes at the predicted peak and sums to ``total_bytes`` (so parts freed
    before the peak, such as the gradients when it comes at the start of backward, show as 0); ``sizes`` has the
    whole gradients and saved activations whichever phase peaks, ``phases`` the total at each candidate peak.
    ``paged_bytes`` is the optimizer state a paged optimizer lets the driver move to host memory. ``verdicts`` maps
    each card size of :data:`GPU_SIZES` to "fits", "fits with paging" (only once the paged state is moved out) or
    "does not fit", counting ``overhead_bytes`` on top of ``total_bytes``.
    """

    inputs: dict
    total_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    phases: dict[str, int]
    sizes: dict[str, int]
    paged_bytes: int
    overhead_bytes: int
    verdicts: dict[str, str]

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GiB

    def fits(self, gpu_bytes: int) -> bool:
        """True when the plan, with ``overhead_bytes``, fits in ``gpu_bytes`` without paging."""
        return self.total_bytes + self.overhead_bytes <= gpu_bytes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"total_gib": round(self.total_gib, 3)}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """The breakdown as a text table, largest parts first, then the total and the verdicts."""
        total_label = f"total (peak at {self.peak_phase})"
        width = max(len(k) for k in [*self.breakdown, total_label]) + 2
        lines = [f"{'part':<{width}}{'GiB':>10}"]
        for name, nbytes in sorted(self.breakdown.items(), key=lambda kv: -kv[1]):
            if nbytes == 0:
                continue
            lines.append(f"{name:<{width}}{nbytes / GiB:>10.3f}")
        lines.append(f"{total_label:<{width}}{self.total_gib:>10.3f}")
        if self.paged_bytes:
            lines.append(f"{'  of which pageable':<{width}}{self.paged_bytes / GiB:>10.3f}")
        lines.append("fits? " + ", ".join(f"{gpu}: {v}" for gpu, v in self.verdicts.items()))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class _Setup:
    shape: ModelShape
    method: str
    lora_impl: str        # "qlora_kernels" (the fused op) or "peft" (stock peft LoRA layers)
    targets: tuple[str, ...]
    r: int
    tokens: int           # batch * seq
    batch: int
    seq: int
    b: int                # bytes per element of the compute dtype
    lora_b: int           # bytes per element of the LoRA weights
    checkpointing: bool


def _linear_input_saved(s: _Setup, names: Sequence[str], k: int) -> int:
    """Bytes that the linear layers ``names`` (q/k/v, gate/up, o or down), which all read one input [tokens, k], save
    of that input for backward: one storage when they save the input itself, one copy per adapter when peft casts
    it to the LoRA dtype first, nothing when all of them are frozen."""
    if s.method == "full":
        return s.tokens * k * s.b  # each weight gradient needs the input; one storage for all of them
    targeted = [n for n in names if n in s.targets]
    if not targeted:
        return 0  # a frozen linear saves only its weight
    if s.lora_impl == "qlora_kernels":
        return s.tokens * k * s.b  # the fused op saves x itself (for dA and dropout's regeneration)
    if s.lora_b == s.b:
        return s.tokens * k * s.b  # peft's lora_A saves the input as it is
    return len(targeted) * s.tokens * k * s.lora_b  # peft casts x to the LoRA dtype once per adapter, and saves that


def _lora_per_linear(s: _Setup, n: int, k: int) -> int:
    """Saved per targeted linear besides its input: S = x·Aᵀ [tokens, r], and the fused op's casts of A and B."""
    if s.lora_impl == "qlora_kernels":
        casts = s.r * (k + n) * s.b if s.lora_b != s.b else 0
        return s.tokens * s.r * 4 + casts  # S is float32 in the fused op
    return s.tokens * s.r * s.lora_b


def _norm_saved(s: _Setup, input_needs_grad: bool) -> int:
    """RMSNorm as transformers writes it (x.to(float32), pow, mean, rsqrt, mul, .to(dtype), weight *): the float32
    input and the rsqrt when the input needs a gradient, the normalised values when the weight trains. Its output is
    counted by the layers that read it."""
    saved = 0
    if input_needs_grad:
        saved += s.tokens * s.shape.hidden * 4 + s.tokens * 4
    if s.method == "full":
        saved += s.tokens * s.shape.hidden * s.b
    return saved


def _layer_activations(s: _Setup, first: bool) -> int:
    """Bytes one decoder layer saves for backward (no checkpointing)."""
    m, t, b = s.shape, s.tokens, s.b
    lin = m.linears()
    # Under LoRA the first layer's input (the frozen embedding's output) needs no gradient.
    x_grad = s.method == "full" or not first
    saved = _norm_saved(s, x_grad)
    saved += _linear_input_saved(s, ("q_proj", "k_proj", "v_proj"), m.hidden)
    # Rotary q and k, v, the attention output (SDPA saves all four) and its log-sum-exp (float32 per head and token).
    saved += t * (2 * m.q_dim + 2 * m.kv_dim) * b + s.batch * m.heads * s.seq * 4
    if s.method != "full" and s.lora_impl == "peft" and s.lora_b != s.b and "o_proj" in s.targets:
        saved += t * m.q_dim * s.lora_b  # peft's cast of the attention output; otherwise that output is shared
    saved += _norm_saved(s, True)
    saved += _linear_input_saved(s, ("gate_proj", "up_proj"), m.hidden)
    saved += 3 * t * m.intermediate * b  # gate output (silu), silu output and up output (their product)
    saved += _linear_input_saved(s, ("down_proj",), m.intermediate)
    if s.method != "full":
        saved += sum(_lora_per_linear(s, *lin[name]) for name in s.targets)
    return saved


def _head_activations(s: _Setup) -> tuple[int, int]:
    """(saved for backward, held by the caller) of the final norm, lm_head and loss."""
    m, t, b = s.shape, s.tokens, s.b
    saved = _norm_saved(s, True) + (t * m.hidden * b if s.method == "full" else 0)
    saved += t * m.vocab * 4 + t * 8  # log_softmax's float32 output and the int64 targets
    saved += 2 * s.seq * m.head_dim * b  # rotary cos and sin, shared by all layers
    logits = t * m.vocab * b  # the model's output, alive for the whole step
    return saved, logits


def _loss_backward_transient(s: _Setup) -> int:
    """Held at the first step of backward on top of the saved tensors: the float32 gradient of the log-probabilities
    and, made from it, the float32 gradient of the logits (the cast of that to the compute dtype comes after the
    first is freed)."""
    return s.tokens * s.shape.vocab * 4 * 2


def _layer_backward_transient(s: _Setup) -> int:
    """Gradients alive at once while one decoder layer runs backward: of the MLP's [tokens, intermediate] activations
    two at a time (an activation gradient and its product with the next), beside the [tokens, hidden]
    gradient of the residual stream."""
    m, t, b = s.shape, s.tokens, s.b
    return t * (2 * m.intermediate + m.hidden) * b


def _trainable_tensors(s: _Setup) -> list[tuple[int, int]]:
    """(numel, bytes per element) of every trainable tensor."""
    m = s.shape
    if s.method == "full":
        per_layer = [n * k for n, k in m.linears().values()] + [m.hidden, m.hidden]
        embeddings = [m.vocab * m.hidden] * (1 if m.tie_embeddings else 2)
        return [(numel, s.b) for numel in per_layer * m.layers + embeddings + [m.hidden]]
    lin = m.linears()
    per_layer = []
    for name in s.targets:
        n, k = lin[name]
        per_layer += [s.r * k, n * s.r]
    return [(numel, s.lora_b) for numel in per_layer * m.layers]


def _optimizer_state(optimizer: str, tensors: list[tuple[int, int]]) -> int:
    moments, eight_bit, paged = OPTIMIZERS[optimizer]
    total = 0
    for numel, param_bytes in tensors:
        if eight_bit and numel >= MIN_8BIT_SIZE:
            total += moments * (numel + 4 * math.ceil(numel / OPTIM_BLOCKSIZE))
        elif eight_bit or paged:
            total += moments * numel * 4  # bitsandbytes / qk.optim keep 32-bit state in float32
        else:
            total += moments * numel * param_bytes  # torch's optimizers: zeros_like(param)
    return total


def _optimizer_step_transient(optimizer: str, tensors: list[tuple[int, int]]) -> int:
    """Temporaries of the optimizer step. torch's AdamW and Lion with foreach (their default on GPUs) compute the
    update of every tensor at once: one temporary the size of all trainable weights (AdamW: the square root of the
    second moments, divided and shifted in place). The fused 8-bit and paged steps of qk.optim and bitsandbytes
    allocate none; plain SGD updates in place."""
    if optimizer in ("adamw", "lion", "sgd_momentum"):
        return sum(n * b for n, b in tensors)
    return 0


def _base_weights(s: _Setup) -> tuple[int, int]:
    """(weights, quantization constants) of the frozen or trained base model."""
    m = s.shape
    linear_numels = [n * k for n, k in m.linears().values()] * m.layers
    others = (m.vocab * m.hidden * (1 if m.tie_embeddings else 2) + (2 * m.layers + 1) * m.hidden) * s.b
    if s.method in ("full", "lora"):
        return sum(linear_numels) * s.b + others, 0
    packed = sum((numel + 1) // 2 for numel in linear_numels)
    constants = 16 * 4  # the NF4 code map, one tensor shared by all layers
    for numel in linear_numels:
        blocks = math.ceil(numel / NF4_BLOCKSIZE)
        if s.method == "qlora":  # uint8 absmax codes, a float32 nested absmax per 256 blocks, the offset
            constants += blocks + 4 * math.ceil(blocks / DQ_BLOCKSIZE) + 4
        else:
            constants += 4 * blocks
    if s.method == "qlora":
        constants += 256 * 4  # the 8-bit dynamic map of the absmax codes, shared
    return packed + others, constants


def plan(
    model: Any,
    method: str = "qlora",
    r: int = 16,
    targets: Union[str, Sequence[str]] = "all-linear",
    batch: int = 1,
    seq: int = 2048,
    checkpointing: bool = True,
    optimizer: str = "paged_adamw_8bit",
    world_size: int = 1,
    sharding: str = "none",
    dtype: str = "bfloat16",
    lora_dtype: str = "float32",
    lora_impl: Optional[str] = None,
    overhead_bytes: int = GiB,
) -> Plan:
    """Plan the peak GPU memory of one training step.

    model: a preset name (see :data:`PRESETS`), a config.json path or its folder, a config dict or a transformers
    PretrainedConfig. method: "full" (every weight trained in ``dtype``), "lora" (frozen ``dtype`` base + LoRA),
    "qlora" (NF4 base with double quantization + LoRA) or "qlora_no_dq". r: LoRA rank. targets: "all-linear",
    "attention", "qv", "mlp", or a list of module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    down_proj). batch: sequences per GPU per step; seq: tokens per sequence. checkpointing: activation checkpointing
    per decoder layer (non-reentrant). optimizer: one of :data:`OPTIMIZERS` (also "adamw_torch", "adamw_fp32",
    "paged_adamw_32bit"). world_size and sharding ("none" or "fsdp"): FSDP full-shard divides trainable weights,
    their gradients and optimizer state (and a full fine-tune's weights) by world_size; the 4-bit base stays whole
    on every GPU, as qk.distributed does. dtype: compute dtype; lora_dtype: LoRA weights' dtype (float32 as peft
    and QLoRALinear keep them). lora_impl: "qlora_kernels" (the fused op; QLoRA's default) or "peft" (stock peft
    layers; LoRA's default). overhead_bytes: added for the verdicts only (CUDA context, allocator slack).

    Assumed: transformers' Llama with SDPA (or flash) attention, not eager attention's [seq, seq] scores; peft's LoRA
    dropout 0 (with dropout peft saves a dropped copy of x per adapter; the fused op regenerates its mask); no AMP
    autocast weight cache; the loss over every position (transformers' causal-LM loss upcasts the logits to float32).

    Raises ValueError/TypeError naming the argument for anything it cannot plan.
    """
    shape = model_shape(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    optimizer = _OPTIMIZER_ALIASES.get(optimizer, optimizer)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    if not isinstance(checkpointing, bool):
        raise TypeError(f"checkpointing must be a bool, got {type(checkpointing).__name__}")
    if sharding not in ("none", "fsdp"):
        raise ValueError(f"sharding must be 'none' or 'fsdp', got {sharding!r}")
    if lora_impl is None:
        lora_impl = "qlora_kernels" if method.startswith("qlora") else "peft"
    if lora_impl not in ("qlora_kernels", "peft"):
        raise ValueError(f"lora_impl must be 'qlora_kernels' or 'peft', got {lora_impl!r}")
    if lora_impl == "qlora_kernels" and method in ("full", "lora"):
        raise ValueError(
            f"lora_impl='qlora_kernels' needs an NF4 base: method 'qlora' or 'qlora_no_dq', not {method!r}"
        )
    if isinstance(overhead_bytes, bool) or not isinstance(overhead_bytes, numbers.Integral) or overhead_bytes < 0:
        raise ValueError(f"overhead_bytes must be an int >= 0, got {overhead_bytes!r}")
    batch, seq, world_size = (_positive_int(batch, "batch"), _positive_int(seq, "seq"),
                              _positive_int(world_size, "world_size"))
    r = _positive_int(r, "r")
    s = _Setup(shape, method, lora_impl, _resolve_targets(targets), r, batch * seq, batch, seq,
               _dtype_bytes(dtype, "dtype"), _dtype_bytes(lora_dtype, "lora_dtype"), checkpointing)
    shards = world_size if sharding == "fsdp" else 1

    weights, constants = _base_weights(s)
    if method == "full":
        weights //= shards
    trainable = _trainable_tensors(s)
    shard = [(math.ceil(n / shards), b) for n, b in trainable]
    lora_weights = 0 if method == "full" else sum(n * b for n, b in shard)
    gradients = sum(n * b for n, b in shard)
    state = _optimizer_state(optimizer, shard)
    paged = state if OPTIMIZERS[optimizer][2] else 0

    head_saved, logits = _head_activations(s)
    if checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        layers_saved = shape.layers * s.tokens * shape.hidden * s.b
        recomputed = _layer_activations(s, first=False)
    else:
        layers_saved = sum(_layer_activations(s, first=(i == 0)) for i in range(shape.layers))
        recomputed = 0
    gathered = 0
    if method == "full" and shards > 1:  # FSDP all-gathers one layer's weights and prefetches the next
        gathered = 2 * sum(n * k for n, k in shape.linears().values()) * s.b

    # Gradients by where backward produces them: the head's (lm_head, final norm) first, the embedding's last.
    if method == "full":
        embedding_grads = shape.vocab * shape.hidden * s.b
        head_grads = (0 if shape.tie_embeddings else embedding_grads) + shape.hidden * s.b
        layer_grads = (sum(n * k for n, k in shape.linears().values()) + 2 * shape.hidden) * s.b
    else:
        embedding_grads = head_grads = 0
        layer_grads = sum(s.r * (n + k) for name, (n, k) in shape.linears().items() if name in s.targets) * s.lora_b
    embedding_grads, head_grads, layer_grads = (math.ceil(g / shards) for g in (embedding_grads, head_grads,
                                                                                 layer_grads))
    # Stock bitsandbytes dequantizes each NF4 weight to the compute dtype in forward and again in backward (under
    # stock peft, and for the NF4 layers without LoRA under the fused path); the fused kernels never hold one.
    stock_nf4 = [name for name in shape.linears() if lora_impl == "peft" or name not in s.targets]
    workspace = 0
    if method.startswith("qlora") and stock_nf4:
        workspace = max(shape.linears()[name][0] * shape.linears()[name][1] for name in stock_nf4) * s.b
    first_layer_saved = (s.tokens * shape.hidden * s.b + recomputed) if checkpointing else _layer_activations(s, True)

    # Four candidate peaks, all with the weights, the optimizer state and the logits the caller holds:
    # - backward start: every saved activation plus the loss's gradients over the vocabulary;
    # - last layer's backward: the head's saved tensors are freed, its gradients made; that layer's backward
    #   temporaries (and, with checkpointing, its recomputed activations) are alive;
    # - first layer's backward: only its activations are left, every gradient but its own and the embedding's is made;
    # - optimizer step: activations are gone, every gradient is alive, plus the step's temporaries.
    static = {"base weights": weights, "quantization constants": constants, "LoRA weights": lora_weights,
              "optimizer state": state, "logits": logits}
    candidates = {
        "backward start": {"activations": layers_saved + head_saved, "gradients": 0,
                           "backward temporaries": _loss_backward_transient(s), "sharding buffers": gathered},
        "last layer backward": {"activations": layers_saved + recomputed, "gradients": head_grads,
                                "backward temporaries": _layer_backward_transient(s),
                                "dequantization workspace": workspace, "sharding buffers": gathered},
        "first layer backward": {"activations": first_layer_saved,
                                 "gradients": gradients - layer_grads - embedding_grads,
                                 "backward temporaries": _layer_backward_transient(s),
                                 "dequantization workspace": workspace, "sharding buffers": gathered},
        "optimizer step": {"activations": 0, "gradients": gradients,
                           "optimizer step temporaries": _optimizer_step_transient(optimizer, shard)},
    }
    phases = {name: sum(static.values()) + sum(parts.values()) for name, parts in candidates.items()}
    peak_phase = max(phases, key=phases.get)
    breakdown = {name: 0 for name in ("activations", "gradients", "backward temporaries", "optimizer step temporaries",
                                      "dequantization workspace", "sharding buffers")}
    breakdown = static | breakdown | candidates[peak_phase]
    total = sum(breakdown.values())

    verdicts = {}
    for gpu, capacity in GPU_SIZES.items():
        if total + overhead_bytes <= capacity:
            verdicts[gpu] = "fits"
        elif paged and total - paged + overhead_bytes <= capacity:
            verdicts[gpu] = "fits with paging"
        else:
            verdicts[gpu] = "does not fit"
    inputs = {
        "model": dataclasses.asdict(shape), "method": method, "r": r, "targets": list(s.targets), "batch": batch,
        "seq": seq, "checkpointing": checkpointing, "optimizer": optimizer, "world_size": world_size,
        "sharding": sharding, "dtype": str(dtype), "lora_dtype": str(lora_dtype), "lora_impl": lora_impl,
        "parameters": shape.parameter_count(), "trainable_parameters": sum(n for n, _ in trainable),
    }
    sizes = {"gradients": gradients, "activations saved for backward": layers_saved + head_saved}
    return Plan(inputs, total, breakdown, peak_phase, phases, sizes, paged, int(overhead_bytes), verdicts)


# ------------------------------------------------------------------------------------------------------- CLI

PLOT_METHODS = ("full", "lora", "qlora")


def sweep_seq(model: Any, seqs: Sequence[int], methods: Sequence[str] = PLOT_METHODS, **options: Any) -> dict:
    """Total bytes per method for each sequence length: ``{method: [total_bytes, ...]}`` (full and lora runs use
    stock peft layers, qlora the fused op; every other option is passed to :func:`plan`)."""
    options = {k: v for k, v in options.items() if k not in ("method", "seq", "lora_impl")}
    return {m: [plan(model, method=m, seq=n, **options).total_bytes for n in seqs] for m in methods}


def write_plot(path: Union[str, os.PathLike], model: Any, seqs: Sequence[int], **options: Any) -> None:
    """Plot total memory against sequence length for full fine-tuning, LoRA and QLoRA, with the card sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals = sweep_seq(model, seqs, **options)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, values in totals.items():
        ax.plot(seqs, [v / GiB for v in values], marker="o", label=method)
    for gpu, capacity in GPU_SIZES.items():
        ax.axhline(capacity / GiB, color="grey", linestyle=":", linewidth=0.8)
        ax.text(seqs[0], capacity / GiB, f" {gpu}", va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("planned peak memory per GPU (GiB)")
    shape = model_shape(model)
    ax.set_title(f"{shape.name}: batch {options.get('batch', 1)}, "
                 f"checkpointing {'on' if options.get('checkpointing', True) else 'off'}, "
                 f"{options.get('optimizer', 'paged_adamw_8bit')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qlora_kernels.plan",
        description="Plan the peak GPU memory of fine-tuning a Llama-style model: full, LoRA or QLoRA.",
    )
    p.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or a config.json path or folder")
    p.add_argument("--method", nargs="+", default=["qlora"], choices=METHODS, help="one or more (default: qlora)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--targets", default="all-linear",
                   help=f"{', '.join(TARGET_SETS)} or comma-separated module names (default: all-linear)")
    p.add_argument("--batch", type=int, default=1, help="sequences per GPU per step (default: 1)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default: 2048)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing per decoder layer (default: on)")
    p.add_argument("--optimizer", default="paged_adamw_8bit",
                   choices=sorted(OPTIMIZERS) + sorted(_OPTIMIZER_ALIASES), help="(default: paged_adamw_8bit)")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--sharding", choices=["none", "fsdp"], default="none")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--lora-dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--lora-impl", choices=["qlora_kernels", "peft"], default=None,
                   help="qlora_kernels' fused op (QLoRA's default) or stock peft layers (LoRA's default)")
    p.add_argument("--json", type=Path, help="write the plan(s) to this JSON file")
    p.add_argument("--plot", type=Path, help="write a plot of total memory vs sequence length (full, lora, qlora)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    options = dict(r=args.r, targets=args.targets, batch=args.batch, seq=args.seq, checkpointing=args.checkpointing,
                   optimizer=args.optimizer, world_size=args.world_size, sharding=args.sharding, dtype=args.dtype,
                   lora_dtype=args.lora_dtype)
    try:
        plans = {}
        for method in args.method:
            impl = args.lora_impl if method.startswith("qlora") or args.lora_impl == "peft" else None
            plans[method] = plan(args.model, method=method, lora_impl=impl, **options)
    except (TypeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for method, result in plans.items():
        print(f"== {model_shape(args.model).name}, {method}: r={args.r}, targets={args.targets}, batch={args.batch}, "
              f"seq={args.seq}, checkpointing={'on' if args.checkpointing else 'off'}, {args.optimizer}, "
              f"world size {args.world_size} ({args.sharding})")
        print(result.table())
    if args.json:
        args.json.write_text(json.dumps({m: p.to_dict() for m, p in plans.items()}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        seqs = [2**k for k in range(8, 16)]  # 256 .. 32768 tokens
        write_plot(args.plot, args.model, seqs, **options)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
