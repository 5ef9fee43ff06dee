"""Pure-torch reference of the paged optimizers' step: the executable specification of the C++/CUDA kernels.

One parameter at a time, readable, slow. Same state layout as :class:`~qlora_kernels.optim.PagedOptimizer`, and the
same float32 arithmetic in the same order as csrc/kernels/optimizer_math.h, so the CPU kernel is expected to match
it bit for bit (tests/test_optim_paged.py checks that), and bitsandbytes' 8-bit optimizers to within quantization.
"""

from __future__ import annotations

import math

import torch

from ..reference import dynamic_map, midpoints

QUANTIZATION_BLOCK = 256


def _f32(x: float) -> torch.Tensor:
    """A Python number rounded to float32 once, as the kernels receive their scalars."""
    return torch.tensor(x, dtype=torch.float32)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root, as sqrtf computes it (torch's vectorized CPU sqrt may be off by an
    ulp; the float64 root rounded once to float32 is exact)."""
    return torch.sqrt(x.double()).float()


def _per_element(absmax: torch.Tensor, numel: int) -> torch.Tensor:
    return absmax.repeat_interleave(QUANTIZATION_BLOCK)[:numel]


def dequantize_moment(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """float32[numel] values of an 8-bit moment: ``code[byte] * absmax[block]``."""
    code = dynamic_map(signed, codes.device)
    flat = codes.reshape(-1).long()
    return code[flat] * _per_element(absmax, flat.numel())


def block_absmax(values: torch.Tensor) -> torch.Tensor:
    """float32[blocks]: max |value| per 256 elements, NaN when the block holds a NaN."""
    n = values.numel()
    blocks = -(-n // QUANTIZATION_BLOCK)
    padded = torch.nn.functional.pad(values.abs(), (0, blocks * QUANTIZATION_BLOCK - n))
    return padded.view(blocks, QUANTIZATION_BLOCK).amax(dim=1)  # amax propagates NaN


def quantize_moment(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes [numel], float32 absmax [blocks]) of float32 ``values``: nearest level of the dynamic map after
    scaling by 1/absmax (ties to the lower level); a negative value never rounds to the +0 level of the signed map."""
    code = dynamic_map(signed, values.device)
    absmax = block_absmax(values)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.where(absmax == 0, torch.zeros_like(absmax), absmax))
    scaled = values * _per_element(inverse, values.numel())
    index = torch.bucketize(scaled, midpoints(code), right=False)
    index = torch.where(torch.isnan(scaled), torch.zeros_like(index), index)
    if signed:
        index = torch.where((scaled < 0) & (code[index] >= 0), index - 1, index)
    return index.to(torch.uint8), absmax


def _load_moment(state: dict, name: str, signed: bool) -> torch.Tensor:
    moment = state[name]
    if moment.dtype == torch.uint8:
        return dequantize_moment(moment, state[name + "_absmax"], signed)
    return moment.reshape(-1).clone()


def _store_moment(state: dict, name: str, values: torch.Tensor, signed: bool) -> None:
    moment = state[name]
    if moment.dtype == torch.uint8:
        codes, absmax = quantize_moment(values, signed)
        moment.copy_(codes.view(moment.shape))
        state[name + "_absmax"].copy_(absmax)
    else:
        moment.copy_(values.view(moment.shape))


@torch.no_grad()
def adamw_step(
    param: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, betas: tuple[float, float], eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step of ``param`` in place, ``state`` as PagedAdamW/PagedAdamW8bit keep it (``step`` advanced)."""
    beta1, beta2 = betas
    state["step"] += 1
    step = state["step"]
    g = grad.reshape(-1).float()
    p = param.reshape(-1).float()
    m = _load_moment(state, "exp_avg", signed=True)
    v = _load_moment(state, "exp_avg_sq", signed=False)
    m = _f32(beta1) * m + _f32(1.0 - beta1) * g
    v = _f32(beta2) * v + (_f32(1.0 - beta2) * g) * g
    step_size = _f32(lr / (1.0 - beta1**step))
    bias_correction2_sqrt = _f32(math.sqrt(1.0 - beta2**step))
    denom = _sqrt(v) / bias_correction2_sqrt + _f32(eps)
    p = p * _f32(1.0 - lr * weight_decay)
    p = p + (-step_size * m) / denom
    param.copy_(p.view(param.shape))
    _store_moment(state, "exp_avg", m, signed=True)
    _store_moment(state, "exp_avg_sq", v, signed=False)


@torch.no_grad()
def lion_step(
    param: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, betas: tuple[float, float], weight_decay: float
) -> None:
    """One Lion step of ``param`` in place, ``state`` as PagedLion/PagedLion8bit keep it (``step`` advanced).

    An infinite gradient element takes the finite sign step (as bitsandbytes' Lion) and leaves the momentum at the
    float32 limit rather than +-inf, so an 8-bit block's absmax stays finite; a NaN element stays NaN."""
    beta1, beta2 = betas
    state["step"] += 1
    g = grad.reshape(-1).float()
    p = param.reshape(-1).float()
    m = _load_moment(state, "exp_avg", signed=True)
    mix = _f32(beta1) * m + _f32(1.0 - beta1) * g
    direction = torch.where(torch.isnan(mix), mix, torch.sign(mix))  # torch.sign(NaN) is 0; the kernel keeps NaN
    p = p * _f32(1.0 - lr * weight_decay)
    p = p - _f32(lr) * direction
    limit = torch.finfo(torch.float32).max
    m = (_f32(beta2) * m + _f32(1.0 - beta2) * g).clamp(-limit, limit)  # clamp keeps NaN (optimizer_math.h)
    param.copy_(p.view(param.shape))
    _store_moment(state, "exp_avg", m, signed=True)
