"""cnnjax's own CPU kernels (cnnjax/cpu_kernels.py, .cc): the build and its cache, the weight
gradient against XLA's, the CPU forms of `cpu_conv.conv_general_dilated` that take it, and the
batch norm + residual + ReLU kernels against autodiff of their formula."""

import os
import platform
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export, lax

from cnnjax import cpu_conv, cpu_kernels

needs_native = pytest.mark.skipif(not cpu_kernels.available(),
                                  reason="cnnjax's CPU kernels did not build here")
TARGET = f'custom_call_target="{cpu_kernels.WEIGHT_GRADIENT}"'


def _xla(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def test_available_where_a_compiler_is():
    # The development and CI machines (x86-64 Linux with g++): the kernels must build and pass
    # their check there, so that the skips below cannot hide a broken build.
    if platform.system() != "Linux" or shutil.which(os.environ.get("CXX") or "c++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert cpu_kernels.available()


def test_usable_means_enabled_then_available(monkeypatch):
    def not_to_be_called():
        raise AssertionError("available() ran with the kernels off")

    monkeypatch.setattr(cpu_kernels, "available", not_to_be_called)
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    assert not cpu_kernels.usable()  # off: no build, no check
    monkeypatch.setenv(cpu_kernels.ENV, "on")
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert not cpu_kernels.usable()
    monkeypatch.setattr(cpu_kernels, "available", lambda: True)
    assert cpu_kernels.usable()


# (input shape, kernel shape, strides, explicit padding). Between them, with AVX-512's 16-float
# vectors (AVX's 8 in brackets): 16 output channels (1 vector [2]), 24 (1 vector and an 8-float
# tail [2 + 1]), 8 (the tail alone [1]), 40 (a 2-vector block and the tail [2 + 2 + 1]), 64 (two
# 2-vector blocks [four]); input channels in one block (16 against 1 vector) or split (20 and 64
# against 2 vectors: blocks of at most 12 [6]); strided, asymmetric and zero padding; one image with
# AlexNet's 11x11 stride-4 stem; 4x4 maps, where a chunk holds several images. Filters that are not
# a multiple of 8 take the expanded rows where they are fewer than 8 or the input channels at most
# 8: LeNet-5's C1 (1 -> 6, 5x5), 5 filters at strides (2, 1) and 12 at (1, 2) (a segment per tap)
# with padding, and a 7x7 kernel's 49 taps (two blocks of accumulators); else vector blocks whose
# last vector holds the rest, partly filled: DenseNet-BC's 48 -> 12, 20 -> 13 at stride 2 and 17 ->
# 30 (a vector, then 14 in one). With AVX-512, three taps wide at stride 1 along the width and 16
# output channels take the kernel-row blocks (`RowBlock`): 16 input channels (blocks of 8), 13 (7
# and 6), a row stride of 2, no padding on the left and two on the right, and 3x3 over 5x5 and 9x9
# maps.
CASES = [
    ((2, 7, 7, 20), (3, 3, 20, 40), (1, 1), ((1, 1), (1, 1))),
    ((4, 12, 12, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1))),
    ((3, 9, 9, 13), (3, 3, 13, 16), (2, 1), ((1, 0), (0, 2))),
    ((5, 5, 5, 16), (2, 3, 16, 16), (1, 1), ((0, 1), (2, 0))),
    ((3, 9, 8, 7), (3, 2, 7, 24), (2, 1), ((1, 2), (0, 1))),
    ((2, 6, 5, 3), (5, 3, 3, 8), (1, 2), ((2, 2), (1, 1))),
    ((1, 23, 23, 3), (11, 11, 3, 8), (4, 4), ((2, 2), (2, 2))),
    ((40, 4, 4, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1))),
    ((2, 5, 5, 4), (1, 1, 4, 8), (2, 2), ((0, 0), (0, 0))),
    ((2, 12, 12, 1), (5, 5, 1, 6), (1, 1), ((0, 0), (0, 0))),
    ((4, 9, 11, 3), (3, 2, 3, 5), (2, 1), ((1, 2), (0, 1))),
    ((3, 7, 8, 2), (3, 3, 2, 12), (1, 2), ((1, 1), (2, 0))),
    ((2, 10, 10, 1), (7, 7, 1, 6), (1, 1), ((3, 3), (3, 3))),
    ((2, 8, 8, 48), (3, 3, 48, 12), (1, 1), ((1, 1), (1, 1))),
    ((2, 7, 7, 20), (3, 3, 20, 13), (2, 2), ((1, 1), (0, 1))),
    ((2, 9, 9, 17), (3, 3, 17, 30), (1, 1), ((1, 1), (1, 1))),
]


