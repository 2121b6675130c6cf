"""Peak live tensor bytes allocated inside a region, on any device, via a TorchDispatchMode.

Every aten op's outputs are inspected: an output that does not alias an input (no ``alias_info`` in
the op schema) owns a fresh storage, whose ``nbytes`` is added to the live total; a ``weakref.finalize``
on each tensor object referring to the storage releases it when the last such tensor dies (PyTorch
keeps a tensor's Python object alive as long as its TensorImpl, so the finalizer fires when the
tensor is really freed). Views of a tracked storage add a reference, never bytes. Storages that
existed before the region (inputs such as ``x_T``) are never counted.

``peak_bytes`` is therefore "peak extra tensor memory" of the region: the largest sum of bytes held
by tensors created inside it and still alive, allocator caching and fragmentation excluded. This is
what ``torch.cuda.max_memory_allocated`` reports on CUDA, measured the same way on CPU.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, number of live tensors]
        self.current = 0
        self.peak = 0
        self.allocations = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, t: torch.Tensor, fresh: bool) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, meta-like tensors: nothing to count
            return
        key = st.data_ptr()
        if key == 0:
            return
        entry = self.live.get(key)
        if entry is None:
            if not fresh:  # a view of something created outside the region
                return
            entry = self.live[key] = [st.nbytes(), 0]
            self.current += entry[0]
            self.allocations += 1
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        flat, _ = tree_flatten(out)
        for i, t in enumerate(flat):
            if isinstance(t, torch.Tensor):
                ret = returns[min(i, len(returns) - 1)] if returns else None
                aliased = ret is not None and ret.alias_info is not None
                self._track(t, fresh=not aliased)
        return out

    @property
    def peak_bytes(self) -> int:
        return self.peak


def peak_extra_bytes(fn) -> tuple[int, object]:
    """Run ``fn()`` under the tracker; returns (peak bytes of tensors created inside, fn's result).

    The result is dropped inside the region boundary accounting only after the peak is read, so the
    returned value counts in the peak (as the caller holds it)."""
    with PeakTensorMemory() as m:
        res = fn()
    return m.peak_bytes, res
