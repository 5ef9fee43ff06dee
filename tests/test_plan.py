"""The memory planner (qk.plan) against measured peak memory of real training steps on the CPU, and its interface.

Peak memory is measured by qlora_kernels.memory_tracker.MemoryTracker (a dispatch-mode byte counter of live tensor
storages): the model's weights and the optimizer state made by a first step are counted, then the peak of a second
full step (forward, loss, backward, optimizer step) is compared with the plan's total.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.memory_tracker import MemoryTracker
from qlora_kernels.plan import GPU_SIZES, PRESETS, TARGET_SETS, main, model_shape, plan

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

TOLERANCE = 0.15  # the bound on |plan - measured| / measured

# Tiny Llama shapes: GQA (2 query heads per KV head), every dimension a multiple of 64 (bitsandbytes' CPU kernels).
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------------ the tracker


def test_tracker_counts_storages_once_and_frees_them():
    with MemoryTracker() as tracker:
        a = torch.empty(1000, dtype=torch.float32)
        view = a.view(10, 100)  # shares a's storage: no new bytes
        b = a.to(torch.float64)
        assert tracker.live_bytes == 4000 + 8000
        del a
        assert tracker.live_bytes == 12000  # the view keeps the storage alive
        del view
        assert tracker.live_bytes == 8000
        del b
        assert tracker.live_bytes == 0
    assert tracker.peak_bytes == 12000


def test_tracker_sees_autograd_saved_tensors_and_existing_tensors():
    weight = torch.randn(64, 64, requires_grad=True)
    with MemoryTracker() as tracker:
        tracker.track([weight])
        x = torch.randn(32, 64)
        y = (x @ weight).exp().sum()  # exp saves its [32, 64] output; mm saves x (already counted)
        assert tracker.live_bytes == 64 * 64 * 4 + 32 * 64 * 4 + 32 * 64 * 4 + 4
        y.backward()
        assert weight.grad is not None
        tracker.reset_peak()
        assert tracker.peak_bytes == tracker.live_bytes
    with pytest.raises(TypeError, match="track"):
        MemoryTracker().track(3)
    with pytest.raises(TypeError, match="device"):
        MemoryTracker(device=0)


# ------------------------------------------------------------------------------------- plan vs measurement


def _swap_qlora_linears(model: nn.Module, r: int, targets, double_quant: bool) -> None:
    """QLoRA by hand: every targeted decoder linear becomes a qk.QLoRALinear; all other weights frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name in targets:
                setattr(parent, name, qk.QLoRALinear.from_linear(child, r=r, lora_alpha=16, double_quant=double_quant))


def _peft_bnb_patched(model: nn.Module, r: int, targets) -> nn.Module:
    """bitsandbytes Linear4bit for every decoder linear (NF4, double quantization), peft LoRA on ``targets``, then
    qk.patch_peft_model: the one-line QLoRA path of the README, without a save/load round trip."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name in TARGET_SETS["all-linear"]:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, quant_type="nf4",
                                          compress_statistics=True, compute_dtype=child.weight.dtype)
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                layer = layer.to("cpu")
                layer.support_avx512bf16_for_cpu = False  # keep bitsandbytes' training layout (see test_peft.py)
                setattr(parent, name, layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets)))
    qk.patch_peft_model(model)
    assert model.qlora_kernels_patched == len(targets) * TINY["num_hidden_layers"]
    return model


def _build(method: str, impl: str, dtype: torch.dtype, r: int, targets, checkpointing: bool) -> nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).to(dtype)
    names = TARGET_SETS[targets] if isinstance(targets, str) else targets
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=list(names)))
    elif method in ("qlora", "qlora_no_dq") and impl == "QLoRALinear":
        _swap_qlora_linears(model, r, names, double_quant=(method == "qlora"))
    elif method == "qlora" and impl == "peft+bnb patched":
        model = _peft_bnb_patched(model, r, names)
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _optimizer(name: str, params):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)  # foreach: torch's default on GPUs
    if name == "paged_adamw_8bit":
        return qk.optim.PagedAdamW8bit(params, lr=1e-3)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    raise AssertionError(name)


def _measure(model: nn.Module, optimizer_name: str, batch: int, seq: int) -> tuple[int, int]:
    """(bytes of weights + optimizer state before the step, peak bytes during one training step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(optimizer_name, params)
    ids = torch.randint(0, TINY["vocab_size"], (batch, seq))

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # makes the optimizer state, which the plan's peak includes
    with MemoryTracker(device="cpu") as tracker:
        tracker.track(model.parameters(), model.buffers(),
                      [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)])
        static = tracker.live_bytes
        tracker.reset_peak()
        step()
    return static, tracker.peak_bytes


