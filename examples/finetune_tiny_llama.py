"""QLoRA fine-tuning of a small Llama with qlora-kernels: the usual peft + bitsandbytes script plus one line.

    python examples/finetune_tiny_llama.py                 # CPU defaults: a few minutes at most on 2 cores
    python examples/finetune_tiny_llama.py --smoke         # a few steps (what the tests run)
    python examples/finetune_tiny_llama.py --hidden 1024 --layers 8 --seq-len 512 --batch-size 16 --steps 500  # GPU

What it does:
1. builds a Llama from a config (random init: no download), saves it, and loads it back the way a QLoRA user loads a
   real model: transformers' 4-bit loader, NF4 with double quantization (bitsandbytes);
2. adds peft LoRA adapters to every linear layer of the decoder;
3. times training steps with and without the patch, alternating, then puts the adapters back as they were;
4. calls ``qk.patch_peft_model(model)`` and trains on a public-domain text shipped in examples/data/ (bytes as
   tokens, so no tokenizer download), with a progress bar;
5. prints the loss falling, held-out loss before and after, steps/s with and without the patch; saves the adapter,
   an ordinary peft adapter that stock peft loads, in --out (default: ~/.cache/qlora-kernels/tiny_llama_qlora_adapter,
   never the current directory), with the random-init base it was trained on in --out/base_model, which the
   adapter's base_model_name_or_path names:

       base = AutoModelForCausalLM.from_pretrained(OUT / "base_model", quantization_config=BitsAndBytesConfig(...))
       model = PeftModel.from_pretrained(base, OUT)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "data" / "devils_dictionary.txt"
VOCAB = 256  # byte-level "tokenizer": every byte is a token
# Outside the repository and the current directory, and kept: the user's cache folder.
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
DEFAULT_OUT = CACHE / "qlora-kernels" / "tiny_llama_qlora_adapter"


def add_training_arguments(p: argparse.ArgumentParser, batch_help: str) -> None:
    """The model, data and training options this example shares with examples/fsdp_qlora.py."""
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a UTF-8/ASCII text file (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help=batch_help)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256, help="hidden size (a multiple of 64)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha (scale = alpha / r)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches for the before/after loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a tiny model and a few steps, to check that it all runs")


def check_training_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Apply --smoke's tiny settings and refuse sizes the model cannot take."""
    if args.smoke:
        args.steps, args.batch_size, args.seq_len = 4, 2, 32
        args.hidden, args.layers, args.heads, args.rank, args.eval_batches = 64, 2, 2, 4, 1
    if args.hidden % 64 or args.hidden % args.heads:
        p.error("--hidden must be a multiple of 64 and of --heads")
    if min(args.steps, args.batch_size, args.seq_len, args.layers, args.rank, args.eval_batches) < 1:
        p.error("--steps, --batch-size, --seq-len, --layers, --rank and --eval-batches must be >= 1")
    return args


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_training_arguments(p, batch_help="sequences per step")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="where the adapter is saved, its base model in OUT/base_model (default: %(default)s)")
    p.add_argument("--compare-steps", type=int, default=10,
                   help="steps timed with and without the patch, alternating (0: skip; default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, …")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    args = check_training_arguments(p, p.parse_args(argv))
    if args.smoke:
        args.compare_steps = 2
    return args


# ------------------------------------------------------------------------------------------------------ data


def load_bytes(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The text as byte tokens, split 95% / 5% into training and held-out parts."""
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
    split = int(len(data) * 0.95)
    return data[:split], data[split:]


def sample_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)
    return torch.stack([data[s : s + seq_len] for s in starts.tolist()])


# ----------------------------------------------------------------------------------------------------- model


def build_qlora_model(args, device: torch.device, dtype: torch.dtype, base_dir: Optional[Path] = None):
    """A random-init Llama, loaded back in 4-bit NF4 as a QLoRA user loads a real one, with peft LoRA adapters.

    The random-init checkpoint is written to ``base_dir`` and kept there (the adapter saved later names it as its base
    model), or to a temporary directory, deleted once loaded, when ``base_dir`` is None.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the shard writing/loading bars of a throwaway checkpoint

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,  # a multiple of 64 as well
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq_len, 64),
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes about loading a quantized model on CPU
        checkpoint = Path(scratch) if base_dir is None else base_dir.resolve()
        LlamaForCausalLM(config).save_pretrained(checkpoint)
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = LlamaForCausalLM.from_pretrained(
            checkpoint, quantization_config=quantization, dtype=dtype, device_map={"": device}
        )
    if base_dir is None:
        model.name_or_path = model.config._name_or_path = ""  # record no path that is about to be deleted
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, lora)
    return model.train()


