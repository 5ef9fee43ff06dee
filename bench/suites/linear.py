"""One QLoRA linear layer, forward / backward / both: ours against bitsandbytes + peft, an Unsloth-style composition,
and a dense layer with the same LoRA (the ceiling: bf16 on a GPU, float32 on a CPU, labelled ``dense_<dtype>``).

All impls share the same NF4 bytes (ours is a zero-copy view of the bitsandbytes layer's storage), the same LoRA
weights (random B so the LoRA path counts) and the same inputs, in one dtype: bf16 on a GPU, float32 on a CPU (CPUs
without native bf16 run bf16 through slow paths, which would compare code paths, not kernels). Each case's outputs
and gradients are checked against a float32 reference before it is timed.

Layers and inputs are built when the first case that needs them runs (inside its time cap, on the device: random
weights are drawn on the GPU and quantized there), and freed when the run moves to the next configuration.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch

import qlora_kernels as qk
from bench.harness import Case, copies_past_cache, copies_past_l2, rotating

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


def _bnb_linear4bit(n: int, k: int, device: torch.device, dtype: torch.dtype):
    """A bitsandbytes NF4 Linear4bit (double quantization) whose random weight was drawn and quantized on ``device``."""
    import bitsandbytes as bnb

    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                             device="meta")
    w = torch.randn(n, k, device=device, dtype=dtype).mul_(k**-0.5)
    base.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64, compress_statistics=True,
                                    quant_type="nf4", module=base)
    return base.to(device)  # Params4bit quantizes where it is moved to: here, where the data already is


class _Layer:
    """The shared weights of one (N, K, r) configuration (``copies`` independent NF4 weights, so that a rotation
    through them leaves the cache cold) and the impls' forward functions."""

    def __init__(self, n: int, k: int, r: int, device: torch.device, dtype: torch.dtype, copies: int = 1) -> None:
        from peft import LoraConfig, get_peft_model

        self.n, self.k, self.r, self.device, self.dtype = n, k, r, device, dtype
        self.scale = LORA_ALPHA / r
        self.lora_a = (torch.randn(r, k, device=device, dtype=dtype) * k**-0.5).requires_grad_()
        self.lora_b = (torch.randn(n, r, device=device, dtype=dtype) * r**-0.5).requires_grad_()

        class Holder(torch.nn.Module):
            def __init__(self, proj):
                super().__init__()
                self.proj = proj

        config = LoraConfig(r=r, lora_alpha=LORA_ALPHA, target_modules=["proj"], lora_dropout=0.0)
        self.bases, self.peft_layers, self.w4s = [], [], []
        for _ in range(copies):
            base = _bnb_linear4bit(n, k, device, dtype)
            layer = get_peft_model(Holder(base), config, autocast_adapter_dtype=False).base_model.model.proj
            # peft's adapters get our LoRA values in our dtype; all copies share the first copy's Parameters, so
            # gradients land in one place.
            if self.peft_layers:
                layer.lora_A["default"].weight = self.peft_layers[0].lora_A["default"].weight
                layer.lora_B["default"].weight = self.peft_layers[0].lora_B["default"].weight
            else:
                layer.lora_A["default"].weight = torch.nn.Parameter(self.lora_a.detach().clone())
                layer.lora_B["default"].weight = torch.nn.Parameter(self.lora_b.detach().clone())
            self.bases.append(base)
            self.peft_layers.append(layer)
            self.w4s.append(qk.NF4Weight.from_bnb(base))
        self.peft_a = self.peft_layers[0].lora_A["default"].weight
        self.peft_b = self.peft_layers[0].lora_B["default"].weight
        self._dense = None
        self._ref = None

    @property
    def w_dense(self) -> torch.Tensor:
        """The dense ceiling's frozen weight (copy 0 only: dense weights are 4-8× the NF4 bytes, past any cache)."""
        if self._dense is None:
            self._dense = self.w4s[0].dequantize(self.dtype)
        return self._dense

    def forward(self, impl: str) -> tuple[Callable[[torch.Tensor, int], Any], tuple]:
        """(fn(x, copy_index), (lora_A, lora_B)) of ``impl``."""
        if impl == "qlora_kernels":
            return (lambda x, i: qk.nf4_lora_linear(x, self.w4s[i], self.lora_a, self.lora_b, self.scale),
                    (self.lora_a, self.lora_b))
        if impl == "bnb_peft":
            return (lambda x, i: self.peft_layers[i](x)), (self.peft_a, self.peft_b)
        if impl == "unsloth_style":
            return (lambda x, i: _UnslothStyle.apply(x, self.bases[i].weight.data, self.bases[i].weight.quant_state,
                                                     self.lora_a, self.lora_b, self.scale),
                    (self.lora_a, self.lora_b))
        if impl.startswith("dense_"):
            lin = torch.nn.functional.linear
            return (lambda x, i: lin(x, self.w_dense) + self.scale * lin(lin(x, self.lora_a), self.lora_b),
                    (self.lora_a, self.lora_b))
        raise ValueError(f"impl must be one of qlora_kernels, bnb_peft, unsloth_style, dense_*; got {impl!r}")

    def reference(self, x: torch.Tensor, dy: torch.Tensor, copy: int = 0):
        """float32 output and gradients (x, A, B) through NF4 weight ``copy``."""
        w_ref = self.w4s[copy].dequantize(torch.float32)
        x32 = x.detach().float().requires_grad_()
        a32 = self.lora_a.detach().float().requires_grad_()
        b32 = self.lora_b.detach().float().requires_grad_()
        y = x32 @ w_ref.t() + self.scale * (x32 @ a32.t()) @ b32.t()
        grads = torch.autograd.grad(y, (x32, a32, b32), dy.float())
        return y.detach(), grads


