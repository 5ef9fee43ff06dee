"""transformers' Trainer with qlora_kernels' optimizers (issue 16): a real tiny Trainer run on CPU.

Trainer builds its own two param groups (``args.weight_decay`` for weights, 0 for biases and LayerNorm) and its
learning-rate schedule around whatever optimizer class it is given; these tests check that ours gets exactly those
groups and that a run with it lands where Trainer's own bitsandbytes run with the same name lands.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import qlora_kernels as qk

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

FEATURES = 24


class TinyRegressor(nn.Module):
    """Weights (decayed by Trainer), biases and a LayerNorm (not decayed), a loss from forward, as Trainer wants."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(FEATURES, FEATURES)
        self.norm = nn.LayerNorm(FEATURES)
        self.head = nn.Linear(FEATURES, 1)
        self.frozen = nn.Parameter(torch.ones(3, dtype=torch.float64), requires_grad=False)  # never handed over

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        prediction = self.head(torch.relu(self.norm(self.hidden(x)))).squeeze(-1)
        return {"loss": nn.functional.mse_loss(prediction, y)}


def dataset(n: int = 64) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, FEATURES, generator=generator)
    y = x[:, :3].sum(dim=1)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def training_args(tmp_path, optim: str, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path), optim=optim, learning_rate=3e-2, weight_decay=0.3, max_steps=8,
        per_device_train_batch_size=8, lr_scheduler_type="linear", warmup_steps=2, use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=1, dataloader_num_workers=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def train(model, args, **trainer_kwargs) -> Trainer:
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: paged optimizers are not supported on CPU
        trainer.train()
    return trainer


def distance(model, other) -> float:
    return max((p - q).abs().max().item() for p, q in zip(model.parameters(), other.parameters()))


@pytest.mark.parametrize("optim", ["paged_adamw_8bit", "paged_lion_32bit"])
def test_trainer_with_our_optimizer_matches_trainer_with_bitsandbytes(tmp_path, optim):
    """Same name, same model, same data: the run with ours ends where Trainer's bitsandbytes run ends (all tensors
    are under 4096 elements, so both keep float32 state and agree to rounding), and Trainer's groups reached ours."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = TinyRegressor()
    start = copy.deepcopy(model)
    theirs = copy.deepcopy(model)
    args = training_args(tmp_path, optim)
    ours = train(model, args, optimizer_cls_and_kwargs=qk.optim.trainer_optimizer_cls_and_kwargs(args))
    train(theirs, args)

    optimizer = ours.optimizer.optimizer if hasattr(ours.optimizer, "optimizer") else ours.optimizer
    assert type(optimizer) is qk.optim.TRAINER_OPTIMIZERS[optim][0]
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.3 and not_decayed["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model.hidden.weight), id(model.head.weight)}
    assert len(not_decayed["params"]) == 4  # two biases, the LayerNorm's weight and bias
    assert decayed["lr"] == pytest.approx(0.0)  # the linear schedule reached the end: Trainer drives our lr

    moved = distance(theirs, start)
    assert moved > 1e-2
    assert distance(model, theirs) < 1e-5, distance(model, theirs)  # measured: 6e-8 (AdamW), 0 (Lion)
    # The weight decay mattered: without it the same run ends measurably elsewhere (measured: 1e-2, 5e-2).
    no_decay = copy.deepcopy(start)
    args_without = training_args(tmp_path, optim, weight_decay=0.0)
    train(no_decay, args_without, optimizer_cls_and_kwargs=qk.optim.trainer_optimizer_cls_and_kwargs(args_without))
    assert distance(no_decay, model) > 1e-3


def test_register_with_transformers_serves_the_names(tmp_path):
    from transformers import trainer_optimizer

    saved = dict(trainer_optimizer._OPTIMIZER_HANDLERS)
    try:
        names = qk.optim.register_with_transformers()
        assert "paged_adamw_8bit" in names
        model = TinyRegressor()
        trainer = train(model, training_args(tmp_path, "paged_adamw_8bit", max_steps=2))
        assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer) \
            is qk.optim.PagedAdamW8bit
    finally:
        trainer_optimizer._OPTIMIZER_HANDLERS.clear()
        trainer_optimizer._OPTIMIZER_HANDLERS.update(saved)


def test_trainer_kwargs_carry_the_arguments_and_refuse_unknown_names(tmp_path):
    args = training_args(tmp_path, "paged_lion_8bit", adam_beta1=0.8, adam_beta2=0.95,
                         optim_args="min_8bit_size=100,page_threshold=5")
    cls, kwargs = qk.optim.trainer_optimizer_cls_and_kwargs(args)
    assert cls is qk.optim.PagedLion8bit
    assert kwargs == dict(lr=3e-2, betas=(0.8, 0.95), weight_decay=0.3, is_paged=True, min_8bit_size=100,
                          page_threshold=5)
    cls, kwargs = qk.optim.trainer_optimizer_cls_and_kwargs(args, optim="adamw_8bit")
    assert cls is qk.optim.PagedAdamW8bit and kwargs["is_paged"] is False and kwargs["eps"] == args.adam_epsilon
    with pytest.raises(ValueError, match="adamw_torch"):
        qk.optim.trainer_optimizer_cls_and_kwargs(training_args(tmp_path, "adamw_torch"))
    with pytest.raises(ValueError, match="optim_args"):
        qk.optim.trainer_optimizer_cls_and_kwargs(training_args(tmp_path, "paged_adamw_8bit", optim_args="foo=1"))
