"""The CPU forms of `layers.Conv` (pointwise, whole-input, input taps, narrow input, depthwise,
cropped kernel) and the stored input of its backward pass: same values and gradients as XLA's
convolution, used on CPU only, with the parameters of `nn.Conv`, and an opt-out."""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import export, lax

from cnnjax import batchnorm, cpu_conv, cpu_kernels, layers, onednn

# (input shape, kernel shape, strides, padding, the form cnnjax picks on CPU)
CASES = [
    ((2, 8, 8, 5), (1, 1, 5, 7), (1, 1), "VALID", "pointwise"),
    ((2, 7, 7, 5), (1, 1, 5, 7), (2, 2), "SAME", "pointwise"),  # odd map: SAME pads nothing for 1x1
    ((2, 5, 5, 4), (5, 5, 4, 6), (1, 1), "VALID", "whole"),  # LeNet-5's C5
    ((2, 12, 12, 1), (5, 5, 1, 6), (1, 1), "VALID", "taps"),  # LeNet-5's C1
    ((2, 9, 8, 3), (3, 3, 3, 6), (2, 2), "SAME", "taps"),  # a strided RGB stem
    ((2, 9, 8, 2), (3, 3, 2, 6), (1, 2), [(1, 2), (0, 1)], "taps"),
    ((2, 6, 6, 4), (3, 3, 4, 6), (1, 1), "SAME", "narrow"),
    ((2, 14, 14, 6), (5, 5, 6, 16), (1, 1), "VALID", "narrow"),  # LeNet-5's C3
    ((2, 7, 6, 5), (3, 2, 5, 4), (1, 1), [(2, 1), (0, 1)], "narrow"),
    ((2, 9, 9, 3), (7, 7, 3, 4), (1, 1), "VALID", "narrow"),  # 147 terms: too many for taps
    ((2, 6, 6, 8), (3, 3, 8, 6), (1, 1), "SAME", None),  # 8 input channels: XLA's kernel
    ((2, 7, 7, 4), (3, 3, 4, 6), (2, 2), "SAME", None),  # strided: XLA's kernel
]


def _ours(strides, padding):
    return lambda x, w: cpu_conv.conv_general_dilated(x, w, strides, padding,
                                                      dimension_numbers=cpu_conv._NHWC)


def _xla(strides, padding):
    return lambda x, w: lax.conv_general_dilated(x, w, strides, padding,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                 precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("x_shape,w_shape,strides,padding,form", CASES)
def test_cpu_form_matches_the_convolution_and_its_gradients(x_shape, w_shape, strides, padding, form):
    assert cpu_conv.cpu_conv_form(x_shape, w_shape, padding, window_strides=strides) == form
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    ours, xla = _ours(strides, padding), _xla(strides, padding)

    def loss(conv):  # a nonlinear loss, so the cotangent differs at every position
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))

    chex.assert_trees_all_close(jax.jit(ours)(x, w), xla(x, w), atol=1e-4, rtol=1e-5)
    chex.assert_trees_all_close(jax.jit(jax.grad(loss(ours), (0, 1)))(x, w),
                                jax.grad(loss(xla), (0, 1))(x, w), atol=1e-3, rtol=1e-4)


def _hlo(x_shape, w_shape, gradient):
    """The compiled CPU program of the forward pass (gradient None), or of the gradient with respect
    to the input (0) or the weight (1) for an output gradient given as an argument."""
    ours = _ours((1, 1), "VALID")
    x, w = jnp.ones(x_shape), jnp.ones(w_shape)
    if gradient is None:
        return jax.jit(ours).lower(x, w).compile().as_text()
    g = jax.eval_shape(ours, x, w)
    return jax.jit(lambda x, w, g: jax.vjp(ours, x, w)[1](g)[gradient]).lower(x, w, g).compile().as_text()


