"""Optionally keeps freed host memory inside the process on CPU-only Linux machines, so that
XLA:CPU's buffers of each step stop page-faulting. Opt-in: `CNNJAX_CPU_MALLOC=on`.

XLA:CPU allocates the temporary buffer of every execution (about 200 MB for resnet20's train step at
batch 128) with malloc on its own threads and frees it at the end. glibc serves an allocation that
large with a fresh mmap and unmaps it on free, so the next step touches new pages: about 50,000 page
faults and 0.1 s of kernel time per resnet20 step on the 2-core development machine. With mmap off,
one arena for every thread and no trimming, freed buffers stay in the heap and the next step reuses
them: no page faults, and resnet20's step measured 1.29x to 1.46x faster (benchmarks/RESULTS.md).
Only the single arena removes the faults (with 2 or 4 arenas they stay), and that arena's lock costs
small steps dearly: lenet5's step (about 9 ms, no page faults to begin with) took 11.1 to 13.5 ms
instead of 8.4 to 9.4. Hence opt-in, for models whose step buffers are large. The price beyond that:
the process keeps its peak heap for its lifetime.

`retain_freed_memory()` runs when cnnjax is imported. With `CNNJAX_CPU_MALLOC=on` it applies where
JAX will run on the CPU only (no accelerator plugin installed, or JAX_PLATFORMS=cpu) and glibc is
the C library. The arena limit only reaches threads that have not allocated yet, so it works when
cnnjax is imported before JAX starts its CPU backend (`import cnnjax` first, as cnnjax's own
commands do).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

ENV = "CNNJAX_CPU_MALLOC"
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_MMAP_MAX, 0), (M_ARENA_MAX, 1), (M_TRIM_THRESHOLD, 2**31 - 1))


def _cpu_only() -> bool:
    """JAX_PLATFORMS=cpu, or no accelerator plugin (CUDA, ROCm, TPU) installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.strip().lower() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    return not importlib.metadata.entry_points(group="jax_plugins")


def retain_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory where CNNJAX_CPU_MALLOC=on (see above); whether it
    did."""
    if os.environ.get(ENV, "off").lower() not in ("on", "1", "true") or sys.platform != "linux":
        return False
    try:
        if not _cpu_only():
            return False
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError where the C library is not glibc)
        return all(libc.mallopt(option, value) == 1 for option, value in SETTINGS)
    except (OSError, AttributeError):
        return False
