"""QLoRA fine-tuning of the tiny Llama on several processes with FSDP2 (torch's fully_shard) and qlora-kernels.

    torchrun --nproc_per_node=2 examples/fsdp_qlora.py              # CPU: gloo, float32
    torchrun --nproc_per_node=2 examples/fsdp_qlora.py --smoke      # a few steps (what the tests run)
    torchrun --nproc_per_node=8 examples/fsdp_qlora.py --hidden 1024 --layers 8 --seq-len 512 --steps 500  # GPUs: nccl
    python examples/fsdp_qlora.py --plan                            # per-GPU memory estimate, Llama-3-70B, 2/4/8 ranks

The model is the one of examples/finetune_tiny_llama.py (a random-init Llama loaded back 4-bit NF4 by transformers and
bitsandbytes, peft LoRA on every linear of the decoder), patched onto the fused kernels, then sharded with
``qk.distributed.fully_shard_qlora``: LoRA weights, their gradients, AdamW's state and the 4-bit base itself are
sharded across the ranks (each layer's base all-gathered around its forward and backward; ``--replicated-base`` keeps
it whole on every rank instead). On GPUs the LoRA math runs in bf16 with float32 master weights
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
    p.add_argument("--replicated-base", action="store_true", help="keep the 4-bit base whole on every rank")
    p.add_argument("--plan", action="store_true",
                   help="print the per-rank memory estimate for Llama-3-70B on 2, 4 and 8 ranks and exit (no torchrun)")
    return check_training_arguments(p, p.parse_args(argv))


# ------------------------------------------------------------------------------------------------- --plan

LLAMA3_70B = dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256)
PLAN_ASSUMPTIONS = dict(lora_r=16, micro_batch=1, seq_len=2048, blocksize=64)


def llama_linear_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> list[tuple[int, int]]:
    """[N, K] of the seven projections of one Llama decoder layer (q, k, v, o, gate, up, down)."""
    kv = hidden // heads * kv_heads
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
            (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]


def plan_per_rank(world_size: int, shapes: dict = LLAMA3_70B, assumptions: dict = PLAN_ASSUMPTIONS) -> dict[str, int]:
    """Bytes per rank of QLoRA training under fully_shard_qlora (base sharded), by item, from the model's shapes.

    The NF4 sizes use the same split as the sharded base (qlora_kernels.sharding): each packed tensor and absmax cut
    into ceil(n / world) pieces, the largest piece counted. Activations are an assumption (see PLAN_NOTES)."""
    from qlora_kernels.sharding import chunk_range, nf4_storage_bytes

    h, layers, vocab, r = shapes["hidden"], shapes["layers"], shapes["vocab"], assumptions["lora_r"]
    linears = llama_linear_shapes(h, shapes["intermediate"], shapes["heads"], shapes["kv_heads"])
    shard = replicated = layer_whole = 0
    for n, k in linears:
        parts = nf4_storage_bytes(n * k, assumptions["blocksize"], double_quant=True)
        shard += sum(chunk_range(parts[p], world_size, 0)[2] for p in ("packed", "absmax"))
        replicated += parts["replicated"]
        layer_whole += parts["packed"] + parts["absmax"]
    lora_params = layers * sum(r * (n + k) for n, k in linears)
    frozen_bf16 = 2 * vocab * h * 2 + (2 * layers + 1) * h * 2  # embed_tokens + lm_head, RMSNorm weights
    tokens = assumptions["micro_batch"] * assumptions["seq_len"]
    checkpointed = layers * tokens * h * 2  # one bf16 hidden state per decoder layer (gradient checkpointing)
    one_layer = tokens * (4 * h + 2 * (h // shapes["heads"] * shapes["kv_heads"]) + 3 * shapes["intermediate"]) * 2
    logits = 2 * tokens * vocab * 4  # float32 logits and their gradient
    return {
        "NF4 base, this rank's pieces": layers * shard,
        "NF4 base, replicated statistics": layers * replicated,
        "NF4 base, one layer gathered": layer_whole,
        "frozen bf16 (embeddings, head, norms), sharded": -(-frozen_bf16 // world_size),
        "root unit gathered (embeddings + head)": 2 * vocab * h * 2,
        "LoRA weights fp32, sharded": -(-lora_params * 4 // world_size),
        "LoRA gradients fp32, sharded": -(-lora_params * 4 // world_size),
        "AdamW state (2 x fp32), sharded": -(-lora_params * 8 // world_size),
        "activations (assumed, see notes)": checkpointed + one_layer + logits,
    }


PLAN_NOTES = (
    "Assumptions: Llama-3-70B shapes (hidden 8192, MLP 28672, 80 layers, 64 heads / 8 KV heads, vocab 128256, "
    "untied head); NF4 with double quantization on the 7 projections of every layer, embeddings and head kept bf16; "
    "LoRA r=16 on all 7 projections, fp32 master weights, torch AdamW; fully_shard_qlora defaults (one FSDP2 unit "
    "per decoder layer plus the root, which FSDP2 keeps gathered from forward to backward); activations for one "
    "micro-batch of 1 x 2048 tokens with gradient checkpointing per decoder layer: one bf16 hidden state per layer, "
    "one layer's recomputed intermediates, float32 logits and their gradient. Not counted: the CUDA context, the "
    "allocator's fragmentation, communication buffers, and FSDP2's gathered LoRA weights of one layer (a few MB)."
)


def print_plan(world_sizes=(2, 4, 8)) -> None:
    plans = {w: plan_per_rank(w) for w in world_sizes}
    replicated = plan_per_rank(1)["NF4 base, this rank's pieces"]
    items = list(plans[world_sizes[0]])
    width = max(map(len, items)) + 2
    print("Llama-3-70B QLoRA under qk.distributed.fully_shard_qlora: GiB per rank")
    print(" " * width + "".join(f"{f'{w} ranks':>10}" for w in world_sizes))
    for item in items:
        print(f"{item:<{width}}" + "".join(f"{plans[w][item] / 2**30:>10.2f}" for w in world_sizes))
    print(f"{'total':<{width}}" + "".join(f"{sum(plans[w].values()) / 2**30:>10.2f}" for w in world_sizes))
    print(f"(the NF4 base whole, as every rank holds it with --replicated-base: {replicated / 2**30:.2f} GiB)")
    print(PLAN_NOTES)


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
    if args.plan:
        print_plan()
        return 0
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
    patched = qk.patch_peft_model(model)
    switched = patched if isinstance(patched, int) else getattr(model, "qlora_kernels_patched", "?")
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    qk.distributed.fully_shard_qlora(model, mp_policy=mp_policy, shard_base=not args.replicated_base)
    bases = qk.distributed.sharded_bases(model)
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
        if bases is not None:
            print(f"4-bit base: {bases.full_nbytes / 2**20:.2f} MiB whole, {bases.shard_nbytes / 2**20:.2f} MiB on "
                  f"this rank ({len(bases.layers)} layers sharded over {world_size} ranks)", flush=True)
        else:
            print("4-bit base: replicated on every rank", flush=True)

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
    if is_main and bases is not None:
        print(f"4-bit base, peak on rank 0: {bases.peak_resident_nbytes / 2**20:.2f} MiB", flush=True)

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
