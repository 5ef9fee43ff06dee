"""transformers ``Trainer`` / TRL ``SFTTrainer`` integration: a callback that patches the model the trainer trains.

    from qlora_kernels.integrations.trainer import QLoRAKernelsCallback
    trainer = SFTTrainer(model=model_loaded_in_4bit, peft_config=LoraConfig(...), ...,
                         callbacks=[QLoRAKernelsCallback()])

A trainer may add the LoRA adapters itself (``SFTTrainer(peft_config=...)``), so a ``patch_peft_model`` call made
before constructing it finds nothing to patch. The callback patches at ``on_train_begin`` instead, on the model the
trainer holds then, whatever wrapped it before; after the first optimizer step it checks that the fused path ran and
warns (or raises, with ``strict=True``) when every LoRA call of that step ran peft's forward instead.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

from torch import nn
from transformers import TrainerCallback

from .peft import lora_call_counts, patch_peft_model, reset_lora_call_counts

__all__ = ["QLoRAKernelsCallback"]

logger = logging.getLogger(__name__)


class QLoRAKernelsCallback(TrainerCallback):
    """Patch the trained model's LoRA layers over bitsandbytes NF4 onto the fused kernels when training begins.

    ``strict=True`` turns every warning of :func:`qlora_kernels.patch_peft_model` (layers left on peft's forward, no
    layer to patch) and of the first-step check into a ValueError / RuntimeError. ``patched`` is the number of
    layers patched at the last ``on_train_begin``.
    """

    def __init__(self, strict: bool = False) -> None:
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        self.strict = strict
        self.patched = 0
        self._first_step_checked = False

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None, **kwargs: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(f"QLoRAKernelsCallback needs the trainer's model, got {type(model).__name__}")
        self.patched = patch_peft_model(model, strict=self.strict).qlora_kernels_patched
        reset_lora_call_counts(model)
        self._first_step_checked = False

    def on_step_end(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None, **kwargs: Any):
        if self._first_step_checked or not isinstance(model, nn.Module):
            return
        self._first_step_checked = True
        counts = lora_call_counts(model)
        # Nothing counted at all: a compiled model (its calls are not counted) or no patched layer (already warned).
        if counts.fused == 0 and counts.peft > 0:
            reasons = ", ".join(f"{reason} ({calls} calls)" for reason, calls in counts.fallbacks.items())
            message = (
                f"no LoRA call of the first training step took qlora_kernels' fused path: all {counts.peft} ran "
                f"peft's forward ({reasons})"
            )
            if self.strict:
                raise RuntimeError(message)
            warnings.warn(message, stacklevel=2)
        else:
            logger.info("first step: %d LoRA calls fused, %d on peft's forward", counts.fused, counts.peft)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None, **kwargs: Any):
        if isinstance(model, nn.Module):
            counts = lora_call_counts(model)
            logger.info(
                "training: %d patched LoRA layers, %d calls fused, %d on peft's forward %s",
                counts.layers, counts.fused, counts.peft, counts.fallbacks or "",
            )
