"""transformers' Trainer with these optimizers: the optimizer names Trainer knows for bitsandbytes, served by ours.

transformers 5.x validates ``TrainingArguments(optim=...)`` against its own list of names, so a new name cannot be
added; what Trainer does offer is ``optimizer_cls_and_kwargs``, with which it still builds its two parameter groups
(weight decay ``args.weight_decay`` for weights, 0 for biases and norms) and its learning-rate schedule::

    args = TrainingArguments(..., optim="paged_adamw_8bit", weight_decay=0.01, learning_rate=2e-4)
    trainer = Trainer(model=model, args=args, ...,
                      optimizer_cls_and_kwargs=qk.optim.trainer_optimizer_cls_and_kwargs(args))

:func:`register_with_transformers` instead makes the bitsandbytes names themselves (``optim="paged_adamw_8bit"``
and the others in :data:`TRAINER_OPTIMIZERS`) build ours, for every Trainer in the process; it patches a private
table of transformers (checked to exist, refused otherwise), so prefer the one-liner above where you can.
"""

from __future__ import annotations

from typing import Any, Optional

from .adamw import PagedAdamW, PagedAdamW8bit
from .lion import PagedLion, PagedLion8bit

# TrainingArguments.optim name → (our class, paged). The names are transformers' bitsandbytes ones, same algorithm
# and state width.
TRAINER_OPTIMIZERS: dict[str, tuple[type, bool]] = {
    "paged_adamw_8bit": (PagedAdamW8bit, True),
    "paged_adamw_32bit": (PagedAdamW, True),
    "paged_lion_8bit": (PagedLion8bit, True),
    "paged_lion_32bit": (PagedLion, True),
    "adamw_8bit": (PagedAdamW8bit, False),
    "adamw_bnb_8bit": (PagedAdamW8bit, False),
    "lion_8bit": (PagedLion8bit, False),
    "lion_32bit": (PagedLion, False),
}

# TrainingArguments.optim_args ("key=value,...") keys passed on, with their types.
_OPTIM_ARGS = {"min_8bit_size": int, "page_threshold": int}


def _optim_name(optim: Any) -> str:
    return str(getattr(optim, "value", optim))  # transformers stores an OptimizerNames enum


def trainer_optimizer_cls_and_kwargs(args: Any, optim: Optional[str] = None) -> tuple[type, dict[str, Any]]:
    """``(optimizer class, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` from ``TrainingArguments``.

    ``optim`` (default: ``args.optim``) is one of :data:`TRAINER_OPTIMIZERS`. The kwargs carry ``args``'
    learning rate, betas (``adam_beta1``, ``adam_beta2``), epsilon (AdamW) and weight decay, and ``is_paged``;
    ``args.optim_args`` may set ``min_8bit_size`` and ``page_threshold``. Trainer's own param groups then override
    the weight decay per group (0 for biases and norms), as for its built-in optimizers.
    """
    name = _optim_name(args.optim if optim is None else optim)
    if name not in TRAINER_OPTIMIZERS:
        raise ValueError(
            f"optim={name!r} has no qlora_kernels optimizer; use one of {sorted(TRAINER_OPTIMIZERS)} "
            "(in TrainingArguments(optim=...) or as the optim argument)"
        )
    optimizer_class, is_paged = TRAINER_OPTIMIZERS[name]
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "weight_decay": args.weight_decay,
        "is_paged": is_paged,
    }
    if optimizer_class.algorithm == "adamw":
        kwargs["eps"] = args.adam_epsilon
    optim_args = getattr(args, "optim_args", None)
    if optim_args:
        for item in str(optim_args).replace(" ", "").split(","):
            key, _, value = item.partition("=")
            if key not in _OPTIM_ARGS or not value:
                raise ValueError(
                    f"optim_args entry {item!r} is not understood; qlora_kernels optimizers take "
                    f"{sorted(_OPTIM_ARGS)} as key=value"
                )
            kwargs[key] = _OPTIM_ARGS[key](value)
    return optimizer_class, kwargs


def register_with_transformers() -> list[str]:
    """Make ``TrainingArguments(optim=<name>)`` build the qlora_kernels optimizer for each name of
    :data:`TRAINER_OPTIMIZERS`, in this process; returns the names. Refused (RuntimeError) when this transformers
    has no handler table to extend (use :func:`trainer_optimizer_cls_and_kwargs` then)."""
    try:
        from transformers import trainer_optimizer
        from transformers.training_args import OptimizerNames
    except ImportError as exc:
        raise RuntimeError(f"register_with_transformers needs transformers >= 5 ({exc})") from exc
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(handlers, dict):
        raise RuntimeError(
            "this transformers has no optimizer handler table; pass "
            "optimizer_cls_and_kwargs=qk.optim.trainer_optimizer_cls_and_kwargs(args) to Trainer instead"
        )

    def handler(context: Any) -> tuple[type, dict[str, Any]]:
        return trainer_optimizer_cls_and_kwargs(context.args)

    for name in TRAINER_OPTIMIZERS:
        handlers[OptimizerNames(name)] = handler
    return list(TRAINER_OPTIMIZERS)
