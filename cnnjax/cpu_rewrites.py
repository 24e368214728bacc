"""The CNNJAX_CPU_REWRITES switch for cnnjax's CPU forms (cnnjax/cpu_conv.py, cnnjax/batchnorm.py,
cnnjax/models/densenet.py), and the fusion boundary they share."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax


def cpu_rewrites_enabled() -> bool:
    """False when CNNJAX_CPU_REWRITES=off (read at trace time, so it applies to the next compile)."""
    return os.environ.get("CNNJAX_CPU_REWRITES", "on").lower() not in ("off", "0", "false")


def first_entry(a: jax.Array) -> jax.Array:
    """a's first entry with no gradient: the condition `kept` takes."""
    return lax.stop_gradient(a.reshape(-1)[0])


def kept(v: jax.Array, w0: jax.Array) -> jax.Array:
    """v, stored in memory: XLA cannot fuse the work that produced v into v's users across a cond
    (`lax.optimization_barrier` does not survive XLA:CPU's pipeline). w0 is a runtime scalar (so XLA
    cannot fold the condition) chosen so that when it is NaN the result is NaN whatever v is: a
    convolution's first kernel entry, a DenseNet layer's first output. Only then does the second
    branch run; a second identity branch would let XLA drop the cond."""
    return lax.cond(w0 == w0, lambda v: v, lambda v: v + w0.astype(v.dtype), v)


def single_cpu_process() -> bool:
    """One CPU device in one process: where a custom call may replace a convolution (it has no SPMD
    rule, so a sharded program would gather its inputs)."""
    return len(jax.devices("cpu")) == 1 and jax.process_count() == 1


def reference_conv(x: jax.Array, w: jax.Array, strides: Sequence[int], padding: Any) -> jax.Array:
    """XLA's NHWC/HWIO convolution at full precision: what a CPU kernel's check compares against."""
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def run_apart_on_cpu(fn: Callable[..., Any], *arrays: np.ndarray) -> Any:
    """fn(*arrays) compiled for the CPU and run apart from any trace in progress: the CPU forms
    check their kernels while tracing, and on a GPU host the default device is not the CPU."""
    on_cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_cpu) for a in arrays]
    return jax.jit(fn).lower(*shapes).compile()(*arrays)