class _Shared:
    """One slot of lazily built state (a layer, or a layer's inputs at one M): building a new key frees the old,
    so a run holds one configuration's tensors at a time."""

    def __init__(self) -> None:
        self.key = None
        self.value = None

    def get(self, key, build: Callable[[], Any]):
        if self.key != key:
            self.key, self.value = None, None  # free the old before building the new
            self.value = build()
            self.key = key
        return self.value


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm().clamp(min=1e-30)).item()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _est_s(device: torch.device, op: str, m: int, n: int, k: int) -> float:
    """Rough wall time of one case (build, gate, timed runs), for the progress bar's ETA only."""
    if device.type == "cuda":
        return 1.0 if op == "fwd" else 2.0
    flops = 2 * m * n * k * (1 if op == "fwd" else 2 if op == "bwd" else 3)
    return 1.5 + flops / 30e9 * 8  # ~30 GFLOP/s on 2 cores, ~8 calls (warm-up, gate, timed runs)


def _cases_for(layers: _Shared, layer_key, build_layer, m: int, impls, ops, device, dtype, inputs: _Shared,
               n: int, k: int, r: int, copies: int) -> list[Case]:
    """Cases of every impl and op at one M. The layer and inputs are built by the first case that needs them."""
    out = []

    def state():
        layer = layers.get(layer_key, build_layer)

        def build_inputs():
            e = torch.finfo(dtype).bits // 8
            count = max(copies, copies_past_l2(e * m * (layer.k + layer.n), device))
            xs = [torch.randn(m, layer.k, device=device, dtype=dtype) for _ in range(count)]
            dys = [torch.randn(m, layer.n, device=device, dtype=dtype) for _ in range(count)]
            y_ref, grads_ref = layer.reference(xs[0], dys[0])
            return xs, dys, y_ref, grads_ref

        return layer, inputs.get((layer_key, m), build_inputs)

    def check_fwd(y):
        _, (_, _, y_ref, _) = state()
        err = _rel_err(y, y_ref)
        return None if err <= REL_TOL else f"output relative error {err:.3e} > {REL_TOL}"

    def check_grads(grads):
        _, (_, _, _, grads_ref) = state()
        for name, g, want in zip(("dX", "dA", "dB"), grads, grads_ref):
            err = _rel_err(g, want)
            if not err <= REL_TOL:
                return f"{name} relative error {err:.3e} > {REL_TOL}"
        return None

    probe_bytes = _probe_nbytes(n, k, r, m, dtype)
    probe_flops = _probe_flops(n, k, r, m)
    common = dict(M=m, N=n, K=k, r=r, dtype=_dtype_name(dtype))
    for impl in impls:
        if "fwd" in ops:
            small = m <= SMALL_M

            def make_fwd(impl=impl, small=small):
                layer, (xs, _, _, _) = state()
                fn, _ = layer.forward(impl)
                count = len(layer.w4s)
                if small:  # decode: no autograd bookkeeping, launch overhead hidden by a CUDA graph
                    nxt = rotating([(x, i % count) for i, x in enumerate(xs)])

                    def call():
                        with torch.no_grad():
                            return fn(*nxt())
                    return call
                nxt = rotating([(x.detach().requires_grad_(), i % count) for i, x in enumerate(xs)])
                return lambda: fn(*nxt())

            graph = small and device.type == "cuda"
            out.append(Case("fwd", impl, make_fwd, check_fwd, bytes=probe_bytes["fwd"], flops=probe_flops["fwd"],
                            case="no_grad+graph" if graph else ("no_grad" if small else ""), cuda_graph=graph,
                            est_s=_est_s(device, "fwd", m, n, k), **common))
        if "bwd" in ops:

            def make_bwd(impl=impl):
                layer, (xs, dys, _, _) = state()
                fn, (lora_a, lora_b) = layer.forward(impl)
                count = len(layer.w4s)
                pairs = []
                for i, (x, dy) in enumerate(zip(xs, dys)):
                    x = x.detach().requires_grad_()
                    pairs.append((fn(x, i % count), x, dy))
                nxt = rotating(pairs)

                def call():
                    y, x, dy = nxt()
                    return torch.autograd.grad(y, (x, lora_a, lora_b), dy, retain_graph=True)

                return call

            out.append(Case("bwd", impl, make_bwd, check_grads, bytes=probe_bytes["bwd"], flops=probe_flops["bwd"],
                            est_s=_est_s(device, "bwd", m, n, k), **common))
        if "fwd_bwd" in ops:

            def make_fwd_bwd(impl=impl):
                layer, (xs, dys, _, _) = state()
                fn, (lora_a, lora_b) = layer.forward(impl)
                count = len(layer.w4s)
                nxt = rotating([(x, dy, i % count) for i, (x, dy) in enumerate(zip(xs, dys))])

                def call():
                    x, dy, i = nxt()
                    x = x.detach().requires_grad_()
                    return torch.autograd.grad(fn(x, i), (x, lora_a, lora_b), dy)

                return call

            out.append(Case("fwd_bwd", impl, make_fwd_bwd, check_grads, bytes=probe_bytes["fwd_bwd"],
                            flops=probe_flops["fwd_bwd"], est_s=_est_s(device, "fwd_bwd", m, n, k), **common))
    return out


