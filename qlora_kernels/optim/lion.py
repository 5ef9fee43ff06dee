"""Paged Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") with 32-bit or 8-bit state."""

from __future__ import annotations

from typing import Iterable

from .adamw import DEFAULT_MIN_8BIT_SIZE, DEFAULT_PAGE_THRESHOLD
from .optimizer import PagedOptimizer


class PagedLion(PagedOptimizer):
    """Lion with a float32 momentum: ``p ← p·(1 − lr·wd) − lr·sign(β1·m + (1 − β1)·g)``, then ``m ← β2·m + (1 − β2)·g``.

    Args:
        params: parameters or param groups (float32, float16 or bfloat16; one device per group).
        lr, betas, weight_decay: Lion's hyperparameters (defaults as bitsandbytes' Lion).
        page_threshold: as :class:`~qlora_kernels.optim.PagedAdamW`.
    """

    algorithm = "lion"
    moment_names = ("exp_avg",)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        page_threshold: int = DEFAULT_PAGE_THRESHOLD,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(params, defaults, optim_bits=32, min_8bit_size=0, page_threshold=page_threshold)


class PagedLion8bit(PagedOptimizer):
    """Lion with an 8-bit blockwise momentum (signed dynamic map, absmax per 256 elements), tracking
    ``bitsandbytes.optim.PagedLion8bit``; parameters under ``min_8bit_size`` elements keep a float32 momentum."""

    algorithm = "lion"
    moment_names = ("exp_avg",)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
        page_threshold: int = DEFAULT_PAGE_THRESHOLD,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(
            params, defaults, optim_bits=8, min_8bit_size=min_8bit_size, page_threshold=page_threshold
        )
