"""The ``qlora_kernels::`` custom ops: schema, fake (meta) implementation, CPU and CUDA kernels.

Plain tensors in, plain tensors out. Each op's kernels are registered per device type with torch's dispatcher: the
op's body is its CPU kernel (the C++ CPU kernels; the Triton launchers through the interpreter under
``QLORA_KERNELS_BACKEND=triton``; the reference under ``=torch``), ``register_kernel("cuda")`` its CUDA kernel (the
Triton launchers; the reference under ``=torch``). Both are one body each, taking the serving module. Argument
validation lives in the public API above this layer; the NF4 storage operands are checked here too (structure only:
dtypes, element counts, contiguity, one device; no device sync), so a direct ``torch.ops.qlora_kernels`` call cannot
hand a kernel a short or strided storage tensor.

:func:`nf4_lora_linear` is the fused linear's entry point for the functional API: the custom op, except for plain
eager calls on the C++ CPU kernels, which run the same kernels and autograd formula without torch.library's Python
dispatch (the section at the end says why and when).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from typing import Optional, Sequence

import torch

from torch import _C

from . import reference
from ._backend import backend_setting, cpu_kernels, triton_kernels, use_cpu_kernels
from .storage import check_nf4_storage

_EMPTY = (0,)


def _implementation(device_type: str, family: str):
    """The module behind the kernel registered for ``device_type`` (``family`` "nf4" or "lora_linear"; each module
    has the reference's functions). torch's dispatcher picks the device type's kernel; ``QLORA_KERNELS_BACKEND`` is
    the small hook that swaps the module that kernel calls (qlora_kernels/_backend.py): CUDA → the Triton launchers;
    CPU → the C++ CPU kernels, or the Triton launchers through the interpreter, or the reference."""
    setting = backend_setting()
    if setting == "torch":
        return reference
    if device_type == "cuda" or setting == "triton":
        return importlib.import_module("." + family, triton_kernels().__name__)
    if use_cpu_kernels(_DEVICES.get(device_type) or torch.device(device_type), setting):
        return cpu_kernels()
    return reference


_DEVICES = {"cpu": torch.device("cpu")}


def _nf4_module(device: torch.device):
    """The module serving the NF4 ops for tensors on ``device``."""
    return _implementation(device.type, "nf4")


def _lora_linear_module(device: torch.device):
    """The module serving the fused linear for tensors on ``device``."""
    return _implementation(device.type, "lora_linear")


def _register_cuda(op, body, family: str) -> None:
    """``op``'s CUDA kernel: ``body(module, *args)`` with the module serving CUDA (the op's own body is its CPU
    kernel, written the same way)."""
    op.register_kernel("cuda")(lambda *args: body(_implementation("cuda", family), *args))


# ---------------------------------------------------------------------------------------------- quantize_nf4


@torch.library.custom_op("qlora_kernels::quantize_nf4", mutates_args=(), device_types="cpu")
def quantize_nf4(
    weight: torch.Tensor, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4-quantize ``weight`` (flattened row-major). Returns (packed uint8 [(n+1)//2], absmax, nested_absmax,
    offset): absmax float32 [blocks] and empty nested_absmax/offset without double quantization; with it, absmax
    uint8 [blocks], nested_absmax float32 [ceil(blocks/256)] and offset a float32 scalar."""
    return _quantize(_implementation("cpu", "nf4"), weight, blocksize, double_quant)


def _quantize(impl, weight, blocksize, double_quant):
    packed, absmax, nested_absmax, offset = impl.quantize_nf4(weight, blocksize, double_quant)
    if nested_absmax is None:
        nested_absmax = torch.empty(_EMPTY, dtype=torch.float32, device=weight.device)
        offset = torch.empty(_EMPTY, dtype=torch.float32, device=weight.device)
    return packed, absmax, nested_absmax, offset


_register_cuda(quantize_nf4, _quantize, "nf4")


