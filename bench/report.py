"""Results as a markdown table (printed and written) and a plot of our speed-ups."""

from __future__ import annotations

from collections import defaultdict

OURS = "qlora_kernels"


def _key(rec: dict) -> tuple:
    return (rec["op"], rec["M"], rec["N"], rec["K"], rec["r"], rec["dtype"], rec["case"])


def roofline_ms(rec: dict, copy_gbps: float, tflops: float) -> float:
    """The floor for a record: its minimal bytes at copy bandwidth or its flops at matmul rate, whichever is larger."""
    t_mem = rec["bytes"] / (copy_gbps * 1e9) if copy_gbps and rec["bytes"] else 0.0
    t_math = rec["flops"] / (tflops * 1e12) if tflops and rec["flops"] else 0.0
    return max(t_mem, t_math) * 1e3


def speedups(results: dict) -> dict:
    """{key: {impl: ms_impl / ms_ours}} for every key where ours ran."""
    by_key: dict = defaultdict(dict)
    for rec in results["records"]:
        by_key[_key(rec)][rec["impl"]] = rec["ms"]
    out = {}
    for key, impls in by_key.items():
        if OURS in impls:
            out[key] = {impl: ms / impls[OURS] for impl, ms in impls.items() if impl != OURS}
    return out


def markdown(results: dict) -> str:
    lines = [
        f"# Benchmark results: {results['device']}",
        "",
        f"commit `{results.get('commit') or '?'}` · " + " · ".join(
            f"{k} {v}" for k, v in results["versions"].items() if v is not None
        ),
        "",
        f"Floors measured in the same run: copy {results['copy_gbps']:.1f} GB/s, bf16 matmul "
        f"{results['bf16_tflops']:.2f} TFLOP/s."
        + (" Quick run (subset)." if results.get("quick") else ""),
        "",
        "| op | M | N | K | r | dtype | case | impl | ms | GB/s | TFLOP/s | of roofline | ours faster by |",
        "|---|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    ups = speedups(results)
    for rec in sorted(results["records"], key=lambda r: (_key(r), r["impl"] != OURS, r["impl"])):
        ms = rec["ms"]
        gbps = rec["bytes"] / (ms * 1e-3) / 1e9 if rec["bytes"] else None
        tf = rec["flops"] / (ms * 1e-3) / 1e12 if rec["flops"] else None
        floor = roofline_ms(rec, results["copy_gbps"], results["bf16_tflops"])
        up = ups.get(_key(rec), {}).get(rec["impl"])
        lines.append(
            "| {op} | {M} | {N} | {K} | {r} | {dtype} | {case} | {impl} | {ms:.4g} | {gb} | {tf} | {fr} | {up} |".format(
                **{k: rec[k] for k in ("op", "M", "N", "K", "r", "dtype", "case", "impl")},
                ms=ms,
                gb=f"{gbps:.1f}" if gbps else "",
                tf=f"{tf:.2f}" if tf else "",
                fr=f"{floor / ms:.0%}" if floor else "",
                up=f"{up:.2f}×" if up else "",
            )
        )
    if results.get("failures"):
        lines += ["", "## Wrong or failed (not timed)", "", "| op | impl | M | N | K | r | dtype | case | error |",
                  "|---|---|---:|---:|---:|---:|---|---|---|"]
        for f in results["failures"]:
            err = str(f["error"]).replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {f['op']} | {f['impl']} | {f['M']} | {f['N']} | {f['K']} | {f['r']} | {f['dtype']} | "
                         f"{f['case']} | {err} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> bool:
    """Bar chart of ours-faster-by per op and shape; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ups = speedups(results)
    ops = sorted({key[0] for key in ups})
    if not ops:
        ops = ["(no comparisons)"]
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        keys = [k for k in ups if k[0] == op]
        impls = sorted({impl for k in keys for impl in ups[k]})
        labels = [f"M={k[1]}\n{k[2]}×{k[3]}" + (f" r={k[4]}" if k[4] else "") + (f"\n{k[6]}" if k[6] else "")
                  for k in keys]
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            xs = [j + i * width for j in range(len(keys))]
            ax.bar(xs, [ups[k].get(impl, 0) for k in keys], width, label=f"vs {impl}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(keys))])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("ours faster by (×)")
        ax.set_title(f"{op} — {results['device']}", fontsize=9)
        if impls:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
