"""Results as a markdown report (printed and written: what the run can tell, the goals, the table) and a plot.

Rates: GB/s = the record's minimal bytes / time; FLOP/s = its flops / time (GFLOP/s on a CPU, TFLOP/s on a GPU);
"of floor" = max(bytes / copy bandwidth, flops / matmul rate of the record's dtype) / time, both floors measured in
the same run. A floor is left blank where the run has no rate for the record's dtype, never taken from another one.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

OURS = "qlora_kernels"

CPU_TOP_LINE = (
    "**What a CPU run tells:** whether each implementation gives the right answer (every case is checked against a "
    "float32 reference before it is timed), how the CPU backend of qlora-kernels compares with bitsandbytes' CPU "
    "code and with a dense float32 layer on this machine, and whether the patched example fine-tune is faster "
    "than stock here. **What it does not tell:** anything about GPU speed. The Triton kernels do not run in a CPU "
    "benchmark (only through the interpreter, in tests), so none of these numbers predicts the GPU goals."
)
GPU_TOP_LINE = (
    "**What this run tells:** the speed of the Triton kernels and the paged optimizers on this GPU against "
    "bitsandbytes + peft, an Unsloth-style composition and a dense bf16 layer, each checked against a float32 "
    "reference before it is timed. Columns marked *modelled* are a static model's predictions, not measurements."
)


def _key(rec: dict) -> tuple:
    return (rec["op"], rec["M"], rec["N"], rec["K"], rec["r"], rec["dtype"], rec["case"])


def matmul_rate(results: dict, dtype: str) -> Optional[float]:
    """TFLOP/s of a dense matmul in ``dtype`` measured in this run (older results: bf16 only)."""
    rates = dict(results.get("matmul_tflops") or {})
    rates.setdefault("bfloat16", results.get("bf16_tflops"))
    return rates.get(dtype) or None


def floor_ms(rec: dict, copy_gbps: Optional[float], tflops: Optional[float]) -> float:
    """The floor for a record: its minimal bytes at copy bandwidth or its flops at the matmul rate of its dtype,
    whichever is larger (0 when neither is known)."""
    t_mem = rec["bytes"] / (copy_gbps * 1e9) if copy_gbps and rec.get("bytes") else 0.0
    t_math = rec["flops"] / (tflops * 1e12) if tflops and rec.get("flops") else 0.0
    return max(t_mem, t_math) * 1e3


def speedups(results: dict) -> dict:
    """{key: {impl: ms_impl / ms_ours}} for every key where ours ran (same op, shape, dtype and case: like for
    like)."""
    by_key: dict = defaultdict(dict)
    for rec in results["records"]:
        by_key[_key(rec)][rec["impl"]] = rec["ms"]
    out = {}
    for key, impls in by_key.items():
        if OURS in impls:
            out[key] = {impl: ms / impls[OURS] for impl, ms in impls.items() if impl != OURS}
    return out


def nf4_nbytes(n: int, k: int) -> int:
    """Bytes of an NF4 weight with double quantization: the codes and one uint8 absmax per 64 elements."""
    return (n * k + 1) // 2 + -(-n * k // 64)


def _sig(x: Optional[float], digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, never rounded to zero."""
    if x is None:
        return ""
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


# ------------------------------------------------------------------------------------------------- goals


def _records(results: dict, op: str) -> dict:
    by_key: dict = defaultdict(dict)
    for rec in results["records"]:
        if rec["op"] == op:
            by_key[_key(rec)][rec["impl"]] = rec
    return by_key


def _shape(key: tuple) -> str:
    op, m, n, k, r, dtype, case = key
    if op in ("optim_step",):
        return case
    if op == "train_step":
        return f"{case}, {dtype}"
    return (f"M={m} " if m else "") + f"{n}×{k}" + (f" r={r}" if r else "") + f" {dtype}"


