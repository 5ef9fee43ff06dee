"""Paged optimizers on the C++/CUDA extension (see DESIGN.md, "Paged optimizers").

``PagedAdamW`` (float32 state, tracks ``torch.optim.AdamW``), ``PagedAdamW8bit`` (8-bit blockwise state, tracks
``bitsandbytes.optim.PagedAdamW8bit``), ``PagedLion`` and ``PagedLion8bit``. All follow the ``torch.optim.Optimizer``
API and run through ``qlora_kernels._C`` on CPU and CUDA tensors alike.
"""

from .adamw import PagedAdamW, PagedAdamW8bit
from .lion import PagedLion, PagedLion8bit
from .optimizer import PagedOptimizer

__all__ = ["PagedAdamW", "PagedAdamW8bit", "PagedLion", "PagedLion8bit", "PagedOptimizer"]