@needs_native
@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CASES)
def test_weight_gradient_matches_xla(x_shape, w_shape, strides, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape, np.float32)
    w = rng.standard_normal(w_shape, np.float32)
    out, vjp = jax.vjp(lambda w: _xla(x, w, strides, padding), w)
    g = rng.standard_normal(out.shape, np.float32)
    ours = jax.jit(lambda x, g: cpu_kernels.weight_gradient(x, g, w_shape[:2], strides, padding))
    chex.assert_trees_all_close(ours(x, g), vjp(g)[0], atol=1e-3, rtol=1e-4)


def _norm_act_formula(x, scale, bias, residual, relu):
    mean = x.mean((0, 1, 2))
    var = jnp.maximum(0.0, (x * x).mean((0, 1, 2)) - mean * mean)
    y = (x - mean) * (scale * lax.rsqrt(var + 1e-5)) + bias
    y = y if residual is None else y + residual
    return (jnp.maximum(y, 0.0) if relu else y), mean, var


# (shape, ReLU, residual): 12 and 100 channels (a tile of 252 and 300 floats, not a multiple of a
# vector), 16 (a 256-float tile), 64 over 8192 rows (several chunks per thread and sum blocks).
# With AVX-512, 16 to 64 channels take the sums in registers (`VectorSums`: 1 to 4 vectors a row,
# 4, 2 or 1 rows at a time): 105 rows of 16 leave a tail of rows, 32 and 48 are 2 and 3 vectors;
# 128 (8 vectors) takes the tiles. With the ReLU and no residual the backward takes its mask from
# x (16 and 48 channels in registers, 100 in tiles).
NORM_ACT_CASES = [((3, 5, 7, 12), True, True), ((3, 5, 7, 12), False, True),
                  ((2, 4, 4, 16), True, False), ((2, 4, 4, 16), False, False),
                  ((4, 3, 3, 100), True, True), ((128, 8, 8, 64), True, True),
                  ((3, 5, 7, 16), True, True), ((2, 9, 9, 32), False, True),
                  ((2, 5, 6, 48), True, False), ((2, 4, 4, 128), True, True),
                  ((4, 3, 3, 100), True, False)]


@needs_native
@pytest.mark.parametrize("shape,relu,has_residual", NORM_ACT_CASES)
def test_norm_act_matches_autodiff_of_its_formula(shape, relu, has_residual):
    rng = np.random.default_rng(0)
    c = shape[-1]
    x = rng.standard_normal(shape, np.float32) * 2 + 1
    scale, bias = rng.standard_normal((2, c), np.float32)
    residual = rng.standard_normal(shape, np.float32) if has_residual else None
    g = rng.standard_normal(shape, np.float32)
    g_mean, g_var = rng.standard_normal((2, c), np.float32)  # the statistics' cotangents too

    expected, vjp = jax.vjp(lambda *a: _norm_act_formula(*a, relu), x, scale, bias, residual)
    out, mean, var = jax.jit(lambda *a: cpu_kernels.norm_act(*a, 1e-5, relu))(x, scale, bias,
                                                                                residual)
    chex.assert_trees_all_close((out, mean, var), expected, atol=1e-5, rtol=1e-5)
    inv = lax.rsqrt(var + 1e-5)
    grads = jax.jit(lambda *a: cpu_kernels.norm_act_backward(
        *a, relu=relu, residual=has_residual))(x, out, g, mean, inv, scale, bias, g_mean, g_var)
    want = vjp((g, g_mean, g_var))
    chex.assert_trees_all_close(grads[:3], want[:3], atol=1e-4, rtol=1e-4)
    # dL/dresidual comes back only where it is not g itself: with the ReLU and a residual.
    assert len(grads) == (4 if relu and has_residual else 3)
    if len(grads) == 4:
        chex.assert_trees_all_close(grads[3], want[3], atol=1e-6)


