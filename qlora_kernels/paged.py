"""Paged tensors: CUDA unified memory that the driver moves between GPU and host memory.

A paged tensor is an ordinary CUDA tensor to torch, allocated with ``cudaMallocManaged``: when the GPU runs short
of memory its pages can live in host memory and come back on use, which is how paged optimizers keep large
optimizer state from causing out-of-memory errors. Unlike bitsandbytes' paged buffers, these are freed when the
last reference to the tensor dies.

- :func:`empty` / :func:`zeros` / :func:`zeros_like` allocate (refusing, with ``torch.OutOfMemoryError``, a single
  allocation larger than the memory the GPU has free);
- :func:`prefetch` moves a paged tensor to its GPU and :func:`evict` to host memory, both asynchronously on the
  current CUDA stream (call ``torch.cuda.current_stream().synchronize()`` before reading an evicted tensor from
  the CPU side if you need it to have arrived);
- :func:`is_paged` and :func:`bytes_in_use` inspect.

On the CPU these are ordinary allocations and paging is a no-op (there is nowhere to page to), so code written for
the GPU runs unchanged on CPU tensors. CUDA allocations need the compiled extension ``qlora_kernels._C``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._extension import extension_available, require_extension

__all__ = ["empty", "zeros", "zeros_like", "is_paged", "prefetch", "evict", "bytes_in_use"]

_Device = Union[torch.device, str, int, None]


def _resolve_device(device: _Device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"paged tensors live on 'cpu' or 'cuda' devices, got device={device}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _resolve_size(size: Sequence) -> list[int]:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = size[0]
    dims = [int(s) for s in size]
    if any(d < 0 for d in dims):
        raise ValueError(f"size must be non-negative, got {tuple(dims)}")
    return dims


def empty(*size, dtype: torch.dtype = torch.float32, device: _Device = None) -> torch.Tensor:
    """An uninitialised tensor in unified memory on a CUDA ``device``; an ordinary tensor on the CPU.

    ``empty(2, 3)`` and ``empty((2, 3))`` both work. Raises ``torch.OutOfMemoryError`` before allocating when the
    tensor is larger than the GPU's free memory, RuntimeError when a CUDA tensor is asked for and the extension is
    not built with CUDA.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    dims = _resolve_size(size)
    device = _resolve_device(device)
    if device.type == "cpu":
        return torch.empty(dims, dtype=dtype, device=device)
    require_extension("qlora_kernels.paged.empty on a CUDA device")
    return torch.ops.qlora_kernels.paged_empty(dims, dtype, device)


def zeros(*size, dtype: torch.dtype = torch.float32, device: _Device = None) -> torch.Tensor:
    """Like :func:`empty`, filled with zeros (on the GPU, which also places the pages there)."""
    return empty(*size, dtype=dtype, device=device).zero_()


def zeros_like(tensor: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A zero-filled paged tensor of ``tensor``'s shape and device (and dtype unless given)."""
    return zeros(tuple(tensor.shape), dtype=tensor.dtype if dtype is None else dtype, device=tensor.device)


def is_paged(tensor: torch.Tensor) -> bool:
    """True when ``tensor``'s storage is unified memory allocated by this module (views included)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cuda" or not extension_available():
        return False
    return bool(torch.ops.qlora_kernels.is_paged(tensor))


def _check_pageable(tensor: torch.Tensor, what: str) -> bool:
    """Whether ``what`` has anything to do for ``tensor``: False on the CPU, ValueError for non-paged CUDA tensors."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type == "cpu":
        return False
    if not is_paged(tensor):
        raise ValueError(
            f"{what}: the tensor is not in unified memory (allocate it with qlora_kernels.paged.empty or zeros)"
        )
    return True


def prefetch(tensor: torch.Tensor) -> None:
    """Migrate a paged tensor's pages to its GPU, asynchronously on the current stream; work queued after it on the
    same stream finds them there. A no-op on the CPU and on GPUs that cannot prefetch (pages then move on use)."""
    if _check_pageable(tensor, "prefetch"):
        torch.ops.qlora_kernels.paged_prefetch(tensor)


def evict(tensor: torch.Tensor) -> None:
    """Migrate a paged tensor's pages to host memory, asynchronously on the current stream, freeing GPU memory
    until the next use. A no-op on the CPU and on GPUs that cannot prefetch."""
    if _check_pageable(tensor, "evict"):
        torch.ops.qlora_kernels.paged_evict(tensor)


def bytes_in_use() -> int:
    """Bytes of unified memory held by live paged tensors (0 without the extension)."""
    if not extension_available():
        return 0
    return int(torch.ops.qlora_kernels.paged_bytes_in_use())
