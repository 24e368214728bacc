"""oneDNN's convolution through jaxlib's custom call (cnnjax/onednn.py) against XLA's convolution, and
the "onednn" CPU form of `cpu_conv.conv_general_dilated` that uses it."""

import os
import platform
import subprocess
import sys
import warnings
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
from jax import export, lax

from cnnjax import cpu_conv, cpu_kernels, layers, onednn

needs_onednn = pytest.mark.skipif(not onednn.available(),
                                  reason="this jaxlib's CPU backend runs no oneDNN convolution")
# A layer whose passes oneDNN's call runs, not cnnjax's gather kernel: 12 input channels are too
# few for its forward pass, and 80 of the output gradient to one vector of x's channels too many
# for its input gradient (with AVX-512's 16 lanes; with AVX's 8, 12 channels are more than one).
ONEDNN_IN, ONEDNN_OUT = 12, 80
needs_onednn_layer = pytest.mark.skipif(
    not onednn.available() or (cpu_kernels.available() and cpu_kernels.vector_floats() != 16),
    reason="needs oneDNN's call, and the gather kernel's rules as AVX-512 has them")


def _xla(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def test_available_where_it_was_verified():
    # x86-64 Linux with jaxlib 0.10 is where the config encoding was read and checked; elsewhere the
    # probe may say no, and the form then stays off.
    if platform.machine() != "x86_64" or not jaxlib.__version__.startswith("0.10."):
        pytest.skip("the oneDNN call was verified on x86-64 with jaxlib 0.10 only")
    assert onednn.available()


# (input shape, kernel shape, strides, explicit padding): asymmetric and non-square throughout,
# a stride that drops input rows (VALID, stride 2 on 8), and AlexNet's 11x11 stride-4 stem.
CASES = [
    ((2, 7, 6, 5), (3, 2, 5, 4), (1, 1), ((1, 1), (0, 1))),
    ((2, 8, 9, 3), (3, 3, 3, 4), (2, 2), ((0, 0), (0, 0))),
    ((1, 23, 23, 3), (11, 11, 3, 8), (4, 4), ((2, 2), (2, 2))),
]


@needs_onednn
@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CASES)
def test_conv_and_input_gradient_match_xla(x_shape, w_shape, strides, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape, np.float32)
    w = rng.standard_normal(w_shape, np.float32)
    expected = _xla(x, w, strides, padding)
    g = rng.standard_normal(_xla(x, w, (1, 1), padding).shape, np.float32)
    x_grad = jax.vjp(lambda x: _xla(x, w, (1, 1), padding), x)[1](g)[0]

    def ours(x, w, g):
        return onednn.conv(x, w, strides, padding), onednn.input_gradient(g, w, padding)

    out, ours_grad = jax.jit(ours)(x, w, g)
    chex.assert_trees_all_close(out, expected, atol=1e-4, rtol=1e-5)
    chex.assert_trees_all_close(ours_grad, x_grad, atol=1e-4, rtol=1e-5)


# (input shape, kernel, strides, padding) of strided layers: ResNet's 3x3 stride 2 on an even and an
# odd input, a kernel narrower than its stride (a phase no tap reaches: zeros), stride 3 with
# asymmetric padding, AlexNet's 11x11 stride-4 stem, a 1x1 stride-2 projection.
STRIDED = [
    ((2, 8, 8, 3), (3, 3, 3, 8), (2, 2), ((1, 1), (1, 1))),
    ((2, 7, 9, 3), (3, 3, 3, 8), (2, 2), ((1, 1), (1, 1))),
    ((2, 9, 8, 3), (1, 3, 3, 8), (2, 3), ((0, 0), (1, 0))),
    ((1, 10, 11, 2), (3, 2, 2, 4), (3, 3), ((2, 0), (0, 1))),
    ((1, 23, 23, 3), (11, 11, 3, 8), (4, 4), ((2, 2), (2, 2))),
    ((2, 8, 8, 4), (1, 1, 4, 8), (2, 2), ((0, 0), (0, 0))),
]


@needs_onednn
def test_strided_input_gradient_matches_xla():
    rng = np.random.default_rng(2)
    for x_shape, w_shape, strides, padding in STRIDED:
        x = rng.standard_normal(x_shape, np.float32)
        w = rng.standard_normal(w_shape, np.float32)
        y, vjp = jax.vjp(lambda x, w=w, s=strides, p=padding: _xla(x, w, s, p), x)
        g = rng.standard_normal(y.shape, np.float32)
        ours = jax.jit(onednn.strided_input_gradient, static_argnums=(2, 3, 4))(
            g, w, x_shape, strides, padding)
        chex.assert_trees_all_close(ours, vjp(g)[0], atol=1e-4, rtol=1e-5)


