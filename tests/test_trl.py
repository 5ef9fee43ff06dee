"""TRL 1.16's SFTTrainer with qlora-kernels: the trainer adds the LoRA adapters itself (peft_config), so the patch is
applied by QLoRAKernelsCallback when training begins; it trains on the fused path and matches stock SFTTrainer."""

from __future__ import annotations

import warnings

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.integrations import peft as qk_peft

from test_peft import LLAMA, NUM_LORA, TARGETS, build, checkpoint, load_in_4bit  # noqa: F401  (checkpoint: fixture)

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")
from peft import LoraConfig  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from qlora_kernels.integrations.trainer import QLoRAKernelsCallback  # noqa: E402

STEPS = 2


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny Llama's vocabulary, built in memory (no download)."""
    vocab = {f"t{i}": i for i in range(LLAMA["vocab_size"])}
    model = tokenizers.models.WordLevel(vocab, unk_token="t0")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(model), pad_token="t1", eos_token="t2")


def sft_trainer(model, tmp_path, peft_config=None, callbacks=None, bf16=False):
    rows = torch.randint(3, LLAMA["vocab_size"], (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        bf16=bf16,  # True: accelerate's bf16 autocast around the forward
    )
    torch.manual_seed(0)  # LoRA A's initialisation, drawn when SFTTrainer applies peft_config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes from transformers and TRL
        return trl.SFTTrainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": rows}),
            processing_class=tiny_tokenizer(), peft_config=peft_config, callbacks=callbacks,
        )


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("bf16", [False, True])
def test_sft_trainer_with_peft_config_trains_fused_through_the_callback(checkpoint, tmp_path, bf16):
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    base = load_in_4bit(checkpoint)
    # The mistake the issue saw: patching before the trainer adds the adapters patches nothing, loudly.
    with pytest.warns(UserWarning, match="no peft LoRA layer.*SFTTrainer.*QLoRAKernelsCallback"):
        qk.patch_peft_model(base)
    callback = QLoRAKernelsCallback()
    ours = sft_trainer(base, tmp_path / "ours", LoraConfig(**lora), callbacks=[callback], bf16=bf16)
    ours.train()
    stock = sft_trainer(load_in_4bit(checkpoint), tmp_path / "stock", LoraConfig(**lora), bf16=bf16)
    stock.train()
    assert callback.patched == NUM_LORA
    counts = qk_peft.lora_call_counts(ours.model)
    # SFTConfig turns on gradient checkpointing: every LoRA layer runs twice per step.
    assert (counts.fused, counts.peft) == (STEPS * NUM_LORA * 2, 0), counts
    # TRL keeps the adapters in bf16 for a quantized model; stock peft runs the LoRA product in bf16 there, the fused
    # path in the float32 compute dtype, so the losses agree to bf16 rounding.
    assert len(losses(ours)) == len(losses(stock)) == STEPS
    torch.testing.assert_close(torch.tensor(losses(ours)), torch.tensor(losses(stock)), rtol=1e-2, atol=0)
    trained = [p for n, p in ours.model.named_parameters() if "lora_B" in n]
    assert len(trained) == NUM_LORA and all(p.abs().sum() > 0 for p in trained)  # B starts at zero


def test_strict_callback_refuses_a_model_the_kernels_would_not_run(checkpoint, tmp_path):
    dora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=True)
    trainer = sft_trainer(load_in_4bit(checkpoint), tmp_path, dora, callbacks=[QLoRAKernelsCallback(strict=True)])
    with pytest.raises(ValueError, match="adapter 'default' is DoRA.*strict=True"):
        trainer.train()
    with pytest.raises(TypeError, match="strict must be a bool"):
        QLoRAKernelsCallback(strict=1)


def test_first_step_check_warns_when_no_call_was_fused(checkpoint):
    model = build(checkpoint, "bnb")
    for strict, expectation in [(False, pytest.warns(UserWarning)), (True, pytest.raises(RuntimeError))]:
        callback = QLoRAKernelsCallback(strict=strict)
        callback.on_train_begin(None, None, None, model=model)
        with model.disable_adapter():  # e.g. a reference-model pass of a preference trainer
            model(input_ids=torch.zeros(1, 4, dtype=torch.long))
        with expectation as caught:
            callback.on_step_end(None, None, None, model=model)
        assert f"all {NUM_LORA} ran peft's forward (adapters disabled" in str(
            caught.value if strict else caught[0].message
        )
        callback.on_step_end(None, None, None, model=model)  # checked once per training run
