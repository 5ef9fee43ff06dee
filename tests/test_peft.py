"""patch_peft_model on a tiny Llama: the same numbers as stock peft, the project's ops running, and peft's machinery
(save/load, merge_and_unload, disable_adapter, set_adapter, mixed batches, DoRA) still working."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.integrations import peft as qk_peft

from helpers import assert_close_normwise

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import (  # noqa: E402
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUM_LAYERS = 2
NUM_LORA = len(TARGETS) * NUM_LAYERS
# Every K and N a multiple of 64: bitsandbytes 0.50.2's CPU dequantize misreads absmax when K % 64 == 32.
LLAMA = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, attention_bias=True,  # biases: the fused path adds them too
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama saved in float32: every model below loads the same weights, so the same NF4 bytes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)  # transformers initialises biases to zero, which would hide them
    model.save_pretrained(path)
    return path


def load_in_4bit(checkpoint, dtype=torch.float32) -> LlamaForCausalLM:
    """transformers' 4-bit loader: peft wraps its layers as lora.bnb.Linear4bit."""
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(checkpoint, quantization_config=config, dtype=dtype, device_map="cpu")


def quantize_by_hand(checkpoint, quant_type="nf4") -> LlamaForCausalLM:
    """Linear4bit swapped in by hand: peft wraps these layers as a plain lora.Linear."""
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name in TARGETS:
                layer = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None, quant_type=quant_type,
                    compress_statistics=True, compute_dtype=torch.float32,
                )
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type=quant_type)
                setattr(parent, name, layer.to("cpu"))
    return model


def build(checkpoint, wrapper="bnb", dtype=torch.float32, cpu_repacking=False, **lora) -> PeftModel:
    base = load_in_4bit(checkpoint, dtype) if wrapper == "bnb" else quantize_by_hand(checkpoint)
    if not cpu_repacking:
        # In eval mode, on CPUs with AVX512-BF16, bitsandbytes rewrites a layer whose input needs no grad into its
        # CPU inference layout and computes with bf16 absmax: a different stock path from the QLoRA training one
        # these tests compare with, and one that depends on the CPU. test_patch_restores_bitsandbytes_cpu_layout
        # covers it.
        for module in base.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, **lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, config)
    randomize_lora_B(model, seed=1)
    return model.train()


def randomize_lora_B(model, seed, adapter="default"):
    """B = 0 at init would hide the LoRA path from outputs and lora_A's gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def batch(seed=0, size=2, length=16):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, LLAMA["vocab_size"], (size, length), generator=generator)


def run(model, ids, **kwargs):
    """Logits, loss and every trainable gradient of one forward/backward."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls that took the fused path (one per LoRA layer per forward)."""
    calls = []
    real = qk_peft.nf4_lora_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(qk_peft, "nf4_lora_linear", counting)
    return calls


# --------------------------------------------------------------------------------------------- wrappers


def test_peft_wraps_linear4bit_two_ways_on_cpu(checkpoint):
    loaded = build(checkpoint, "bnb")
    by_hand = build(checkpoint, "plain")
    assert {type(m) for m in lora_layers(loaded)} == {peft.tuners.lora.bnb.Linear4bit}
    assert {type(m) for m in lora_layers(by_hand)} == {peft.tuners.lora.layer.Linear}


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("wrapper", ["bnb", "plain"])
def test_patched_matches_stock_peft(checkpoint, wrapper, fused_calls):
    model = build(checkpoint, wrapper)
    ids = batch()
    logits, loss, grads = run(model, ids)
    assert len(grads) == 2 * NUM_LORA and all(g.abs().sum() > 0 for g in grads.values())
    assert qk.patch_peft_model(model).qlora_kernels_patched == NUM_LORA
    with torch.profiler.profile() as prof:
        p_logits, p_loss, p_grads = run(model, ids)
    assert len(fused_calls) == NUM_LORA
    assert any(e.name.startswith("qlora_kernels::") for e in prof.events()), "the project's ops did not run"
    assert_close_normwise(p_logits, logits, torch.float32)
    assert_close_normwise(p_loss, loss, torch.float32)
    assert grads.keys() == p_grads.keys()
    for name in grads:
        assert_close_normwise(p_grads[name], grads[name], torch.float32, scale=2)


