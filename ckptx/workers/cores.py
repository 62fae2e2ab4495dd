"""How many threads a process's CPU-bound byte kernels use, and how N worker processes on one machine share it.

A process converts chunks of a tensor on a small thread pool (numpy and zlib release the GIL), sized by
`kernel_threads()`: the cores this process may run on, capped at MAX_THREADS. A worker process of a pool of N on one
machine calls `share_cores(N)` first, so N workers run about one thread per core in all rather than N times that;
torch (when a unit imports it) reads OMP_NUM_THREADS, set here too, without this module importing torch.
"""

from __future__ import annotations

import os
import sys

__all__ = ["MAX_THREADS", "THREADS_VARIABLE", "available_cores", "kernel_threads", "share_cores"]

THREADS_VARIABLE = "CKPTX_THREADS"
MAX_THREADS = 8  # chunks of 8 MiB: more threads than this only add memory on the machines ckptx runs on


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def kernel_threads() -> int:
    """Threads for the byte kernels of this process: `CKPTX_THREADS` when set (by `share_cores` or the user), else
    the available cores, at most MAX_THREADS."""
    text = os.environ.get(THREADS_VARIABLE, "")
    if text.isdigit() and int(text) > 0:
        return int(text)
    return min(MAX_THREADS, available_cores())


def share_cores(workers: int) -> None:
    """Worker start-up: this process is one of `workers` on the machine; it takes its share of the cores for its
    byte kernels and for torch's threads (torch is not imported here: it reads OMP_NUM_THREADS when a task first
    needs it; if it is already imported, its thread count is set now)."""
    threads = max(1, available_cores() // max(1, workers))
    os.environ[THREADS_VARIABLE] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch_module = sys.modules.get("torch")
    if torch_module is not None:
        torch_module.set_num_threads(threads)