def _probe_nbytes(n: int, k: int, r: int, m: int, dtype: torch.dtype) -> dict:
    """``_Layer.nbytes`` without building a layer: NF4 bytes with double quantization (codes, uint8 absmax, one
    float32 per 256 blocks, the 256-entry map and the offset)."""
    numel = n * k
    blocks = -(-numel // 64)
    nf4 = (numel + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 * 16 + 4
    e = torch.finfo(dtype).bits // 8
    lora = e * r * (n + k)
    fwd = nf4 + lora + e * m * (k + n)
    bwd = nf4 + 2 * lora + e * m * (n + 2 * k)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


def _probe_flops(n: int, k: int, r: int, m: int) -> dict:
    fwd = 2 * m * n * k + 2 * m * r * (k + n)
    bwd = 2 * m * n * k + 4 * m * r * (k + n)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


def _plan_points(device: torch.device, plan: str) -> list[tuple[tuple[int, int], int, list[tuple[int, tuple]]]]:
    """[((N, K), r, [(M, ops), ...]), ...] of a plan."""
    if plan == "tiny":
        return [((256, 256), 16, [(16, ("fwd", "bwd", "fwd_bwd"))])]
    if plan == "quick":
        return [((1024, 1024), 16, [(16, ("fwd", "bwd", "fwd_bwd")), (256, ("fwd", "bwd", "fwd_bwd"))])]
    if plan == "cpu":
        # The CPU goals: fwd at M = 1 against memory bandwidth; fwd and bwd at M = 256 against bnb + peft and the
        # dense float32 layer.
        return [((4096, 4096), 16, [(1, ("fwd",)), (256, ("fwd", "bwd"))])]
    if plan == "gpu-check":
        return [(shape, 16, [(1, ("fwd",)), (16, ("fwd",)), (4096, ("fwd_bwd",)), (8192, ("fwd_bwd",))])
                for shape in [(4096, 4096), (14336, 4096)]]
    # full: decode sizes below 16 rows forward only (the M <= 16 goal is a forward goal)
    return [(shape, r, [(m, ("fwd",) if m < SMALL_M else ("fwd", "bwd", "fwd_bwd")) for m in M_FULL])
            for shape in SHAPES_FULL for r in R_FULL]


def impls_for(device: torch.device) -> list[str]:
    dense = "dense_bf16" if device.type == "cuda" else "dense_float32"
    if not installed("bitsandbytes", "peft"):
        return ["qlora_kernels", dense]
    return ["qlora_kernels", "bnb_peft", "unsloth_style", dense]


def installed(*names: str) -> bool:
    """Whether every package is installed (found, not imported: listing cases stays fast; a broken install
    surfaces as the failure of the cases that use it)."""
    return all(importlib.util.find_spec(name) is not None for name in names)


def cases(device: torch.device, plan: str) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impls = impls_for(device)
    layers, inputs = _Shared(), _Shared()
    out: list[Case] = []
    for (n, k), r, points in _plan_points(device, plan):
        for m, ops in points:
            # Small M on a CPU: the weight is the big operand and would sit in the last-level cache; rotate through
            # enough independent NF4 weights to touch twice that cache per cycle.
            copies = 1
            if device.type == "cpu" and m <= SMALL_M:
                copies = copies_past_cache(_probe_nbytes(n, k, r, 0, dtype)["fwd"], device)
            key = (n, k, r, copies)

            def build_layer(n=n, k=k, r=r, copies=copies):
                return _Layer(n, k, r, device, dtype, copies)

            out.extend(_cases_for(layers, key, build_layer, m, impls, ops, device, dtype, inputs, n, k, r, copies))
    return out
