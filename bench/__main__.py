"""``python -m bench [--plan NAME] [--out DIR] [--only PATTERN] [--dry-run]``: run the benchmarks, print the report,
write DIR/results.json, DIR/results.md and DIR/results.png (default DIR: bench/results/latest-<device>/).

Plans (bench/plans.py): ``full`` (the default on a GPU), ``gpu-check`` (the goal points, for a short GPU lease),
``cpu`` (the default on a CPU: the CPU goals in a few minutes), ``quick`` (a small subset; also ``--quick``). A case
past the plan's time cap is recorded as a timeout; Ctrl-C, SIGTERM (``timeout``), a spent run budget or an
exception end the run with the report and plot of what was measured.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import signal
import sys
import time
import traceback

import torch

from bench import harness, plans, report


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def collect_cases(device: torch.device, plan: str, patterns, failures: list) -> list:
    """Every case of every suite for ``plan`` matching ``patterns`` (globs over 'suite:op/impl'). A suite that fails
    to list its cases is recorded in ``failures`` and the others still run."""
    from bench.suites import SUITES

    cases = []
    for suite_name, suite in SUITES.items():
        try:
            suite_cases = suite.cases(device, plan)
        except Exception as exc:  # noqa: BLE001 - one broken suite must not cost the others' numbers
            failures.append({"op": suite_name, "impl": "(suite)", "error": f"{type(exc).__name__}: {exc}"})
            continue
        for case in suite_cases:
            label = f"{suite_name}:{case.op}/{case.impl}"
            if patterns is None or any(fnmatch.fnmatch(label, p) for p in patterns):
                cases.append(case)
    return cases


def attach_models(cases: list) -> bool:
    """Put the static kernel model's prediction on each of our fwd / fwd_bwd cases; False when there is no model."""
    from bench import kernel_hooks

    model = kernel_hooks.find_modelled_time_us()
    if model is None:
        return False
    for case in cases:
        if case.impl == report.OURS:
            case.modelled_us = kernel_hooks.modelled_us(model, case.op, case.M, case.N, case.K, case.r)
    return True


def print_dry_run(cases: list, plan: plans.Plan, device: torch.device, modelled: bool) -> None:
    print(f"plan {plan.name} on {device.type}: {len(cases)} cases, per-case cap {plan.case_cap_s:g} s, "
          f"estimated {sum(c.est_s for c in cases):.0f} s of case time (an estimate, not a measurement)")
    for case in cases:
        extra = f"  modelled H200 {case.modelled_us:.1f} µs" if modelled and case.modelled_us else ""
        extra += f"  planned peak {case.planned_mem_mb:.0f} MiB" if case.planned_mem_mb else ""
        print(f"  ~{case.est_s:5.1f} s  {case.name}{extra}")
    if plan.autotune_limit is not None:
        print(f"autotune: the first {plan.autotune_limit} candidates of each GEMM family")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", choices=sorted(plans.PLANS), default=None,
                        help="what to measure (default: full on a GPU, cpu on a CPU)")
    parser.add_argument("--quick", action="store_true", help="the same as --plan quick")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/latest-<device>/)")
    parser.add_argument("--only", default=None,
                        help="glob over 'suite:op/impl' names, e.g. 'linear:fwd*' or '*:dequant/*' (comma-separated)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--case-cap", type=float, default=None, help="seconds per case (default: the plan's)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run; later cases are skipped (default: the plan's)")
    parser.add_argument("--dry-run", action="store_true", help="list the cases and their estimates; time nothing")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = plans.get("quick" if args.quick else (args.plan or plans.default_plan(device)))
    patterns = [p.strip() for p in args.only.split(",")] if args.only else None
    if device.type == "cuda" and plan.autotune_limit is not None:
        from bench import kernel_hooks

        kernel_hooks.limit_autotune(plan.autotune_limit)

    suite_failures: list = []
    cases = collect_cases(device, plan.name, patterns, suite_failures)
    modelled = (device.type == "cuda" or args.dry_run) and attach_models(cases)
    if args.dry_run:
        print_dry_run(cases, plan, device, modelled)
        return 0
    if not cases:
        print(f"no benchmark case matches --only {args.only!r}" if args.only else "no benchmark case", file=sys.stderr)
        for f in suite_failures:
            print(f"suite {f['op']} failed: {f['error']}", file=sys.stderr)
        return 2

    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       f"latest-{_slug(device.type + '-' + harness.device_name(device))}")
    os.makedirs(out_dir, exist_ok=True)
    plot_path = os.path.join(out_dir, "results.png")

    def write(results: harness.Results, with_plot: bool = True) -> None:
        """results.json, results.md and the plot, rewritten as the run goes (a run cut short keeps its numbers)."""
        harness.write_json(results, os.path.join(out_dir, "results.json"))
        data = results.to_json()
        with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
            f.write(report.markdown(data, modelled=modelled))
        if with_plot:
            report.plot(data, plot_path)

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    start = time.perf_counter()
    results = harness.new_results(device, plan.name, plan.name == "quick",
                                  sorted({getattr(torch, c.dtype) for c in cases if c.dtype}, key=str))
    results.failures.extend(suite_failures)
    try:
        harness.run(cases, device, plan.name == "quick", progress=not args.no_progress, checkpoint=write,
                    plan=plan.name, results=results,
                    case_cap_s=plan.case_cap_s if args.case_cap is None else args.case_cap,
                    run_budget_s=plan.run_budget_s if args.budget is None else args.budget)
    except KeyboardInterrupt:  # a second signal while the checkpoint was writing
        results.interrupted = results.interrupted or "interrupted"
    except Exception as exc:  # noqa: BLE001 - the harness itself failed: keep what it measured
        results.interrupted = f"the harness failed: {type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        signal.signal(signal.SIGTERM, previous)
        results.wall_s = time.perf_counter() - start
        write(results)
    data = results.to_json()
    print(report.markdown(data, modelled=modelled))
    print(f"wrote {out_dir}/results.json, results.md, results.png ({results.wall_s:.0f} s)")
    return 1 if data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
