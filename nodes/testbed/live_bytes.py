"""Peak bytes of live tensors, measured on any device: the yardstick the memory estimates are checked
against (``tests/engine/test_budget.py``, ``tests/benchmarks/bench_real_shapes.py``). Test-bed only:
it imports private torch modules."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Measures, on any device, the peak bytes of tensors created inside the block and alive together.

    Every op's new output storage is counted until a finalizer sees it freed; views and in-place
    results share an input's storage and are not new. Tensors that existed before the block
    (weights) are not counted. On a GPU this is what the allocator must hold on top of the
    weights, without its rounding and cache; on a CPU it stands in for
    ``torch.cuda.max_memory_allocated``. Costs some microseconds per op.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._alive: dict[int, int] = {}

    def _track(self, storage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._alive:
            return
        self._alive[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        self.current -= self._alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._track(t.untyped_storage())
        return out