def goals(results: dict) -> list[dict]:
    """The performance goals this run measures: [{goal, point, value, target, met}], ``met`` None when the run
    lacks a side of the comparison. CPU goals from issue 14, GPU goals from the README's Results section."""
    cpu = results.get("device_type", "cuda" if "cpu" not in results.get("device", "") else "cpu") == "cpu"
    copy = results.get("copy_gbps")
    rows: list[dict] = []

    def ratio_rows(op, m_ok, other, target, label, faster=True):
        for key, impls in sorted(_records(results, op).items()):
            if not m_ok(key[1]) or OURS not in impls:
                continue
            theirs = next((rec for impl, rec in impls.items() if impl == other or
                           (other.endswith("*") and impl.startswith(other[:-1]))), None)
            if theirs is None:
                rows.append(dict(goal=label, point=_shape(key), value="not measured", target="", met=None))
                continue
            ours_ms = impls[OURS]["ms"]
            if faster:
                value = theirs["ms"] / ours_ms
                strict = target == 1  # "faster than": a tie is not a win
                rows.append(dict(goal=label, point=_shape(key), value=f"{value:.2f}× faster",
                                 target=f"{'>' if strict else '≥'} {target:g}×",
                                 met=value > target if strict else value >= target))
            else:
                value = ours_ms / theirs["ms"]
                rows.append(dict(goal=label, point=_shape(key), value=f"{value:.2f}× its time",
                                 target=f"≤ {target:g}×", met=value <= target))

    def bandwidth_rows(label, m, target):
        for key, impls in sorted(_records(results, "fwd").items()):
            if key[1] != m or OURS not in impls or not copy:
                continue
            gbps = nf4_nbytes(key[2], key[3]) / (impls[OURS]["ms"] * 1e-3) / 1e9
            frac = gbps / copy
            rows.append(dict(goal=label, point=_shape(key), value=f"{frac:.0%} ({gbps:.3g} of {copy:.3g} GB/s)",
                             target=f"≥ {target:.0%}", met=frac >= target))

    if cpu:
        ratio_rows("dequant", lambda m: True, "bnb", 1, "dequantize vs bitsandbytes' native CPU")
        ratio_rows("quantize", lambda m: True, "bnb", 1, "quantize vs bitsandbytes' native CPU")
        bandwidth_rows("fwd M=1: NF4 bytes at the copy bandwidth", 1, 0.60)
        for op in ("fwd", "bwd"):
            ratio_rows(op, lambda m: m >= 256, "bnb_peft", 1, f"{op} M ≥ 256 vs bitsandbytes + peft")
            ratio_rows(op, lambda m: m >= 256, "dense_*", 1.3, f"{op} M ≥ 256 vs dense F.linear + LoRA",
                       faster=False)
        ratio_rows("train_step", lambda m: True, "bnb_peft", 1, "example fine-tune step, patched vs stock")
        ratio_rows("optim_step", lambda m: True, "bnb", 1, "optimizer step vs bitsandbytes' (same bits)")
        return rows
    ratio_rows("fwd_bwd", lambda m: m >= 4096, "bnb_peft", 1.3, "fwd_bwd M ≥ 4096 vs bitsandbytes + peft")
    ratio_rows("fwd_bwd", lambda m: m >= 4096, "dense_*", 1.10, "fwd_bwd M ≥ 4096 vs dense bf16 + LoRA",
               faster=False)
    ratio_rows("fwd", lambda m: m <= 16, "bnb_peft", 1.5, "fwd M ≤ 16 vs bitsandbytes + peft")
    bandwidth_rows("fwd M=1: NF4 bytes at the copy bandwidth", 1, 0.80)
    ratio_rows("optim_step", lambda m: True, "bnb", 1.5, "optimizer step vs bitsandbytes' paged (same bits)")
    ratio_rows("train_step", lambda m: True, "bnb_peft", 1, "train step, patched vs stock")
    for key, impls in sorted(_records(results, "train_step").items()):
        if OURS in impls and "bnb_peft" in impls and impls[OURS].get("peak_mem_mb") is not None:
            ours, stock = impls[OURS]["peak_mem_mb"], impls["bnb_peft"]["peak_mem_mb"]
            rows.append(dict(goal="train step peak memory vs stock", point=_shape(key),
                             value=f"{ours:.0f} vs {stock:.0f} MiB", target="≤ stock", met=ours <= stock))
    return rows


# ------------------------------------------------------------------------------------------------ report


