"""``python -m bench [--quick] [--out DIR] [--only PATTERN]``: run the benchmarks, print the table, write
DIR/results.json, DIR/results.md and DIR/results.png (default DIR: bench/results/latest-<device>/)."""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import sys

import torch

from bench import harness, report
from bench.suites import SUITES


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a CPU-friendly subset (minutes on 2 cores)")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/latest-<device>/)")
    parser.add_argument("--only", default=None,
                        help="glob over 'suite:op/impl' names, e.g. 'linear:fwd*' or '*:dequant/*' (comma-separated)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    patterns = [p.strip() for p in args.only.split(",")] if args.only else None
    cases = []
    for suite_name, suite in SUITES.items():
        for case in suite.cases(device, args.quick):
            label = f"{suite_name}:{case.op}/{case.impl}"
            if patterns is None or any(fnmatch.fnmatch(label, p) for p in patterns):
                cases.append(case)
    if not cases:
        print(f"no benchmark case matches --only {args.only!r}", file=sys.stderr)
        return 2

    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       f"latest-{_slug(device.type + '-' + harness.device_name(device))}")
    os.makedirs(out_dir, exist_ok=True)

    def write(results: harness.Results) -> None:
        """results.json and results.md, rewritten as the run goes (an interrupted run keeps what it measured)."""
        harness.write_json(results, os.path.join(out_dir, "results.json"))
        with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
            f.write(report.markdown(results.to_json()))

    results = harness.run(cases, device, args.quick, progress=not args.no_progress, checkpoint=write)
    data = results.to_json()
    table = report.markdown(data)
    plotted = report.plot(data, os.path.join(out_dir, "results.png"))
    print(table)
    print(f"wrote {out_dir}/results.json, results.md" + (", results.png" if plotted else ""))
    return 1 if data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
