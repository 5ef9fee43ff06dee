"""The one validation of NF4 storage (DESIGN.md, "The NF4 format").

Every path that hands NF4 storage to a kernel goes through :func:`check_nf4_storage`: ``NF4Weight``'s constructor
(so ``quantize``, ``from_bnb``, ``from_state_dict``, ``QLoRALinear.load_state_dict`` and the peft patch), and the
``qlora_kernels::`` custom ops themselves (structure only), so a direct ``torch.ops`` call cannot send a short or
strided tensor to a kernel either. The kernels index the storage as flat, dense arrays; a tensor that is not what
the format says would be read out of bounds or in the wrong order, so it is refused here with a ValueError or
TypeError that names the argument.

Two levels:

- **structure** (always; no device synchronisation): types, dtypes, element counts, contiguity (a stride-0 or
  transposed view is refused, never read), one device, element counts that fit int64.
- **values** (``check_values=True``: at construction and load, skipped while ``torch.compile`` traces): absmax,
  nested absmax and offset finite, absmax and nested absmax non-negative, the codebooks finite.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch

from . import reference

# A weight's element count must fit comfortably in int64 index arithmetic (the kernels form byte and element
# offsets in int64; 2^62 leaves room for the x2 of nibble indices and for strides).
MAX_NUMEL = 2**62
STORAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)


def check_shape(shape: Any, what: str = "shape") -> tuple[int, int]:
    """An [N, K] weight shape of Python ints >= 1 whose product fits int64 (no wrap-around, no float truncation)."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) and not isinstance(shape, torch.Size):
        raise TypeError(f"{what} must be a sequence [N, K] of ints, got {type(shape).__name__}")
    dims = list(shape)
    if len(dims) != 2:
        raise ValueError(f"{what} must be [N, K], got {len(dims)} dimensions {dims!r}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"{what} must hold ints, got {type(d).__name__} {d!r} in {dims!r}")
    n, k = (int(d) for d in dims)
    if n < 1 or k < 1:
        raise ValueError(f"{what} must be [N, K] with N, K >= 1, got {[n, k]}")
    if n * k > MAX_NUMEL:
        raise ValueError(f"{what} {[n, k]} has {n * k} elements, more than the supported 2^62")
    return n, k


def check_blocksize(blocksize: Any) -> int:
    """An NF4 blocksize: a power of two from 32 to 4096 (bitsandbytes' set)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in reference.VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two from 32 to 4096 {reference.VALID_BLOCKSIZES}, got {blocksize!r}")
    return blocksize


def _tensor(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _dense(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor the kernels would not read as a flat dense array (stride-0, transposed, gapped views)."""
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous tensor (the kernels read it as a flat array), got shape {tuple(t.shape)} "
            f"with strides {tuple(t.stride())}: pass {name}.contiguous()"
        )
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense strided tensor, got layout {t.layout}")


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"


def check_nf4_storage(
    packed: Any,
    absmax: Any,
    nested_absmax: Any,
    offset: Any,
    numel: int,
    blocksize: int,
    quant_map: Any = None,
    nested_quant_map: Any = None,
    check_values: bool = True,
) -> None:
    """Validate NF4 storage for a weight of ``numel`` elements in blocks of ``blocksize``.

    packed: (numel + 1) // 2 bytes in uint8 or a float ``quant_storage``; absmax: float32 [blocks], or uint8
    [blocks] with double quantization, where nested_absmax is float32 [ceil(blocks / 256)] and offset a one-element
    float32; quant_map (if given) 16 float32 entries; nested_quant_map (if given) 256. All contiguous, one device.
    Raises TypeError / ValueError naming the argument.
    """
    check_blocksize(blocksize)
    if isinstance(numel, bool) or not isinstance(numel, int) or not 1 <= numel <= MAX_NUMEL:
        raise ValueError(f"the weight must have 1 to 2^62 elements, got {numel!r}")
    nblocks = -(-numel // blocksize)
    packed = _tensor("packed", packed)
    if packed.dtype not in STORAGE_DTYPES:
        raise TypeError(f"packed must be uint8 (or a float quant_storage viewing the same bytes), got {packed.dtype}")
    _dense("packed", packed)
    nbytes = packed.numel() * packed.element_size()
    if nbytes != (numel + 1) // 2:
        raise ValueError(f"packed must hold (N*K + 1) // 2 = {(numel + 1) // 2} bytes, got {nbytes} ({_describe(packed)})")

    absmax = _tensor("absmax", absmax)
    double_quant = nested_absmax is not None
    if double_quant != (offset is not None):
        raise ValueError("nested_absmax and offset come together (double quantization) or not at all")
    expected = torch.uint8 if double_quant else torch.float32
    if absmax.dtype != expected or absmax.numel() != nblocks:
        raise ValueError(
            f"absmax must be {str(expected).removeprefix('torch.')} [{nblocks}] for {numel} elements in blocks of {blocksize}"
            f"{' with double quantization' if double_quant else ''}, got {_describe(absmax)}"
        )
    _dense("absmax", absmax)
    tensors = {"packed": packed, "absmax": absmax}
    if double_quant:
        nested_absmax = _tensor("nested_absmax", nested_absmax)
        offset = _tensor("offset", offset)
        nested_blocks = -(-nblocks // reference.NESTED_BLOCKSIZE)
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != nested_blocks:
            raise ValueError(f"nested_absmax must be float32 [{nested_blocks}], got {_describe(nested_absmax)}")
        _dense("nested_absmax", nested_absmax)
        if offset.dtype != torch.float32 or offset.numel() != 1:
            raise ValueError(f"offset must be a one-element float32 tensor, got {_describe(offset)}")
        tensors.update(nested_absmax=nested_absmax, offset=offset)
    for name, t, entries in (("quant_map", quant_map, 16), ("nested_quant_map", nested_quant_map, 256)):
        if t is None:
            continue
        t = _tensor(name, t)
        if t.dtype != torch.float32 or t.numel() != entries:
            raise ValueError(f"{name} must be float32 [{entries}], got {_describe(t)}")
        _dense(name, t)
        tensors[name] = t
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"{', '.join(tensors)} must be on one device, got {sorted(map(str, devices))}")
    if check_values and not torch.compiler.is_compiling():
        _check_values(tensors, double_quant)


def _check_values(tensors: dict[str, torch.Tensor], double_quant: bool) -> None:
    """Finite, non-negative statistics: a NaN/Inf/negative absmax would decode every weight of its block wrong."""
    checks = [("nested_absmax", True), ("offset", False)] if double_quant else [("absmax", True)]
    checks += [("quant_map", False), ("nested_quant_map", False)]
    for name, non_negative in checks:
        t = tensors.get(name)
        if t is None:
            continue
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds NaN or Inf: the checkpoint is corrupt")
        if non_negative and bool((t < 0).any()):
            raise ValueError(f"{name} holds negative values: an absmax is a maximum of magnitudes")

