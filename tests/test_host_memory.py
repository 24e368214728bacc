"""cnnjax/host_memory.py: with CNNJAX_CPU_MALLOC=on, on CPU-only Linux with glibc, freed memory
stays in the process."""

import os
import subprocess
import sys

import pytest

from cnnjax import host_memory

# Allocates, writes, frees and allocates 64 MiB again with the C library's malloc, counting the page
# faults of the second round: glibc's default serves it with a fresh mmap whose every page faults
# anew (16,384 of them; 32 where transparent huge pages are always on).
CODE = """
import ctypes, resource
import cnnjax
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 << 20)
    libc.memset(block, 1, 64 << 20)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(cnnjax.RETAINS_FREED_MEMORY, faults[1])
"""


def _run(**env):
    out = subprocess.run([sys.executable, "-c", CODE], env=dict(os.environ, **env),
                         capture_output=True, text=True, check=True)
    retains, faults = out.stdout.split()
    return retains == "True", int(faults)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    retains, faults = _run(JAX_PLATFORMS="cpu", CNNJAX_CPU_MALLOC="on")
    assert retains and faults < 8, faults
    retains, faults = _run(JAX_PLATFORMS="cpu", CNNJAX_CPU_MALLOC="off")
    assert not retains and faults >= 32, faults
    env = {k: v for k, v in os.environ.items() if k != "CNNJAX_CPU_MALLOC"}
    out = subprocess.run([sys.executable, "-c", CODE], env=dict(env, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "False"  # off by default


def test_off_by_default_and_where_an_accelerator_may_run(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv(host_memory.ENV, raising=False)
    assert not host_memory.retain_freed_memory()  # opt-in
    monkeypatch.setenv(host_memory.ENV, "on")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not host_memory._cpu_only() and not host_memory.retain_freed_memory()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory._cpu_only()
    monkeypatch.delenv("JAX_PLATFORMS")
    # An installed JAX plugin (jax-cuda13-plugin and the like) registers this entry point group.
    monkeypatch.setattr(host_memory.importlib.metadata, "entry_points",
                        lambda group: ["xla_cuda13"] if group == "jax_plugins" else [])
    assert not host_memory._cpu_only()
    monkeypatch.setattr(host_memory.importlib.metadata, "entry_points", lambda group: [])
    assert host_memory._cpu_only()
    monkeypatch.setenv(host_memory.ENV, "off")
    assert not host_memory.retain_freed_memory()
