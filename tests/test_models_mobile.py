"""MobileNet v1/v2 and EfficientNet: what the generic registry test cannot see.

Scaling rules, the derived B1-B7 tables, block wiring (depthwise groups, SE width, linear
bottleneck, when the shortcut exists), per-example stochastic depth and torchvision's padding.
Whole networks are only traced (`jax.eval_shape`); real passes run single blocks on tiny inputs.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.layers import Conv, batch_norm
from cnnjax.models import efficientnet, mobilenet
from cnnjax.models.efficientnet import EfficientNet, MBConv, round_filters, round_repeats


def _variables(model, size=32):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def _count(params):
    return sum(leaf.size for leaf in jax.tree.leaves(params))


def _record_modules(model, size=32, train=False):
    """Every module whose __call__ runs in one traced forward pass, in call order."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            seen.append(context.module)
        return next_fun(*args, **kwargs)

    variables = _variables(model, size)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=train, rngs={"dropout": jax.random.key(0)},
                                                mutable=["batch_stats"]), variables, x)
    return seen


# --- EfficientNet scaling ------------------------------------------------------------------------


def test_round_filters_and_repeats():
    assert [round_filters(c, 1.1) for c in (32, 16, 24, 40, 80, 112, 192, 320, 1280)] == [
        32, 16, 24, 48, 88, 120, 208, 352, 1408]
    assert round_filters(32, 0.25) == 8  # never below the divisor
    assert [round_repeats(r, 3.1) for r in (1, 2, 2, 3, 3, 4, 1)] == [4, 7, 7, 10, 10, 13, 4]
    assert [round_repeats(r, 0.25) for r in (1, 2, 2, 3, 3, 4, 1)] == [1] * 7


def test_b7_table_is_derived_from_b0():
    stages = efficientnet.scaled_stages(*efficientnet.SCALING["b7"][:2])
    assert [s.out_channels for s in stages] == [32, 48, 80, 160, 224, 384, 640]
    assert [s.in_channels for s in stages] == [64, 32, 48, 80, 160, 224, 384]
    assert sum(s.repeats for s in stages) == 55
    # kernels, strides and expansions are B0's: only widths and depths scale.
    base = efficientnet.B0_STAGES
    assert [(s.kernel_size, s.stride, s.expand_ratio) for s in stages] == [
        (s.kernel_size, s.stride, s.expand_ratio) for s in base]


def test_stage_table_read_back_from_json_lists():
    # A run's config.json stores the stage table as lists; the model must read it as StageConfigs.
    rows = [list(s) for s in efficientnet.B0_STAGES]
    assert efficientnet.scaled_stages(1.1, 1.2, rows) == efficientnet.scaled_stages(1.1, 1.2)


def test_compound_coefficients():
    np.testing.assert_allclose(efficientnet.compound_coefficients(0), (1.0, 1.0, 1.0))
    depth, width, resolution = efficientnet.compound_coefficients(1)
    np.testing.assert_allclose((depth, width, resolution), (1.2, 1.1, 1.15))
    np.testing.assert_allclose(efficientnet.compound_coefficients(2)[0], 1.44)
    # The paper's constraint: FLOPs ~ d * w^2 * r^2 ~= 2 per unit of phi.
    assert abs(depth * width**2 * resolution**2 - 2) < 0.1
    with pytest.raises(ValueError, match="must be >= 1"):
        efficientnet.compound_coefficients(1, alpha=0.5)


def test_from_variant_table_and_overrides():
    b3 = EfficientNet.from_variant("b3", num_classes=10)
    assert (b3.width_coefficient, b3.depth_coefficient, b3.dropout_rate) == (1.2, 1.4, 0.3)
    assert (b3.bn_momentum, b3.bn_epsilon) == (0.9, 1e-5)
    b6 = EfficientNet.from_variant("b6", width_coefficient=0.25, num_classes=10)
    assert (b6.width_coefficient, b6.depth_coefficient) == (0.25, 2.6)
    assert (b6.bn_momentum, b6.bn_epsilon) == (0.99, 1e-3)  # torchvision's TF port for B5-B7
    with pytest.raises(ValueError, match="unknown EfficientNet variant 'b8'"):
        EfficientNet.from_variant("b8")


