"""ResNet and DenseNet details the registry tests miss: shortcuts, v1.5 strides, concatenation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.layers import Conv, batch_norm
from cnnjax.models import densenet, resnet


def _numpy_init(key, shape, dtype=jnp.float32):
    # A trace-time constant: jax.random takes seconds to compile on a loaded 2-core CPU.
    return jnp.asarray(np.random.default_rng(sum(shape)).normal(0.0, 0.3, shape), dtype)


def _input(*shape):
    return jnp.asarray(np.random.default_rng(len(shape)).standard_normal(shape), jnp.float32)


CONV = functools.partial(Conv, use_bias=False, kernel_init=_numpy_init)
EVAL_NORM = functools.partial(batch_norm, False)  # running stats 0/1, so BN is affine at init
CIFAR_SMALL = dict(stage_sizes=(1, 1, 1), width=4)


def _shapes(model, size=32):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def _count(params):
    return sum(a.size for a in jax.tree.leaves(params))


def _paths(params):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


# --- ResNet ------------------------------------------------------------------------------------


def test_pad_shortcut_subsamples_and_appends_zero_channels():
    x = _input(2, 7, 7, 4)
    y = resnet.pad_shortcut(x, 8, strides=2)
    assert y.shape == (2, 4, 4, 8)  # same size as a 3x3/2 conv with padding 1 gives
    np.testing.assert_array_equal(y[..., :4], x[:, ::2, ::2, :])
    np.testing.assert_array_equal(y[..., 4:], 0.0)
    with pytest.raises(ValueError, match="shortcut='B'"):
        resnet.pad_shortcut(x, 2)


def test_option_a_block_adds_the_zero_padded_identity():
    # With the last BN's scale at zero the residual branch outputs 0, leaving relu(shortcut(x)).
    block = resnet.BasicBlock(8, CONV, EVAL_NORM, strides=2, shortcut="A", zero_init_residual=True)
    plain = block.clone(skip_connection=False, zero_init_residual=False)
    x = _input(1, 6, 6, 4)
    variables = jax.jit(block.init)(jax.random.key(2), x)
    assert not any("downsample" in p for p in _paths(variables["params"]))
    out, plain_out = jax.jit(lambda v, x: (block.apply(v, x), plain.apply(v, x)))(variables, x)
    np.testing.assert_allclose(out, jax.nn.relu(resnet.pad_shortcut(x, 8, 2)))
    assert not np.allclose(plain_out, out)


def test_option_a_cifar_resnet_has_no_shortcut_params():
    params = _shapes(resnet.ResNet20(**CIFAR_SMALL))
    assert not any("downsample" in p for p in _paths(params))
    # Option A is parameter-free, so the residual and plain nets share one parameter tree.
    plain = _shapes(resnet.ResNet20(skip_connections=False, **CIFAR_SMALL))
    assert jax.tree.structure(plain) == jax.tree.structure(params)
    # Option B adds a 1x1 conv + BN at the two downsampling blocks (4->8, 8->16 channels).
    option_b = _shapes(resnet.ResNet20(shortcut="B", **CIFAR_SMALL))
    assert _count(option_b) - _count(params) == (4 * 8 + 2 * 8) + (8 * 16 + 2 * 16)
    assert option_b["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 4, 8)


def test_cifar_resnet20_matches_the_paper():
    params = _shapes(resnet.ResNet20())
    assert _count(params) == 269_722  # He 2016 table 6: 0.27M
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 16)
    assert params["layer3_2"]["conv2"]["kernel"].shape == (3, 3, 64, 64)


def test_imagenet_plain_net_drops_the_projections_and_keeps_the_rest():
    small = dict(stage_sizes=(1, 1, 1, 1), width=8)
    residual = _paths(_shapes(resnet.ResNet18(**small)))
    plain = _paths(_shapes(resnet.ResNet18(skip_connections=False, **small)))
    assert [p for p in residual if "downsample" not in p] == plain
    assert any("['layer2_0']['downsample_conv']" in p for p in residual)


def test_param_names_mirror_torchvision():
    params = _shapes(resnet.ResNet50(stage_sizes=(1, 2, 1, 1), width=8))
    assert set(params) == {"stem_conv", "stem_bn", "layer1_0", "layer2_0", "layer2_1",
                           "layer3_0", "layer4_0", "fc"}
    assert set(params["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                       "downsample_conv", "downsample_bn"}
    assert params["stem_conv"]["kernel"].shape == (7, 7, 3, 8)
    assert params["fc"]["kernel"].shape == (8 * 8 * 4, 1000)


def test_bottleneck_is_v1_5_stride_on_the_3x3():
    block = resnet.BottleneckBlock(4, CONV, EVAL_NORM, strides=2)
    x = jax.ShapeDtypeStruct((1, 8, 8, 16), jnp.float32)
    variables = jax.eval_shape(block.init, jax.random.key(0), x)
    out, state = jax.eval_shape(
        functools.partial(block.apply, capture_intermediates=True, mutable=["intermediates"]),
        variables, x)
    inter = state["intermediates"]
    assert inter["conv1"]["__call__"][0].shape == (1, 8, 8, 4)  # 1x1 keeps the resolution
    assert inter["conv2"]["__call__"][0].shape == (1, 4, 4, 4)  # the 3x3 downsamples
    assert out.shape == (1, 4, 4, 16)


@pytest.mark.parametrize("block_cls,last",
                         [(resnet.BasicBlock, "bn2"), (resnet.BottleneckBlock, "bn3")])
def test_zero_init_residual_zeroes_only_the_last_bn_scale(block_cls, last):
    block = block_cls(4, CONV, EVAL_NORM, zero_init_residual=True)
    params = jax.jit(block.init)(jax.random.key(0), jnp.ones((1, 4, 4, 16)))["params"]
    np.testing.assert_array_equal(params[last]["scale"], 0.0)
    np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)
    with pytest.raises(ValueError, match="skip_connections=True"):
        _shapes(resnet.ResNet20(zero_init_residual=True, skip_connections=False, **CIFAR_SMALL))


@pytest.mark.parametrize("model,match", [
    (resnet.ResNet20(shortcut="C"), "unknown shortcut 'C'"),
    (resnet.ResNet18(stage_sizes=()), "stage_sizes"),
    (densenet.DenseNetBC100(stem="tiny"), "unknown DenseNet stem 'tiny'"),
    (densenet.DenseNet121(compression=0.0), "compression"),
])
def test_bad_configuration_is_a_clear_value_error(model, match):
    with pytest.raises(ValueError, match=match):
        _shapes(model)


def test_rank_3_input_is_a_clear_value_error():
    x = jax.ShapeDtypeStruct((32, 32, 3), jnp.float32)
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(resnet.ResNet20().init, jax.random.key(0), x)


def test_bfloat16_computes_in_bf16_and_keeps_fp32_params():
    model = resnet.ResNet20(dtype=jnp.bfloat16, **CIFAR_SMALL)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.eval_shape(model.apply, variables, x).dtype == jnp.bfloat16
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


# --- DenseNet ----------------------------------------------------------------------------------


def test_dense_layer_concatenates_rather_than_adds():
    layer = densenet.DenseLayer(growth_rate=3, bn_size=2, conv=CONV, norm=EVAL_NORM)
    x = _input(1, 5, 5, 6)
    variables = jax.jit(layer.init)(jax.random.key(1), x)
    y = jax.jit(layer.apply)(variables, x)
    assert y.shape == (1, 5, 5, 9)
    np.testing.assert_array_equal(y[..., :6], x)  # earlier features pass through untouched
    assert variables["params"]["conv1"]["kernel"].shape == (1, 1, 6, 6)  # bn_size * k
    assert variables["params"]["conv2"]["kernel"].shape == (3, 3, 6, 3)


def test_dense_layer_dropout_hits_new_features_in_train_only():
    layer = densenet.DenseLayer(growth_rate=64, bn_size=1, conv=CONV, norm=EVAL_NORM, drop_rate=0.5)
    x = _input(1, 4, 4, 4)
    variables = jax.jit(layer.init)(jax.random.key(1), x)

    @jax.jit
    def outputs(variables, x):
        train = layer.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
        return train, layer.apply(variables, x), layer.apply(variables, x)

    train, eval_a, eval_b = outputs(variables, x)
    np.testing.assert_array_equal(eval_a, eval_b)
    np.testing.assert_array_equal(train[..., :4], x)  # only the new features are dropped
    kept = train[..., 4:] != 0
    assert 0.3 < float(kept.mean()) < 0.7
    np.testing.assert_allclose(train[..., 4:][kept], 2.0 * eval_a[..., 4:][kept], rtol=1e-5)


def test_transition_compresses_channels_and_halves_resolution():
    transition = densenet.Transition(features=3, conv=CONV, norm=EVAL_NORM)
    x = jax.ShapeDtypeStruct((1, 9, 9, 7), jnp.float32)
    variables = jax.eval_shape(transition.init, jax.random.key(0), x)
    assert jax.eval_shape(transition.apply, variables, x).shape == (1, 4, 4, 3)


def test_densenet_bc100_channel_bookkeeping():
    params = _shapes(densenet.DenseNetBC100())
    assert _count(params) == 769_162  # Huang 2017 table 2: 0.8M
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 24)  # 2k channels, no BN, no pool
    assert "stem_bn" not in params
    # 24 + 16*12 = 216 -> 108; 108 + 192 = 300 -> 150; 150 + 192 = 342.
    assert params["transition1"]["conv"]["kernel"].shape == (1, 1, 216, 108)
    assert params["transition2"]["conv"]["kernel"].shape == (1, 1, 300, 150)
    assert params["final_bn"]["scale"].shape == (342,)
    assert sum(k.startswith("block") for k in params) == 48


def test_densenet121_layout_mirrors_torchvision():
    params = _shapes(densenet.DenseNet121())
    assert params["stem_conv"]["kernel"].shape == (7, 7, 3, 64)
    assert set(params["block1_layer1"]) == {"bn1", "conv1", "bn2", "conv2"}
    assert set(params["transition1"]) == {"bn", "conv"}
    assert params["final_bn"]["scale"].shape == (1024,)
    assert {k for k in params if k.startswith("transition")} == {
        "transition1", "transition2", "transition3"}


def test_num_init_features_defaults_to_twice_the_growth_rate():
    params = _shapes(densenet.DenseNet121(block_config=(1, 1), growth_rate=5))
    assert params["stem_conv"]["kernel"].shape == (7, 7, 3, 10)
