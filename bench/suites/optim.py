"""One optimizer step over a parameter set: ours (PagedAdamW, PagedAdamW8bit) against bitsandbytes' paged optimizers
of the same bits and torch's AdamW (fused on a GPU)."""

from __future__ import annotations

import torch

from bench.harness import Case

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01


def lora_llama3_8b_shapes(r: int = 16) -> list[tuple[int, int]]:
    """LoRA A [r, K] and B [N, r] of every linear layer of Llama-3-8B (32 layers, GQA k/v of 1024): 448 tensors."""
    linears = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
    shapes = []
    for _ in range(32):
        for n, k in linears:
            shapes += [(r, k), (n, r)]
    return shapes


def full_1b_shapes() -> list[tuple[int, int]]:
    """A 1.0B-parameter Llama-style set (16 layers of width 2048, MLP 8192, vocab 64k tied)."""
    shapes = [(65536, 2048)]
    for _ in range(16):
        shapes += [(2048, 2048)] * 4 + [(8192, 2048), (8192, 2048), (2048, 8192)] + [(2048,), (2048,)]
    return shapes


def small_lora_shapes() -> list[tuple[int, int]]:
    """A CPU-sized LoRA set: 8 layers × 4 linears of 1024, r = 16 (64 tensors)."""
    return [s for _ in range(32) for s in ((16, 1024), (1024, 16))]


def _make_params(shapes, device, seed=0):
    """Parameters and gradients drawn where they live (a GPU draws its 1.2 G-element sets in milliseconds; a CPU
    draw would cost seconds per case, plus the copy)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, generator=gen, device=device).mul_(0.02).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device).mul_(1e-3)
    return params


def _optimizer(impl: str, bits: int, params):
    if impl == "qlora_kernels":
        import qlora_kernels as qk

        cls = qk.optim.PagedAdamW8bit if bits == 8 else qk.optim.PagedAdamW
        return cls(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    if impl == "bnb":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if bits == 8 else bnb.optim.PagedAdamW
        return cls(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    if impl == "torch":
        fused = params[0].is_cuda
        return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=fused, foreach=not fused)
    raise ValueError(impl)


def _reference_update(shapes, device):
    """Parameters after one torch AdamW step from the same start: the gate for every impl."""
    params = _make_params(shapes, device)
    torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False).step()
    return [p.detach().clone() for p in params]


def _case(set_name, shapes, impl, bits, device, reference):
    numel = sum(torch.Size(s).numel() for s in shapes)
    state_bytes = 2 * (1 if bits == 8 else 4)
    nbytes = numel * (4 + 4 + 4 + 2 * state_bytes)  # read p, g, states; write p, states

    holder = {}

    def make():
        params = _make_params(shapes, device)
        start = [p.detach().clone() for p in params]
        opt = _optimizer(impl, bits, params)
        holder.update(params=params, start=start)

        def step():
            opt.step()
            return holder["params"]

        return step

    def check(params):
        # After the first step every impl must move the parameters like AdamW does: exactly (32-bit) or in the
        # same direction up to 8-bit state quantization (the first step's moments are exact in bitsandbytes' scheme
        # too, so the 8-bit bound is still tight).
        tol = 1e-5 if bits == 32 else 2e-2
        num = den = 0.0
        for p, p0, want in zip(params, holder["start"], reference):
            num += (p.detach().float() - want).norm().item() ** 2
            den += (want - p0).norm().item() ** 2
        err = (num / max(den, 1e-30)) ** 0.5
        return None if err <= tol else f"first-step update differs from AdamW's by {err:.2e} (relative) > {tol}"

    est = 2.0 if device.type == "cpu" else 1.0 + numel / 2e8
    return Case("optim_step", impl, make, check, M=0, N=len(shapes), K=numel, r=0, dtype="float32",
                bytes=nbytes, flops=0, case=f"{set_name}/{bits}bit", est_s=est)


def cases(device: torch.device, plan: str) -> list[Case]:
    if plan == "tiny":
        sets = {"lora_tiny": lambda: [(16, 256), (256, 16)] * 4}
    elif plan in ("quick", "cpu"):
        sets = {"lora_small": small_lora_shapes}
    elif plan == "gpu-check":
        sets = {"lora_llama3_8b_r16": lambda: lora_llama3_8b_shapes(16)}
    else:
        sets = {"lora_llama3_8b_r16": lambda: lora_llama3_8b_shapes(16), "full_1b": full_1b_shapes}
    out = []
    for name, make_shapes in sets.items():
        shapes = make_shapes()
        reference = _LazyReference(shapes, device)
        for bits in (32, 8):
            for impl in ("qlora_kernels", "bnb") + (("torch",) if bits == 32 else ()):
                out.append(_case(name, shapes, impl, bits, device, reference))
    return out


class _LazyReference:
    """The AdamW reference update, computed by the first case that checks against it (inside its time cap)."""

    def __init__(self, shapes, device) -> None:
        self.shapes, self.device, self.value = shapes, device, None

    def __iter__(self):
        if self.value is None:
            self.value = _reference_update(self.shapes, self.device)
        return iter(self.value)