# The gather kernel (cpu_kernels.conv, input_gradient): (input shape, kernel shape, strides,
# explicit padding). 16, 32 and 64 input channels at stride 1 with 3-wide kernels (kernel rows in
# triples; 16 and 48 output channels: one vector, then 2-vector blocks and a 1-vector tail), at
# stride 2 (input pixels two apart) and at strides (1, 2) and 3; 3 input channels (an RGB layer)
# in triples; the generic loop (5, 6 and 48 input channels, a 5x5 kernel, a 3x2 one); asymmetric
# padding, a pad wider than the kernel's reach on one side, and none at all (read in place); one
# image (chunks of rows) and a 1x1 kernel. The input gradient of every case too: where x's channels
# are at most half a vector (3, 5 and 6 with AVX-512) from whole vectors of g's in dot tiles,
# LeNet-5's C3 (6 <- 16) among them, 6 <- 32 at stride 2 with two vectors a tap; a 7x7 RGB stem
# at stride 2 (its loop compiled for 3 channels two pixels apart) and 80 -> 32 (a wide input to
# two vectors of outputs, in the generic loop). Weights packed per block of two vectors: 64 -> 48
# and 80 -> 64 at 4x4 (tiles of four vectors where a row is short, forward and back; a block of
# one vector at the end, forward and back); 200 px rows of 64 channels (more rows than one group
# of rows holds). Channel counts that are no multiple of the vector (the last vector of a tile
# written only up to the last channel, its weights padded with zeros): x's 12 from g's 16 (no
# longer dot tiles: more than half a vector), DenseNet-BC's growth layer 48 -> 12 (both passes
# one partial vector), EfficientNet-B3's stride-2 stem 3 -> 40 (two vectors and a half-filled
# one; back, 3 <- 40 from g's partial vectors), 8 -> 24 (a block of one and a half vectors,
# back: 8 <- 24), GoogLeNet's 5x5 24 <- 64, and 17 -> 56 with an addend (3.5 vectors forward,
# 17 <- 56 back).
GATHER_CASES = [
    ((2, 7, 6, 16), (3, 3, 16, 16), (1, 1), ((1, 0), (1, 2))),
    ((3, 6, 9, 32), (3, 3, 32, 48), (1, 1), ((1, 1), (1, 1))),
    ((2, 5, 5, 64), (3, 3, 64, 32), (1, 1), ((0, 0), (0, 0))),
    ((2, 9, 8, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (0, 1))),
    ((2, 9, 11, 32), (3, 3, 32, 16), (1, 2), ((2, 1), (1, 0))),
    ((2, 11, 10, 16), (5, 5, 16, 16), (3, 3), ((2, 2), (1, 3))),
    ((2, 7, 7, 5), (3, 2, 5, 16), (1, 1), ((1, 1), (0, 1))),
    ((2, 8, 7, 3), (3, 3, 3, 32), (1, 1), ((1, 1), (2, 0))),
    ((1, 12, 10, 48), (3, 3, 48, 16), (1, 1), ((1, 1), (1, 1))),
    ((2, 6, 6, 16), (1, 1, 16, 32), (2, 2), ((0, 0), (0, 0))),
    ((2, 14, 14, 6), (5, 5, 6, 16), (1, 1), ((0, 0), (0, 0))),
    ((2, 6, 7, 12), (3, 3, 12, 16), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 9, 6), (3, 3, 6, 32), (2, 2), ((1, 1), (1, 0))),
    ((2, 15, 14, 3), (7, 7, 3, 32), (2, 2), ((3, 3), (3, 2))),
    ((1, 5, 6, 80), (3, 3, 80, 32), (1, 1), ((1, 1), (1, 1))),
    ((2, 4, 4, 64), (3, 3, 64, 48), (1, 1), ((1, 1), (1, 1))),
    ((2, 4, 5, 80), (3, 3, 80, 64), (1, 1), ((1, 1), (0, 1))),
    ((1, 12, 200, 64), (3, 3, 64, 32), (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 8, 48), (3, 3, 48, 12), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 10, 3), (3, 3, 3, 40), (2, 2), ((1, 1), (0, 1))),
    ((2, 7, 7, 8), (5, 5, 8, 24), (1, 1), ((2, 2), (2, 2))),
    ((2, 6, 7, 24), (5, 5, 24, 64), (1, 1), ((2, 2), (2, 1))),
    ((1, 5, 12, 17), (3, 3, 17, 56), (1, 1), ((1, 1), (1, 1))),
]