def markdown(results: dict, modelled: bool = False) -> str:
    """The report. ``modelled`` adds the "modelled H200 µs" column (also shown whenever a record carries one)."""
    cuda = results.get("device_type") == "cuda"
    per_s = 1e12 if cuda else 1e9
    unit = "TFLOP/s" if cuda else "GFLOP/s"
    commit = results.get("commit") or "?"
    rates = dict(results.get("matmul_tflops") or {"bfloat16": results.get("bf16_tflops")})
    rate_text = ", ".join(f"{dt} {_sig(v * 1e12 / per_s)} {unit}" for dt, v in rates.items() if v)
    lines = [
        f"# Benchmark results: {results['device']}",
        "",
        CPU_TOP_LINE if not cuda else GPU_TOP_LINE,
        "",
        f"plan `{results.get('plan') or '?'}` · commit `{commit}` · "
        + (f"{results['wall_s']:.0f} s wall · " if results.get("wall_s") else "")
        + " · ".join(f"{k} {v}" for k, v in results["versions"].items() if v is not None),
        "",
        f"Floors measured in the same run: copy {_sig(results['copy_gbps'])} GB/s (bytes read + written, a buffer "
        f"past the last-level cache); dense matmul {rate_text}." + (" Quick run (subset)." if results.get("quick")
                                                                    else ""),
    ]
    if results.get("interrupted"):
        lines += ["", f"**Cut short:** {results['interrupted']}. The tables show what was measured before."]
    goal_rows = goals(results)
    if goal_rows:
        lines += ["", "## Goals", "", "| goal | point | measured | target | met |", "|---|---|---:|---:|---|"]
        for g in goal_rows:
            met = "" if g["met"] is None else ("yes" if g["met"] else "**no**")
            lines.append(f"| {g['goal']} | {g['point']} | {g['value']} | {g['target']} | {met} |")
    show_model = modelled or cuda or any(rec.get("modelled_us") is not None for rec in results["records"])
    show_plan = any(rec.get("planned_mem_mb") is not None for rec in results["records"])
    header = ["op", "M", "N", "K", "r", "dtype", "case", "impl", "ms", "GB/s", unit, "of floor", "ours faster by"]
    if show_model:
        header.insert(9, "modelled H200 µs")
    header.append("peak MiB")
    if show_plan:
        header.append("planned MiB")
    lines += ["", "## Measurements", "", "| " + " | ".join(header) + " |",
              "|" + "|".join("---" if h in ("op", "dtype", "case", "impl") else "---:" for h in header) + "|"]
    ups = speedups(results)
    over_floor = False
    for rec in sorted(results["records"], key=lambda r: (_key(r), r["impl"] != OURS, r["impl"])):
        ms = rec["ms"]
        gbps = rec["bytes"] / (ms * 1e-3) / 1e9 if rec.get("bytes") else None
        rate = rec["flops"] / (ms * 1e-3) / per_s if rec.get("flops") else None
        floor = floor_ms(rec, results.get("copy_gbps"), matmul_rate(results, rec["dtype"]))
        frac = floor / ms if floor else None
        over_floor |= bool(frac and frac > 1.0)
        up = ups.get(_key(rec), {}).get(rec["impl"])
        cells = [rec["op"], rec["M"], rec["N"], rec["K"], rec["r"], rec["dtype"], rec["case"], rec["impl"],
                 _sig(ms, 4), _sig(gbps), _sig(rate), f"{frac:.0%}" + ("‡" if frac > 1 else "") if frac else "",
                 f"{up:.2f}×" if up else ""]
        if show_model:
            cells.insert(9, _sig(rec.get("modelled_us")))
        cells.append(_sig(rec.get("peak_mem_mb"), 4))
        if show_plan:
            cells.append(_sig(rec.get("planned_mem_mb"), 4))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if over_floor:
        lines += ["", "‡ faster than the floor measured in this run: the operands stayed in a cache the copy "
                  "measurement overflowed, or the floor's rate was measured low; treat that row's fraction with care."]
    if show_model:
        lines += ["", "*modelled H200 µs*: the static model's prediction (DESIGN.md, \"the static model\"), not a "
                  "measurement."]
    if results.get("timeouts"):
        lines += ["", f"## Timed out (cap {results.get('case_cap_s') or '?'} s per case)", "",
                  "| op | impl | M | N | K | r | dtype | case | where | finished runs | ms of those |",
                  "|---|---|---:|---:|---:|---:|---|---|---|---:|---:|"]
        for t in results["timeouts"]:
            lines.append(f"| {t['op']} | {t['impl']} | {t['M']} | {t['N']} | {t['K']} | {t['r']} | {t['dtype']} | "
                         f"{t['case']} | {t['error']} | {t.get('runs', 0)} | {_sig(t.get('ms_of_finished_runs'), 4)} |")
    if results.get("failures"):
        lines += ["", "## Wrong or failed (not timed)", "", "| op | impl | M | N | K | r | dtype | case | error |",
                  "|---|---|---:|---:|---:|---:|---|---|---|"]
        for f in results["failures"]:
            err = str(f["error"]).replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {f.get('op', '')} | {f.get('impl', '')} | {f.get('M', '')} | {f.get('N', '')} | "
                         f"{f.get('K', '')} | {f.get('r', '')} | {f.get('dtype', '')} | {f.get('case', '')} | {err} |")
    if results.get("skipped"):
        lines += ["", f"## Not run ({len(results['skipped'])} cases)", ""]
        lines += [f"- {name}" for name in results["skipped"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> bool:
    """Bar chart of ours-faster-by per op and shape, titled with device, plan and commit; False when matplotlib is
    missing. Written even with no comparison yet (a run cut short early), saying so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ups = speedups(results)
    ops = sorted({key[0] for key in ups})
    commit = results.get("commit") or "?"
    commit = commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")
    title = (f"{results['device']} · plan {results.get('plan') or '?'} · commit {commit}"
             + (" · cut short" if results.get("interrupted") else ""))
    fig, axes = plt.subplots(max(1, len(ops)), 1, figsize=(12, 3.2 * max(1, len(ops)) + 0.6), squeeze=False)
    if not ops:
        axes[0, 0].text(0.5, 0.5, "no comparison measured yet", ha="center", va="center")
        axes[0, 0].set_axis_off()
    for ax, op in zip(axes[:, 0], ops):
        keys = sorted(k for k in ups if k[0] == op)
        impls = sorted({impl for k in keys for impl in ups[k]})
        labels = [(f"M={k[1]}\n" if k[1] else "") + f"{k[2]}×{k[3]}" + (f" r={k[4]}" if k[4] else "")
                  + (f"\n{k[6]}" if k[6] else "") for k in keys]
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            xs = [j + i * width for j in range(len(keys))]
            ax.bar(xs, [ups[k].get(impl, 0) for k in keys], width, label=f"vs {impl}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(keys))])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("ours faster by (×)")
        ax.set_title(f"{op} ({keys[0][5] if keys else ''})", fontsize=9)
        if impls:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title above the first plot
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
