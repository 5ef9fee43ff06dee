"""What every launcher needs: whether Triton runs through its CPU interpreter, and device checks."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``, read when Triton decorates them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raise before a launch that cannot work: CPU tensors outside the interpreter, or tensors on mixed devices."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors of one kernel call must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop() if devices else None
    if device is not None and device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "CPU tensors reach the Triton kernels only through Triton's interpreter: set TRITON_INTERPRET=1 before "
            "importing qlora_kernels, or unset QLORA_KERNELS_BACKEND to use the torch reference on CPU"
        )


def compile_options(**options) -> dict:
    """Launch options that only a real compiler understands (the interpreter takes no compile options)."""
    return {} if interpreting() else options


# Split-K of the decode-sized GEMMs (M ≤ 16): the weight's output tiles alone can be fewer than the SMs (64 tiles of
# 64 rows at N = 4096), so the reduction is split too, each split writing float32 partial sums that one more small
# kernel adds up in a fixed order. At most this many splits, and few enough that the partial sums (written once and
# read once: 8 · splits · M · out bytes) stay within an eighth of the NF4 weight's out · reduce_len / 2 bytes.
MAX_SPLITS = 16


def split_limit(M: int, reduce_len: int) -> int:
    """The most splits worth running for M rows over a reduction of ``reduce_len``: MAX_SPLITS, or fewer where the
    partial sums' traffic would pass an eighth of the weight's."""
    return max(1, min(MAX_SPLITS, reduce_len // (128 * max(M, 1))))


def split_count(tiles: int, reduce_tiles: int, sms: int, max_splits: int = MAX_SPLITS) -> int:
    """How many splits of the reduction (``reduce_tiles`` steps) to run beside ``tiles`` output tiles on ``sms``
    SMs: the count that makes the fewest waves × steps per split (wave quantisation: ceil(programs / sms) programs
    share an SM), and among equals the fewest splits that give every SM a program. Each split's step count comes
    first (``cdiv(reduce_tiles, splits)``), then the splits it needs, so that no split is left empty."""
    best = None
    for wanted in range(1, max(1, min(max_splits, reduce_tiles)) + 1):
        per_split = -(-reduce_tiles // wanted)
        splits = -(-reduce_tiles // per_split)
        programs = tiles * splits
        cost = (-(-programs // sms) * per_split, programs < sms, splits)
        if best is None or cost < best[0]:
            best = (cost, splits)
    return best[1]
