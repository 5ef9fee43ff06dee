"""Paged optimizers on the C++/CUDA extension (see DESIGN.md, "Paged optimizers").

``PagedAdamW`` (float32 state, tracks ``torch.optim.AdamW``), ``PagedAdamW8bit`` (8-bit blockwise state, tracks
``bitsandbytes.optim.PagedAdamW8bit``), ``PagedLion`` and ``PagedLion8bit``. All follow the ``torch.optim.Optimizer``
API, take bitsandbytes' arguments, and run through ``qlora_kernels._C`` on CPU and CUDA tensors alike;
:func:`trainer_optimizer_cls_and_kwargs` hands them to transformers' Trainer.
"""

from .adamw import PagedAdamW, PagedAdamW8bit
from .lion import PagedLion, PagedLion8bit
from .optimizer import PagedOptimizer
from .trainer import TRAINER_OPTIMIZERS, register_with_transformers, trainer_optimizer_cls_and_kwargs

__all__ = [
    "PagedAdamW",
    "PagedAdamW8bit",
    "PagedLion",
    "PagedLion8bit",
    "PagedOptimizer",
    "TRAINER_OPTIMIZERS",
    "register_with_transformers",
    "trainer_optimizer_cls_and_kwargs",
]