def test_bad_coefficients_and_images_raise():
    x = jnp.zeros((32, 32, 3))
    with pytest.raises(ValueError, match="NHWC"):
        EfficientNet(num_classes=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="must be > 0"):
        _variables(EfficientNet(num_classes=2, depth_coefficient=0.0))
    with pytest.raises(ValueError, match="width_multiplier must be > 0"):
        _variables(mobilenet.MobileNetV2(num_classes=2, width_multiplier=0.0))
    with pytest.raises(ValueError, match="NHWC"):
        mobilenet.MobileNetV1(num_classes=2).init(jax.random.key(0), x)


# --- EfficientNet blocks -------------------------------------------------------------------------


def test_mbconv_wiring_in_b0():
    params = _variables(EfficientNet(num_classes=1000))["params"]
    first, second = params["stage1_0"], params["stage2_0"]
    assert "expand_conv" not in first  # expansion 1: no 1x1 expand
    assert first["dw_conv"]["kernel"].shape == (3, 3, 1, 32)  # depthwise: one input channel each
    assert first["se"]["fc1"]["kernel"].shape == (1, 1, 32, 8)
    # SE squeezes to a quarter of the block INPUT (16), not of the expanded width (96).
    assert second["expand_conv"]["kernel"].shape == (1, 1, 16, 96)
    assert second["se"]["fc1"]["kernel"].shape == (1, 1, 96, 4)
    assert second["se"]["fc2"]["bias"].shape == (96,)
    assert params["stage3_0"]["dw_conv"]["kernel"].shape == (5, 5, 1, 144)
    assert params["head_conv"]["kernel"].shape == (1, 1, 320, 1280)
    assert _count(params["classifier"]) == 1280 * 1000 + 1000
    assert len([k for k in params if k.startswith("stage")]) == 16


def test_stochastic_depth_rates_grow_linearly():
    model = EfficientNet(num_classes=3, stochastic_depth_rate=0.4)  # B0's 16 blocks
    rates = [m.rate for m in _record_modules(model, train=True)
             if isinstance(m, nn.Dropout) and m.name == "stochastic_depth"]
    # Only shape-keeping blocks have a residual; block b of 16 gets 0.4 * b / 16.
    residual_blocks = [2, 4, 6, 7, 9, 10, 12, 13, 14]
    np.testing.assert_allclose(rates, [0.4 * b / 16 for b in residual_blocks])


def _mbconv(rate):
    conv = functools.partial(Conv, use_bias=False)
    norm = functools.partial(batch_norm, False)  # running statistics: the branch is deterministic
    return MBConv(8, 2, 3, conv=conv, norm=norm, act=nn.silu, stochastic_depth_rate=rate)


def test_stochastic_depth_drops_whole_branch_per_example():
    x = jax.random.normal(jax.random.key(0), (16, 4, 4, 8))

    @jax.jit  # one compile for init and the three passes: eager flax compiles op by op
    def passes(x):
        variables = _mbconv(0.0).init(jax.random.key(1), x)
        branch = _mbconv(0.0).apply(variables, x, False) - x
        dropped = _mbconv(0.5).apply(variables, x, True, rngs={"dropout": jax.random.key(3)}) - x
        evaluated = _mbconv(0.5).apply(variables, x, False) - x
        return branch, dropped, evaluated

    branch, out, evaluated = (np.asarray(a) for a in passes(x))
    kept = np.any(out != 0, axis=(1, 2, 3))
    assert 0 < kept.sum() < len(kept), "some examples should keep the branch, some drop it"
    # A kept branch is scaled by 1 / (1 - rate), a dropped one is exactly zero: no partial masks.
    np.testing.assert_allclose(out[kept], branch[kept] * 2.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[~kept], 0.0)
    # Evaluation ignores the rate and needs no rng.
    np.testing.assert_array_equal(evaluated, branch)


def test_convs_pad_symmetrically_like_torchvision():
    # SAME would pad (0, 1) at stride 2 on even inputs; torchvision pads k // 2 on both sides, which
    # the imported weights need to reproduce torchvision's outputs.
    for model in (EfficientNet(num_classes=3, width_coefficient=0.25, depth_coefficient=0.25),
                  mobilenet.MobileNetV2(num_classes=3, width_multiplier=0.25),
                  mobilenet.MobileNetV1(num_classes=3, width_multiplier=0.25)):
        convs = [m for m in _record_modules(model) if isinstance(m, nn.Conv)]
        assert convs
        for conv in convs:
            k = conv.kernel_size[0]
            assert k == 1 or conv.padding == k // 2, (conv.name, conv.padding)


# --- MobileNet -----------------------------------------------------------------------------------