@needs_native
@pytest.mark.parametrize("x_shape,w_shape,strides,padding", GATHER_CASES)
def test_gather_convolution_and_input_gradient_match_xla(x_shape, w_shape, strides, padding):
    rng = np.random.default_rng(0)
    x, w = (rng.standard_normal(s, np.float32) for s in (x_shape, w_shape))
    y, vjp = jax.vjp(lambda x: _xla(x, w, strides, padding), x)
    g, a = (rng.standard_normal(y.shape, np.float32) for _ in range(2))
    b = rng.standard_normal(x_shape, np.float32)

    def ours(x, w, g, a, b):
        return [cpu_kernels.conv(x, w, strides, padding),
                cpu_kernels.conv(x, w, strides, padding, a),
                cpu_kernels.input_gradient(g, w, x.shape, strides, padding),
                cpu_kernels.input_gradient(g, w, x.shape, strides, padding, b)]

    got = jax.jit(ours)(x, w, g, a, b)
    expected = [y, y + a, vjp(g)[0], vjp(g)[0] + b]
    chex.assert_trees_all_close(got, expected, atol=1e-4, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("c_in,c_out", [(2, 6), (3, 1)])
def test_input_gradient_from_any_number_of_output_channels(c_in, c_out):
    # x's channels in vectors (c_in of them), g's any count (c_out more than the lanes): the
    # packed weights' transpose leaves channels past its last whole block of lanes.
    lanes = cpu_kernels.vector_floats()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 6, c_in * lanes), np.float32)
    w = rng.standard_normal((3, 3, c_in * lanes, c_out + lanes), np.float32)
    padding = ((1, 1), (1, 1))
    y, vjp = jax.vjp(lambda x: _xla(x, w, (1, 1), padding), x)
    g = rng.standard_normal(y.shape, np.float32)
    got = jax.jit(lambda g, w: cpu_kernels.input_gradient(g, w, x.shape, (1, 1), padding))(g, w)
    chex.assert_trees_all_close(got, vjp(g)[0], atol=1e-4, rtol=1e-4)


@needs_native
def test_every_kernel_runs_under_vmap_once_per_member():
    # multiseed vmaps the engine's step over K members: each call runs member by member.
    rng = np.random.default_rng(1)
    k, strides, padding = 2, (1, 1), ((1, 1), (1, 1))
    x, g = (rng.standard_normal((k, 2, 5, 5, 16), np.float32) for _ in range(2))
    w = rng.standard_normal((k, 3, 3, 16, 16), np.float32)
    scale, bias = rng.standard_normal((2, k, 16), np.float32)

    def calls(x, w, g, scale, bias):
        out, mean, var = cpu_kernels.norm_act(x, scale, bias, None, 1e-5, True)
        return [cpu_kernels.conv(x, w, strides, padding),
                cpu_kernels.input_gradient(g, w, x.shape, strides, padding),
                cpu_kernels.weight_gradient(x, g, (3, 3), strides, padding), out, mean, var,
                *cpu_kernels.norm_act_backward(x, out, g, mean, lax.rsqrt(var + 1e-5), scale, bias,
                                               mean, var, relu=True, residual=False)]

    vmapped = jax.jit(jax.vmap(calls))(x, w, g, scale, bias)
    members = [jax.jit(calls)(x[i], w[i], g[i], scale[i], bias[i]) for i in range(k)]
    chex.assert_trees_all_close(vmapped, jax.tree.map(lambda *m: np.stack(m), *members),
                                atol=1e-6, rtol=1e-6)


@needs_native
def test_gather_kernel_names_a_shape_it_cannot_take():
    x, w = jnp.ones((1, 4, 4, 16)), jnp.ones((3, 3, 8, 20))  # w's 8 input channels, x's 16
    with pytest.raises(Exception, match=r"expects x \[N,H,W,Ci\], w \[kh,kw,Ci,Co\]"):
        jax.jit(lambda x, w: cpu_kernels.conv(x, w, (1, 1), ((1, 1), (1, 1))))(x, w)
    with pytest.raises(Exception, match="the addend must match the output"):
        jax.jit(lambda x, w, a: cpu_kernels.conv(x, w, (1, 1), ((1, 1), (1, 1)), a))(
            x, jnp.ones((3, 3, 16, 20)), jnp.ones((1, 4, 4, 10)))
    g = jnp.ones((1, 4, 4, 12))  # w's 20 output channels
    with pytest.raises(Exception, match=r"expects g \[N,Ho,Wo,Co\], w \[kh,kw,Ci,Co\]"):
        jax.jit(lambda g, w: cpu_kernels.input_gradient(g, w, (1, 4, 4, 16), (1, 1), (
            (1, 1), (1, 1))))(g, jnp.ones((3, 3, 16, 20)))


