"""The fine-tuning example runs end to end in its reduced form (--smoke) and saves a peft adapter."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
safetensors = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetune_tiny_llama.py"


def test_shipped_text_is_small_and_documented():
    text = ROOT / "examples" / "data" / "devils_dictionary.txt"
    assert 100_000 < text.stat().st_size < 500_000
    readme = (ROOT / "examples" / "data" / "README.md").read_text()
    assert "devils_dictionary.txt" in readme and "public domain" in readme.lower()


def test_example_smoke_run(tmp_path):
    """Run without --out from an empty folder: the adapter goes to the user's cache folder (here a temporary one),
    nothing into the current directory, and it names a base model that still exists."""
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--smoke"],
        cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, "XDG_CACHE_HOME": str(cache)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    log = result.stdout
    assert "patch_peft_model: 14 LoRA layers" in log, log
    losses = re.search(r"training loss: ([\d.]+) .* -> ([\d.]+)", log)
    assert losses, log
    rates = re.search(r"stock peft ([\d.]+), patched ([\d.]+)", log)
    assert rates and float(rates.group(1)) > 0 and float(rates.group(2)) > 0, log
    assert not list(cwd.iterdir()), "the example wrote into the current directory"
    out = cache / "qlora-kernels" / "tiny_llama_qlora_adapter"
    assert f"adapter saved to {out}" in log, log
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert Path(config["base_model_name_or_path"]) == out / "base_model"
    weights = safetensors.load_file(out / "adapter_model.safetensors")
    lora_B = [v for k, v in weights.items() if "lora_B" in k]
    assert len([k for k in weights if "lora_A" in k]) == 14 and len(lora_B) == 14
    assert any(v.abs().sum() > 0 for v in lora_B), "the adapter saved is untrained"

    # The saved pair loads the way the example's docstring says, and carries the trained weights.
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM.from_pretrained(config["base_model_name_or_path"], quantization_config=quantization,
                                                dtype=torch.float32, device_map="cpu")
        loaded = PeftModel.from_pretrained(base, out)
    state = get_peft_model_state_dict(loaded)
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    assert torch.isfinite(loaded(input_ids=torch.arange(8)[None]).logits).all()


def test_default_output_folder_is_outside_the_working_directory():
    spec = importlib.util.spec_from_file_location("finetune_tiny_llama", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.parse_args([]).out
    assert out.is_absolute() and ROOT not in out.parents, out