CASES = [
    # method, implementation, dtype, r, targets, checkpointing, optimizer, batch, seq
    ("full", "transformers", torch.float32, 0, "all-linear", False, "adamw", 2, 64),
    ("full", "transformers", torch.bfloat16, 0, "all-linear", True, "sgd", 2, 64),
    ("lora", "peft", torch.float32, 8, "all-linear", True, "adamw", 4, 32),
    ("lora", "peft", torch.bfloat16, 4, "qv", False, "adamw", 2, 64),
    ("qlora", "QLoRALinear", torch.float32, 8, "all-linear", True, "paged_adamw_8bit", 2, 64),
    ("qlora", "QLoRALinear", torch.bfloat16, 16, "all-linear", False, "adamw", 2, 32),
    ("qlora_no_dq", "QLoRALinear", torch.float32, 4, "all-linear", False, "sgd", 1, 96),
    ("qlora", "peft+bnb patched", torch.float32, 8, "qv", False, "adamw", 2, 64),
]


def _case_id(case) -> str:
    method, impl, dtype, r, targets, ckpt, opt, batch, seq = case
    return f"{method}-{impl}-{str(dtype)[6:]}-r{r}-{targets}-{'ckpt' if ckpt else 'nockpt'}-{opt}-b{batch}s{seq}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_plan_matches_measured_peak(case):
    method, impl, dtype, r, targets, checkpointing, optimizer, batch, seq = case
    model = _build(method, impl, dtype, r, targets, checkpointing)
    static, peak = _measure(model, optimizer, batch, seq)
    planned = plan(LlamaConfig(**TINY), method=method, r=max(r, 1), targets=targets, batch=batch, seq=seq,
                   checkpointing=checkpointing, optimizer=optimizer, dtype=str(dtype)[6:])
    parts = planned.breakdown
    planned_static = sum(parts[k] for k in ("base weights", "quantization constants", "LoRA weights",
                                            "optimizer state"))
    # Weights, quantization constants, LoRA and optimizer state are counted tensor by tensor: nearly exact.
    # (bitsandbytes keeps a code map per layer where QLoRALinear shares one: 1 KiB a layer.)
    assert planned_static == pytest.approx(static, rel=0.04)
    error = planned.total_bytes / peak - 1
    print(f"{_case_id(case)}: planned {planned.total_bytes} measured {peak} error {100 * error:+.1f}% "
          f"(peak at {planned.peak_phase})")
    assert abs(error) <= TOLERANCE


# ------------------------------------------------------------------------------------------- the interface


@pytest.mark.parametrize("name, published", [
    ("llama-2-7b", 6_738_415_616), ("llama-3-8b", 8_030_261_248), ("mistral-7b", 7_241_732_096),
])
def test_presets_have_the_published_parameter_counts(name, published):
    assert PRESETS[name].parameter_count() == published


