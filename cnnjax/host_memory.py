"""Keeps XLA:CPU's per-step buffers inside the process on CPU-only Linux machines, so that steps
stop page-faulting. On by default; `CNNJAX_CPU_MALLOC=off` turns it off.

XLA:CPU allocates the temporary buffer of every execution (about 200 MB for resnet20's train step at
batch 128) with malloc and frees it when the step ends. glibc serves an allocation that large with a
fresh mmap and unmaps it on free, so every step touches new pages: about 50,000 page faults and
0.1 s of kernel time per resnet20 step on the 2-core development machine.

Two settings together keep that buffer:
- JAX's asynchronous CPU dispatch off (`jax_cpu_enable_async_dispatch`): a one-device program then
  runs on the thread that calls it, so its buffer comes from glibc's main arena. With dispatch on,
  it runs on a worker thread whose arena cannot hold a block over 64 MiB (glibc's heap size for
  secondary arenas) and maps every such block afresh, whatever mallopt says.
- mallopt: no mmap and no trimming, so the main arena grows once to the step's peak and the next
  step reuses it.

resnet20's train step then took 218 and 221 ms against 231 and 242 ms with the single-arena setting
of session 10 and about 261 ms with neither; resnet18 at 32 px, batch 32, 86 against 102 ms;
mobilenet_v2 53 to 57 against 72 to 84 ms; lenet5 7.4 to 7.9 against 8.1 to 8.5 ms
(benchmarks/RESULTS.md, session 11). The single arena that session 10 used instead (every thread
in the main arena) slowed lenet5 to 10 to 13 ms through the arena's lock; this needs no such limit.

The costs: a jitted call on one CPU device returns when its work is done, not before, so Python
cannot run ahead of the computation (cnnjax's loops do not rely on it; programs over several
devices dispatch asynchronously as before), and the process keeps its peak heap until it exits.

`retain_freed_memory()` runs when cnnjax is imported. It applies where JAX will run on the CPU only
(no accelerator plugin installed, or JAX_PLATFORMS=cpu), glibc is the C library and JAX has not
started a backend yet (the dispatch setting reaches only a CPU client made after it), so import
cnnjax before anything calls JAX, as cnnjax's own commands do. Where JAX_CPU_ENABLE_ASYNC_DISPATCH
is set, cnnjax leaves both settings to the user.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

ENV = "CNNJAX_CPU_MALLOC"
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def _cpu_only() -> bool:
    """JAX_PLATFORMS=cpu, or no accelerator plugin (CUDA, ROCm, TPU) installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.strip().lower() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    return not importlib.metadata.entry_points(group="jax_plugins")


def _glibc():
    """The C library through ctypes where it is glibc, else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError where it is not glibc)
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory() -> bool:
    """Turns JAX's asynchronous CPU dispatch off and sets glibc's malloc to keep freed memory,
    unless CNNJAX_CPU_MALLOC=off or the machine is not a CPU-only glibc Linux (see above); whether
    it did."""
    if os.environ.get(ENV, "on").lower() in ("off", "0", "false") or sys.platform != "linux":
        return False
    if not _cpu_only() or "JAX_CPU_ENABLE_ASYNC_DISPATCH" in os.environ:
        return False  # an accelerator may run, or the user chose the dispatch
    libc = _glibc()
    if libc is None:
        return False
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return False  # the CPU client exists: its dispatch, and so its buffers' arena, are set
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return all(libc.mallopt(option, value) == 1 for option, value in SETTINGS)
