"""Benchmark suites. Each module has ``cases(device, quick) -> list[Case]``; SUITES lists them in run order."""

from . import linear, optim, quant, train

SUITES = {"quant": quant, "linear": linear, "optim": optim, "train": train}
