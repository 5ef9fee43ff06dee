"""torch.compile of a patched peft model (fullgraph False and True) runs the fused ops and matches eager.

The model is compiled before it ever ran eagerly (under fullgraph=True after peft's merge/unmerge replaced the base
storage, and a second patch call): that first compiled call is where the NF4 view of bitsandbytes'
storage used to be built under dynamo, ending in a RecursionError inside bitsandbytes' Params4bit. The backend is
aot_eager: dynamo and AOT autograd (where that failure was) without Inductor's C++ code generation, which adds
minutes on a small CPU and nothing this test looks at.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import qlora_kernels as qk

from helpers import assert_close_normwise

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import test_peft  # noqa: E402  (the tiny Llama, its 4-bit loading and LoRA set-up)


@pytest.fixture(scope="module")
def one_layer_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("one_layer_llama")
    config = transformers.LlamaConfig(**{**test_peft.LLAMA, "num_hidden_layers": 1})
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def forward_backward(model, ids, call=None):
    """Logits, loss and the LoRA gradients of one step of ``call`` (default: ``model`` itself)."""
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_patched_model_matches_eager(one_layer_checkpoint, fullgraph):
    torch._dynamo.reset()
    model = qk.patch_peft_model(test_peft.build(one_layer_checkpoint, "bnb"))
    lora_layers = len(test_peft.TARGETS)
    assert model.qlora_kernels_patched == lora_layers
    if fullgraph:
        # bitsandbytes replaces the base storage (new Params4bit) at an unmerge; the kernels' view of it cannot be
        # rebuilt inside a full graph, so patching again rebuilds it, eagerly, before compiling.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft: merging into 4-bit weights rounds
            model.merge_adapter()
            model.unmerge_adapter()
        assert qk.patch_peft_model(model).qlora_kernels_patched == lora_layers
    compiled = torch.compile(model, fullgraph=fullgraph, backend="aot_eager")
    ids = test_peft.batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on compiling a model with tensor-subclass parameters
        with torch.profiler.profile() as prof:
            c_logits, c_loss, c_grads = forward_backward(model, ids, call=compiled)
    names = [e.name for e in prof.events()]
    assert sum(name == "qlora_kernels::nf4_lora_linear_fwd" for name in names) >= lora_layers, sorted(set(names))
    logits, loss, grads = forward_backward(model, ids)  # eager, the same patched model
    assert qk.integrations.peft.lora_call_counts(model).fused == lora_layers  # the eager call; compiled are uncounted
    assert_close_normwise(c_logits, logits, torch.float32)
    assert_close_normwise(c_loss, loss, torch.float32)
    assert c_grads.keys() == grads.keys() and len(grads) == 2 * lora_layers
    for name in grads:
        assert_close_normwise(c_grads[name], grads[name], torch.float32, scale=2)
    # A second step reuses the compiled graph and still follows the LoRA weights.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    assert_close_normwise(compiled(input_ids=ids).logits.detach(), model(input_ids=ids).logits.detach(), torch.float32)