@needs_onednn
def test_input_gradient_takes_an_addend_in_the_same_call():
    if platform.machine() != "x86_64" or not jaxlib.__version__.startswith("0.10."):
        pytest.skip("the binary-add config was verified on x86-64 with jaxlib 0.10 only")
    assert onednn.addend_available()
    rng = np.random.default_rng(3)
    x_shape, w_shape, _, padding = CASES[0]
    w = rng.standard_normal(w_shape, np.float32)
    g = rng.standard_normal(_xla(np.zeros(x_shape, np.float32), w, (1, 1), padding).shape, np.float32)
    addend = rng.standard_normal(x_shape, np.float32)
    fused = jax.jit(lambda g, w, a: onednn.input_gradient(g, w, padding, a))
    x_grad = jax.vjp(lambda x: _xla(x, w, (1, 1), padding), np.zeros(x_shape, np.float32))[1](g)[0]
    chex.assert_trees_all_close(fused(g, w, addend), x_grad + addend, atol=1e-4, rtol=1e-5)
    hlo = fused.lower(g, w, addend).compile().as_text()
    assert hlo.count(f'custom_call_target="{onednn.TARGET}"') == 1 and "BINARY_ADD" in hlo


def _block_input_grad(conv_and_input):
    """The gradient of a residual block's head: conv(x) and a shortcut that reads x, through
    `conv_and_input(x, w) -> (y, x)`, under a nonlinear loss."""
    def loss(x, w):
        y, shortcut = conv_and_input(x, w)
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(shortcut) * shortcut)

    return jax.grad(loss, (0, 1))


@needs_onednn_layer
def test_conv_passing_input_adds_the_shortcut_gradient_in_onednns_call(monkeypatch):
    # oneDNN's call, not the gather kernel's (80 filters: the native weight gradient).
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, ONEDNN_IN))
    w = jax.random.normal(jax.random.key(1), (3, 3, ONEDNN_IN, ONEDNN_OUT))
    padding = ((1, 1), (1, 1))
    ours = jax.jit(_block_input_grad(lambda x, w: cpu_conv.conv_passing_input(
        x, w, (1, 1), padding, dimension_numbers=cpu_conv._NHWC)))
    expected = _block_input_grad(lambda x, w: (_xla(x, w, (1, 1), padding), x))(x, w)
    chex.assert_trees_all_close(ours(x, w), expected, atol=1e-3, rtol=1e-4)
    hlo = ours.lower(x, w).compile().as_text()
    # Forward pass and input gradient, the shortcut's gradient added inside the second call.
    assert hlo.count(f'custom_call_target="{onednn.TARGET}"') == 2 and "BINARY_ADD" in hlo
    # The same block through the plain convolution adds the two gradients in a pass of its own.
    plain = jax.jit(_block_input_grad(lambda x, w: (_ours((1, 1), padding)(x, w), x)))
    assert "BINARY_ADD" not in plain.lower(x, w).compile().as_text()
    # Where no fused form applies (stride 2 here, the CPU forms off), the convolution and x as they
    # are, with the same gradients.
    strided = _block_input_grad(lambda x, w: cpu_conv.conv_passing_input(
        x, w, (2, 2), padding, dimension_numbers=cpu_conv._NHWC))
    chex.assert_trees_all_close(
        jax.jit(strided)(x, w),
        _block_input_grad(lambda x, w: (_xla(x, w, (2, 2), padding), x))(x, w), atol=1e-3, rtol=1e-4)
    assert "BINARY_ADD" not in jax.jit(strided).lower(x, w).compile().as_text()
    monkeypatch.setenv("CNNJAX_CPU_REWRITES", "off")
    off = jax.jit(_block_input_grad(lambda x, w: cpu_conv.conv_passing_input(
        x, w, (1, 1), padding, dimension_numbers=cpu_conv._NHWC)))
    assert onednn.TARGET not in off.lower(x, w).compile().as_text()
    chex.assert_trees_all_close(off(x, w), expected, atol=1e-3, rtol=1e-4)