def test_plan_call_shape_of_the_benchmark_and_json(tmp_path):
    p = qk.plan(model="llama-2-7b", method="qlora", r=16, targets="all-linear", batch=1, seq=512,
                checkpointing=True, optimizer="paged_adamw_8bit", world_size=1)
    assert isinstance(p.total_bytes, int) and p.total_bytes == sum(p.breakdown.values())
    assert set(p.verdicts) == set(GPU_SIZES)
    # The 4-bit base: half a byte per decoder linear weight, plus bf16 embeddings, lm_head and norms.
    shape = PRESETS["llama-2-7b"]
    linear = shape.layers * sum(n * k for n, k in shape.linears().values())
    assert p.breakdown["base weights"] == linear // 2 + 2 * (shape.parameter_count() - linear)
    data = json.loads(p.to_json())
    assert data["total_bytes"] == p.total_bytes and data["breakdown"] == p.breakdown
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LlamaConfig(**TINY).to_dict()))
    assert qk.plan(str(tmp_path), seq=64).total_bytes == qk.plan(LlamaConfig(**TINY), seq=64).total_bytes


def test_plan_orders_methods_and_options_as_memory_must_go():
    kw = dict(model="llama-2-7b", batch=2, seq=1024, checkpointing=False, optimizer="adamw")
    full, lora, qlora = (plan(method=m, **kw).total_bytes for m in ("full", "lora", "qlora"))
    assert full > lora > qlora
    assert plan(method="qlora_no_dq", **kw).total_bytes > qlora  # float32 absmax instead of 8-bit codes
    assert plan(method="qlora", **(kw | {"checkpointing": True})).total_bytes < qlora
    assert plan(method="qlora", r=64, **kw).total_bytes > plan(method="qlora", r=8, **kw).total_bytes
    assert plan(method="qlora", targets="qv", **kw).total_bytes < qlora
    stock = plan(method="qlora", lora_impl="peft", **kw)  # bitsandbytes dequantizes a whole weight per call
    shape = PRESETS["llama-2-7b"]
    assert stock.breakdown["dequantization workspace"] in (0, shape.hidden * shape.intermediate * 2)
    assert stock.total_bytes > qlora
    eight = plan(method="full", **(kw | {"optimizer": "adamw_8bit"}))
    assert eight.breakdown["optimizer state"] < plan(method="full", **kw).breakdown["optimizer state"] / 1.9
    # FSDP full shard over 8 GPUs: a full fine-tune's weights, gradients and state split 8 ways, activations not;
    # QLoRA's 4-bit base stays whole on every GPU.
    whole, sharded = plan(method="full", **kw), plan(method="full", world_size=8, sharding="fsdp", **kw)
    assert sharded.breakdown["base weights"] == whole.breakdown["base weights"] // 8
    assert sharded.sizes["gradients"] == pytest.approx(whole.sizes["gradients"] / 8, rel=1e-4)
    assert sharded.sizes["activations saved for backward"] == whole.sizes["activations saved for backward"]
    q_sharded = plan(method="qlora", world_size=8, sharding="fsdp", **kw)
    assert q_sharded.breakdown["base weights"] == plan(method="qlora", **kw).breakdown["base weights"]
    assert q_sharded.breakdown["optimizer state"] < plan(method="qlora", **kw).breakdown["optimizer state"] / 7.9


def test_verdicts_of_known_cases():
    # The QLoRA paper: LLaMA-65B fine-tunes on one 48 GB GPU (r=64 on all linear layers, paged optimizer,
    # gradient checkpointing); 16-bit full fine-tuning of it needs far more than any single card.
    guanaco = plan("llama-65b", method="qlora", r=64, batch=1, seq=512, checkpointing=True, optimizer="paged_adamw")
    assert guanaco.verdicts["48GB"] in ("fits", "fits with paging")
    assert guanaco.verdicts["24GB"] == "does not fit"
    assert plan("llama-65b", method="full", optimizer="adamw", seq=512).verdicts["141GB"] == "does not fit"
    assert plan("llama-2-7b", method="qlora", seq=512, batch=1).verdicts["24GB"] == "fits"


