"""The GPU check's correctness smoke (stage 2 of bench/gpu_check.sh): the kernels a GPU run depends on, each checked
once against a float32 reference or bitsandbytes, results written to a JSON file after every check (a run cut short
keeps what it found).

    python -m bench.gpu_smoke OUT.json [--device cuda] [--small]

1. the fused linear in bf16, forward and backward, at M = 1, 16, 4096 on 4096×4096 and 14336×4096 (r = 16), against
   float32 math on the same NF4 weight: output, dX, dA, dB, norm-wise relative error ≤ 2e-2 (bf16: ≈ 1e-2 expected);
2. NF4 quantize and dequantize against bitsandbytes on the same device: the same packed bytes and absmax codes, the
   same dequantized weight;
3. one step of PagedAdamW (32-bit) against torch.optim.AdamW and of PagedAdamW8bit against bitsandbytes'
   PagedAdamW8bit, from the same start;
4. the bf16 GEMMs' register decode (triton_kernels/nf4_asm.py, inline asm the CPU cannot run) against its plain
   Triton twin: the same forward output, bit for bit, at M = 16 through the first plain and the first swapped
   (MMA-order) decode candidate, and at M = 4096 through the first candidate.

Runs the first autotuning candidate of each kernel (QLORA_KERNELS_AUTOTUNE=0): correctness needs no tuning, and
the benchmark stage then finds these kernels compiled in Triton's cache. On a GPU the groups of checks (one per M,
one for NF4 + optimizers) run as parallel processes, so their Triton compiles overlap on the host's cores. ``--small`` (for CPU tests of this script)
uses 256×256 and 512×256 weights and M = 1, 16, 64. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from typing import Callable, Optional

os.environ.setdefault("QLORA_KERNELS_AUTOTUNE", "0")

import torch  # noqa: E402

LINEAR_TOL = 2e-2
OPTIM_TOL_32 = 1e-5
OPTIM_TOL_8 = 2e-2


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


def check_linear(device: torch.device, n: int, k: int, m: int, r: int = 16) -> dict:
    """bf16 fused linear fwd + bwd vs float32 math on the same dequantized NF4 weight."""
    import qlora_kernels as qk

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    w4 = qk.NF4Weight.quantize(torch.randn(n, k, device=device, dtype=dtype) * k**-0.5)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, k, device=device, dtype=dtype) * k**-0.5).requires_grad_()
    b = (torch.randn(n, r, device=device, dtype=dtype) * r**-0.5).requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=dtype)
    scale = 2.0
    y = qk.nf4_lora_linear(x, w4, a, b, scale)
    grads = torch.autograd.grad(y, (x, a, b), dy)
    w32 = w4.dequantize(torch.float32)
    x32, a32, b32 = (t.detach().float().requires_grad_() for t in (x, a, b))
    y32 = x32 @ w32.t() + scale * (x32 @ a32.t()) @ b32.t()
    grads32 = torch.autograd.grad(y32, (x32, a32, b32), dy.float())
    errors = {"y": _rel(y, y32)}
    errors.update({name: _rel(g, g32) for name, g, g32 in zip(("dX", "dA", "dB"), grads, grads32)})
    worst = max(errors.values())
    return {"ok": worst <= LINEAR_TOL and all(torch.isfinite(t).all().item() for t in (y, *grads)),
            "errors": {k_: float(f"{v:.3e}") for k_, v in errors.items()}, "tolerance": LINEAR_TOL}


def check_nf4_vs_bnb(device: torch.device, n: int, k: int) -> dict:
    """Our quantize and dequantize against bitsandbytes' on the same device and input."""
    import bitsandbytes.functional as F

    import qlora_kernels as qk

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    w = torch.randn(n, k, device=device, dtype=dtype)
    ours = qk.NF4Weight.quantize(w)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    theirs = qk.NF4Weight.from_bnb(packed, state)
    same_codes = torch.equal(ours.packed.reshape(-1), theirs.packed.reshape(-1))
    absmax_agree = (ours.absmax.reshape(-1) == theirs.absmax.reshape(-1)).float().mean().item()
    deq_same = torch.equal(theirs.dequantize(dtype), F.dequantize_4bit(packed, state).to(dtype))
    # bitsandbytes' CPU library picks a farther absmax level for ~0.2 % of blocks (README); its CUDA kernel agrees.
    absmax_ok = absmax_agree == 1.0 if device.type == "cuda" else absmax_agree > 0.99
    return {"ok": same_codes and deq_same and absmax_ok, "same_packed_codes": same_codes,
            "absmax_codes_agree": absmax_agree, "dequantize_equal": deq_same}