class _Head(nn.Module):
    """A residual block's head: conv1 and an identity shortcut, through `layers.conv_and_input`."""

    conv: type[nn.Module]
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        y, shortcut = layers.conv_and_input(
            self.conv(ONEDNN_OUT, (3, 3), padding=1, dtype=self.dtype), x)
        return y, shortcut


@needs_onednn_layer
def test_conv_and_input_passes_the_input_through_cnnjaxs_conv_only():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, ONEDNN_IN))  # oneDNN's call
    variables = _Head(nn.Conv).init(jax.random.key(1), x)

    def grad(head):
        def loss(x):
            y, shortcut = head.apply(variables, x)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(shortcut) * shortcut)
        return jax.jit(jax.grad(loss))

    ours, theirs = grad(_Head(layers.Conv)), grad(_Head(nn.Conv))
    chex.assert_trees_all_close(ours(x), theirs(x), atol=1e-3, rtol=1e-4)
    assert "BINARY_ADD" in ours.lower(x).compile().as_text()
    # flax's own Conv, and ours where it casts its input, leave the caller's x as the shortcut.
    assert _Head(nn.Conv).apply(variables, x)[1] is x
    y, shortcut = _Head(layers.Conv, jnp.bfloat16).apply(variables, x)
    assert y.dtype == jnp.bfloat16 and shortcut is x


@needs_onednn
def test_conv_under_vmap_runs_each_element():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 5, 5, 4), np.float32)
    w = rng.standard_normal((3, 3, 3, 4, 2), np.float32)  # a kernel per element as well
    padding = ((1, 1), (1, 1))
    out = jax.vmap(lambda x, w: onednn.conv(x, w, (1, 1), padding))(x, w)
    chex.assert_trees_all_close(out, jnp.stack([_xla(x[i], w[i], (1, 1), padding) for i in range(3)]),
                                atol=1e-4, rtol=1e-5)


def _ours(strides, padding):
    return lambda x, w: cpu_conv.conv_general_dilated(x, w, strides, padding,
                                                      dimension_numbers=cpu_conv._NHWC)


@needs_onednn_layer
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_generic_layers_run_as_onednn(strides, monkeypatch):
    # 12 -> 80 channels, 3x3: no other CPU form applies, and the gather kernel's rules take neither
    # pass (ONEDNN_IN above). The forward pass and the input gradient are oneDNN's; the weight
    # gradient is cnnjax's native kernel (tests/test_cpu_kernels.py), or XLA's with that kernel off.
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, ONEDNN_IN))
    w = jax.random.normal(jax.random.key(1), (3, 3, ONEDNN_IN, ONEDNN_OUT))
    ours = _ours(strides, "SAME")

    def loss(conv):  # a nonlinear loss, so the cotangent differs at every position
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))

    expected = jax.grad(loss(lambda x, w: _xla(x, w, strides, "SAME")), (0, 1))(x, w)
    for native in ("on", "off"):
        monkeypatch.setenv(cpu_kernels.ENV, native)
        grad = jax.jit(jax.grad(loss(ours), (0, 1)))
        chex.assert_trees_all_close(grad(x, w), expected, atol=1e-3, rtol=1e-4)
        hlo = grad.lower(x, w).compile().as_text()
        calls = hlo.count(f'custom_call_target="{onednn.TARGET}"')
        # At stride 2 the input gradient is one call per phase of the input: 4 for a 3x3 kernel.
        assert calls == (2 if strides == (1, 1) else 5), calls
        native_calls = hlo.count(f'custom_call_target="{cpu_kernels.WEIGHT_GRADIENT}"')
        assert native_calls == (native == "on" and cpu_kernels.available()), native
        # XLA's convolution: only the weight gradient without the native kernel
        assert (" convolution(" in hlo) == (not native_calls)

    monkeypatch.setenv(onednn.ENV, "off")
    assert onednn.TARGET not in jax.jit(ours).lower(x, w).compile().as_text()


@needs_onednn
@pytest.mark.parametrize("x_shape,w_shape,calls", [((2, 8, 8, 3), (3, 3, 3, 16), 1),  # an RGB stem
                                                   ((2, 12, 12, 1), (5, 5, 1, 6), 0)])  # LeNet's C1
