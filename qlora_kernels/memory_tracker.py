"""A byte counter for tensor memory on any device, CPU included: live storage bytes and their peak.

``torch.cuda.max_memory_allocated`` exists only on CUDA. To check the memory planner on a CPU, this module counts
what torch itself allocates: a ``TorchDispatchMode`` sees the output of every op run while it is active, records the
storage behind each output once (views share their base's storage), and learns of a storage's death through a weak
reference. Tensors that existed before the mode started (a model's weights, say) are counted by handing them to
:meth:`MemoryTracker.track`.

    with MemoryTracker() as tracker:
        tracker.track(model.parameters(), model.buffers())
        loss = model(batch).loss; loss.backward(); optimizer.step()
    tracker.peak_bytes, tracker.live_bytes

What it does not see: memory an op allocates and frees inside itself (a kernel's scratch space), allocator rounding
and caching, and storages made outside the mode that no tracked tensor holds. It sees every tensor that outlives the
op producing it, which is what the planner models.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["MemoryTracker"]


class MemoryTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages, and the largest that count reached, while active.

    ``live_bytes`` is the sum of ``nbytes`` over the distinct storages now alive among those seen; ``peak_bytes`` the
    largest value ``live_bytes`` has had since the tracker was made or :meth:`reset_peak` was last called.
    ``device`` (None: all devices) restricts the count to storages on that device type ("cpu", "cuda", ...).
    """

    def __init__(self, device: Optional[str] = None) -> None:
        super().__init__()
        if device is not None and not isinstance(device, str):
            raise TypeError(f"device must be a device type string such as 'cpu' or None, got {device!r}")
        self.device = device
        self.live_bytes = 0
        self.peak_bytes = 0
        # storage key -> (nbytes, weak reference to the storage); the weak reference's callback drops the entry
        self._live: dict[tuple[str, int], tuple[int, weakref.ref]] = {}

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        self.peak_bytes = self.live_bytes

    def track(self, *tensors: Any) -> None:
        """Count tensors that already exist (made outside the mode): tensors, or iterables of them, in any nesting."""
        leaves, _ = tree_flatten(tensors)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
            elif isinstance(leaf, Iterable) and not isinstance(leaf, (str, bytes)):
                self.track(*leaf)
            else:
                raise TypeError(f"track takes tensors or iterables of tensors, got {type(leaf).__name__}")

    def _add(self, tensor: torch.Tensor) -> None:
        if tensor.is_meta or (self.device is not None and tensor.device.type != self.device):
            return
        if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
            return  # a tensor subclass (DTensor, FakeTensor): its real storage, if any, is seen where it is made
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        key = (tensor.device.type, storage.data_ptr())
        if key in self._live:
            return
        self._live[key] = (nbytes, weakref.ref(storage, lambda _ref, key=key: self._drop(key)))
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _drop(self, key: tuple[str, int]) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.live_bytes -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten(out)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
        return out