def _step_params(shapes, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, generator=gen, device=device).mul_(0.02).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device).mul_(1e-3)
    return params


def check_optimizer_step(device: torch.device, bits: int) -> dict:
    """One step of ours against the same step of the reference optimizer (torch AdamW, or bitsandbytes' 8-bit)."""
    import qlora_kernels as qk

    shapes = [(16, 4096), (4096, 16), (4096,), (300, 70)]  # below and above the 8-bit minimum size
    kwargs = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ours_p, ref_p = _step_params(shapes, device), _step_params(shapes, device)
    start = [p.detach().clone() for p in ours_p]
    if bits == 32:
        qk.optim.PagedAdamW(ours_p, **kwargs).step()
        torch.optim.AdamW(ref_p, foreach=False, **kwargs).step()
        tol = OPTIM_TOL_32
    else:
        import bitsandbytes as bnb

        qk.optim.PagedAdamW8bit(ours_p, **kwargs).step()
        bnb.optim.PagedAdamW8bit(ref_p, **kwargs).step()
        tol = OPTIM_TOL_8
    num = sum((p.detach().float() - q.detach().float()).norm().item() ** 2 for p, q in zip(ours_p, ref_p))
    den = sum((q.detach().float() - s).norm().item() ** 2 for q, s in zip(ref_p, start))
    err = (num / max(den, 1e-30)) ** 0.5
    return {"ok": err <= tol, "update_relative_error": float(f"{err:.3e}"), "tolerance": tol}


def check_register_decode(device: torch.device, n: int, k: int, m: int, r: int = 16,
                          swapped: Optional[bool] = None) -> dict:
    """The fused forward with the register decode's inline asm and with its twin: identical bf16 outputs (the two
    produce the same weights bit for bit, so the same MMAs follow). The family's first candidate, or the first with
    ``swapped`` as its SWAP_AB (at M ≤ 16 swapped: the MMA-order tiles and the asm's word form; plain: the byte
    form)."""
    import qlora_kernels as qk
    from qlora_kernels.triton_kernels import lora_linear as launch
    from qlora_kernels.triton_kernels import lora_linear_gemm as gemm
    from qlora_kernels.triton_kernels import lora_linear_tiles as tiles

    if device.type != "cuda":
        return {"ok": True, "skipped": "inline asm needs a GPU"}
    w4 = qk.NF4Weight.quantize(torch.randn(n, k, device=device, dtype=torch.bfloat16) * k**-0.5)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    a = torch.randn(r, k, device=device, dtype=torch.bfloat16) * k**-0.5
    b = torch.randn(n, r, device=device, dtype=torch.bfloat16) * r**-0.5
    candidates = gemm.gemm_configs("fwd", m <= gemm.SMALL_M, True, every_candidate=True)
    first = candidates[0] if swapped is None else next(c for c in candidates if c.kwargs["SWAP_AB"] == swapped)
    config = {**first.kwargs, "num_warps": first.num_warps, "num_stages": first.num_stages}
    storage = w4.op_storage()
    outs = {}
    for name, mode in (("asm", tiles.DECODE_REGISTERS_ASM.value), ("twin", tiles.DECODE_REGISTERS_TWIN.value)):
        outs[name], _ = launch.nf4_lora_linear_fwd(x, *storage, a, b, 2.0, None, 0.0, None, config=config,
                                                   decode=mode)
    same = torch.equal(outs["asm"].view(torch.int16), outs["twin"].view(torch.int16))
    return {"ok": same, "bitwise_equal": same, "max_abs_difference": (outs["asm"].float() - outs["twin"].float())
            .abs().max().item(), "config": str(first)}