def test_only_the_narrowest_taps_layers_stay_tap_sums_beside_onednn(x_shape, w_shape, calls):
    # Both are "taps" by shape; beside oneDNN's kernel only layers of at most
    # TAPS_MAX_MACS_BESIDE_ONEDNN multiply-adds per output pixel keep the tap sum. The others take
    # the onednn form: the RGB stem's forward pass is then the gather kernel's call
    # (tests/test_cpu_kernels.py), or oneDNN's without cnnjax's kernels.
    assert cpu_conv.cpu_conv_form(x_shape, w_shape, "SAME") == "taps"
    x, w = jax.random.normal(jax.random.key(0), x_shape), jax.random.normal(jax.random.key(1), w_shape)
    fn = jax.jit(_ours((1, 1), "SAME"))
    hlo = fn.lower(x, w).compile().as_text()
    assert sum(hlo.count(f'custom_call_target="{t}"') for t in (onednn.TARGET, cpu_kernels.CONV)) == calls
    chex.assert_trees_all_close(fn(x, w), _xla(x, w, (1, 1), "SAME"), atol=1e-4, rtol=1e-5)


@needs_onednn
def test_narrow_layers_run_as_onednn_beside_it(monkeypatch):
    # LeNet-5's C3 is "narrow" by shape (6 input channels); beside oneDNN its input gradient ran in
    # 1.7 ms against the narrow form's row GEMMs' 3.0 (batch 128), so the layer takes the onednn
    # form. There cnnjax's gather kernel takes its forward pass and its input gradient (dot tiles:
    # 0.34 against oneDNN's 0.99 ms), or, with cnnjax's kernels off, oneDNN's call both.
    x_shape, w_shape = (2, 14, 14, 6), (5, 5, 6, 16)
    assert cpu_conv.cpu_conv_form(x_shape, w_shape, "VALID") == "narrow"
    x, w = jax.random.normal(jax.random.key(0), x_shape), jax.random.normal(jax.random.key(1), w_shape)
    ours = _ours((1, 1), "VALID")

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))

    expected = jax.grad(loss(lambda x, w: _xla(x, w, (1, 1), "VALID")), (0, 1))(x, w)
    for native in ("on", "off"):
        monkeypatch.setenv(cpu_kernels.ENV, native)
        grad = jax.jit(jax.grad(loss(ours), (0, 1)))
        chex.assert_trees_all_close(grad(x, w), expected, atol=1e-3, rtol=1e-4)
        hlo = grad.lower(x, w).compile().as_text()
        gather = native == "on" and cpu_kernels.available()
        targets = (onednn.TARGET, cpu_kernels.CONV, cpu_kernels.INPUT_GRADIENT)
        counts = [hlo.count(f'custom_call_target="{t}"') for t in targets]
        assert counts == ([0, 1, 1] if gather else [2, 0, 0]), (native, counts)


@needs_onednn_layer
def test_onednn_form_is_cpu_only():
    x, w = jnp.ones((2, 6, 6, ONEDNN_IN)), jnp.ones((3, 3, ONEDNN_IN, ONEDNN_OUT))
    fn = jax.jit(_ours((1, 1), "SAME"))
    # jax.export refuses a custom call with no compatibility guarantee unless told otherwise.
    allowed = [export.DisabledSafetyCheck.custom_call(onednn.TARGET)]
    assert onednn.TARGET in export.export(fn, platforms=["cpu"], disabled_checks=allowed)(x, w).mlir_module()
    module = export.export(fn, platforms=["cuda"])(x, w).mlir_module()
    assert onednn.TARGET not in module and "stablehlo.convolution" in module


def test_not_available_with_several_cpu_devices():
    # A custom call has no SPMD partitioning rule: a sharded step would gather its whole batch.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    code = "from cnnjax import onednn; print(onednn.available())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@needs_onednn
def test_compilation_cache_skips_onednn_programs_quietly(tmp_path):
    from jax.experimental.compilation_cache import compilation_cache

    from cnnjax import compile_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_enable_compilation_cache")
    saved = {k: getattr(jax.config, k) for k in keys}
    try:
        compile_cache.enable_compilation_cache(tmp_path, min_compile_seconds=0)
        x, w = np.ones((1, 5, 5, 2), np.float32), np.ones((3, 3, 2, 2), np.float32)
        with warnings.catch_warnings(record=True) as caught:
            jax.jit(lambda x, w: onednn.conv(x, w, (1, 1), ((1, 1), (1, 1))) + 1.0)(x, w)
        # XLA cannot serialise the call: nothing stored, and JAX's warning about it filtered.
        assert not [str(c.message) for c in caught if "compilation cache" in str(c.message)]
        assert not [p for p in tmp_path.iterdir() if "lambda" in p.name]
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()