# XLA:CPU itself runs a 1x1 convolution's forward pass as a dot, but not its weight gradient; the
# taps form replaces the forward pass only (its gradients are the convolution's); the narrow form
# replaces the input gradient only.
@pytest.mark.parametrize("x_shape,w_shape,gradient", [((2, 8, 8, 5), (1, 1, 5, 7), 1),
                                                      ((2, 5, 5, 4), (5, 5, 4, 6), None),
                                                      ((2, 12, 12, 1), (5, 5, 1, 6), None),
                                                      ((2, 14, 14, 6), (5, 5, 6, 16), 0)])
def test_cpu_forms_compile_without_a_convolution_and_opt_out_restores_it(monkeypatch, x_shape, w_shape,
                                                                          gradient):
    monkeypatch.delenv("CNNJAX_CPU_REWRITES", raising=False)
    assert " convolution(" not in _hlo(x_shape, w_shape, gradient)
    monkeypatch.setenv("CNNJAX_CPU_REWRITES", "off")
    assert " convolution(" in _hlo(x_shape, w_shape, gradient)


# (input shape, kernel shape, strides, padding, the live taps per axis and their padding)
CROP_CASES = [
    ((2, 1, 1, 8), (3, 3, 8, 6), (1, 1), "SAME", ([(1, 2), (1, 2)], [(0, 0), (0, 0)])),  # -> pointwise
    ((2, 1, 1, 8), (3, 3, 8, 6), (2, 2), [(1, 1), (1, 1)], ([(1, 2), (1, 2)], [(0, 0), (0, 0)])),
    ((2, 2, 2, 8), (3, 3, 8, 6), (2, 2), "SAME", ([(0, 2), (0, 2)], [(0, 0), (0, 0)])),  # -> whole
    ((2, 2, 3, 8), (3, 3, 8, 6), (2, 2), [(1, 1), (1, 1)], ([(1, 3), (0, 3)], [(0, 0), (1, 1)])),
    ((2, 2, 2, 8), (5, 5, 8, 6), (1, 1), "SAME", ([(1, 4), (1, 4)], [(1, 1), (1, 1)])),
    ((2, 1, 2, 8), (5, 3, 8, 6), (1, 1), [(2, 2), (1, 1)], ([(2, 3), (0, 3)], [(0, 0), (1, 1)])),
    ((2, 3, 3, 8), (7, 7, 8, 6), (1, 1), "SAME", ([(1, 6), (1, 6)], [(2, 2), (2, 2)])),
    ((2, 2, 2, 8), (3, 3, 8, 6), (1, 1), "SAME", None),  # every tap meets the input somewhere
]


def test_live_taps():
    # Deep layers of ImageNet nets on CIFAR-size input (ResNet-18's layer4 at 1x1, GoogLeNet's 5x5s)
    # pad more than their kernel can reach: the taps that only ever meet padding are cropped away.
    for x_shape, w_shape, strides, padding, live in CROP_CASES:
        assert cpu_conv.live_taps(x_shape, w_shape, strides, padding) == live, (x_shape, w_shape)


# Compiled: to one tap, to a whole-input kernel, one axis only, 5x5 to 3x3, nothing to crop.
@pytest.mark.parametrize("x_shape,w_shape,strides,padding,live",
                         [CROP_CASES[i] for i in (0, 2, 3, 4, 7)])
def test_cropped_kernel_matches_the_convolution_and_its_gradients(x_shape, w_shape, strides, padding,
                                                                  live):
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    ours, xla = _ours(strides, padding), _xla(strides, padding)
    chex.assert_trees_all_close(jax.jit(ours)(x, w), xla(x, w), atol=1e-4, rtol=1e-5)
    loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w)))  # noqa: E731
    grads = jax.jit(jax.grad(loss(ours), (0, 1)))(x, w)
    chex.assert_trees_all_close(grads, jax.grad(loss(xla), (0, 1))(x, w), atol=1e-3, rtol=1e-4)
    if live is not None:  # the dead taps get an exact zero gradient
        (rows, cols), _ = live
        dead = jnp.ones(w_shape, bool).at[rows[0]:rows[1], cols[0]:cols[1]].set(False)
        assert jnp.all(jnp.where(dead, grads[1], 0) == 0)