def checks_for(device: torch.device, small: bool) -> list[tuple[str, str, Callable[[], dict]]]:
    """[(group, name, check)]: one group per M (each compiles its own kernels) and one for NF4 + the optimizers."""
    shapes = [(256, 256), (512, 256)] if small else [(4096, 4096), (14336, 4096)]
    ms = [1, 16, 64] if small else [1, 16, 4096]
    checks = []
    for m in ms:
        for n, k in shapes:
            checks.append((f"M={m}", f"fused linear fwd+bwd M={m} {n}x{k} r=16",
                           lambda n=n, k=k, m=m: check_linear(device, n, k, m)))
    checks.append(("nf4+optim", f"nf4 quantize/dequantize vs bitsandbytes {shapes[0][0]}x{shapes[0][1]}",
                   lambda: check_nf4_vs_bnb(device, *shapes[0])))
    checks.append(("nf4+optim", "PagedAdamW step vs torch AdamW", lambda: check_optimizer_step(device, 32)))
    checks.append(("nf4+optim", "PagedAdamW8bit step vs bitsandbytes PagedAdamW8bit",
                   lambda: check_optimizer_step(device, 8)))
    n, k = shapes[0]
    checks.append(("decode", f"register decode asm vs twin, plain tiles, fused fwd M=16 {n}x{k}",
                   lambda n=n, k=k: check_register_decode(device, n, k, 16, swapped=False)))
    m = 64 if small else 4096
    checks.append(("decode", f"register decode asm vs twin, fused fwd M={m} {n}x{k}",
                   lambda n=n, k=k, m=m: check_register_decode(device, n, k, m)))
    n, k = shapes[0]
    checks.append(("decode", f"register decode asm vs twin, MMA-order tiles, fused fwd M=16 {n}x{k}",
                   lambda n=n, k=k: check_register_decode(device, n, k, 16, swapped=True)))
    return checks


def run_checks(checks, device: torch.device, write: Callable[[list], None]) -> list:
    """Run ``checks`` one after another in this process, calling ``write(results)`` after each."""
    results: list = []
    for group, name, fn in checks:
        start = time.perf_counter()
        try:
            entry = {"check": name, "group": group, **fn()}
        except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported with the others
            entry = {"check": name, "group": group, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()[-2000:]}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        entry["seconds"] = round(time.perf_counter() - start, 2)
        results.append(entry)
        print(f"{'ok  ' if entry['ok'] else 'FAIL'} {entry['seconds']:6.1f} s  {name}"
              + ("" if entry["ok"] else f"  {entry.get('error') or entry}"), flush=True)
        write(results)
    return results


def run_groups_in_parallel(groups: list, argv_base: list, out: str, write: Callable[[list], None]) -> list:
    """One process per group, all at once (their Triton compiles then overlap on the host's cores); their results
    are merged into ``out`` as each process ends. A group whose process dies is reported as a failed check."""
    procs = {}
    for group in groups:
        part = f"{out}.{re.sub(r'[^A-Za-z0-9]+', '_', group)}.json"
        cmd = [sys.executable, "-m", "bench.gpu_smoke", part, "--group", group, *argv_base]
        procs[group] = (subprocess.Popen(cmd), part)
    results: list = []
    pending = dict(procs)
    while pending:
        for group, (proc, part) in list(pending.items()):
            if proc.poll() is None:
                continue
            del pending[group]
            try:
                with open(part, encoding="utf-8") as f:
                    results.extend(json.load(f)["checks"])
            except (OSError, ValueError, KeyError):
                results.append({"check": f"group {group}", "group": group, "ok": False,
                                "error": f"its process exited {proc.returncode} without results"})
            write(results)
        time.sleep(0.2)
    return results


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSON file for the results")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--small", action="store_true", help="small shapes (a CPU test of this script)")
    parser.add_argument("--group", default=None, help="run only this group of checks (M=1, M=16, ..., nf4+optim)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="groups run as parallel processes (default: all at once on a GPU, 1 on a CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checks = checks_for(device, args.small)
    groups = list(dict.fromkeys(group for group, _, _ in checks))
    if args.group is not None:
        if args.group not in groups:
            parser.error(f"--group must be one of {groups}, got {args.group!r}")
        checks = [c for c in checks if c[0] == args.group]

    def write(results: list) -> None:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"device": str(device), "checks": results}, f, indent=1)

    jobs = args.jobs if args.jobs is not None else (len(groups) if device.type == "cuda" else 1)
    if args.group is None and jobs > 1:
        base = ["--device", str(device)] + (["--small"] if args.small else [])
        results = run_groups_in_parallel(groups, base, args.out, write)
    else:
        results = run_checks(checks, device, write)
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
