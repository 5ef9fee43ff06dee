"""Paged Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") with 32-bit or 8-bit state."""

from __future__ import annotations

from typing import Any, Iterable

from .adamw import DEFAULT_MIN_8BIT_SIZE, DEFAULT_PAGE_THRESHOLD, bitsandbytes_options, resolve_paging
from .optimizer import PagedOptimizer


class PagedLion(PagedOptimizer):
    """Lion with a float32 momentum: ``p ← p·(1 − lr·wd) − lr·sign(β1·m + (1 − β1)·g)``, then ``m ← β2·m + (1 − β2)·g``.

    Args:
        params: parameters or param groups, as :class:`~qlora_kernels.optim.PagedAdamW`.
        lr, betas, weight_decay: Lion's hyperparameters (defaults as bitsandbytes' Lion).
        optim_bits, args, min_8bit_size: bitsandbytes' ``PagedLion`` arguments, in its order (``optim_bits=8``: an
            8-bit momentum for parameters of at least ``min_8bit_size`` elements, as :class:`PagedLion8bit`).
        is_paged, page_threshold, percentile_clipping, block_wise, max_unorm, skip_zeros, maximize: as
            :class:`~qlora_kernels.optim.PagedAdamW`.

    A NaN or infinite gradient element makes its parameter NaN (sign() would otherwise turn an infinity into an
    ordinary step and leave an infinite momentum behind); with 8-bit state its 256-element block is poisoned, as in
    :class:`~qlora_kernels.optim.PagedAdamW8bit`.
    """

    algorithm = "lion"
    moment_names = ("exp_avg",)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
        *,
        is_paged: bool = True,
        page_threshold: int = DEFAULT_PAGE_THRESHOLD,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        maximize: bool = False,
    ) -> None:
        bitsandbytes_options(
            type(self).__name__, args=args, percentile_clipping=percentile_clipping, block_wise=block_wise,
            max_unorm=max_unorm, skip_zeros=skip_zeros, maximize=maximize,
        )
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(
            params, defaults, optim_bits=optim_bits, min_8bit_size=min_8bit_size,
            page_threshold=resolve_paging(is_paged, page_threshold),
        )


class PagedLion8bit(PagedOptimizer):
    """Lion with an 8-bit blockwise momentum (signed dynamic map, absmax per 256 elements), tracking
    ``bitsandbytes.optim.PagedLion8bit``; parameters under ``min_8bit_size`` elements keep a float32 momentum.

    Arguments as :class:`PagedLion`, in bitsandbytes' ``PagedLion8bit`` order (``params, lr, betas, weight_decay,
    args, min_8bit_size``); non-finite gradients as there."""

    algorithm = "lion"
    moment_names = ("exp_avg",)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        args: Any = None,
        min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
        *,
        is_paged: bool = True,
        page_threshold: int = DEFAULT_PAGE_THRESHOLD,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        maximize: bool = False,
    ) -> None:
        bitsandbytes_options(
            type(self).__name__, args=args, percentile_clipping=percentile_clipping, block_wise=block_wise,
            max_unorm=max_unorm, skip_zeros=skip_zeros, maximize=maximize,
        )
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(
            params, defaults, optim_bits=8, min_8bit_size=min_8bit_size,
            page_threshold=resolve_paging(is_paged, page_threshold),
        )
