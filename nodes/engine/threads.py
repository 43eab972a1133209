"""How many CPU threads the pack's own tensor work uses.

Small models make many tiny tensor operations. With two OpenMP threads each operation waits for
its peer, and when another process keeps one core busy that peer is often descheduled: the
README's main job took 252 s instead of 22 s beside one busy core on a 2-core machine (22 s
again with ``OMP_NUM_THREADS=1``; see docs/benchmarks.md). One thread loses nothing on such work.
:func:`threads_for` picks the count from the work's size; :func:`cpu_threads` applies it for a
block and restores the caller's setting, so the host's (ComfyUI's) global choice stands for
everything else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

SMALL_WORK_PARAMS = 50_000_000  # a choice: below it one thread (the mini world's models total ~1 M)


def threads_for(modules: Iterable[torch.nn.Module]) -> int | None:
    """1 for CPU work with small models (under :data:`SMALL_WORK_PARAMS` parameters together), else
    None (keep the current setting: large models gain from threads, GPUs do not use them)."""
    params = [p for m in modules for p in m.parameters()]
    if any(p.device.type != "cpu" for p in params) or sum(p.numel() for p in params) >= SMALL_WORK_PARAMS:
        return None
    return 1


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Within the block, torch intra-op and BLAS use ``count`` threads (None: unchanged); restored after."""
    if count is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)