def test_a_kernel_cropped_to_one_tap_compiles_to_products():
    x, w = jnp.ones((2, 1, 1, 8)), jnp.ones((3, 3, 8, 6))
    ours = _ours((1, 1), "SAME")
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) ** 2), (0, 1)))
    assert " convolution(" not in grad.lower(x, w).compile().as_text()


DEPTHWISE_CASES = [
    ((2, 9, 9, 6), (3, 3, 1, 6), (1, 1), "SAME"),  # MobileNet's stride-1 layers
    ((2, 10, 9, 5), (3, 3, 1, 5), (2, 2), [(1, 1), (1, 1)]),  # stride 2, odd width
    ((2, 11, 11, 4), (5, 5, 1, 4), (2, 2), "SAME"),  # EfficientNet's 5x5
    ((2, 8, 8, 4), (3, 3, 1, 4), (1, 2), [(0, 1), (2, 0)]),
    ((2, 1, 1, 4), (3, 3, 1, 4), (2, 2), "SAME"),  # a 1x1 map: cropped to the centre tap first
]


def _depthwise(strides, padding, ours=True):
    conv = cpu_conv.conv_general_dilated if ours else lax.conv_general_dilated
    return lambda x, w: conv(x, w, strides, padding, dimension_numbers=cpu_conv._NHWC,
                             feature_group_count=x.shape[-1])


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", DEPTHWISE_CASES)
def test_depthwise_form_matches_the_grouped_convolution_and_its_gradients(x_shape, w_shape, strides,
                                                                          padding):
    assert cpu_conv.cpu_conv_form(x_shape, w_shape, padding, feature_group_count=x_shape[-1],
                                window_strides=strides) == "depthwise"
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    ours, xla = _depthwise(strides, padding), _depthwise(strides, padding, ours=False)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))

    chex.assert_trees_all_close(jax.jit(ours)(x, w), xla(x, w), atol=1e-5, rtol=1e-5)
    expected = jax.grad(loss(xla), (0, 1))(x, w)
    chex.assert_trees_all_close(jax.jit(jax.grad(loss(ours), (0, 1)))(x, w), expected,
                                atol=1e-4, rtol=1e-4)
    # The accelerator variant: the weight gradient summed over the whole batch at once.
    batch_wide = functools.partial(cpu_conv.depthwise_conv, strides=strides, padding=padding,
                                   image_by_image=False)
    chex.assert_trees_all_close(jax.jit(jax.grad(loss(batch_wide), (0, 1)))(x, w), expected,
                                atol=1e-4, rtol=1e-4)
    # bf16 inputs: the taps add up in fp32 and the result comes back in bf16.
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    out = jax.jit(ours)(xb, wb)
    assert out.dtype == jnp.bfloat16
    expected_bf16 = xla(xb.astype(jnp.float32), wb.astype(jnp.float32))
    chex.assert_trees_all_close(out.astype(jnp.float32), expected_bf16, atol=3e-2, rtol=3e-2)


def test_depthwise_form_compiles_without_a_convolution_and_other_groupings_keep_it(monkeypatch):
    monkeypatch.delenv("CNNJAX_CPU_REWRITES", raising=False)
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 1, 4))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(_depthwise((1, 1), "SAME")(x, w) ** 2), (0, 1)))
    assert " convolution(" not in grad.lower(x, w).compile().as_text()
    # A channel multiplier (8 outputs from 4 inputs) or AlexNet's two groups: XLA's kernel.
    for w_shape, groups in (((3, 3, 1, 8), 4), ((3, 3, 2, 6), 2)):
        assert cpu_conv.cpu_conv_form((2, 8, 8, 4), w_shape, "SAME", feature_group_count=groups) is None


