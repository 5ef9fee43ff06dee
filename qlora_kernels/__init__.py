"""qlora-kernels: fused QLoRA kernels for PyTorch.

Frozen base weights in bitsandbytes' NF4 format, dequantized on the fly inside Triton kernels that compute
``x · Wᵀ + scale · (x · Aᵀ) · Bᵀ`` forward and backward, and paged optimizers in a C++/CUDA extension.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers the qlora_kernels:: custom ops)
from . import optim  # noqa: F401  (qk.optim.PagedAdamW, PagedAdamW8bit, PagedLion8bit: paged optimizers on _C)
from ._extension import extension_available
from .functional import nf4_lora_linear
from .nf4 import NF4Weight
from .nn import QLoRALinear
from .integrations.peft import patch_peft_model, unpatch_peft_model
from . import distributed  # noqa: F401,E402  (qk.distributed.fully_shard_qlora, ddp_qlora: FSDP2 / DDP)
from .plan import plan  # noqa: E402  (qk.plan(...): the memory planner; python -m qlora_kernels.plan)

__all__ = [
    "NF4Weight",
    "nf4_lora_linear",
    "QLoRALinear",
    "patch_peft_model",
    "unpatch_peft_model",
    "extension_available",
    "plan",
    "__version__",
]
