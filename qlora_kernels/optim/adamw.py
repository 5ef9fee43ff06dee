"""Paged AdamW with 32-bit or 8-bit blockwise state."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from .optimizer import PagedOptimizer, check_unsupported

DEFAULT_PAGE_THRESHOLD = 100_000  # elements; bitsandbytes pages state of parameters this large
DEFAULT_MIN_8BIT_SIZE = 4096  # elements; smaller parameters keep float32 state, as in bitsandbytes

CLIP_INSTEAD = "clip gradients with torch.nn.utils.clip_grad_norm_ before step()"


def bitsandbytes_options(
    owner: str,
    *,
    amsgrad: bool = False,
    args: Any = None,
    percentile_clipping: int = 100,
    block_wise: bool = True,
    max_unorm: float = 0.0,
    skip_zeros: bool = False,
    maximize: bool = False,
) -> None:
    """Accept bitsandbytes' (and torch's) keyword arguments at the values these optimizers implement; refuse the
    others with a ValueError that names the argument and says what to do instead."""
    check_unsupported(
        owner,
        amsgrad=(amsgrad, False, "AMSGrad is not implemented; use amsgrad=False"),
        args=(args, None, "pass the settings as keyword arguments"),
        percentile_clipping=(percentile_clipping, 100, CLIP_INSTEAD),
        block_wise=(block_wise, True, "the 8-bit state is always blockwise (256 elements per scale)"),
        max_unorm=(max_unorm, 0.0, CLIP_INSTEAD),
        skip_zeros=(skip_zeros, False, "zero gradients are ordinary gradients here"),
        maximize=(maximize, False, "negate the loss to maximize it"),
    )


def resolve_paging(is_paged: bool, page_threshold: Optional[int]) -> Optional[int]:
    """bitsandbytes' ``is_paged``: False pages nothing (page_threshold None), True keeps ``page_threshold``."""
    if not isinstance(is_paged, bool):
        raise TypeError(f"is_paged must be a bool, got {is_paged!r}")
    return page_threshold if is_paged else None


class PagedAdamW(PagedOptimizer):
    """AdamW (decoupled weight decay) with float32 state, the same updates as ``torch.optim.AdamW``.

    Args:
        params: parameters or param groups (``model.parameters()`` works: parameters that do not require grad are
            never stepped; trainable ones are float32, float16 or bfloat16, one device per group).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay defaults to 1e-2 there too).
        amsgrad, optim_bits, args, min_8bit_size: bitsandbytes' ``PagedAdamW`` arguments, in its order.
            ``optim_bits=8`` gives 8-bit blockwise state (as :class:`PagedAdamW8bit`) to parameters of at least
            ``min_8bit_size`` elements, as in bitsandbytes; ``amsgrad=True`` and an ``args`` object are refused.
        is_paged: False keeps all state in ordinary device memory (bitsandbytes' non-paged optimizers).
        page_threshold: parameters with at least this many elements on a CUDA device keep their moments in unified
            memory (:mod:`qlora_kernels.paged`), which the driver can page out to host memory under pressure.
        percentile_clipping, block_wise, max_unorm, skip_zeros (older bitsandbytes), maximize (torch): accepted at
            their defaults (100, True, 0.0, False, False), refused otherwise with a ValueError saying what to use.

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
        amsgrad: bool = False,
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
            type(self).__name__, amsgrad=amsgrad, args=args, percentile_clipping=percentile_clipping,
            block_wise=block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros, maximize=maximize,
        )
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(
            params, defaults, optim_bits=optim_bits, min_8bit_size=min_8bit_size,
            page_threshold=resolve_paging(is_paged, page_threshold),
        )


class PagedAdamW8bit(PagedOptimizer):
    """AdamW with 8-bit blockwise state, tracking ``bitsandbytes.optim.PagedAdamW8bit``.

    Each moment is stored as one byte per element on bitsandbytes' dynamic maps (signed for the first moment,
    unsigned for the second) with a float32 absmax per 256 elements: about 2 bytes of state per parameter instead
    of 8. Parameters with fewer than ``min_8bit_size`` elements keep float32 state, as in bitsandbytes.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, args, is_paged, page_threshold, percentile_clipping,
            block_wise, max_unorm, skip_zeros, maximize: as :class:`PagedAdamW`.
        optim_bits: accepted for bitsandbytes' signature (its default 32, or 8); the state is 8-bit either way, as
            in bitsandbytes' ``PagedAdamW8bit``.
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
        amsgrad: bool = False,
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
            type(self).__name__, amsgrad=amsgrad, args=args, percentile_clipping=percentile_clipping,
            block_wise=block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros, maximize=maximize,
        )
        if isinstance(optim_bits, bool) or optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 32 (bitsandbytes' default) or 8, got {optim_bits!r}; the state of "
                             f"{type(self).__name__} is 8-bit either way (use PagedAdamW for float32 state)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(
            params, defaults, optim_bits=8, min_8bit_size=min_8bit_size,
            page_threshold=resolve_paging(is_paged, page_threshold),
        )