def _calls(hlo, *targets):
    return [hlo.count(f'custom_call_target="{t}"') for t in targets]


# (input shape, kernel shape, strides, the gather kernel's calls: forward, input gradient).
# 16 -> 32 channels: both passes, at stride 1 and 2. The forward pass from 16 input channels up
# (WIDE_MIN_CHANNELS); the input gradient, which reads the output gradient's channels, from 16 of
# them up to more than one vector of x's channels, or to one from at most three vectors or from
# GATHER_CHANNELS: 16 -> 48 both, 16 -> 128 the forward pass only (x's one vector from a wide g);
# 48 -> 16, a DenseNet growth layer (128 -> 32), 256 -> 256 at 4x4 and 96 -> 128 at stride 2 both;
# 24 -> 64 both (x's 24 channels, no multiple of the lanes). At most 8 input channels
# (NARROW_CHANNELS) both where the output is at most two vectors (8 -> 16: the generic loop
# forward, dot tiles back; ablation_inception's 8 -> 24), the input gradient only where it is
# more (6 -> 64: oneDNN's forward pass was faster); 12 -> 16 the input gradient only (12
# channels too few for the forward pass's wide rule); DenseNet-BC's growth layer 48 -> 12 and
# 128 -> 12 both (the input gradient from WIDE_GRADIENT_MIN_CHANNELS of g); 64 -> 2 the forward
# pass only (two channels of g are too few).
GATHER_FORM_CASES = [((2, 9, 9, 16), (3, 3, 16, 32), (1, 1), (1, 1)),
                     ((2, 9, 9, 16), (3, 3, 16, 32), (2, 2), (1, 1)),
                     ((2, 8, 8, 16), (3, 3, 16, 48), (1, 1), (1, 1)),
                     ((2, 8, 8, 48), (3, 3, 48, 16), (1, 1), (1, 1)),
                     ((2, 6, 6, 128), (3, 3, 128, 32), (1, 1), (1, 1)),
                     ((2, 6, 6, 16), (3, 3, 16, 128), (1, 1), (1, 0)),
                     ((2, 4, 4, 256), (3, 3, 256, 256), (1, 1), (1, 1)),
                     ((2, 8, 8, 96), (3, 3, 96, 128), (2, 2), (1, 1)),
                     ((2, 8, 8, 24), (3, 3, 24, 64), (1, 1), (1, 1)),
                     ((2, 8, 8, 8), (3, 3, 8, 16), (1, 1), (1, 1)),
                     ((2, 8, 8, 6), (3, 3, 6, 64), (1, 1), (0, 1)),
                     ((2, 8, 8, 12), (3, 3, 12, 16), (1, 1), (0, 1)),
                     ((2, 8, 8, 8), (5, 5, 8, 24), (1, 1), (1, 1)),
                     ((2, 8, 8, 48), (3, 3, 48, 12), (1, 1), (1, 1)),
                     ((2, 6, 6, 128), (3, 3, 128, 12), (1, 1), (1, 1)),
                     ((2, 8, 8, 64), (3, 3, 64, 2), (1, 1), (1, 0))]


