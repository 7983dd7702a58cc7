"""torch's intra-op thread count for short kernels: all CPUs but one, set for a block.

The merge loop's kernels (dtype casts, fused adds, finiteness checks) and an adapter's
validation (one `aminmax` per small matrix) are memory-bound passes of microseconds to
milliseconds, run while other threads work beside them (a hash thread, the kernel's
writes, other processes). On 2 CPUs torch's second OpenMP thread only contends with
them: every parallel region then waits at its barrier for a thread the scheduler gave
away. Measured here: the merge loop used 2-4x the CPU of one thread, several times its
wall time on a loaded machine; validating a 126-matrix MoRA adapter (246 x 246 float32
each) took 0.4 s of CPU with 2 threads and 0.01 s with one. Same results either way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def spare_one_core() -> int:
    """Intra-op threads for short kernels: the CPUs this process may use, less one (see
    the module docstring)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus - 1))


@contextlib.contextmanager
def kernel_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` for the block, restored after it."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
