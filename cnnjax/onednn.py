"""oneDNN's convolution, which jaxlib's XLA:CPU carries, called from cnnjax's CPU convolution form.

XLA:CPU runs a convolution through Eigen's generic kernel; PyTorch's CPU build runs oneDNN's JIT
kernels. jaxlib links oneDNN in, and its CPU backend runs a custom call named
"__onednn$convolution" with oneDNN's forward kernel, whose layout, window and padding come from a
JSON backend config. XLA's own oneDNN rewriter, which would emit it, does not run in this wheel
(`--xla_cpu_experimental_onednn_custom_call=true` changes nothing), so `conv` makes the call itself
with `jax.ffi.ffi_call`.

The forward kernel gives the forward pass and the input gradient of a stride-1 layer: the output
gradient convolved, fully padded, with the kernel flipped and its channel axes swapped
(`input_gradient`). A strided layer's input gradient would need the output gradient dilated by the
stride, which the call does not take; `strided_input_gradient` splits it into one stride-1 call per
phase of the input instead (below). The weight gradient is not oneDNN's (cnnjax/cpu_kernels.py
has its own): as oneDNN's forward convolution (the input as C_in images of N channels, the output
gradient as the kernel) it was no faster in whole steps.

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
import jax.numpy as jnp
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
         layout: Layout = NHWC, addend: Array | None = None) -> Array:
    """oneDNN's forward convolution of float32 x with w: `lax.conv_general_dilated(x, w, strides,
    padding, rhs_dilation=dilation)` with the dimension numbers `layout` names, plus `addend` (of
    the output's shape) where given, added as the kernel writes its output (oneDNN's binary-add
    post-op: no pass of its own). Padding is explicit and non-negative. CPU only."""
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
    operands = (x, w)
    if addend is not None:
        config["onednn_conv_config"]["fusions"] = {"ops": ["BINARY_ADD"]}
        operands = (x, w, addend)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(out.shape, out.dtype),
                            vmap_method="sequential", custom_call_api_version=1,
                            legacy_backend_config=json.dumps(config))
    return call(*operands)


def pads_below_kernel(kernel: Sequence[int], padding: Sequence[tuple[int, int]]) -> bool:
    """Whether every pad is below its kernel size: what `input_gradient` needs."""
    return all(p < k for k, pair in zip(kernel, padding, strict=True) for p in pair)


def input_gradient(g: Array, w: Array, padding: Sequence[tuple[int, int]],
                   addend: Array | None = None) -> Array:
    """dL/dx of a stride-1 NHWC convolution of w with `padding`, from its output gradient g: g padded
    by kernel - 1 - pad on each side, convolved with w flipped and its channel axes swapped; plus
    `addend` (x's shape) where given, in the same call. Needs every pad below its kernel size."""
    kh, kw = w.shape[:2]
    full = [(k - 1 - low, k - 1 - high) for k, (low, high) in zip((kh, kw), padding, strict=True)]
    return conv(g, w[::-1, ::-1], (1, 1), full, (1, 1), _SWAPPED, addend)


def _phase(size: int, kernel: int, stride: int, low: int, out: int, p: int
           ) -> tuple[slice, tuple[int, int], int, int] | None:
    """For the input rows r = a * stride + p of one axis: the kernel taps that reach them (a slice),
    the padding of the output gradient that makes their sum a stride-1 correlation with those taps
    flipped, the rows' count, and how many leading gradient rows to drop (negative padding). None
    when no tap reaches them.

    Row r gets g[o] * w[i] wherever o * stride + i - low = r, so i = i0 + stride * k with
    i0 = (p + low) % stride, and o = a + c - k with c = (p + low - i0) // stride."""
    i0 = (p + low) % stride
    taps = len(range(i0, kernel, stride))
    rows = len(range(p, size, stride))
    if taps == 0 or rows == 0:
        return None
    c = (p + low - i0) // stride
    before, after = taps - 1 - c, rows + c - out
    crop = max(0, -before)
    return slice(i0, i0 + stride * taps, stride), (max(0, before), after), rows, crop


def strided_input_gradient(g: Array, w: Array, x_shape: Sequence[int], strides: Sequence[int],
                           padding: Sequence[tuple[int, int]]) -> Array:
    """dL/dx [N, H, W, C_in] of an NHWC convolution of w with `strides` and explicit non-negative
    `padding`, from its output gradient g, as stride-1 oneDNN calls: one per phase (p, q) of the
    input, x[:, p::sh, q::sw], each the output gradient correlated with the taps that reach that
    phase, flipped, then the phases interleaved. XLA:CPU's own kernel takes the dilated gradient
    and does sh * sw times the work (resnet20's stride-2 layer2_0/conv1: 14.3 ms of a 226 ms step).
    CPU only."""
    (n, h, wd, c_in), (kh, kw) = x_shape, w.shape[:2]
    ho, wo = g.shape[1:3]
    (sh, sw), ((top, _), (left, _)) = strides, padding
    rows = [_phase(h, kh, sh, top, ho, p) for p in range(sh)]
    cols = [_phase(wd, kw, sw, left, wo, q) for q in range(sw)]
    height, width = -(-h // sh), -(-wd // sw)  # the largest phase
    grid = []
    for row in rows:
        line = []
        for col in cols:
            if row is None or col is None:
                line.append(jnp.zeros((n, height, width, c_in), g.dtype))
                continue
            (ti, pad_h, count_h, crop_h), (tj, pad_w, count_w, crop_w) = row, col
            gp, pads = g[:, crop_h:, crop_w:], [pad_h, pad_w]
            # A negative high pad drops the gradient's last rows (that phase's rows end sooner).
            gp = gp[:, :gp.shape[1] + min(0, pad_h[1]), :gp.shape[2] + min(0, pad_w[1])]
            pads = [(low, max(0, high)) for low, high in pads]
            part = conv(gp, w[ti, tj][::-1, ::-1], (1, 1), pads, (1, 1), _SWAPPED)
            pad = [(0, 0), (0, height - count_h), (0, width - count_w), (0, 0)]
            line.append(jnp.pad(part, pad))
        grid.append(jnp.stack(line, axis=3))  # [N, height, width, sw, C]
    full = jnp.stack(grid, axis=2).reshape(n, height * sh, width * sw, c_in)
    return full[:, :h, :wd]


@functools.cache
def available() -> bool:
    """Whether this process can use `conv`: it runs on one CPU device (a custom call has no SPMD
    rule, so a sharded program would gather its inputs), and this jaxlib's oneDNN call gives XLA's
    results on a small case with asymmetric padding and a non-square kernel, strided and as input
    gradients at strides 1 and 2. Checked once per process (a compile of about 0.1 s)."""
    try:
        if not single_cpu_process():
            return False
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 7, 6, 3), np.float32)
        w = rng.standard_normal((3, 2, 3, 4), np.float32)
        g = rng.standard_normal((2, 7, 6, 4), np.float32)  # the stride-1 output's gradient
        g2 = rng.standard_normal((2, 4, 3, 4), np.float32)  # the stride-2 output's gradient
        padding = ((1, 1), (0, 1))

        def both(x: Array, w: Array, g: Array, g2: Array) -> tuple[list[Array], list[Array]]:
            x_grad = jax.vjp(lambda x: reference_conv(x, w, (1, 1), padding), x)[1](g)[0]
            x_grad2 = jax.vjp(lambda x: reference_conv(x, w, (2, 2), padding), x)[1](g2)[0]
            ours = [conv(x, w, (2, 2), padding), input_gradient(g, w, padding),
                    strided_input_gradient(g2, w, x.shape, (2, 2), padding)]
            return ours, [reference_conv(x, w, (2, 2), padding), x_grad, x_grad2]

        ours, theirs = run_apart_on_cpu(both, x, w, g, g2)
        return all(np.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(ours, theirs, strict=True))
    except Exception:  # no such custom call target, or a config this jaxlib reads differently
        return False


@functools.cache
def addend_available() -> bool:
    """Whether `conv` also takes an addend here: `available()`, and this jaxlib's call reads the
    binary-add fusion in its config as `conv(...) + addend` (a config XLA may encode differently
    in other versions; without it cnnjax adds in a pass of its own). Checked once per process."""
    if not available():
        return False
    try:
        rng = np.random.default_rng(1)
        g = rng.standard_normal((2, 5, 6, 4), np.float32)
        w = rng.standard_normal((3, 2, 3, 4), np.float32)
        addend = rng.standard_normal((2, 5, 6, 3), np.float32)
        padding = ((1, 1), (0, 1))

        def both(g: Array, w: Array, addend: Array) -> tuple[Array, Array]:
            return input_gradient(g, w, padding, addend), input_gradient(g, w, padding) + addend

        ours, theirs = run_apart_on_cpu(both, g, w, addend)
        return bool(np.allclose(ours, theirs, rtol=1e-5, atol=1e-5))
    except Exception:  # a config this jaxlib reads differently
        return False
