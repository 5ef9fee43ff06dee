"""Every ```python block of README.md runs, as written, on this machine (CPU here; the blocks pick the GPU when there
is one). The blocks run in order in one namespace, as a reader pasting them into one session would, in a temporary
folder (a block may save a model or an adapter to the current directory). The Multi-GPU block runs as one rank of
one, with the environment torchrun would give it."""

from __future__ import annotations

import re
import socket
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def readme_blocks() -> list[tuple[str, str]]:
    """(section heading, code) of every ```python block, in order."""
    text = README.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        blocks.append((headings[-1] if headings else "", match.group(1)))
    return blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_has_the_snippets_this_test_checks():
    sections = [section for section, _ in readme_blocks()]
    for expected in ("Use", "The fused linear", "Fine-tune with one extra line", "Paged optimizers", "Multi-GPU"):
        assert expected in sections, sections
    assert all("device=\"cuda\"" not in code for _, code in readme_blocks()), "a snippet only a GPU can run"


def test_readme_snippets_run_as_written(tmp_path, monkeypatch):
    """Needs qk.optim's optimizers to take model.parameters() of a QLoRA model (frozen uint8 base included)."""
    monkeypatch.chdir(tmp_path)
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    namespace: dict = {"__name__": "__readme__"}
    try:
        for section, code in readme_blocks():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' and torch's notes on a CPU 4-bit model
                exec(compile(code, f"README.md ({section})", "exec"), namespace)  # noqa: S102
            check_section(section, namespace, tmp_path)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def check_section(section: str, ns: dict, folder: Path) -> None:
    """What each section's prose says its snippet does, checked on the names it leaves behind."""
    qk = ns.get("qk")
    if section == "Use":
        w, w_again, w4, linear4bit = ns["w"], ns["w_again"], ns["w4"], ns["linear4bit"]
        assert w_again.dtype == w.dtype and (w_again - w).float().norm() < 0.15 * w.float().norm()  # NF4's error
        bnb_weight = ns["bnb"].functional.dequantize_4bit(linear4bit.weight.data, linear4bit.weight.quant_state)
        assert isinstance(w4, qk.NF4Weight) and torch.equal(w4.dequantize(), bnb_weight)
    elif section == "The fused linear":
        x, lora_A, lora_B = (ns[k].float() for k in ("x", "lora_A", "lora_B"))
        expected = x @ ns["w4"].dequantize(torch.float32).T + ns["scale"] * (x @ lora_A.T) @ lora_B.T
        assert ns["y"].shape == (8, 4096) and ns["y"].dtype == torch.bfloat16
        torch.testing.assert_close(ns["y"].float(), expected, rtol=2e-2, atol=5e-2)
    elif section == "Fine-tune with one extra line":
        assert ns["model"].qlora_kernels_patched == 14
        assert (folder / "my-adapter" / "adapter_model.safetensors").is_file()
    elif section == "Paged optimizers":
        assert isinstance(ns["opt"], torch.optim.Optimizer)
    elif section == "Multi-GPU":
        assert torch.isfinite(ns["loss"]).all()
