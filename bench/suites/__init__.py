"""Benchmark suites. Each module has ``cases(device, quick) -> list[Case]``; SUITES lists them in run order."""

from . import quant

SUITES = {"quant": quant}
