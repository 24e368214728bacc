"""cnnjax's own CPU kernels (cnnjax/cpu_kernels.cc), built on first use and called through XLA's FFI.

One kernel so far: the weight gradient of a convolution, where XLA:CPU's generic kernel is 2x to 3x
slower than oneDNN's backward-weights kernel in PyTorch, and jaxlib's oneDNN call (cnnjax/onednn.py)
runs forward kernels only. The C++ file is compiled once per machine with the system's C++
compiler (`$CXX`, else `c++`) and `-O3 -march=native`, into a cache keyed by the source, the
compiler, jaxlib and the CPU ($CNNJAX_NATIVE_CACHE, else $XDG_CACHE_HOME/cnnjax/native, else
~/.cache/cnnjax/native), and registered as an XLA FFI target. Where there is no compiler, the build
fails or the kernel disagrees with XLA's convolution on a small check, `available()` says False
(with one warning saying why) and cnnjax keeps XLA's kernel. `CNNJAX_CPU_NATIVE=off` turns the kernels
off; so does `CNNJAX_CPU_REWRITES=off`, with every CPU form.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from cnnjax.cpu_rewrites import reference_conv, run_apart_on_cpu, single_cpu_process

Array = jax.Array
ENV = "CNNJAX_CPU_NATIVE"
CACHE_ENV = "CNNJAX_NATIVE_CACHE"
SOURCE = Path(__file__).with_name("cpu_kernels.cc")
WEIGHT_GRADIENT = "cnnjax_conv_weight_gradient"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def enabled() -> bool:
    """False when CNNJAX_CPU_NATIVE=off (read at trace time, like CNNJAX_CPU_REWRITES)."""
    return os.environ.get(ENV, "on").lower() not in ("off", "0", "false")


def cache_dir() -> Path:
    """$CNNJAX_NATIVE_CACHE, else $XDG_CACHE_HOME/cnnjax/native, else ~/.cache/cnnjax/native."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnjax" / "native"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform's
    processor string. A cache shared across machines then holds one build per kind of CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build(compiler: str | None = None) -> Path:
    """The compiled library, built now unless the cache has it. Raises RuntimeError naming the
    problem when there is no compiler or the build fails."""
    command = shlex.split(compiler or os.environ.get("CXX") or "c++")
    if shutil.which(command[0]) is None:
        raise RuntimeError(f"no C++ compiler {command[0]!r} on PATH (set CXX or install g++)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([
        SOURCE.read_text(), " ".join(command + list(FLAGS)), jaxlib.__version__, _cpu_identity(),
        subprocess.run([*command, "--version"], capture_output=True, text=True).stdout,
    ]).encode()).hexdigest()[:16]
    path = cache_dir() / f"libcnnjax_cpu_{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed into place: concurrent builds (pytest-xdist workers)
    # never see a half-written library.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        result = subprocess.run([*command, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(built)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{command[0]} failed to build {SOURCE.name}: {last}")
        os.replace(built, path)
    return path


@functools.cache
def _register() -> None:
    import ctypes

    library = ctypes.cdll.LoadLibrary(str(build()))
    jax.ffi.register_ffi_target(WEIGHT_GRADIENT, jax.ffi.pycapsule(library.CnnjaxConvWeightGradient),
                                platform="cpu")


def weight_gradient(x: Array, g: Array, kernel: Sequence[int], strides: Sequence[int],
                    padding: Sequence[tuple[int, int]]) -> Array:
    """dL/dw [kh, kw, C_in, C_out] of an NHWC convolution (one group, no dilation) of float32 x with
    explicit non-negative `padding`, from its output gradient g; C_out a multiple of 8. CPU only;
    `available()` first."""
    _register()
    (kh, kw), (sh, sw), ((pt, _), (pl, _)) = kernel, strides, padding
    call = jax.ffi.ffi_call(WEIGHT_GRADIENT,
                            jax.ShapeDtypeStruct((kh, kw, x.shape[3], g.shape[3]), jnp.float32))
    return call(x, g, sh=np.int64(sh), sw=np.int64(sw), pt=np.int64(pt), pl=np.int64(pl))


@functools.cache
def available() -> bool:
    """Whether this process can use the kernels: one CPU device in one process (a custom
    call has no SPMD rule, so a sharded program would gather its inputs), the library builds, and its
    weight gradient matches XLA's on small cases: strided with asymmetric padding, a non-square
    kernel, 8, 24 and 40 output channels (every vector block the build has). Checked once per
    process (about 0.2 s, plus the build the first time on a machine: a few seconds)."""
    try:
        if not single_cpu_process():
            return False
        _register()
        rng = np.random.default_rng(0)
        cases = [((3, 9, 8, 7), (3, 2, 7, 24), (2, 1), ((1, 2), (0, 1))),
                 ((2, 6, 5, 3), (5, 3, 3, 8), (1, 2), ((2, 2), (1, 1))),
                 ((2, 5, 5, 20), (3, 3, 20, 40), (1, 1), ((1, 1), (1, 1)))]
        for x_shape, w_shape, strides, padding in cases:
            conv = functools.partial(reference_conv, strides=strides, padding=padding)

            def both(x, w, g, conv=conv, kernel=w_shape[:2], strides=strides, padding=padding):
                expected = jax.vjp(lambda w: conv(x, w), w)[1](g)[0]
                return weight_gradient(x, g, kernel, strides, padding), expected

            x, w = (rng.standard_normal(shape, np.float32) for shape in (x_shape, w_shape))
            g = rng.standard_normal(jax.eval_shape(conv, x, w).shape, np.float32)
            ours, expected = run_apart_on_cpu(both, x, w, g)
            if not np.allclose(ours, expected, rtol=1e-4, atol=1e-4):
                raise RuntimeError("its weight gradient disagrees with XLA's convolution")
        return True
    except Exception as err:  # no compiler, a failed build, a jaxlib without the FFI it needs
        warnings.warn(f"cnnjax's CPU kernels are off, XLA's kernels run instead: {err} "
                      f"(set {ENV}=off to silence)", stacklevel=2)
        return False
