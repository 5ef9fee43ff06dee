"""One QLoRA linear layer, forward / backward / both, at Llama-3-8B shapes: ours against bitsandbytes + peft,
an Unsloth-style composition, and a dense bf16 layer with the same LoRA (the ceiling).

All four impls share the same NF4 bytes (ours is a zero-copy view of the bitsandbytes layer's storage), the same
LoRA weights (bf16, random B so the LoRA path counts) and the same inputs. Each case's outputs and gradients are
checked against a float32 reference before it is timed.
"""

from __future__ import annotations

import torch

import qlora_kernels as qk
from bench.harness import Case, copies_past_l2, rotating

SHAPES_FULL = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (N, K)
M_FULL = [1, 2, 4, 8, 16, 64, 256, 1024, 4096, 8192]
R_FULL = [16, 64]
SMALL_M = 16  # at and below: decode-like calls, timed under no_grad in a CUDA graph
LORA_ALPHA = 16
REL_TOL = 3e-2  # bf16 end to end against a float32 reference


class _UnslothStyle(torch.autograd.Function):
    """bitsandbytes dequantize → matmul → addmm for the LoRA term; backward dequantizes again (nothing dense kept)."""

    @staticmethod
    def forward(ctx, x, packed, state, lora_a, lora_b, scale):
        import bitsandbytes.functional as F

        w = F.dequantize_4bit(packed, state).to(x.dtype)
        s = x @ lora_a.t()
        y = x @ w.t()
        y.addmm_(s, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x, s, lora_a, lora_b)
        ctx.packed, ctx.state, ctx.scale = packed, state, scale
        return y

    @staticmethod
    def backward(ctx, dy):
        import bitsandbytes.functional as F

        x, s, lora_a, lora_b = ctx.saved_tensors
        ds = dy @ lora_b
        d_b = (dy.t() @ s) * ctx.scale
        d_a = (ds.t() @ x) * ctx.scale
        w = F.dequantize_4bit(ctx.packed, ctx.state).to(dy.dtype)
        dx = dy @ w
        dx.addmm_(ds, lora_a, alpha=ctx.scale)
        return dx, None, None, d_a, d_b, None


class _Layer:
    """The shared weights of one (N, K, r) configuration and the four impls' forward functions."""

    def __init__(self, n: int, k: int, r: int, device: torch.device, dtype: torch.dtype) -> None:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model

        self.n, self.k, self.r, self.device, self.dtype = n, k, r, device, dtype
        self.scale = LORA_ALPHA / r
        base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        base.load_state_dict({"weight": torch.randn(n, k, dtype=dtype) * k**-0.5})
        base = base.to(device)

        class Holder(torch.nn.Module):
            def __init__(self, proj):
                super().__init__()
                self.proj = proj

        config = LoraConfig(r=r, lora_alpha=LORA_ALPHA, target_modules=["proj"], lora_dropout=0.0)
        self.peft_layer = get_peft_model(Holder(base), config, autocast_adapter_dtype=False).base_model.model.proj
        self.lora_a = (torch.randn(r, k, device=device, dtype=dtype) * k**-0.5).requires_grad_()
        self.lora_b = (torch.randn(n, r, device=device, dtype=dtype) * r**-0.5).requires_grad_()
        with torch.no_grad():
            self.peft_layer.lora_A["default"].weight.copy_(self.lora_a)
            self.peft_layer.lora_B["default"].weight.copy_(self.lora_b)
        self.peft_a = self.peft_layer.lora_A["default"].weight
        self.peft_b = self.peft_layer.lora_B["default"].weight
        self.w4 = qk.NF4Weight.from_bnb(base)
        self.packed, self.state = base.weight.data, base.weight.quant_state
        self.w_dense = self.w4.dequantize(dtype)  # the dense ceiling's frozen weight
        self.w_ref = self.w4.dequantize(torch.float32)

    def forward(self, impl: str):
        if impl == "qlora_kernels":
            return lambda x: qk.nf4_lora_linear(x, self.w4, self.lora_a, self.lora_b, self.scale), (self.lora_a, self.lora_b)
        if impl == "bnb_peft":
            return self.peft_layer, (self.peft_a, self.peft_b)
        if impl == "unsloth_style":
            return (lambda x: _UnslothStyle.apply(x, self.packed, self.state, self.lora_a, self.lora_b, self.scale),
                    (self.lora_a, self.lora_b))
        if impl == "dense_bf16":
            lin = torch.nn.functional.linear
            return (lambda x: lin(x, self.w_dense) + self.scale * lin(lin(x, self.lora_a), self.lora_b),
                    (self.lora_a, self.lora_b))
        raise ValueError(impl)

    def reference(self, x: torch.Tensor, dy: torch.Tensor):
        """float32 output and gradients (x, A, B)."""
        x32 = x.detach().float().requires_grad_()
        a32 = self.lora_a.detach().float().requires_grad_()
        b32 = self.lora_b.detach().float().requires_grad_()
        y = x32 @ self.w_ref.t() + self.scale * (x32 @ a32.t()) @ b32.t()
        grads = torch.autograd.grad(y, (x32, a32, b32), dy.float())
        return y.detach(), grads

    def nbytes(self, m: int) -> dict:
        nf4 = self.w4.nbytes
        lora = 2 * self.r * (self.n + self.k)
        fwd = nf4 + lora + 2 * m * (self.k + self.n)
        bwd = nf4 + 2 * lora + 2 * m * (self.n + 2 * self.k)
        return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}

    def flops(self, m: int) -> dict:
        fwd = 2 * m * self.n * self.k + 2 * m * self.r * (self.k + self.n)
        bwd = 2 * m * self.n * self.k + 4 * m * self.r * (self.k + self.n)
        return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm().clamp(min=1e-30)).item()