def test_paged_state_gives_a_fits_with_paging_verdict():
    # Full fine-tuning of a 7B with paged 32-bit AdamW: 8 bytes of state a parameter (50 GiB) that the driver may page
    # to host memory; weights and gradients (25 GiB) alone fit 48 GB, everything fits 80 GB.
    p = plan("llama-2-7b", method="full", optimizer="paged_adamw", seq=512)
    shape = PRESETS["llama-2-7b"]
    assert p.paged_bytes == p.breakdown["optimizer state"] == 8 * shape.parameter_count()
    assert p.verdicts == {"24GB": "does not fit", "48GB": "fits with paging", "80GB": "fits", "141GB": "fits"}
    assert not p.fits(GPU_SIZES["48GB"]) and p.fits(GPU_SIZES["80GB"])
    unpaged = plan("llama-2-7b", method="full", optimizer="adamw", dtype="float32", seq=512)
    assert unpaged.paged_bytes == 0 and "fits with paging" not in unpaged.verdicts.values()


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="method"):
        plan("llama-2-7b", method="dora")
    with pytest.raises(ValueError, match="optimizer"):
        plan("llama-2-7b", optimizer="adam9")
    with pytest.raises(ValueError, match="targets"):
        plan("llama-2-7b", targets=["q_proj", "wq"])
    with pytest.raises(TypeError, match="batch"):
        plan("llama-2-7b", batch=2.0)
    with pytest.raises(ValueError, match="seq"):
        plan("llama-2-7b", seq=0)
    with pytest.raises(ValueError, match="model"):
        plan("no-such-model")
    with pytest.raises(ValueError, match="sharding"):
        plan("llama-2-7b", sharding="zero3")
    with pytest.raises(ValueError, match="dtype"):
        plan("llama-2-7b", dtype="int8")
    with pytest.raises(ValueError, match="lora_impl"):
        plan("llama-2-7b", method="lora", lora_impl="qlora_kernels")
    with pytest.raises(TypeError, match="checkpointing"):
        plan("llama-2-7b", checkpointing="yes")
    with pytest.raises(ValueError, match="intermediate_size"):
        model_shape({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 10})


def test_cli_prints_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    assert main(["llama-3-8b", "--method", "full", "qlora", "--seq", "1024", "--no-checkpointing",
                 "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "qlora" in printed and "fits?" in printed and "total" in printed
    data = json.loads(out.read_text())
    assert set(data) == {"full", "qlora"}
    assert data["qlora"]["total_bytes"] == plan("llama-3-8b", method="qlora", seq=1024,
                                                checkpointing=False).total_bytes
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["llama-3-8b", "--r", "0"]) == 2
    assert "r must be" in capsys.readouterr().err
    assert math.isfinite(data["full"]["total_gib"])


# ------------------------------------------------------------------------------------------------- on a GPU

GPU_MODEL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)

GPU_CASES = [
    # method, r, checkpointing, batch, seq (bf16, all linear layers, torch AdamW: its state is in max_memory_allocated,
    # where a paged optimizer's unified memory is not)
    ("full", 1, False, 4, 256),
    ("lora", 16, True, 4, 256),
    ("qlora", 16, False, 4, 256),
    ("qlora", 16, True, 4, 256),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-r{c[1]}-{'ckpt' if c[2] else 'nockpt'}")
def test_plan_matches_cuda_max_memory_allocated(case):
    method, r, checkpointing, batch, seq = case
    device = torch.device("cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**GPU_MODEL)).to(device=device, dtype=torch.bfloat16)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules="all-linear"))
    elif method == "qlora":
        _swap_qlora_linears(model, r, TARGET_SETS["all-linear"], double_quant=True)
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    ids = torch.randint(0, GPU_MODEL["vocab_size"], (batch, seq), device=device)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer state, autotuning, cuBLAS workspace
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated(device) - before
    planned = plan(LlamaConfig(**GPU_MODEL), method=method, r=r, targets="all-linear", batch=batch, seq=seq,
                   checkpointing=checkpointing, optimizer="adamw", dtype="bfloat16")
    error = planned.total_bytes / measured - 1
    print(f"cuda {case}: planned {planned.total_bytes} measured {measured} error {100 * error:+.1f}%")
    assert abs(error) <= TOLERANCE