@needs_native
@pytest.mark.parametrize("x_shape,w_shape,strides,calls", GATHER_FORM_CASES)
@pytest.mark.parametrize("onednn_setting", ["on", "off"])
def test_generic_layers_take_the_gather_kernel_where_their_channels_fit(
        x_shape, w_shape, strides, calls, onednn_setting, monkeypatch):
    # With oneDNN's call ("onednn" form) the passes the kernel does not take are oneDNN's; without
    # it ("native"), XLA's.
    from cnnjax import onednn

    if cpu_kernels.vector_floats() != 16:
        pytest.skip("the cases' channel counts are chosen for AVX-512's 16-float vectors")
    if onednn_setting == "on" and not onednn.available():
        pytest.skip("this jaxlib's CPU backend runs no oneDNN convolution")
    monkeypatch.setenv(onednn.ENV, onednn_setting)
    x = jax.random.normal(jax.random.key(0), x_shape)
    # He-scaled, so that wide layers' outputs stay of order 1 (their float32 sums then agree).
    w = jax.random.normal(jax.random.key(1), w_shape) * (2 / np.prod(w_shape[:3])) ** 0.5

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))

    ours = loss(lambda x, w: cpu_conv.conv_general_dilated(x, w, strides, "SAME",
                                                           dimension_numbers=cpu_conv._NHWC))
    grad = jax.jit(jax.grad(ours, (0, 1)))
    expected = jax.grad(loss(lambda x, w: _xla(x, w, strides, "SAME")), (0, 1))(x, w)
    chex.assert_trees_all_close(grad(x, w), expected, atol=1e-3, rtol=1e-4)
    hlo = grad.lower(x, w).compile().as_text()
    assert tuple(_calls(hlo, cpu_kernels.CONV, cpu_kernels.INPUT_GRADIENT)) == calls
    onednn_calls = _calls(hlo, onednn.TARGET)[0]
    if onednn_setting == "off":
        assert onednn_calls == 0
    else:  # the rest oneDNN's: its input gradient at stride 2 one call per phase (4 for 3x3)
        assert onednn_calls == (1 - calls[0]) + (1 - calls[1]) * (1 if strides == (1, 1) else 4)
    # Where every pass is a custom call, nothing is stored for the backward pass; fewer than 8
    # filters (on more than 8 channels) keep XLA's weight gradient, and so the store.
    native_weight_gradient = w_shape[3] >= 8 or x_shape[3] <= cpu_kernels.NARROW_CHANNELS
    in_place = native_weight_gradient and (onednn_setting == "on" or calls == (1, 1))
    assert (" conditional(" in hlo) == (not in_place)
    # GPUs and TPUs never see the calls (`lax.platform_dependent`).
    module = export.export(grad, platforms=["cuda"])(x, w).mlir_module()
    assert cpu_kernels.CONV not in module and cpu_kernels.INPUT_GRADIENT not in module
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    hlo = jax.jit(jax.grad(ours, (0, 1))).lower(x, w).compile().as_text()
    assert _calls(hlo, cpu_kernels.CONV, cpu_kernels.INPUT_GRADIENT) == [0, 0]


@needs_native
def test_rgb_first_layers_take_the_gather_kernel_at_any_size_and_narrow_ones_while_small():
    # 3 input channels: the "taps" form by shape, beside oneDNN's call the onednn form; the gather
    # kernel takes its forward pass at any output size, width and kernel. 4 input channels (the
    # narrow form, beside oneDNN's call the onednn form) to two vectors: while the output is at
    # most NARROW_MAX_OUTPUT_BYTES.
    from cnnjax import onednn

    if not onednn.available():
        pytest.skip("this jaxlib's CPU backend runs no oneDNN convolution")
    lanes = cpu_kernels.vector_floats()
    fn = jax.jit(lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                                            dimension_numbers=cpu_conv._NHWC))
    # With AVX-512's 16 lanes: 3x3 to 4 vectors 32 and 512 MiB out; 4 -> 2 vectors 16 and 256 MiB;
    # EfficientNet-B6's stem width, 56 (no multiple of the lanes), 448 MiB.
    for batch, c_in, kernel, outputs, gather in (
            (128, 3, 3, 4 * lanes, True), (2048, 3, 3, 4 * lanes, True), (2048, 3, 3, 56, True),
            (2048, 3, 5, 4 * lanes, True), (128, 4, 3, 2 * lanes, True),
            (2048, 4, 3, 2 * lanes, False)):
        x = jax.ShapeDtypeStruct((batch, 32, 32, c_in), jnp.float32)
        w = jax.ShapeDtypeStruct((kernel, kernel, c_in, outputs), jnp.float32)
        small = 4 * batch * 32 * 32 * outputs <= cpu_kernels.NARROW_MAX_OUTPUT_BYTES
        assert small == (batch == 128)
        hlo = fn.lower(x, w).compile().as_text()
        assert _calls(hlo, cpu_kernels.CONV, onednn.TARGET) == ([1, 0] if gather else [0, 1])