@quantize_nf4.register_fake
def _(weight, blocksize, double_quant):
    numel = weight.numel()
    nblocks = -(-numel // blocksize)
    packed = weight.new_empty(((numel + 1) // 2,), dtype=torch.uint8)
    if double_quant:
        return (
            packed,
            weight.new_empty((nblocks,), dtype=torch.uint8),
            weight.new_empty((-(-nblocks // reference.NESTED_BLOCKSIZE),), dtype=torch.float32),
            weight.new_empty((), dtype=torch.float32),
        )
    empty = weight.new_empty(_EMPTY, dtype=torch.float32)
    return packed, weight.new_empty((nblocks,), dtype=torch.float32), empty, empty.clone()


# -------------------------------------------------------------------------------------------- dequantize_nf4


@torch.library.custom_op("qlora_kernels::dequantize_nf4", mutates_args=(), device_types="cpu")
def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize NF4 storage to ``dtype`` [shape]: ``code[nibble] * absmax[block]`` in float32, cast once.
    ``packed`` is the uint8 byte view; pass nested_absmax, offset and nested_code for double quantization."""
    return _dequantize(
        _implementation("cpu", "nf4"), packed, absmax, nested_absmax, offset, nested_code, blocksize, shape, dtype
    )


def _dequantize(impl, packed, absmax, nested_absmax, offset, nested_code, blocksize, shape, dtype):
    numel = math.prod(int(d) for d in shape)  # a Python int: never a wrapped int64
    check_nf4_storage(packed, absmax, nested_absmax, offset, numel, blocksize, None, nested_code, check_values=False)
    return impl.dequantize_nf4(packed, absmax, nested_absmax, offset, blocksize, shape, dtype, nested_code)


_register_cuda(dequantize_nf4, _dequantize, "nf4")


@dequantize_nf4.register_fake
def _(packed, absmax, nested_absmax, offset, nested_code, blocksize, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


# ----------------------------------------------------------------------------------- nf4_lora_linear (fused)
#
# y = x · deq(W)ᵀ + scale · (dropout(x) · lora_Aᵀ) · lora_Bᵀ + bias on 2-D x [M, K], with W [N, K] in NF4 storage
# (packed uint8 bytes, absmax, optional double quantization). x, lora_A, lora_B and bias share one float dtype (the
# functional API checks and casts). The forward also returns S = dropout(x) · lora_Aᵀ [M, r] in float32 for the
# backward; ``seed`` (int64, one element) regenerates the dropout mask there. Autograd: x, lora_A, lora_B, bias.


def _no_autocast(device: torch.device):
    """The kernels run with autocast off: the compute dtype was decided above this layer (functional.compute_dtype),
    and an implementation's own float32 products (the reference's, the CPU kernels' BLAS calls) must not be recast
    to the autocast dtype under a caller's ``torch.autocast``. (No context at all when autocast is off already: an
    autocast context costs microseconds a call.)"""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _check_weight_storage(x, lora_B, packed, absmax, nested_absmax, offset, nested_code, blocksize) -> None:
    """The NF4 storage of a fused linear's weight [N = lora_B rows, K = x columns], structure only."""
    if x.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"x and lora_B must be 2-D, got {tuple(x.shape)} and {tuple(lora_B.shape)}")
    numel = lora_B.shape[0] * x.shape[1]
    check_nf4_storage(packed, absmax, nested_absmax, offset, numel, blocksize, None, nested_code, check_values=False)


@torch.library.custom_op("qlora_kernels::nf4_lora_linear_fwd", mutates_args=(), device_types="cpu")
def nf4_lora_linear_fwd(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    blocksize: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor],
    dropout: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused NF4 + LoRA linear, forward: ``(y [M, N] in x's dtype, s = dropout(x) · lora_Aᵀ [M, r] float32)``."""
    return _linear_fwd(
        _implementation("cpu", "lora_linear"), x, packed, absmax, nested_absmax, offset, nested_code, blocksize,
        lora_A, lora_B, scale, bias, dropout, seed,
    )


def _linear_fwd(impl, x, packed, absmax, nested_absmax, offset, nested_code, blocksize, lora_A, lora_B, *rest):
    _check_weight_storage(x, lora_B, packed, absmax, nested_absmax, offset, nested_code, blocksize)
    with _no_autocast(x.device):
        return impl.nf4_lora_linear_fwd(
            x, packed, absmax, nested_absmax, offset, nested_code, blocksize, lora_A, lora_B, *rest
        )


_register_cuda(nf4_lora_linear_fwd, _linear_fwd, "lora_linear")


@nf4_lora_linear_fwd.register_fake
def _(x, packed, absmax, nested_absmax, offset, nested_code, blocksize, lora_A, lora_B, scale, bias, dropout, seed):
    return x.new_empty((x.shape[0], lora_B.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("qlora_kernels::nf4_lora_linear_bwd", mutates_args=(), device_types="cpu")
def nf4_lora_linear_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    blocksize: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout: float,
    seed: Optional[torch.Tensor],
    need_x: bool,
    need_A: bool,
    need_B: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused NF4 + LoRA linear, backward: ``(grad_x [M, K], grad_A [r, K], grad_B [N, r], grad_bias [N])`` in x's
    dtype; a gradient that is not needed comes back as an empty tensor. No gradient for the frozen W."""
    return _linear_bwd(
        _implementation("cpu", "lora_linear"), grad_y, x, s, packed, absmax, nested_absmax, offset, nested_code,
        blocksize, lora_A, lora_B, scale, dropout, seed, need_x, need_A, need_B, need_bias,
    )


def _linear_bwd(impl, grad_y, x, s, packed, absmax, nested_absmax, offset, nested_code, blocksize, lora_A, lora_B,
                *rest):
    _check_weight_storage(x, lora_B, packed, absmax, nested_absmax, offset, nested_code, blocksize)
    with _no_autocast(x.device):
        grads = impl.nf4_lora_linear_bwd(
            grad_y, x, s, packed, absmax, nested_absmax, offset, nested_code, blocksize, lora_A, lora_B, *rest
        )
    return tuple(x.new_empty(_EMPTY) if g is None else g for g in grads)


_register_cuda(nf4_lora_linear_bwd, _linear_bwd, "lora_linear")


@nf4_lora_linear_bwd.register_fake
def _(grad_y, x, s, packed, absmax, nested_absmax, offset, nested_code, blocksize, lora_A, lora_B, scale, dropout,
      seed, need_x, need_A, need_B, need_bias):
    def grad(needed: bool, shape) -> torch.Tensor:
        return x.new_empty(tuple(shape) if needed else _EMPTY)

    n = lora_B.shape[0]
    return grad(need_x, x.shape), grad(need_A, lora_A.shape), grad(need_B, lora_B.shape), grad(need_bias, (n,))


# The forward's argument names in schema order: autograd reads "which inputs need a gradient" and returns gradients
# by these names, so adding an argument to the op cannot shift a gradient onto the wrong input.
_FWD_ARGS = tuple(a.name for a in nf4_lora_linear_fwd._opoverload._schema.arguments)
_SAVED = ("x", "packed", "absmax", "nested_absmax", "offset", "nested_code", "lora_A", "lora_B", "seed")
_DIFFERENTIABLE = ("x", "lora_A", "lora_B", "bias")


def _fwd_setup_context(ctx, inputs, output) -> None:
    args = dict(zip(_FWD_ARGS, inputs))
    ctx.save_for_backward(output[1], *(args[name] for name in _SAVED))
    ctx.blocksize, ctx.scale, ctx.dropout = args["blocksize"], args["scale"], args["dropout"]
    ctx.has_bias = args["bias"] is not None
    ctx.mark_non_differentiable(output[1])


def _fwd_backward(ctx, grad_y: torch.Tensor, _grad_s):
    s, *saved = ctx.saved_tensors
    t = dict(zip(_SAVED, saved))
    need = dict(zip(_FWD_ARGS, ctx.needs_input_grad))
    need["bias"] = ctx.has_bias and need["bias"]
    grads = nf4_lora_linear_bwd(
        grad_y.to(t["x"].dtype), t["x"], s, t["packed"], t["absmax"], t["nested_absmax"], t["offset"],
        t["nested_code"], ctx.blocksize, t["lora_A"], t["lora_B"], ctx.scale, ctx.dropout, t["seed"],
        *(need[name] for name in _DIFFERENTIABLE),
    )
    by_name = {name: g if need[name] else None for name, g in zip(_DIFFERENTIABLE, grads)}
    return tuple(by_name.get(name) for name in _FWD_ARGS)


nf4_lora_linear_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ------------------------------------------------------------------------------------ eager fast path (CPU)
#
# In a plain eager call, torch.library's Python machinery around a custom op costs more than the CPU kernels of a
# small layer save: measured on a 2-core machine, ~70 us per forward call without autograd and ~170 us with it
# (utils.fill_defaults walks the 13-argument schema quadratically), ~90 us per backward call, against ~1.1 ms of
# kernels for a 512-token, 256×256 layer's forward and backward. So when the C++ CPU kernels serve the call and
# nothing but plain eager autograd is watching, the same kernels (with the same storage checks) and the same backward
# formula run through a torch.autograd.Function instead. Everything else takes the custom op: torch.compile,
# FakeTensor/meta tracing, any TorchDispatchMode or TorchFunctionMode (FlopCounterMode, DebugMode, a device context
# manager), functorch transforms, tensor subclasses, and the profiler, so that traces still name
# ``qlora_kernels::nf4_lora_linear_fwd`` / ``_bwd``.

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_eager_call(*tensors: Optional[torch.Tensor]) -> bool:
    """True when nothing but eager autograd sees this call (see above) and every tensor is a plain tensor."""
    if (
        torch.compiler.is_compiling()
        or _C._len_torch_dispatch_stack()
        or _C._is_torch_function_mode_enabled()
        or _C._autograd._profiler_enabled()
        or _C._functorch.peek_interpreter_stack() is not None
    ):
        return False
    return all(t is None or type(t) in _PLAIN_TENSOR_TYPES for t in tensors)


class _EagerLinear(torch.autograd.Function):
    """The fused linear's forward and backward kernels, called directly (the custom op's autograd formula). The NF4
    storage travels as one non-tensor argument (it never takes a gradient; fewer arguments make ``apply`` cheaper)."""

    @staticmethod
    def forward(ctx, impl, storage, x, lora_A, lora_B, bias, scale, dropout, seed):
        packed, absmax, nested_absmax, offset, nested_code, blocksize = storage
        y, s = _linear_fwd(impl, x, packed, absmax, nested_absmax, offset, nested_code, blocksize, lora_A, lora_B,
                           scale, bias, dropout, seed)
        ctx.save_for_backward(s, x, lora_A, lora_B)
        ctx.impl, ctx.storage, ctx.scale, ctx.dropout, ctx.seed = impl, storage, scale, dropout, seed
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        s, x, lora_A, lora_B = ctx.saved_tensors
        need_x, need_A, need_B, need_bias = ctx.needs_input_grad[2:6]
        need_bias = need_bias and ctx.has_bias
        # The storage was checked by the forward, and autograd's version counters guard the saved tensors; the
        # implementation gives None for a gradient not asked for.
        with _no_autocast(x.device):
            grads = ctx.impl.nf4_lora_linear_bwd(
                grad_y.to(x.dtype), x, s, *ctx.storage, lora_A, lora_B, ctx.scale, ctx.dropout, ctx.seed, need_x,
                need_A, need_B, need_bias,
            )
        return (None, None, *(g if needed else None for g, needed in zip(grads, (need_x, need_A, need_B, need_bias))),
                None, None, None)


def nf4_lora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    blocksize: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor],
    dropout: float,
    seed: Optional[torch.Tensor],
) -> torch.Tensor:
    """y of the fused linear, differentiable in x, lora_A, lora_B and bias: the ``nf4_lora_linear_fwd`` custom op, or
    for a plain eager call on the C++ CPU kernels the same kernels through :class:`_EagerLinear`."""
    if x.device.type == "cpu" and _plain_eager_call(x, packed, lora_A, lora_B, bias):
        impl = _implementation("cpu", "lora_linear")
        if impl is cpu_kernels():
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lora_A, lora_B, bias)):
                storage = (packed, absmax, nested_absmax, offset, nested_code, blocksize)
                return _EagerLinear.apply(impl, storage, x, lora_A, lora_B, bias, scale, dropout, seed)
            # Nothing to differentiate: no autograd node at all.
            return _linear_fwd(impl, x, packed, absmax, nested_absmax, offset, nested_code, blocksize, lora_A, lora_B,
                               scale, bias, dropout, seed)[0]
    return nf4_lora_linear_fwd(x, packed, absmax, nested_absmax, offset, nested_code, blocksize, lora_A, lora_B, scale,
                               bias, dropout, seed)[0]
