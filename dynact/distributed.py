"""Small helpers for code that runs the same way on one process or many.

Used by the estimators (:mod:`dynact.density`) and :class:`dynact.ActivationOptimizer`; public
because a front door may need them too.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "collective_device", "single_thread"]


def is_distributed(group: Any = None) -> bool:
    """True when a ``torch.distributed`` process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def collective_device(group: Any = None) -> torch.device:
    """Where a tensor must live for a collective of ``group``: the current GPU under NCCL, else CPU."""
    if is_distributed(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def single_thread(device: torch.device) -> Iterator[None]:
    """Run torch CPU ops with one intra-op thread inside the block (no-op for other devices).

    The estimators' ``update`` and ``compute`` and the optimizer's per-layer work touch a few
    thousand values at most: too little for torch's intra-op threads to pay off, and on a busy
    machine waking them costs milliseconds per op. Measured on 2 shared cores, median of 15:
    updating with 1e4 values took 40 ms with 2 threads against 0.25 ms with 1; a 514-value exp or
    irfft 4-8 ms against 5 us. Switching the thread count costs under a microsecond. The thread
    count is process-wide, so the block restores it on exit, errors included.
    """
    saved = torch.get_num_threads() if device.type == "cpu" else 1
    if saved != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if saved != 1:
            torch.set_num_threads(saved)
