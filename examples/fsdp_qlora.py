"""QLoRA fine-tuning of the tiny Llama on several processes with FSDP2 (torch's fully_shard) and qlora-kernels.

    torchrun --nproc_per_node=2 examples/fsdp_qlora.py              # CPU: gloo, float32
    torchrun --nproc_per_node=2 examples/fsdp_qlora.py --smoke      # a few steps (what the tests run)
    torchrun --nproc_per_node=8 examples/fsdp_qlora.py --hidden 1024 --layers 8 --seq-len 512 --steps 500  # GPUs: nccl

The model is the one of examples/finetune_tiny_llama.py (a random-init Llama loaded back 4-bit NF4 by transformers and
bitsandbytes, peft LoRA on every linear of the decoder), patched onto the fused kernels, then sharded with
``qk.distributed.fully_shard_qlora``: LoRA weights, their gradients and AdamW's state are sharded across the ranks,
the 4-bit base stays whole on every rank. On GPUs the LoRA math runs in bf16 with float32 master weights
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)``), which never touches the 4-bit storage. Each rank
trains on its own batches (global batch = --batch-size x ranks); rank 0 prints the loss averaged over ranks and saves
the adapter, an ordinary peft adapter.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the single-GPU example's model builder and data helpers

from finetune_tiny_llama import (  # noqa: E402
    VOCAB,
    add_training_arguments,
    build_qlora_model,
    check_training_arguments,
    held_out_loss,  # the same batches before and after training, on every rank (a fixed generator seed)
    load_bytes,
    sample_batch,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_training_arguments(p, batch_help="sequences per rank and step")
    p.add_argument("--out", type=Path, default=Path("tiny_llama_fsdp_adapter"), help="where rank 0 saves the adapter")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bf16"],
                   help="auto: bf16 mixed precision on GPUs, float32 on CPUs")
    return check_training_arguments(p, p.parse_args(argv))


def local_device() -> torch.device:
    """This process's device as torchrun describes it: its own GPU (LOCAL_RANK), or the CPU."""
    if "RANK" not in os.environ:
        raise SystemExit("run me under torchrun: torchrun --nproc_per_node=2 examples/fsdp_qlora.py")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment: nccl on GPUs, gloo on CPUs."""
    import torch.distributed as dist

    # A bounded timeout: if one rank dies, the others fail instead of waiting forever in a collective.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=5))
    return dist.get_rank(), dist.get_world_size()


def mean_over_ranks(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)  # SUM: gloo has no AVG
    return total.item() / dist.get_world_size()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import qlora_kernels as qk

    device = local_device()
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    train_data, held_out = load_bytes(args.data)
    # Every rank builds the same model (same seed, same 4-bit bytes): the base is replicated, never sent around. Built
    # before joining the process group because the builder writes a throwaway checkpoint and reads it back, and once
    # torch.distributed is initialized transformers' save_pretrained writes on rank 0 only. (A real model is only
    # read, on every rank, so it may equally be loaded after.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_qlora_model(args, device, dtype)
    rank, world_size = init_distributed(device)
    is_main = rank == 0
    switched = qk.patch_peft_model(model)
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    qk.distributed.fully_shard_qlora(model, mp_policy=mp_policy)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    if is_main:
        count = sum(p.numel() for p in trainable)  # DTensors report their global size
        print(
            f"tiny Llama: {args.layers} layers, hidden {args.hidden}, NF4 base (bitsandbytes), LoRA r={args.rank}; "
            f"{switched} LoRA layers on the fused path; FSDP2 over {world_size} ranks ({dist.get_backend()}, "
            f"{device.type}, {'bf16 mixed precision' if bf16 else 'float32'}); {count / 1e6:.2f} M trainable "
            f"parameters, sharded; global batch {args.batch_size * world_size} x {args.seq_len} tokens",
            flush=True,
        )

    before = held_out_loss(model, held_out, args, device)
    generator = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own batches
    losses: list[float] = []
    report_every = max(1, args.steps // 10)
    for step in range(args.steps):
        ids = sample_batch(train_data, args.batch_size, args.seq_len, generator).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(loss.item(), device))
        if is_main and ((step + 1) % report_every == 0 or step == 0):
            print(f"  step {step + 1:4d}  loss {losses[-1]:.3f}", flush=True)
    after = held_out_loss(model, held_out, args, device)

    # The adapter: trainable tensors only, gathered whole onto rank 0's CPU (a collective: every rank calls it).
    adapter = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    )
    if is_main:
        window = max(1, min(10, len(losses) // 4))
        first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
        print(f"training loss: {first:.3f} (first {window} steps) -> {last:.3f} (last {window} steps)")
        print(f"held-out loss: {before:.3f} -> {after:.3f}   (uniform over bytes: {math.log(VOCAB):.3f})")
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out, state_dict=adapter)
        print(f"adapter saved to {args.out} (load it with peft's PeftModel.from_pretrained)")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