def _fused_computations_with(hlo_text, *ops):
    computations = re.split(r"\n(?=%?\S+ \(|ENTRY)", hlo_text)
    return [c.split(" ", 1)[0] for c in computations if all(f" {op}(" in c for op in ops)]


def test_cpu_backward_reads_the_stored_input_instead_of_recomputing_it(monkeypatch):
    # 8 input channels with oneDNN's and the native kernels off: XLA's own kernel, whose weight
    # gradient copies the input to CHWN.
    monkeypatch.setenv(onednn.ENV, "off")
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    x, w, g = jnp.ones((4, 8, 8, 8)), jnp.ones((3, 3, 8, 8)), jnp.ones((4, 8, 8, 8))
    ours = _ours((1, 1), "SAME")

    def f(x, w):  # the input is a ReLU's output, as in every ResNet block
        return ours(jnp.maximum(x * 2.0 - 1.0, 0.0), w)

    def gradient_hlo():
        return jax.jit(lambda x, w, g: jax.vjp(f, x, w)[1](g)).lower(x, w, g).compile().as_text()

    monkeypatch.delenv("CNNJAX_CPU_REWRITES", raising=False)
    hlo = gradient_hlo()
    assert " conditional(" in hlo and not _fused_computations_with(hlo, "transpose", "maximum")
    # The forward pass alone (evaluation) stores nothing.
    assert " conditional(" not in jax.jit(f).lower(x, w).compile().as_text()
    # The onednn form's three passes are custom calls that read the input in place: no store,
    # unless its weight gradient is XLA's.
    if onednn.available():
        monkeypatch.setenv(onednn.ENV, "on")
        assert " conditional(" in gradient_hlo()
        if cpu_kernels.available():
            monkeypatch.setenv(cpu_kernels.ENV, "on")
            assert " conditional(" not in gradient_hlo()
        monkeypatch.setenv(onednn.ENV, "off")
        monkeypatch.setenv(cpu_kernels.ENV, "off")
    # Without it, XLA recomputes the ReLU inside the weight gradient's transposing copy.
    monkeypatch.setenv("CNNJAX_CPU_REWRITES", "off")
    hlo = gradient_hlo()
    assert " conditional(" not in hlo and _fused_computations_with(hlo, "transpose", "maximum")


def test_taps_form_stores_its_sum_apart_from_the_activation(monkeypatch):
    # LeNet-5's C1 and its tanh: fused into one loop they ran 4.7x slower than stored apart
    # (cpu_conv._tap_sum). The tanh's loop must not hold the sum's products.
    x, w = jnp.ones((2, 12, 12, 1)), jnp.ones((5, 5, 1, 6))
    ours = _ours((1, 1), "VALID")
    monkeypatch.delenv("CNNJAX_CPU_REWRITES", raising=False)
    assert cpu_conv.cpu_conv_form(x.shape, w.shape, "VALID") == "taps"
    hlo = jax.jit(lambda x, w: jnp.tanh(ours(x, w))).lower(x, w).compile().as_text()
    assert " conditional(" in hlo and _fused_computations_with(hlo, "tanh")
    assert not _fused_computations_with(hlo, "tanh", "multiply")


def test_stored_input_keeps_a_nan_kernel_nan():
    # 12 channels to 2 filters: a layer that stores its input (XLA's weight gradient: too many
    # channels for the native kernel's expanded rows, too few filters for its blocks).
    x, w = jnp.ones((1, 4, 4, 12)), jnp.ones((3, 3, 12, 2)).at[0, 0, 0, 0].set(jnp.nan)
    out, vjp = jax.vjp(_ours((1, 1), "SAME"), x, w)
    x_grad, w_grad = vjp(jnp.ones_like(out))
    assert jnp.isnan(out).any() and jnp.isnan(x_grad).any() and jnp.isnan(w_grad).any()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerators_keep_the_convolution(platform):
    x, w = jnp.ones((2, 8, 8, 5)), jnp.ones((1, 1, 5, 7))
    fn = jax.jit(_ours((1, 1), "VALID"))
    assert "dot_general" in export.export(fn, platforms=["cpu"])(x, w).mlir_module()
    module = export.export(fn, platforms=[platform])(x, w).mlir_module()
    assert "stablehlo.convolution" in module and "dot_general" not in module


