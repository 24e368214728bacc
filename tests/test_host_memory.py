"""cnnjax/host_memory.py: on CPU-only Linux with glibc, a jitted program's temporary buffer is
reused from step to step instead of page-faulting in afresh; CNNJAX_CPU_MALLOC=off restores JAX's
and glibc's defaults."""

import os
import subprocess
import sys

import pytest

from cnnjax import host_memory

# A jitted program whose intermediate (a @ b, 64 MiB) lives in the execution's temporary buffer, run
# five times after three warm-up runs, counting the page faults of each; the fewest are printed.
# JAX frees a run's buffer shortly after its outputs are ready, so the test waits 50 ms between
# runs, as a real step's length would (back to back, the next run may allocate before the free).
# Under a loaded machine (the suite's other worker) a free can still come late, and that run
# faults: the fewest of five shows whether the buffer is reused at all, and with the defaults
# every run faults.
# With glibc's and JAX's defaults the buffer is a fresh mmap on a worker thread every time: 16,384
# faults (32 where transparent huge pages are always on).
CODE = """
import resource, time
import cnnjax
import jax, jax.numpy as jnp
step = jax.jit(lambda a, b, c: (a @ b) @ c)
a, b, c = jnp.ones((8192, 8)), jnp.ones((8, 2048)), jnp.ones((2048, 8))
assert step.lower(a, b, c).compile().memory_analysis().temp_size_in_bytes >= 64 << 20
for _ in range(3):
    jax.block_until_ready(step(a, b, c))
    time.sleep(0.05)
faults = []
for _ in range(5):
    time.sleep(0.05)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(a, b, c))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(cnnjax.RETAINS_FREED_MEMORY, jax.config.read("jax_cpu_enable_async_dispatch"),
      min(faults))
"""


def _run(**env):
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV} | env
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                         check=True)
    retains, dispatch, faults = out.stdout.split()
    return retains == "True", dispatch == "True", int(faults)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")
def test_step_buffers_are_reused_without_page_faults():
    retains, async_dispatch, faults = _run(JAX_PLATFORMS="cpu")  # the default
    assert retains and not async_dispatch and faults < 64, faults
    retains, async_dispatch, faults = _run(JAX_PLATFORMS="cpu", CNNJAX_CPU_MALLOC="off")
    assert not retains and async_dispatch and faults >= 32, faults
    # The user's own choice of dispatch wins, and without synchronous dispatch malloc's settings
    # alone would not reach the worker thread's buffer.
    retains, async_dispatch, _ = _run(JAX_PLATFORMS="cpu", JAX_CPU_ENABLE_ASYNC_DISPATCH="true")
    assert not retains and async_dispatch


def test_applies_only_where_jax_runs_on_the_cpu_alone(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
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
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv(host_memory.ENV, "off")
    assert not host_memory.retain_freed_memory()
    # In this process JAX's backend has started: the dispatch setting could no longer reach it.
    import jax

    jax.devices()
    monkeypatch.setenv(host_memory.ENV, "on")
    assert not host_memory.retain_freed_memory()