def test_patched_matches_stock_peft_bf16(checkpoint):
    # Stock peft keeps the adapters in float32 and runs the LoRA path there; the fused path runs it in the compute
    # dtype. Logits and loss agree to bf16 rounding; the gradients are compared as one vector, since a single small
    # LoRA gradient of a random tiny model can differ by a few percent (measured: 0.5% overall, 5% worst tensor).
    model = build(checkpoint, "bnb", dtype=torch.bfloat16)
    ids = batch()
    logits, loss, grads = run(model, ids)
    qk.patch_peft_model(model)
    p_logits, p_loss, p_grads = run(model, ids)
    assert p_logits.dtype == torch.bfloat16
    assert_close_normwise(p_logits, logits, torch.bfloat16)
    assert_close_normwise(p_loss, loss, torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in p_grads.values())  # float32 master weights, float32 gradients
    flat = lambda g: torch.cat([g[name].reshape(-1) for name in sorted(g)])  # noqa: E731
    assert_close_normwise(flat(p_grads), flat(grads), torch.bfloat16)


def test_no_grad_eval_forward_is_fused(checkpoint, fused_calls):
    model = build(checkpoint, "bnb").eval()
    ids = batch()
    with torch.no_grad():
        qk.patch_peft_model(model)
        model(input_ids=ids)
    assert len(fused_calls) == NUM_LORA


def test_patch_restores_bitsandbytes_cpu_layout(checkpoint, fused_calls):
    model = build(checkpoint, "bnb", cpu_repacking=True).eval()
    with torch.no_grad():
        model(input_ids=batch())  # stock eval forward: bitsandbytes may rewrite the first layer's q/k/v/gate/up
    repacked = [m for m in lora_layers(model) if qk.nn.bnb_cpu_repacked(m.base_layer)]
    if not repacked:
        pytest.skip("bitsandbytes rewrites storage only on CPUs with AVX512-BF16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert qk.patch_peft_model(model).qlora_kernels_patched == NUM_LORA
    assert not any(qk.nn.bnb_cpu_repacked(m.base_layer) for m in lora_layers(model))
    with torch.no_grad():
        model(input_ids=batch())
    assert len(fused_calls) == NUM_LORA
    assert not any(qk.nn.bnb_cpu_repacked(m.base_layer) for m in lora_layers(model))


# ------------------------------------------------------------------------------------- peft's own forward


def test_disable_adapter_runs_the_base_model(checkpoint, fused_calls):
    model = build(checkpoint, "bnb")
    ids = batch()
    with model.disable_adapter():
        base_logits = model(input_ids=ids).logits.detach()
    with_lora = model(input_ids=ids).logits.detach()
    qk.patch_peft_model(model)
    with model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, base_logits)
    assert not fused_calls
    assert_close_normwise(model(input_ids=ids).logits.detach(), with_lora, torch.float32)
    assert len(fused_calls) == NUM_LORA


def test_mixed_batch_adapter_names_run_peft_forward(checkpoint, fused_calls):
    model = build(checkpoint, "bnb")
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    randomize_lora_B(model, seed=2, adapter="other")
    ids, names = batch(size=3), ["default", "other", "__base__"]
    model.eval()  # peft refuses adapter_names in training mode
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=names).logits
        qk.patch_peft_model(model)
        assert torch.equal(model(input_ids=ids, adapter_names=names).logits, expected)
    assert not fused_calls


def test_set_adapter_and_two_active_adapters(checkpoint, fused_calls):
    model = build(checkpoint, "bnb")
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    randomize_lora_B(model, seed=2, adapter="other")
    model.set_adapter("other")
    ids = batch()
    other = model(input_ids=ids).logits.detach()
    model.base_model.set_adapter(["default", "other"])
    both = model(input_ids=ids).logits.detach()
    model.set_adapter("other")
    qk.patch_peft_model(model)
    assert_close_normwise(model(input_ids=ids).logits.detach(), other, torch.float32)
    assert len(fused_calls) == NUM_LORA
    model.base_model.set_adapter(["default", "other"])
    assert torch.equal(model(input_ids=ids).logits, both)
    assert len(fused_calls) == NUM_LORA, "two active adapters must run peft's forward"


