"""The fine-tuning example runs end to end in its reduced form (--smoke) and saves a peft adapter."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    out = tmp_path / "adapter"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--smoke", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    log = result.stdout
    assert "patch_peft_model: 14 LoRA layers" in log, log
    losses = re.search(r"training loss: ([\d.]+) .* -> ([\d.]+)", log)
    assert losses, log
    rates = re.search(r"stock peft ([\d.]+), patched ([\d.]+)", log)
    assert rates and float(rates.group(1)) > 0 and float(rates.group(2)) > 0, log
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    weights = safetensors.load_file(out / "adapter_model.safetensors")
    lora_B = [v for k, v in weights.items() if "lora_B" in k]
    assert len([k for k in weights if "lora_A" in k]) == 14 and len(lora_B) == 14
    assert any(v.abs().sum() > 0 for v in lora_B), "the adapter saved is untrained"
