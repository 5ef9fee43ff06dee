"""Integrations with other libraries: peft (:mod:`.peft`, imported with qlora_kernels) and transformers' Trainer /
TRL's SFTTrainer (:mod:`.trainer`, imported on first use, since it imports transformers)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "QLoRAKernelsCallback":
        from .trainer import QLoRAKernelsCallback

        return QLoRAKernelsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
