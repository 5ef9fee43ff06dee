"""NF4 quantize / dequantize: ours against bitsandbytes."""

from __future__ import annotations

import torch

import qlora_kernels as qk
from bench.harness import Case, copies_past_l2, rotating


def _bnb():
    try:
        import bitsandbytes.functional as F
    except Exception:  # noqa: BLE001 - bitsandbytes is optional for the benchmark
        return None
    return F


def _shapes(device: torch.device, quick: bool):
    if quick or device.type == "cpu":
        return [(4096, 4096)] if not quick else [(2048, 2048)]
    return [(4096, 4096), (14336, 4096), (4096, 14336)]


def cases(device: torch.device, quick: bool) -> list[Case]:
    F = _bnb()
    out: list[Case] = []
    for n, k in _shapes(device, quick):
        dtype = torch.bfloat16
        numel = n * k
        nf4_bytes = (numel + 1) // 2 + numel // 64
        w = torch.randn(n, k, device=device, dtype=dtype)
        w4 = qk.NF4Weight.quantize(w)
        want = w4.dequantize()
        copies = copies_past_l2(nf4_bytes + 2 * numel, device)
        ours_inputs = [w4] + [qk.NF4Weight.quantize(torch.randn_like(w)) for _ in range(copies - 1)]

        def check_equal(out, want=want):
            if not torch.equal(out, want):
                return f"dequantized weight differs from the reference in {(out != want).sum().item()} elements"
            return None

        def make_ours(inputs=ours_inputs):
            nxt = rotating(inputs)
            return lambda: nxt().dequantize()

        common = dict(M=0, N=n, K=k, dtype="bfloat16", bytes=nf4_bytes + 2 * numel, flops=0)
        out.append(Case("dequant", "qlora_kernels", make_ours, check_equal, **common))
        if F is not None:
            packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            bnb_inputs = [(packed, state)]
            for extra in ours_inputs[1:]:
                bnb_inputs.append(F.quantize_4bit(extra.dequantize(), compress_statistics=True, quant_type="nf4"))
            want_bnb = qk.NF4Weight.from_bnb(packed, state).dequantize()

            def make_bnb(inputs=bnb_inputs):
                nxt = rotating(inputs)
                return lambda: F.dequantize_4bit(*nxt())

            def check_bnb(out, want=want_bnb):
                # bitsandbytes 0.50.2's CPU kernel is wrong at K % 64 == 32; our shapes avoid it, the gate would show it.
                return None if torch.equal(out, want) else "bitsandbytes' dequantize differs from the NF4 definition"

            out.append(Case("dequant", "bnb", make_bnb, check_bnb, **common))

        # Quantize: one-time cost when a model is loaded; reads bf16, writes the NF4 bytes.
        q_common = dict(M=0, N=n, K=k, dtype="bfloat16", bytes=2 * numel + nf4_bytes, flops=0)
        want_packed = w4.packed

        def make_quant_ours(w=w):
            return lambda: qk.NF4Weight.quantize(w)

        def check_quant(out, want=want_packed):
            return None if torch.equal(out.packed, want) else "quantized bytes differ from the reference"

        out.append(Case("quantize", "qlora_kernels", make_quant_ours, check_quant, **q_common))
        if F is not None:

            def make_quant_bnb(w=w):
                return lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

            def check_quant_bnb(out, want=want_packed):
                same = (out[0].reshape(-1) == want.reshape(-1)).float().mean().item()
                return None if same > 1 - 1e-6 else f"only {same:.6f} of bitsandbytes' bytes match the NF4 definition"

            out.append(Case("quantize", "bnb", make_quant_bnb, check_quant_bnb, **q_common))
    return out