def test_mobilenet_v1_width_multiplier_matches_paper():
    # Howard 2017 Table 6: 4.2M, 2.6M, 1.3M, 0.5M parameters for alpha 1, 0.75, 0.5, 0.25.
    counts = [_count(_variables(mobilenet.MobileNetV1(width_multiplier=a))["params"])
              for a in (1.0, 0.75, 0.5, 0.25)]
    assert counts == [4_231_976, 2_585_560, 1_331_592, 470_072]
    assert mobilenet.mobilenet_v1_channels(32, 0.1) == 8


def test_mobilenet_v1_is_resolution_agnostic():
    sizes = [mobilenet.mobilenet_v1_input_size(r) for r in (1, 6 / 7, 5 / 7, 4 / 7)]
    assert sizes == [224, 192, 160, 128]
    model = mobilenet.MobileNetV1(num_classes=7, width_multiplier=0.25)
    v128, v224 = _variables(model, 128), _variables(model, 224)
    assert jax.tree.map(lambda a: a.shape, v128) == jax.tree.map(lambda a: a.shape, v224)
    with pytest.raises(ValueError, match="resolution_multiplier"):
        mobilenet.mobilenet_v1_input_size(0)


def test_depthwise_separable_block_is_depthwise():
    conv = functools.partial(Conv, use_bias=False)
    norm = functools.partial(batch_norm, False)
    block = mobilenet.DepthwiseSeparableConv(6, conv=conv, norm=norm, act=nn.relu, strides=2)
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 4))

    @jax.jit
    def run(x):
        variables = block.init(jax.random.key(1), x)

        def depthwise(x):
            _, state = block.apply(variables, x, capture_intermediates=True)
            return state["intermediates"]["dw_conv"]["__call__"][0]

        moved = depthwise(x.at[..., 0].add(1.0)) - depthwise(x)
        return variables["params"], moved, block.apply(variables, x)

    params, moved, out = run(x)
    moved = np.asarray(moved)
    assert params["dw_conv"]["kernel"].shape == (3, 3, 1, 4)
    assert params["pw_conv"]["kernel"].shape == (1, 1, 4, 6)
    # Changing input channel 0 must leave the depthwise outputs of channels 1..3 untouched.
    assert np.any(moved[..., 0] != 0) and not np.any(moved[..., 1:] != 0)
    assert out.shape == (1, 3, 3, 6)


def test_mobilenet_v2_layout():
    params = _variables(mobilenet.MobileNetV2(num_classes=1000))["params"]
    assert "expand_conv" not in params["block1"]
    assert params["block2"]["expand_conv"]["kernel"].shape == (1, 1, 16, 96)
    assert len([k for k in params if k.startswith("block")]) == 17
    # The head never narrows below 1280, and widens with alpha > 1.
    for alpha, head in ((0.5, 1280), (1.4, 1792)):
        p = _variables(mobilenet.MobileNetV2(num_classes=3, width_multiplier=alpha))["params"]
        assert p["head_conv"]["kernel"].shape[-1] == head


def test_inverted_residual_shortcut_only_when_shape_kept():
    conv = functools.partial(Conv, use_bias=False)
    norm = functools.partial(batch_norm, False)
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 8))
    cases = ((8, 1, True), (16, 1, False), (8, 2, False))

    @jax.jit  # one compile for all three blocks
    def run(x):
        outs = []
        for features, stride, _ in cases:
            block = mobilenet.InvertedResidual(features, 6, conv=conv, norm=norm, act=nn.relu6,
                                               strides=stride)
            variables = block.init(jax.random.key(1), x)
            # Zeroing the projection BN's scale and bias silences the branch, leaving the shortcut.
            silenced = jax.tree_util.tree_map_with_path(
                lambda path, p: jnp.zeros_like(p) if "project_bn" in jax.tree_util.keystr(path) else p,
                variables)
            outs.append(block.apply(silenced, x))
        return outs

    for (_, _, residual), out in zip(cases, run(x), strict=True):
        np.testing.assert_array_equal(out, x if residual else np.zeros(out.shape))


def test_bf16_compute_keeps_fp32_params():
    for model in (EfficientNet(num_classes=3, width_coefficient=0.25, depth_coefficient=0.25,
                               dtype=jnp.bfloat16),
                  mobilenet.MobileNetV2(num_classes=3, width_multiplier=0.25, dtype=jnp.bfloat16)):
        variables = _variables(model)
        x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
        logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
        assert logits.dtype == jnp.bfloat16
        assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