# -------------------------------------------------------------------------------------------------- training


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, ids: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """One optimizer step; returns (loss, seconds)."""
    synchronize(device)
    started = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    synchronize(device)
    return value, time.perf_counter() - started


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def compare_speed(model, optimizer, data, args, device, patch, unpatch) -> tuple[float, float]:
    """Steps/s of stock peft and of the patched model, alternating one step of each so that both see the same machine
    load (other work on a small CPU swings timings a lot); the median step time of each, after one warm-up pair."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    times: dict[bool, list[float]] = {False: [], True: []}
    for step in range(args.compare_steps + 1):
        for patched in (False, True):
            patch() if patched else unpatch()
            ids = sample_batch(data, args.batch_size, args.seq_len, generator).to(device)
            _, seconds = train_step(model, optimizer, ids, device)
            if step > 0:
                times[patched].append(seconds)
    return 1 / median(times[False]), 1 / median(times[True])


def train(model, optimizer, data, args, device, progress: bool) -> tuple[list[float], float]:
    """The fine-tuning run with a progress bar; returns the losses and steps/s (median step time)."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(args.seed + 2)
    losses: list[float] = []
    times: list[float] = []
    bar = tqdm(range(args.steps), desc="fine-tuning", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        ids = sample_batch(data, args.batch_size, args.seq_len, generator).to(device)
        loss, seconds = train_step(model, optimizer, ids, device)
        losses.append(loss)
        times.append(seconds)
        bar.set_postfix(loss=f"{loss:.3f}")
        if progress and (step + 1) % max(1, args.steps // 10) == 0:
            bar.write(f"  step {step + 1:4d}  loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    return losses, 1 / median(times[1:] or times)


@torch.no_grad()
def held_out_loss(model, data, args, device) -> float:
    generator = torch.Generator().manual_seed(1234)  # the same batches before and after training
    total = 0.0
    for _ in range(args.eval_batches):
        ids = sample_batch(data, args.batch_size, args.seq_len, generator).to(device)
        total += model(input_ids=ids, labels=ids).loss.item()
    return total / args.eval_batches


def main(argv=None) -> int:
    args = parse_args(argv)
    import qlora_kernels as qk
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    train_data, held_out = load_bytes(args.data)
    model = build_qlora_model(args, device, dtype, base_dir=args.out / "base_model")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"tiny Llama: {args.layers} layers, hidden {args.hidden}, NF4 base (bitsandbytes), LoRA r={args.rank} "
        f"on {device} in {str(dtype).removeprefix('torch.')}; {trainable / 1e6:.2f} M trainable parameters; "
        f"text: {args.data.name} ({len(train_data) + len(held_out):,} bytes)"
    )
    progress = not args.smoke
    def new_optimizer():
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)

    # 1. Speed with and without the patch, on a copy of the fresh adapters that is put back afterwards.
    stock_rate = patched_rate = float("nan")
    if args.compare_steps > 0:
        fresh = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # patching twice is harmless, and says nothing new
            stock_rate, patched_rate = compare_speed(
                model, new_optimizer(), train_data, args, device,
                patch=lambda: qk.patch_peft_model(model), unpatch=lambda: qk.unpatch_peft_model(model),
            )
        set_peft_model_state_dict(model, fresh)
        qk.unpatch_peft_model(model)

    # 2. The one line.
    model = qk.patch_peft_model(model)
    print(f"patch_peft_model: {model.qlora_kernels_patched} LoRA layers now run qlora_kernels' fused NF4 + LoRA path")

    before = held_out_loss(model, held_out, args, device)
    losses, training_rate = train(model, new_optimizer(), train_data, args, device, progress)
    after = held_out_loss(model, held_out, args, device)

    window = max(1, min(10, len(losses) // 4))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"training loss: {first:.3f} (first {window} steps) -> {last:.3f} (last {window} steps)")
    print(f"held-out loss: {before:.3f} -> {after:.3f}   (uniform over bytes: {math.log(VOCAB):.3f})")
    print(
        f"steps/s (batch {args.batch_size} x {args.seq_len} tokens): stock peft {stock_rate:.2f}, "
        f"patched {patched_rate:.2f} (x{patched_rate / stock_rate:.2f}, alternating steps); "
        f"fine-tuning run {training_rate:.2f}"
    )
    model.save_pretrained(args.out)
    print(f"adapter saved to {args.out}, its base model to {args.out / 'base_model'} "
          "(load them with transformers' from_pretrained and peft's PeftModel.from_pretrained)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