def _cases_for(layer: _Layer, m: int, impls, ops, device) -> list[Case]:
    out = []
    x_bytes = 2 * m * layer.k
    copies = copies_past_l2(x_bytes + 2 * m * layer.n, device)
    xs = [torch.randn(m, layer.k, device=device, dtype=layer.dtype) for _ in range(copies)]
    dys = [torch.randn(m, layer.n, device=device, dtype=layer.dtype) for _ in range(copies)]
    y_ref, grads_ref = layer.reference(xs[0], dys[0])
    nbytes, flops = layer.nbytes(m), layer.flops(m)
    common = dict(M=m, N=layer.n, K=layer.k, r=layer.r, dtype="bfloat16")
    for impl in impls:
        fn, (lora_a, lora_b) = layer.forward(impl)

        def check_fwd(y):
            err = _rel_err(y, y_ref)
            return None if err <= REL_TOL else f"output relative error {err:.3e} > {REL_TOL}"

        def check_grads(grads):
            for name, g, want in zip(("dX", "dA", "dB"), grads, grads_ref):
                err = _rel_err(g, want)
                if not err <= REL_TOL:
                    return f"{name} relative error {err:.3e} > {REL_TOL}"
            return None

        if "fwd" in ops:
            small = m <= SMALL_M

            def make_fwd(fn=fn, small=small):
                if small:  # decode: no autograd bookkeeping, launch overhead hidden by a CUDA graph
                    nxt = rotating(xs)

                    def call():
                        with torch.no_grad():
                            return fn(nxt())
                    return call
                leaves = [x.detach().requires_grad_() for x in xs]
                nxt = rotating(leaves)
                return lambda: fn(nxt())

            out.append(Case("fwd", impl, make_fwd, check_fwd, bytes=nbytes["fwd"], flops=flops["fwd"],
                            case="no_grad+graph" if small and device.type == "cuda" else "", cuda_graph=small and device.type == "cuda",
                            **common))
        if "bwd" in ops:

            def make_bwd(fn=fn, lora_a=lora_a, lora_b=lora_b):
                pairs = []
                for x, dy in zip(xs, dys):
                    x = x.detach().requires_grad_()
                    pairs.append((fn(x), x, dy))
                nxt = rotating(pairs)

                def call():
                    y, x, dy = nxt()
                    return torch.autograd.grad(y, (x, lora_a, lora_b), dy, retain_graph=True)

                return call

            out.append(Case("bwd", impl, make_bwd, check_grads, bytes=nbytes["bwd"], flops=flops["bwd"], **common))
        if "fwd_bwd" in ops:

            def make_fwd_bwd(fn=fn, lora_a=lora_a, lora_b=lora_b):
                nxt = rotating(list(zip(xs, dys)))

                def call():
                    x, dy = nxt()
                    x = x.detach().requires_grad_()
                    return torch.autograd.grad(fn(x), (x, lora_a, lora_b), dy)

                return call

            out.append(Case("fwd_bwd", impl, make_fwd_bwd, check_grads, bytes=nbytes["fwd_bwd"],
                            flops=flops["fwd_bwd"], **common))
    return out


def cases(device: torch.device, quick: bool) -> list[Case]:
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except Exception:  # noqa: BLE001
        impls = ["qlora_kernels", "dense_bf16"]
    else:
        impls = ["qlora_kernels", "bnb_peft", "unsloth_style", "dense_bf16"]
    if quick or device.type == "cpu":
        plan = [((1024, 1024), [16, 256], [16])] if quick else [((4096, 4096), [1, 16, 1024], [16])]
    else:
        plan = [(shape, M_FULL, R_FULL) for shape in SHAPES_FULL]
    out: list[Case] = []
    for (n, k), ms, rs in plan:
        for r in rs:
            layer = _Layer(n, k, r, device, torch.bfloat16)
            for m in ms:
                # Decode sizes below 16 rows are measured forward only (the M <= 16 goal is a forward goal).
                ops = ("fwd",) if m < SMALL_M else ("fwd", "bwd", "fwd_bwd")
                out.extend(_cases_for(layer, m, impls, ops, device))
    return out
