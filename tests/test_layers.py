"""Layer behaviour: padding arithmetic, im2col equivalence, pooling, norms, activations, initialisers."""

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnnjax import layers
from cnnjax.padding import conv_output_size, explicit_padding


@pytest.mark.parametrize("padding,stride", itertools.product(["VALID", "SAME", "FULL", 2], [1, 2, 3]))
def test_conv_output_size_follows_the_formula(padding, stride):
    x = jnp.ones((1, 11, 11, 2))
    conv = layers.Conv(3, (3, 3), strides=stride, padding=padding)
    y = conv.apply(conv.init(jax.random.key(0), x), x)
    pad = {"VALID": 0, "FULL": 2, 2: 2}.get(padding)
    expected = -(-11 // stride) if padding == "SAME" else (11 + 2 * pad - 3) // stride + 1
    assert y.shape == (1, expected, expected, 3)
    assert conv_output_size(11, 3, stride, padding) == expected


def test_valid_shrinks_full_grows_stride_downsizes():
    assert conv_output_size(28, 5, 1, "VALID") == 24
    assert conv_output_size(28, 5, 1, "FULL") == 32
    assert conv_output_size(28, 5, 1, "SAME") == 28
    assert conv_output_size(28, 3, 2, "SAME") == 14


def test_unknown_padding_names_the_choices():
    with pytest.raises(ValueError, match="unknown padding 'FUL'.*FULL"):
        explicit_padding("FUL", 3)


@pytest.mark.parametrize("padding,stride", itertools.product(["VALID", "SAME", "FULL", 1], [1, 2]))
def test_conv_im2col_equals_lax_conv(padding, stride):
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 10, 9, 3))
    kernel = jax.random.normal(kk, (3, 4, 3, 5))
    expected = lax.conv_general_dilated(
        x, kernel, (stride, stride), explicit_padding(padding, (3, 4)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST)
    got = layers.conv_im2col(x, kernel, stride, padding)
    chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pooling_never_enlarges_and_matches_definitions():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    for pool in (layers.max_pool, layers.avg_pool):
        for window, stride in [(2, None), (3, 2), (3, 1)]:
            y = pool(x, window, stride)
            assert y.shape[1] <= x.shape[1] and y.shape[2] <= x.shape[2]
    blocks = x.reshape(2, 4, 2, 4, 2, 3)
    chex.assert_trees_all_close(layers.max_pool(x, 2), blocks.max(axis=(2, 4)))
    chex.assert_trees_all_close(layers.avg_pool(x, 2), blocks.mean(axis=(2, 4)), atol=1e-6)
    assert layers.global_avg_pool(x).shape == (2, 3)
    chex.assert_trees_all_close(layers.global_avg_pool(x), x.mean(axis=(1, 2)), atol=1e-6)


def test_same_avg_pool_excludes_padding_from_the_average():
    y = layers.avg_pool(jnp.ones((1, 5, 5, 1)), 3, 1, "SAME")
    chex.assert_trees_all_close(y, jnp.ones((1, 5, 5, 1)))


def test_batch_norm_keeps_fp32_statistics_under_bf16_compute():
    x = jax.random.normal(jax.random.key(2), (8, 4, 4, 3)).astype(jnp.bfloat16) * 3 + 1
    norm = layers.batch_norm(train=True, dtype=jnp.bfloat16)
    variables = norm.init(jax.random.key(0), x)
    y, updates = norm.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    for leaf in jax.tree.leaves((variables["params"], updates["batch_stats"])):
        assert leaf.dtype == jnp.float32
    mean = updates["batch_stats"]["mean"]
    chex.assert_trees_all_close(mean, 0.1 * x.astype(jnp.float32).mean(axis=(0, 1, 2)), atol=2e-2)


def test_local_response_norm_matches_the_paper_formula():
    x = jax.random.normal(jax.random.key(3), (1, 2, 2, 7))
    y = layers.LocalResponseNorm(size=5, alpha=1e-2, beta=0.75, k=2.0).apply({}, x)
    xs = np.asarray(x)
    expected = np.empty_like(xs)
    for c in range(7):
        lo, hi = max(0, c - 2), min(7, c + 3)
        expected[..., c] = xs[..., c] / (2.0 + 1e-2 / 5 * (xs[..., lo:hi] ** 2).sum(-1)) ** 0.75
    np.testing.assert_allclose(y, expected, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(layers.ACTIVATIONS))
def test_activations_by_name(name):
    fn = layers.activation(name)
    x = jnp.linspace(-3, 3, 13)
    y = fn(x)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    if name in ("relu", "relu6"):
        assert float(y.min()) == 0.0
    if name in ("sigmoid",):
        assert bool(jnp.all((y > 0) & (y < 1)))
    if name == "tanh":
        chex.assert_trees_all_close(y, jnp.tanh(x))


def test_tanh_on_cpu_is_the_expm1_form_and_as_accurate_as_xlas(monkeypatch):
    monkeypatch.setenv("CNNJAX_CPU_REWRITES", "on")  # conftest turns the CPU forms off here
    # Across tanh's range, past its saturation, at the signed zeros and the non-finite values.
    x = np.concatenate([np.linspace(-12, 12, 20001), [0.0, -0.0, 1e-30, np.inf, -np.inf, np.nan]]
                       ).astype(np.float32)
    exact = np.tanh(x.astype(np.float64))
    ours = np.asarray(jax.jit(layers.tanh)(x))
    np.testing.assert_allclose(ours, exact, rtol=0, atol=2e-7)  # XLA's own tanh: 2.3e-7
    assert np.signbit(ours[20002]) and ours[20003] == np.float32(1e-30)  # -0.0, tiny x exact
    grad = np.asarray(jax.jit(jax.vmap(jax.grad(layers.tanh)))(x[:20001]))
    np.testing.assert_allclose(grad, 1 - exact[:20001] ** 2, atol=5e-7)
    hlo = jax.jit(layers.tanh).lower(x).as_text()
    assert "stablehlo.exponential_minus_one" in hlo and "stablehlo.tanh" not in hlo
    # Other dtypes, and other platforms, keep jnp.tanh.
    assert "stablehlo.tanh" in jax.jit(layers.tanh).lower(x.astype(jnp.bfloat16)).as_text()
    gpu = jax.export.export(jax.jit(layers.tanh), platforms=["cuda"])(x).mlir_module()
    assert "stablehlo.tanh" in gpu and "exponential_minus_one" not in gpu
    monkeypatch.setenv("CNNJAX_CPU_REWRITES", "off")  # the CPU forms' opt-out
    # A new function, so that jit's trace cache (keyed by function, not environment) traces anew.
    assert "stablehlo.tanh" in jax.jit(lambda v: layers.tanh(v)).lower(x).as_text()


@pytest.mark.parametrize("shape,dtype", [((128, 28, 28, 6), jnp.float32),  # rows of 32 x 6
                                         ((3, 7, 5, 13), jnp.float32),  # 105 rows, odd: not folded
                                         ((31, 1, 1, 1000), jnp.float32),  # too wide to fold
                                         ((4, 8, 8, 16), jnp.bfloat16), ((6, 5), jnp.float32)])
def test_channel_sum_on_cpu_folds_rows_and_matches_float64(shape, dtype, monkeypatch):
    monkeypatch.setenv("CNNJAX_CPU_REWRITES", "on")  # conftest turns the CPU forms off here
    g = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    exact = g.astype(np.float64).sum(tuple(range(g.ndim - 1)))
    ours = jax.jit(layers.channel_sum)(jnp.asarray(g, dtype))
    assert ours.dtype == dtype and ours.shape == shape[-1:]
    # fp32 accumulation, bf16 included (one rounding to bf16 at the end).
    tol = 1e-4 * np.sqrt(g.size // shape[-1]) if dtype == jnp.float32 else 2 ** -7 * np.abs(exact)
    np.testing.assert_allclose(np.asarray(ours, np.float64), exact, rtol=0, atol=np.max(tol) + 1e-6)
    # The folded form on CPU only: rows 32 x 6 = 192 floats wide for the first shape.
    hlo = jax.jit(layers.channel_sum).lower(jnp.ones((128, 28, 28, 6))).as_text()
    assert "tensor<3136x192xf32>" in hlo
    gpu = jax.export.export(jax.jit(layers.channel_sum), platforms=["cuda"])(
        jnp.ones((128, 28, 28, 6))).mlir_module()
    assert "3136x192" not in gpu


def test_conv_bias_gradient_is_a_channel_sum_and_matches_flax(monkeypatch):
    monkeypatch.setenv("CNNJAX_CPU_REWRITES", "on")
    x = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))
    ours, theirs = layers.Conv(6, (5, 5), padding="VALID"), nn.Conv(6, (5, 5), padding="VALID")
    variables = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, theirs.init(jax.random.key(0), x))  # the same parameters, names and shapes
    assert ours.use_bias  # the field is flipped only while the convolution is traced

    def grads(module):
        return jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(module.apply(v, x)))))(variables)

    chex.assert_trees_all_close(grads(ours), grads(theirs), atol=1e-4, rtol=1e-5)
    chex.assert_trees_all_close(ours.apply(variables, x), theirs.apply(variables, x), atol=1e-6)
    hlo = jax.jit(jax.grad(lambda v: jnp.sum(ours.apply(v, x)))).lower(variables).as_text()
    assert "tensor<8x192xf32>" in hlo  # 4 x 8 x 8 rows of 6 channels folded 32 at a time
    monkeypatch.setenv("CNNJAX_CPU_REWRITES", "off")  # flax's own bias add
    hlo = jax.jit(jax.grad(lambda v: jnp.sum(ours.apply(v, x) * 1.0))).lower(variables).as_text()
    assert "8x192" not in hlo


def test_unknown_activation_lists_close_matches():
    with pytest.raises(ValueError, match="Did you mean relu"):
        layers.activation("reluu")


@pytest.mark.parametrize("name,expected_std", [
    ("xavier_normal", np.sqrt(2 / (300 + 200))), ("glorot_uniform", np.sqrt(2 / (300 + 200))),
    ("he_normal", np.sqrt(2 / 300)), ("kaiming_uniform", np.sqrt(2 / 300)),
    ("lecun_normal", np.sqrt(1 / 300)), ("lecun_uniform", np.sqrt(1 / 300)),
])
def test_initialisers_have_their_variance(name, expected_std):
    w = layers.initializer(name)(jax.random.key(0), (300, 200))
    assert abs(float(jnp.std(w)) / expected_std - 1) < 0.05
    assert abs(float(jnp.mean(w))) < 0.01


def test_make_divisible_never_drops_more_than_ten_percent():
    assert layers.make_divisible(32 * 0.25) == 8
    assert layers.make_divisible(1280 * 1.0) == 1280
    assert layers.make_divisible(12) == 16  # 8 would be a 33% drop
    for value in range(1, 500):
        assert layers.make_divisible(value) % 8 == 0
        assert layers.make_divisible(value) >= 0.9 * value
