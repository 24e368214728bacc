"""oneDNN's convolution, which jaxlib's XLA:CPU carries, called from cnnjax's CPU convolution form.

XLA:CPU runs a convolution through Eigen's generic kernel; PyTorch's CPU build runs oneDNN's JIT
kernels. jaxlib links oneDNN in, and its CPU backend runs a custom call named
"__onednn$convolution" with oneDNN's forward kernel, whose layout, window and padding come from a
JSON backend config. XLA's own oneDNN rewriter, which would emit it, does not run in this wheel
(`--xla_cpu_experimental_onednn_custom_call=true` changes nothing), so `conv` makes the call itself
with `jax.ffi.ffi_call`.

The forward kernel gives the forward pass and the input gradient of a stride-1 layer: the output
gradient convolved, fully padded, with the kernel flipped and its channel axes swapped
(`input_gradient`). The weight gradient stays XLA's: as oneDNN's forward convolution (the input as
C_in images of N channels, the output gradient as the kernel) it was no faster in whole steps.

The config's encoding is XLA's internal format and has changed between XLA versions, and a jaxlib
built without oneDNN lacks the target, so `available()` runs both on a small asymmetric case
against XLA's convolution once per process before anything uses them. XLA cannot serialise a program
that holds these calls: such programs miss the persistent compilation cache (README says so;
cnnjax/compile_cache.py filters JAX's warning about each of them).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax import lax

from cnnjax.cpu_rewrites import reference_conv, run_apart_on_cpu, single_cpu_process

Array = jax.Array
TARGET = "__onednn$convolution"
ENV = "CNNJAX_CPU_ONEDNN"

# (batch, feature, spatial dims) of the input and output, (input feature, output feature, spatial
# dims) of the kernel: positions in each array's shape.
Layout = tuple[tuple[int, int, tuple[int, int]], tuple[int, int, tuple[int, int]],
               tuple[int, int, tuple[int, int]]]
NHWC: Layout = ((0, 3, (1, 2)), (2, 3, (0, 1)), (0, 3, (1, 2)))  # x NHWC, w HWIO, y NHWC
# The input gradient's kernel is the forward kernel with its channel axes swapped: HWOI.
_SWAPPED: Layout = ((0, 3, (1, 2)), (3, 2, (0, 1)), (0, 3, (1, 2)))


def enabled() -> bool:
    """False when CNNJAX_CPU_ONEDNN=off (read at trace time, like CNNJAX_CPU_REWRITES)."""
    return os.environ.get(ENV, "on").lower() not in ("off", "0", "false")


def _dimension_numbers(layout: Layout) -> lax.ConvDimensionNumbers:
    (xb, xf, xs), (wi, wo, ws), (yb, yf, ys) = layout
    return lax.ConvDimensionNumbers((xb, xf, *xs), (wo, wi, *ws), (yb, yf, *ys))


def conv(x: Array, w: Array, strides: Sequence[int] = (1, 1),
         padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)), dilation: Sequence[int] = (1, 1),
         layout: Layout = NHWC) -> Array:
    """oneDNN's forward convolution of float32 x with w: `lax.conv_general_dilated(x, w, strides,
    padding, rhs_dilation=dilation)` with the dimension numbers `layout` names. Padding is
    explicit and non-negative. CPU only."""
    (_, _, xs), (wi, wo, ws), (yb, yf, ys) = layout
    out = jax.eval_shape(functools.partial(
        lax.conv_general_dilated, window_strides=strides, padding=padding, rhs_dilation=dilation,
        dimension_numbers=_dimension_numbers(layout)), x, w)
    config = {"onednn_conv_config": {
        "dims": 4, "feature_groups": 1,
        "input": {"dims": 4, "data": {"batch_dim": layout[0][0], "feature_dim": layout[0][1],
                                      "spatial_dims": list(xs)}},
        "kernel": {"dims": 4, "filter": {"input_feature_dim": wi, "output_feature_dim": wo,
                                         "spatial_dims": list(ws)}},
        "output": {"dims": 4, "data": {"batch_dim": yb, "feature_dim": yf, "spatial_dims": list(ys)}},
        # This jaxlib's encoding: strides and pads as they are, dilations as XLA's (1 = none).
        "window": {"strides": list(strides), "pad_left": [p[0] for p in padding],
                   "pad_right": [p[1] for p in padding], "window_dilations": list(dilation)}}}
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(out.shape, out.dtype),
                            vmap_method="sequential", custom_call_api_version=1,
                            legacy_backend_config=json.dumps(config))
    return call(x, w)


def input_gradient(g: Array, w: Array, padding: Sequence[tuple[int, int]]) -> Array:
    """dL/dx of a stride-1 NHWC convolution of w with `padding`, from its output gradient g: g padded
    by kernel - 1 - pad on each side, convolved with w flipped and its channel axes swapped. Needs
    every pad below its kernel size."""
    kh, kw = w.shape[:2]
    full = [(k - 1 - low, k - 1 - high) for k, (low, high) in zip((kh, kw), padding, strict=True)]
    return conv(g, w[::-1, ::-1], (1, 1), full, (1, 1), _SWAPPED)


@functools.cache
def available() -> bool:
    """Whether this process can use `conv`: it runs on one CPU device (a custom call has no SPMD
    rule, so a sharded program would gather its inputs), and this jaxlib's oneDNN call gives XLA's
    results on a small case with asymmetric padding and a non-square kernel, strided and as an input
    gradient. Checked once per process (a compile of about 0.1 s)."""
    try:
        if not single_cpu_process():
            return False
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 7, 6, 3), np.float32)
        w = rng.standard_normal((3, 2, 3, 4), np.float32)
        g = rng.standard_normal((2, 7, 6, 4), np.float32)  # the stride-1 output's gradient
        padding = ((1, 1), (0, 1))

        def both(x: Array, w: Array, g: Array) -> tuple[list[Array], list[Array]]:
            x_grad = jax.vjp(lambda x: reference_conv(x, w, (1, 1), padding), x)[1](g)[0]
            ours = [conv(x, w, (2, 2), padding), input_gradient(g, w, padding)]
            return ours, [reference_conv(x, w, (2, 2), padding), x_grad]

        ours, theirs = run_apart_on_cpu(both, x, w, g)
        return all(np.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(ours, theirs, strict=True))
    except Exception:  # no such custom call target, or a config this jaxlib reads differently
        return False