def test_dora_layers_are_left_to_peft_and_reported(checkpoint, fused_calls):
    model = build(checkpoint, "bnb", use_dora=True)
    ids = batch()
    logits, _, grads = run(model, ids)
    with pytest.warns(UserWarning, match=f"left {NUM_LORA} LoRA layer.*adapter 'default' is DoRA"):
        assert qk.patch_peft_model(model).qlora_kernels_patched == 0
    p_logits, _, p_grads = run(model, ids)
    assert not fused_calls
    assert torch.equal(p_logits, logits)
    assert all(torch.equal(p_grads[n], grads[n]) for n in grads)
    with pytest.raises(ValueError, match="DoRA.*strict=True"):
        qk.patch_peft_model(model, strict=True)


def test_call_counts_say_which_path_ran_and_warn_on_unchosen_fallbacks(checkpoint, fused_calls):
    model = build(checkpoint, "bnb")
    qk.patch_peft_model(model)
    ids = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caller's own choices fall back without a warning
        model(input_ids=ids)
        with model.disable_adapter():
            model(input_ids=ids)
    counts = qk_peft.lora_call_counts(model)
    assert (counts.layers, counts.fused, counts.peft) == (NUM_LORA, NUM_LORA, NUM_LORA)
    assert counts.fused == len(fused_calls)
    assert counts.fallbacks == {qk_peft.ADAPTERS_DISABLED: NUM_LORA}
    # A DoRA adapter made active after patching: every layer falls back, and says so once.
    model.add_adapter("dora", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    model.set_adapter("dora")
    with pytest.warns(UserWarning, match="runs peft's forward, not the fused kernels: adapter 'dora' is DoRA") as seen:
        model(input_ids=ids)
    assert len([w for w in seen if "not the fused kernels" in str(w.message)]) == NUM_LORA  # once per layer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids)  # ... and only once
    counts = qk_peft.lora_call_counts(model)
    assert counts.fused == NUM_LORA and counts.fallbacks["adapter 'dora' is DoRA"] == 2 * NUM_LORA
    qk_peft.reset_lora_call_counts(model)
    assert qk_peft.lora_call_counts(model) == qk_peft.LoraCallCounts(layers=NUM_LORA)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        qk_peft.lora_call_counts(None)


def test_merged_adapter_runs_peft_forward(checkpoint, fused_calls):
    model = build(checkpoint, "bnb")
    qk.patch_peft_model(model)
    model.merge_adapter()
    model(input_ids=batch())
    assert not fused_calls
    model.unmerge_adapter()  # bitsandbytes re-quantizes into new storage: the fused path must read the new bytes
    logits = model(input_ids=batch()).logits
    assert len(fused_calls) == NUM_LORA
    qk.unpatch_peft_model(model)
    assert_close_normwise(logits, model(input_ids=batch()).logits, torch.float32)


# --------------------------------------------------------------------------------------- save, load, merge


def train_one_step(model, seed=3):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = batch(seed)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def test_adapter_saved_patched_loads_in_stock_peft_and_back(checkpoint, tmp_path, fused_calls):
    patched = build(checkpoint, "bnb")
    qk.patch_peft_model(patched)
    train_one_step(patched)
    assert fused_calls
    patched.save_pretrained(tmp_path / "ours")
    ids = batch(4)
    ours = patched(input_ids=ids).logits.detach()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = PeftModel.from_pretrained(load_in_4bit(checkpoint), tmp_path / "ours").train()
    assert_close_normwise(stock(input_ids=ids).logits.detach(), ours, torch.float32)

    # ... and an adapter stock peft saved, loaded and then patched, computes what stock peft computes.
    stock_trained = build(checkpoint, "bnb")
    train_one_step(stock_trained, seed=5)
    stock_trained.save_pretrained(tmp_path / "theirs")
    theirs = stock_trained(input_ids=ids).logits.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(load_in_4bit(checkpoint), tmp_path / "theirs").train()
    fused_calls.clear()
    assert qk.patch_peft_model(loaded).qlora_kernels_patched == NUM_LORA
    assert_close_normwise(loaded(input_ids=ids).logits.detach(), theirs, torch.float32)
    assert len(fused_calls) == NUM_LORA


def test_merge_and_unload_matches_stock(checkpoint):
    stock, patched = build(checkpoint, "bnb"), build(checkpoint, "bnb")
    qk.patch_peft_model(patched)
    train_one_step(patched)
    set_peft_model_state_dict(stock, get_peft_model_state_dict(patched))
    ids = batch(4)
    merged, stock_merged = patched.merge_and_unload(), stock.merge_and_unload()
    assert not lora_layers(merged) and isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    merged.train(), stock_merged.train()
    assert torch.equal(merged(input_ids=ids).logits, stock_merged(input_ids=ids).logits)


# --------------------------------------------------------------------------------------------- patch API


def test_unpatch_restores_peft_forward(checkpoint, fused_calls):
    model = build(checkpoint, "plain")
    ids = batch()
    stock = model(input_ids=ids).logits.detach()
    for m in lora_layers(model):
        m.base_layer.support_avx512bf16_for_cpu = True
    flags = [m.base_layer.support_avx512bf16_for_cpu for m in lora_layers(model)]
    assert qk.patch_peft_model(model).qlora_kernels_patched == NUM_LORA
    assert not any(m.base_layer.support_avx512bf16_for_cpu for m in lora_layers(model))
    assert qk.patch_peft_model(model).qlora_kernels_patched == NUM_LORA  # idempotent: no wrapper around the wrapper
    model(input_ids=ids)
    assert len(fused_calls) == NUM_LORA
    assert qk.unpatch_peft_model(model) is model and model.qlora_kernels_patched == 0
    assert not any("forward" in m.__dict__ for m in lora_layers(model))
    assert [m.base_layer.support_avx512bf16_for_cpu for m in lora_layers(model)] == flags
    assert torch.equal(model(input_ids=ids).logits, stock)
    assert len(fused_calls) == NUM_LORA
    assert qk.unpatch_peft_model(model).qlora_kernels_patched == 0


def test_deepcopy_of_a_patched_model_is_patched_on_its_own_layers(checkpoint, fused_calls):
    model = build(checkpoint, "plain")
    qk.patch_peft_model(model)
    clone = copy.deepcopy(model)
    for layer in lora_layers(clone):
        assert isinstance(layer.forward, qk_peft.FusedLoraForward) and layer.forward.layer is layer
    clone(input_ids=batch())
    assert len(fused_calls) == NUM_LORA


def test_patch_returns_the_model_and_logs_the_count(checkpoint, caplog):
    model = build(checkpoint, "bnb")
    with caplog.at_level(logging.INFO, logger="qlora_kernels"):
        returned = qk.patch_peft_model(model)
    assert returned is model and model.qlora_kernels_patched == NUM_LORA
    assert f"patch_peft_model: {NUM_LORA} LoRA layer(s) of PeftModel on the fused" in caplog.text
    with pytest.raises(TypeError, match="strict must be a bool"):
        qk.patch_peft_model(model, strict="yes")


def test_patching_before_peft_adds_the_adapters_warns_or_raises(checkpoint):
    base = load_in_4bit(checkpoint)  # what a user patches before handing it to SFTTrainer(peft_config=...)
    with pytest.warns(UserWarning, match="no peft LoRA layer over a bitsandbytes Linear4bit.*QLoRAKernelsCallback"):
        assert qk.patch_peft_model(base).qlora_kernels_patched == 0
    with pytest.raises(ValueError, match="no peft LoRA layer.*strict=True"):
        qk.patch_peft_model(base, strict=True)


def test_model_without_4bit_lora_layers_warns_and_patches_nothing():
    float_model = get_peft_model(
        LlamaForCausalLM(LlamaConfig(**LLAMA)), LoraConfig(r=4, target_modules=["q_proj"])
    )
    with pytest.warns(UserWarning, match="no peft LoRA layer over a bitsandbytes Linear4bit"):
        assert qk.patch_peft_model(float_model).qlora_kernels_patched == 0
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        qk.patch_peft_model("model")


def test_fp4_base_is_left_to_peft_with_a_warning(checkpoint):
    base = quantize_by_hand(checkpoint, quant_type="fp4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS))
    with pytest.warns(UserWarning, match="FP4 base: FP4 is not NF4"):
        assert qk.patch_peft_model(model).qlora_kernels_patched == 0
