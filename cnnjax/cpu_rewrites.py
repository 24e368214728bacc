"""The CNNJAX_CPU_REWRITES switch for cnnjax's CPU forms (cnnjax/cpu_conv.py, cnnjax/batchnorm.py,
cnnjax/models/densenet.py), and the fusion boundary they share."""

from __future__ import annotations

import os

import jax
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
