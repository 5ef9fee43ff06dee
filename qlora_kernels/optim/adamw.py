"""Paged AdamW with 32-bit or 8-bit blockwise state."""

from __future__ import annotations

from typing import Iterable

from .optimizer import PagedOptimizer

DEFAULT_PAGE_THRESHOLD = 100_000  # elements; bitsandbytes pages state of parameters this large
DEFAULT_MIN_8BIT_SIZE = 4096  # elements; smaller parameters keep float32 state, as in bitsandbytes


class PagedAdamW(PagedOptimizer):
    """AdamW (decoupled weight decay) with float32 state, the same updates as ``torch.optim.AdamW``.

    Args:
        params: parameters or param groups (float32, float16 or bfloat16; one device per group).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay defaults to 1e-2 there too).
        page_threshold: parameters with at least this many elements on a CUDA device keep their moments in unified
            memory (:mod:`qlora_kernels.paged`), which the driver can page out to host memory under pressure.

    The state is float32 whatever the parameter dtype; the update is computed in float32 and rounded once into the
    parameter. One fused kernel launch per param group per step on CUDA, without host synchronisation.
    """

    algorithm = "adamw"
    moment_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        page_threshold: int = DEFAULT_PAGE_THRESHOLD,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, optim_bits=32, min_8bit_size=0, page_threshold=page_threshold)


class PagedAdamW8bit(PagedOptimizer):
    """AdamW with 8-bit blockwise state, tracking ``bitsandbytes.optim.PagedAdamW8bit``.

    Each moment is stored as one byte per element on bitsandbytes' dynamic maps (signed for the first moment,
    unsigned for the second) with a float32 absmax per 256 elements: about 2 bytes of state per parameter instead
    of 8. Parameters with fewer than ``min_8bit_size`` elements keep float32 state, as in bitsandbytes.

    Args:
        params, lr, betas, eps, weight_decay, page_threshold: as :class:`PagedAdamW`.
        min_8bit_size: smallest parameter (elements) given 8-bit state.

    Per 256-element block, a step dequantizes the moments, updates them and the parameter in float32, and
    requantizes them with the block's new absmax (round to nearest level; a negative first moment never rounds to
    zero). A NaN or Inf gradient makes the parameter NaN as in ``torch.optim.AdamW``; since a byte cannot hold a NaN,
    the whole 256-element block of the moment is poisoned (its absmax becomes NaN) rather than the one element.
    """

    algorithm = "adamw"
    moment_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
        page_threshold: int = DEFAULT_PAGE_THRESHOLD,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(
            params, defaults, optim_bits=8, min_8bit_size=min_8bit_size, page_threshold=page_threshold
        )