def test_conv_keeps_nn_conv_parameters_and_output():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    for kernel in ((1, 1), (3, 3), (6, 6)):
        ours, theirs = layers.Conv(4, kernel, padding="VALID"), nn.Conv(4, kernel, padding="VALID")
        variables = theirs.init(jax.random.key(1), x)
        chex.assert_trees_all_equal_shapes(ours.init(jax.random.key(1), x), variables)
        chex.assert_trees_all_close(ours.apply(variables, x), theirs.apply(variables, x),
                                    atol=1e-5, rtol=1e-5)


# (model, its keyword arguments, tolerance: a leaf's largest error over its largest entry).
# resnet20 with ReLU is compared to 5e-2: with its float32 rounding changed, a pre-activation within
# rounding of 0 changes sides (one at 2.5e-9 in layer2_1's bn1 with key 1, against float64's
# value), and that pixel's gradient passes or not: 1.7% to 2.5% of a leaf's largest entry on the
# three inputs tried, while float64's gradient matched one of the two float32 results. With SiLU,
# smooth through 0, the same net is compared to 1e-3.
WHOLE_MODELS = [("lenet5", {}, 1e-3), ("resnet20", {"act": "silu"}, 1e-3),
                ("resnet20", {}, 5e-2), ("mobilenet_v2", "small", 1e-3)]


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,tolerance", WHOLE_MODELS)
def test_whole_models_train_the_same_with_and_without_the_cpu_forms(monkeypatch, name, kwargs,
                                                                    tolerance):
    # Every form in place: lenet5 (taps, narrow, whole), resnet20 (the gather kernel, stored inputs
    # under batch norm and shortcuts, batch norm's form, with ReLU its norm + residual + ReLU op),
    # mobilenet_v2's small variant (depthwise, pointwise, stride 2).
    from cnnjax import models

    spec, size = models.get_spec(name), 32
    model = models.create_model(name, num_classes=5, **(spec.small if kwargs == "small" else kwargs))
    # Batch 16: at initialisation with batch 4, resnet20's gradients move by several percent under
    # 1e-6 relative noise on one activation (batch norm over 4 images is ill-conditioned), so two
    # correct forms that round differently (the native batch norm sums in double) disagreed.
    x = jax.random.normal(jax.random.key(1), (16, size, size, spec.in_channels))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def loss(params):
        logits, updates = model.apply({"params": params, **rest}, x, train=True,
                                      mutable=list(rest), rngs={"dropout": jax.random.key(2)})
        return jnp.sum(jnp.sin(logits)), (logits, updates)

    results = {}
    for setting in ("on", "off"):
        monkeypatch.setenv("CNNJAX_CPU_REWRITES", setting)
        # Batch norm's form as small models' steps trace it; mobilenet_v2 (3.5M parameters) trains
        # with YNNPACK's fusions and flax's batch norm.
        with batchnorm.blocked_sums(name != "mobilenet_v2"):
            results[setting] = jax.jit(jax.grad(loss, has_aux=True))(params)
    # Each leaf to within `tolerance` of its own largest entry (or 1e-5 for leaves that are zero up
    # to rounding, such as a bias followed by batch norm): a kernel gradient sums many products, and
    # batch norm scales their float rounding. A wrong shift, stride or gradient is off by O(1).
    def error(a, b):
        return float(jnp.max(jnp.abs(a - b)) / (tolerance * jnp.max(jnp.abs(b)) + 1e-5))

    errors = jax.tree.map(error, results["on"], results["off"])
    assert max(jax.tree.leaves(errors)) < 1, errors