@needs_native
def test_outputs_larger_than_the_cache_are_stored_past_it_and_agree():
    # Beyond 32 MB the gather tiles stream their stores (StreamStore): an RGB layer's 67 MB output
    # with an addend, and a 34 MB input gradient; not where pixels are no whole cache lines (40
    # channels, 42 MB: a streamed store needs one).
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 128, 128, 3), np.float32)
    padding = ((1, 1), (1, 1))
    for c_out in (64, 40):
        w = rng.standard_normal((3, 3, 3, c_out), np.float32)
        a = rng.standard_normal((16, 128, 128, c_out), np.float32)
        got = jax.jit(lambda x, w, a: cpu_kernels.conv(x, w, (1, 1), padding, a))(x, w, a)
        chex.assert_trees_all_close(got, _xla(x, w, (1, 1), padding) + a, atol=1e-4, rtol=1e-4)
    x = rng.standard_normal((16, 128, 128, 32), np.float32)
    w = rng.standard_normal((3, 3, 32, 32), np.float32) / 17
    y, vjp = jax.vjp(lambda x: _xla(x, w, (1, 1), padding), x)
    g = rng.standard_normal(y.shape, np.float32)
    got = jax.jit(lambda g, w: cpu_kernels.input_gradient(g, w, x.shape, (1, 1), padding))(g, w)
    chex.assert_trees_all_close(got, vjp(g)[0], atol=1e-4, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_block_input_gradient_adds_the_shortcut_gradient_in_the_gather_kernel(strides):
    # conv_passing_input (a ResNet block's conv1 and its shortcut): the shortcut's gradient is
    # the input-gradient call's third operand, at stride 1 and 2.
    if cpu_kernels.vector_floats() != 16:
        pytest.skip("the case's channel counts are chosen for AVX-512's 16-float vectors")
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    w = jax.random.normal(jax.random.key(1), (3, 3, 16, 32))

    def grad(conv_and_x):
        def loss(x, w):
            y, shortcut = conv_and_x(x, w)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(shortcut[:, ::2, ::2]) * shortcut[:, ::2, ::2])
        return jax.grad(loss, (0, 1))

    ours = jax.jit(grad(lambda x, w: cpu_conv.conv_passing_input(
        x, w, strides, ((1, 1), (1, 1)), dimension_numbers=cpu_conv._NHWC)))
    expected = grad(lambda x, w: (_xla(x, w, strides, ((1, 1), (1, 1))), x))(x, w)
    chex.assert_trees_all_close(ours(x, w), expected, atol=1e-3, rtol=1e-4)
    hlo = ours.lower(x, w).compile().as_text()
    call = [line for line in hlo.splitlines()
            if f'custom_call_target="{cpu_kernels.INPUT_GRADIENT}"' in line]
    assert len(call) == 1
    operands = call[0].split("custom-call(", 1)[1].split(")", 1)[0]
    assert operands.count(",") == 2, call[0]  # g, w and the shortcut's gradient


# One layer per form that takes the native weight gradient: "taps" (a first layer on 3 channels),
# "narrow" (4 channels), and "native" itself (8 channels with oneDNN's call off); LeNet-5's C1
# (taps, 6 filters: the expanded rows, as at most NARROW_CHANNELS input channels); and a layer of
# 12 channels to 6 filters, which keeps XLA's (no form of its own, too wide for expanded rows).
FORM_CASES = [("taps", (2, 8, 8, 3), (3, 3, 3, 16), 1), ("narrow", (2, 8, 8, 4), (3, 3, 4, 8), 1),
              ("native", (2, 9, 9, 8), (3, 3, 8, 16), 1), ("taps", (2, 12, 12, 1), (5, 5, 1, 6), 1),
              (None, (2, 8, 8, 12), (3, 3, 12, 6), 0)]


@needs_native
@pytest.mark.parametrize("form,x_shape,w_shape,calls", FORM_CASES)
def test_cpu_forms_take_the_native_weight_gradient(form, x_shape, w_shape, calls, monkeypatch):
    monkeypatch.setenv("CNNJAX_CPU_ONEDNN", "off")
    assert cpu_conv.cpu_conv_form(x_shape, w_shape, "SAME") == (None if form == "native" else form)
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)

    def loss(conv):  # a nonlinear loss, so the cotangent differs at every position
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))

    ours = loss(lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                                           dimension_numbers=cpu_conv._NHWC))
    expected = jax.grad(loss(lambda x, w: _xla(x, w, (1, 1), "SAME")), (0, 1))(x, w)
    grad = jax.jit(jax.grad(ours, (0, 1)))
    chex.assert_trees_all_close(grad(x, w), expected, atol=1e-3, rtol=1e-4)
    assert grad.lower(x, w).compile().as_text().count(TARGET) == calls
    if not calls:
        return
    # GPUs and TPUs never see the call (`lax.platform_dependent`), and jax.export needs telling
    # that a CPU program may hold it (and the gather kernel's, which takes the 8-channel layer's
    # other passes).
    assert cpu_kernels.WEIGHT_GRADIENT not in export.export(grad, platforms=["cuda"])(x, w).mlir_module()
    allowed = [export.DisabledSafetyCheck.custom_call(target) for target in (
        cpu_kernels.WEIGHT_GRADIENT, cpu_kernels.CONV, cpu_kernels.INPUT_GRADIENT)]
    exported = export.export(grad, platforms=["cpu"], disabled_checks=allowed)(x, w)
    assert cpu_kernels.WEIGHT_GRADIENT in exported.mlir_module()

    monkeypatch.setenv(cpu_kernels.ENV, "off")
    grad = jax.jit(jax.grad(ours, (0, 1)))
    chex.assert_trees_all_close(grad(x, w), expected, atol=1e-3, rtol=1e-4)
    assert TARGET not in grad.lower(x, w).compile().as_text()


