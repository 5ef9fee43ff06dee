"""One training step of a Llama-style model: stock transformers + peft + bitsandbytes against the same model after
``qk.patch_peft_model`` (and back: the patch is undone for the stock measurement), with peak memory.

The model is the one examples/finetune_tiny_llama.py builds (random init, loaded back 4-bit NF4 by transformers,
peft LoRA on every linear layer), so the benchmark measures what that example's users run. The optimizer is AdamW
with lr = 0: a real step's cost, parameters that stay put, so both impls see the same model and the gate can
compare their losses on the same batch.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Optional

import torch

from bench.harness import Case
from bench.suites.linear import installed

_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_tiny_llama.py"
REL_TOL = 2e-2


def _example():
    spec = importlib.util.spec_from_file_location("finetune_tiny_llama", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _settings(device: torch.device, plan: str) -> argparse.Namespace:
    """The model and batch of a plan: on a CPU the example's own model (what `python examples/finetune_tiny_llama.py`
    trains) at batch 4, its --smoke sizes for the quick plan, an 8-layer 2048-wide model at sequence 2048 on a GPU."""
    example = _example()
    if plan == "quick":
        args = example.parse_args(["--smoke"])
    elif device.type == "cpu":
        # The example's model and sequence at half its batch (4 × 128 tokens), so that a step, its gate, its warm-up
        # and three timed runs fit one case's cap on a shared 2-core machine.
        args = example.parse_args(["--batch-size", "4"])
    else:
        args = example.parse_args(["--hidden", "2048", "--layers", "8", "--heads", "16", "--seq-len", "2048",
                                   "--batch-size", "1"])
    args.dropout = 0.0
    return args


def planned_peak_mb(args: argparse.Namespace, dtype: torch.dtype, impl: str) -> tuple[Optional[float], dict]:
    """The memory planner's prediction (``qk.plan``) of this train step's peak in MiB (base weights, LoRA weights,
    gradients, AdamW state, activations: the whole step) and its breakdown; (None, why) when the planner is missing
    or refuses the configuration."""
    try:
        import qlora_kernels as qk

        plan_fn = getattr(qk, "plan", None)
        if not callable(plan_fn):
            return None, {"planner": "qk.plan is not available"}
        config = {
            "vocab_size": _example().VOCAB, "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden,
            "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.heads,
            "tie_word_embeddings": False,
        }
        result = plan_fn(config, method="qlora", r=args.rank, targets="all-linear", batch=args.batch_size,
                         seq=args.seq_len, checkpointing=False, optimizer="adamw",
                         dtype=str(dtype).removeprefix("torch."), lora_dtype="float32",
                         lora_impl="qlora_kernels" if impl == "qlora_kernels" else "peft")
        breakdown = result.to_dict().get("breakdown", {}) if hasattr(result, "to_dict") else {}
        return result.total_bytes / 2**20, {"planner_breakdown_bytes": breakdown}
    except Exception as exc:  # noqa: BLE001 - the planner is optional; say why it gave nothing
        return None, {"planner": f"unavailable: {type(exc).__name__}: {exc}"[:300]}


def cases(device: torch.device, plan: str) -> list[Case]:
    if not installed("bitsandbytes", "peft", "transformers"):  # the comparison needs the whole stock stack
        return []
    import qlora_kernels as qk

    if plan == "tiny":
        return []  # building a model takes longer than the whole tiny plan
    args = _settings(device, plan)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    state = {}

    def model():
        if "model" not in state:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                state["allocated_before_model"] = torch.cuda.memory_allocated(device)
            example = _example()
            state["model"] = example.build_qlora_model(args, device, dtype)
            params = [p for p in state["model"].parameters() if p.requires_grad]
            state["optimizer"] = torch.optim.AdamW(params, lr=0.0)
            gen = torch.Generator().manual_seed(0)
            state["ids"] = torch.randint(0, example.VOCAB, (args.batch_size, args.seq_len), generator=gen).to(device)
        return state["model"]

    def make(impl, notes):
        def build():
            m = model()
            if "allocated_before_model" in state:  # the harness measures the peak from here (the planner's total)
                notes["peak_baseline_bytes"] = state["allocated_before_model"]
            if impl == "qlora_kernels":
                qk.patch_peft_model(m)
            else:
                qk.unpatch_peft_model(m)
            opt, ids = state["optimizer"], state["ids"]

            def step():
                loss = m(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()

            return step

        return build

    def check(loss):
        value = loss.float().item()
        ref = state.setdefault("reference_loss", value)  # the first impl measured sets it (stock runs first)
        err = abs(value - ref) / max(abs(ref), 1e-12)
        return None if err <= REL_TOL else f"loss {value:.5f} vs stock {ref:.5f} (relative {err:.2e} > {REL_TOL})"

    tokens = args.batch_size * args.seq_len
    n_linear = args.layers * 7
    est = 25.0 if device.type == "cpu" else 20.0
    common = dict(M=tokens, N=args.hidden, K=args.hidden, r=args.rank, dtype=str(dtype).removeprefix("torch."),
                  bytes=0, flops=0, case=f"llama {args.layers}x{args.hidden} seq {args.seq_len} ({n_linear} LoRA layers)",
                  est_s=est, min_runs=3,  # a step is long: 3 timed runs after the gate and the warm-up
                  cap_s=120.0 if device.type == "cpu" else None)  # the first case also builds the model
    out = []
    for impl in ("bnb_peft", "qlora_kernels"):
        planned, notes = planned_peak_mb(args, dtype, impl)
        notes["peak"] = "whole step: allocated at the step's peak minus what was allocated before the model was built"
        out.append(Case("train_step", impl, make(impl, notes), check, planned_mem_mb=planned, notes=notes, **common))
    return out
