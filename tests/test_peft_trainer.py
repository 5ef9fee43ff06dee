"""A patched peft model trains with transformers.Trainer (tiny Llama, a few steps, CPU)."""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk

from test_peft import NUM_LORA, build, checkpoint, fused_calls  # noqa: F401  (fixtures)

transformers = pytest.importorskip("transformers")


class RepeatedText(torch.utils.data.Dataset):
    """A few fixed sequences: a handful of steps is enough for the loss to fall."""

    def __init__(self, vocab_size: int, count: int = 8, length: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, vocab_size, (count, length), generator=generator)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_trainer_trains_the_patched_model(checkpoint, tmp_path, fused_calls, gradient_checkpointing):  # noqa: F811
    model = build(checkpoint, "bnb")
    assert qk.patch_peft_model(model).qlora_kernels_patched == NUM_LORA
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        activation_checkpointing=gradient_checkpointing,  # the usual QLoRA memory saver: forwards run twice
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RepeatedText(model.config.vocab_size))
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert result.global_step == 6
    calls_per_step = NUM_LORA * (2 if gradient_checkpointing else 1)
    assert len(fused_calls) == 6 * calls_per_step, "Trainer's steps did not (all) take the fused path"
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
