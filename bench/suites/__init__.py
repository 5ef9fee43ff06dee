"""Benchmark suites. Each module has ``cases(device, plan) -> list[Case]`` (plan: a name in bench/plans.py); SUITES lists them in run order."""

from . import linear, optim, quant, train

SUITES = {"quant": quant, "linear": linear, "optim": optim, "train": train}
