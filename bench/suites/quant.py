"""NF4 quantize / dequantize: ours against bitsandbytes (its CUDA kernels on a GPU, its native CPU library on a CPU),
same input dtype and output dtype for both (bf16 on a GPU, float32 on a CPU)."""

from __future__ import annotations

import torch

import qlora_kernels as qk
from qlora_kernels import reference
from bench.harness import Case, copies_past_cache, rotating
from bench.suites.linear import _Shared


def _bnb():
    try:
        import bitsandbytes.functional as F
    except Exception:  # noqa: BLE001 - bitsandbytes is optional for the benchmark
        return None
    return F


def _reference_dequantize(w4: qk.NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The torch reference's dequantization of ``w4``'s storage (the specification, not the backend timed)."""
    return reference.dequantize_nf4(w4.packed, w4.absmax, w4.nested_absmax, w4.offset, w4.blocksize, w4.shape, dtype)


def _shapes(device: torch.device, plan: str):
    if plan == "tiny":
        return [(256, 256)]
    if plan == "quick":
        return [(2048, 2048)]
    if plan in ("cpu", "gpu-check"):
        return [(4096, 4096)]
    return [(4096, 4096), (14336, 4096), (4096, 14336)]


def cases(device: torch.device, plan: str) -> list[Case]:
    if plan == "gpu-check":
        return []  # no goal names quantization; the GPU check's smoke stage tests it against bitsandbytes
    F = _bnb()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    e = torch.finfo(dtype).bits // 8
    shared = _Shared()
    out: list[Case] = []
    for n, k in _shapes(device, plan):
        numel = n * k
        nf4_bytes = (numel + 1) // 2 + numel // 64
        traffic = nf4_bytes + e * numel  # read the codes and absmax, write the weight (or the reverse)
        copies = copies_past_cache(traffic, device)

        def state(n=n, k=k, copies=copies):
            def build():
                ws = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(copies)]
                ours = [qk.NF4Weight.quantize(w) for w in ws]
                theirs = [F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                          for w in ws] if F is not None else []
                want = _reference_dequantize(ours[0], dtype)
                packed_ref = reference.quantize_nf4(ws[0], 64, True)[0]
                return {"ws": ws, "ours": ours, "theirs": theirs, "want": want, "packed_ref": packed_ref}
            return shared.get((n, k), build)

        def check_deq(out, state=state):
            want = state()["want"]
            if not torch.equal(out, want):
                return f"dequantized weight differs from the torch reference in {(out != want).sum().item()} elements"
            return None

        def make_deq_ours(state=state):
            nxt = rotating(state()["ours"])
            return lambda: nxt().dequantize(dtype)

        common = dict(M=0, N=n, K=k, dtype=dtype_name, bytes=traffic, flops=0,
                      est_s=2.0 if device.type == "cuda" else 3.0)
        out.append(Case("dequant", "qlora_kernels", make_deq_ours, check_deq, **common))
        if F is not None:

            def make_deq_bnb(state=state):
                nxt = rotating(state()["theirs"])
                return lambda: F.dequantize_4bit(*nxt())

            def check_deq_bnb(out, state=state):
                want = _reference_dequantize(qk.NF4Weight.from_bnb(*state()["theirs"][0]), dtype)
                # bitsandbytes 0.50.2's CPU kernel is wrong at K % 64 == 32; our shapes avoid it, the gate would show it.
                return None if torch.equal(out, want) else "bitsandbytes' dequantize differs from the NF4 definition"

            out.append(Case("dequant", "bnb", make_deq_bnb, check_deq_bnb, **common))

        # Quantize: one-time cost when a model is loaded; reads the weight, writes the NF4 bytes.
        def make_quant_ours(state=state):
            nxt = rotating(state()["ws"])
            return lambda: qk.NF4Weight.quantize(nxt())

        def check_quant(out, state=state):
            want = state()["packed_ref"]
            same = torch.equal(out.packed.reshape(-1), want.reshape(-1))
            return None if same else "quantized bytes differ from the torch reference"

        out.append(Case("quantize", "qlora_kernels", make_quant_ours, check_quant, **common))
        if F is not None:

            def make_quant_bnb(state=state):
                nxt = rotating(state()["ws"])
                return lambda: F.quantize_4bit(nxt(), blocksize=64, compress_statistics=True, quant_type="nf4")

            def check_quant_bnb(out, state=state):
                want = state()["packed_ref"]
                same = (out[0].reshape(-1) == want.reshape(-1)).float().mean().item()
                return None if same > 1 - 1e-6 else f"only {same:.6f} of bitsandbytes' bytes match the NF4 definition"

            out.append(Case("quantize", "bnb", make_quant_bnb, check_quant_bnb, **common))
    return out
