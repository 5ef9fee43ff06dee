"""Functional API: ``nf4_lora_linear``.

PROVISIONAL: this first version composes torch ops (dequantize, matmul) and lets torch's autograd differentiate them,
so that the layers above can be built and tested against a fixed contract. The fused Triton kernels and their custom
op replace the body; the signature and semantics below are the contract.
"""

from __future__ import annotations

from typing import Optional

import torch

from .nf4 import NF4Weight


def nf4_lora_linear(
    x: torch.Tensor,
    w4: NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``x · deq(W)ᵀ + scale · (dropout(x) · lora_Aᵀ) · lora_Bᵀ + bias``.

    x: [..., K]; w4: NF4Weight [N, K]; lora_A: [r, K]; lora_B: [N, r]; bias: [N] or None. Differentiable in x,
    lora_A, lora_B and bias (never in the frozen W). Output [..., N] in x's dtype. ``dropout`` is the LoRA-path
    dropout probability (pass 0.0 in eval mode).
    """
    w = w4.dequantize(x.dtype)
    lora_in = torch.nn.functional.dropout(x, dropout) if dropout > 0 else x
    y = torch.nn.functional.linear(x, w, bias)
    return y + scale * torch.nn.functional.linear(torch.nn.functional.linear(lora_in, lora_A), lora_B)