def test_build_is_cached_and_failures_name_the_problem(tmp_path, monkeypatch):
    if shutil.which(os.environ.get("CXX") or "c++") is None:
        pytest.skip("no C++ compiler on this machine")
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
    path = cpu_kernels.build()
    assert path.parent == tmp_path and path.name.startswith("libcnnjax_cpu_")
    built_at = path.stat().st_mtime_ns
    assert cpu_kernels.build() == path and path.stat().st_mtime_ns == built_at  # not built again
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-cxx' on PATH"):
        cpu_kernels.build("no-such-cxx")
    with pytest.raises(RuntimeError, match="false failed to build cpu_kernels.cc"):
        cpu_kernels.build("false")  # a "compiler" that exits 1


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env),
                          capture_output=True, text=True, check=True)


def test_without_a_compiler_xla_weight_gradient_runs_after_one_warning(tmp_path):
    code = """
import jax, jax.numpy as jnp
from cnnjax import cpu_conv, cpu_kernels
conv = lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                                  dimension_numbers=cpu_conv._NHWC)
x, w = jnp.ones((1, 6, 6, 8)), jnp.ones((3, 3, 8, 8))
grad = jax.jit(jax.grad(lambda w: conv(x, w).sum()))
print(cpu_kernels.available(), cpu_kernels.WEIGHT_GRADIENT in grad.lower(w).as_text(),
      float(grad(w)[1, 1, 0, 0]))
"""
    out = _python(code, CXX="no-such-cxx", CNNJAX_NATIVE_CACHE=str(tmp_path),
                  CNNJAX_CPU_ONEDNN="off")
    assert out.stdout.split() == ["False", "False", "36.0"]  # the centre tap sees all 6x6 pixels
    assert out.stderr.count("cnnjax's CPU kernels are off") == 1
    assert "no C++ compiler 'no-such-cxx'" in out.stderr


def test_not_available_with_several_cpu_devices():
    # A custom call has no SPMD partitioning rule: a sharded step would gather its whole batch.
    out = _python("from cnnjax import cpu_kernels; print(cpu_kernels.available())",
                  XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert out.stdout.strip() == "False"


@needs_native
def test_programs_with_the_kernel_enter_the_compilation_cache(tmp_path):
    from jax.experimental.compilation_cache import compilation_cache

    from cnnjax import compile_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_enable_compilation_cache")
    saved = {k: getattr(jax.config, k) for k in keys}
    try:
        compile_cache.enable_compilation_cache(tmp_path, min_compile_seconds=0)
        x, g = np.ones((1, 5, 5, 2), np.float32), np.ones((1, 5, 5, 8), np.float32)

        def native_weight_gradient(x, g):
            return cpu_kernels.weight_gradient(x, g, (3, 3), (1, 1), ((1, 1), (1, 1))) * 2

        def native_conv(x, w):
            return cpu_kernels.conv(x, w, (1, 1), ((1, 1), (1, 1))) * 2

        jax.jit(native_weight_gradient)(x, g)
        jax.jit(native_conv)(np.ones((1, 5, 5, 16), np.float32),
                             np.ones((3, 3, 16, cpu_kernels.vector_floats()), np.float32))
        # Unlike oneDNN's call (tests/test_onednn.py), XLA serialises these.
        assert [p for p in tmp_path.iterdir() if "native_weight_gradient" in p.name]
        assert [p for p in tmp_path.iterdir() if "native_conv" in p.name]
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()
