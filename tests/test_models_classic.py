"""Classic CNNs (LeNet-5, AlexNet, VGG, GoogLeNet): variants, aux heads and pools, per family."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import layers
from cnnjax.models import alexnet, googlenet, lenet, vgg


def _variables(model: nn.Module, size: int, channels: int = 3, train: bool = False) -> dict:
    """Variable shapes only: tracing, no initialiser runs (RNG kernels compile slowly on CPU)."""
    init = functools.partial(model.init, train=train)
    return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, size, size, channels)))


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _module_outputs(model: nn.Module, size: int) -> dict:
    """Output shape of every submodule at `size` pixels (eval mode), again by tracing only."""
    x = jnp.zeros((1, size, size, 3))
    variables = _variables(model, size)
    def apply(v):
        return model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])

    _, state = jax.eval_shape(apply, variables)
    return state["intermediates"]


def _random_like(shapes, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), s.dtype), shapes)


# --- pooling helpers appended to cnnjax/layers.py ----------------------------------------------


@pytest.mark.parametrize("size,out", [(5, 3), (1, 7), (6, 4), (13, 6), (2, 7)])
def test_adaptive_avg_pool_uses_torch_bins(size, out):
    x = np.random.default_rng(0).normal(size=(2, size, size + 1, 3)).astype(np.float32)
    expected = np.zeros((2, out, out, 3), np.float32)
    for i in range(out):
        for j in range(out):
            r0, r1 = (i * size) // out, -(-(i + 1) * size // out)
            c0, c1 = (j * (size + 1)) // out, -(-(j + 1) * (size + 1) // out)
            expected[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    np.testing.assert_allclose(layers.adaptive_avg_pool(jnp.asarray(x), out), expected, rtol=1e-6,
                               atol=1e-6)


def test_adaptive_avg_pool_is_identity_at_target_size_and_rejects_zero():
    x = jnp.ones((1, 7, 7, 2))
    assert layers.adaptive_avg_pool(x, 7) is x
    with pytest.raises(ValueError, match="output size"):
        layers.adaptive_avg_pool(x, 0)


@pytest.mark.parametrize("size,window,stride,padding,expected",
                         [(112, 3, 2, 0, 56), (56, 3, 2, 0, 28), (28, 3, 2, 0, 14),
                          (14, 2, 2, 0, 7), (14, 3, 1, 1, 14), (6, 3, 2, 0, 3), (5, 2, 2, 1, 3)])
def test_max_pool_ceil_output_size_matches_torch(size, window, stride, padding, expected):
    x = jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32)
    shape = jax.eval_shape(lambda a: layers.max_pool_ceil(a, window, stride, padding), x).shape
    assert shape == (1, expected, expected, 1)


def test_max_pool_ceil_keeps_partial_window_and_never_picks_padding():
    x = -np.arange(36, dtype=np.float32).reshape(1, 6, 6, 1) - 1.0  # all negative: -inf pad loses
    y = np.asarray(layers.max_pool_ceil(jnp.asarray(x), 3, 2))
    expected = np.array([[x[0, r:r + 3, c:c + 3, 0].max() for c in (0, 2, 4)] for r in (0, 2, 4)])
    np.testing.assert_array_equal(y[0, :, :, 0], expected)
    assert layers.max_pool(jnp.asarray(x), 3, 2).shape[1] == 2  # floor mode drops that last window


# --- LeNet-5 -----------------------------------------------------------------------------------


def test_lenet5_is_fully_connected_at_c3_with_61706_params():
    params = _variables(lenet.LeNet5(), 32, channels=1)["params"]
    assert _count(params) == 61_706
    assert params["c3"]["kernel"].shape == (5, 5, 6, 16)
    assert _count(_variables(lenet.LeNet5(pool="max", act="relu"), 32, 1)["params"]) == 61_706


def test_lenet5_rejects_bad_pool_and_unpadded_mnist():
    with pytest.raises(ValueError, match="pool"):
        lenet.LeNet5(pool="median")
    with pytest.raises(ValueError, match="pad 28x28"):
        _variables(lenet.LeNet5(), 28, channels=1)


# --- AlexNet -----------------------------------------------------------------------------------


def test_alexnet_paper_variant_has_two_groups_and_lrn():
    paper, torch_layout = alexnet.AlexNet(variant="paper"), alexnet.AlexNet()
    params = _variables(paper, 224)["params"]
    assert _count(params) == 60_965_224
    assert _count(_variables(torch_layout, 224)["params"]) == 61_100_840
    # Grouped convs see half the input channels: 96/2 into conv2, 384/2 into conv4 and conv5.
    assert params["conv2"]["kernel"].shape == (5, 5, 48, 256)
    assert params["conv4"]["kernel"].shape == (3, 3, 192, 384)
    assert params["conv5"]["kernel"].shape == (3, 3, 192, 256)
    assert params["fc1"]["kernel"].shape == (6 * 6 * 256, 4096)  # 224 ends on a 6x6 map
    assert {"lrn1", "lrn2"} <= set(_module_outputs(paper, 224))
    assert "lrn1" not in _module_outputs(torch_layout, 224)


def test_alexnet_small_input_is_pooled_up_to_6x6():
    model = alexnet.AlexNet(variant="paper", features=(16, 32, 32, 32, 32), hidden=64)
    assert _variables(model, 64)["params"]["fc1"]["kernel"].shape == (6 * 6 * 32, 64)


def test_alexnet_rejects_bad_configs():
    with pytest.raises(ValueError, match="even"):
        alexnet.AlexNet(variant="paper", features=(16, 33, 32, 32, 32))
    with pytest.raises(ValueError, match="variant"):
        alexnet.AlexNet(variant="caffe")
    with pytest.raises(ValueError, match="5 conv widths"):
        alexnet.AlexNet(features=(16, 32))
    with pytest.raises(ValueError, match="at least 63"):
        _variables(alexnet.AlexNet(), 62)


# --- VGG ---------------------------------------------------------------------------------------


def test_vgg16_counts_and_bn_layers():
    plain, with_bn = _variables(vgg.VGG16(), 224), _variables(vgg.VGG16_BN(), 224)
    assert _count(plain["params"]) == 138_357_544
    assert _count(with_bn["params"]) == 138_365_992
    assert "batch_stats" not in plain and len(with_bn["batch_stats"]) == 13
    assert plain["params"]["conv5_3"]["kernel"].shape == (3, 3, 512, 512)


def test_vgg_small_repeats_1x1_map_to_7x7_and_accepts_cfg_sequence():
    model = vgg.VGG(cfg=vgg.CONFIGS["A"], width_multiplier=1 / 16, hidden=32)
    params = _variables(model, 32)["params"]
    assert params["conv1_1"]["kernel"].shape == (3, 3, 3, 4)
    assert params["fc1"]["kernel"].shape == (7 * 7 * 32, 32)
    assert _count(params) == _count(_variables(vgg.VGG11(width_multiplier=1 / 16, hidden=32), 32))
    with pytest.raises(ValueError, match="cfg"):
        vgg.VGG(cfg="F")


# --- GoogLeNet ---------------------------------------------------------------------------------


def test_googlenet_counts_for_5x5_3x3_and_aux_heads():
    assert _count(_variables(googlenet.GoogLeNet(), 224)["params"]) == 7_005_832
    assert _count(_variables(googlenet.GoogLeNet(branch5x5_kernel=3), 224)["params"]) == 6_624_904
    # Created even by an eval-mode init, so a checkpoint always has them.
    params = _variables(googlenet.GoogLeNet(aux_logits=True), 224, train=False)["params"]
    assert _count(params["aux1"]) == 3_188_968 and _count(params["aux2"]) == 3_191_016
    with pytest.raises(ValueError, match="odd"):
        googlenet.GoogLeNet(branch5x5_kernel=4)


def test_googlenet_map_sizes_at_224_follow_ceil_mode():
    outputs = _module_outputs(googlenet.GoogLeNet(), 224)
    sizes = {name: outputs[name]["__call__"][0].shape for name in
             ("conv1", "conv3", "inception3b", "inception4a", "inception4e", "inception5b")}
    assert sizes == {"conv1": (1, 112, 112, 64), "conv3": (1, 56, 56, 192),
                     "inception3b": (1, 28, 28, 480), "inception4a": (1, 14, 14, 512),
                     "inception4e": (1, 14, 14, 832), "inception5b": (1, 7, 7, 1024)}


def test_googlenet_aux_logits_are_sown_in_train_only():
    model = googlenet.GoogLeNet(num_classes=7, aux_logits=True, width_multiplier=0.125)
    x = jnp.zeros((2, 64, 64, 3))
    variables = _variables(model, 64)

    def run(train):
        return jax.eval_shape(lambda v: model.apply(
            v, x, train=train, rngs={"dropout": jax.random.key(0)},
            mutable=["batch_stats", "intermediates"]), variables)

    logits, state = run(True)
    assert logits.shape == (2, 7)
    assert [a.shape for a in state["intermediates"]["aux_logits"]] == [(2, 7), (2, 7)]
    logits, state = run(False)
    assert logits.shape == (2, 7) and "intermediates" not in state


def test_aux_head_gets_gradients_and_dropout_in_train():
    head = googlenet.InceptionAux(num_classes=3, width_multiplier=1 / 16)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 5, 8)), jnp.float32)
    shapes = jax.eval_shape(functools.partial(head.init, train=False), jax.random.key(0), x)
    variables = {"params": _random_like(shapes["params"]),
                 "batch_stats": jax.tree.map(lambda s: jnp.ones(s.shape), shapes["batch_stats"])}

    @jax.jit
    def grads_and_outputs(params, seed):
        def loss(p):
            out, _ = head.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(seed)})
            return jnp.sum(out * jnp.arange(1.0, 4.0)), out
        return jax.grad(loss, has_aux=True)(params)

    grads, out_a = grads_and_outputs(variables["params"], 0)
    _, out_b = grads_and_outputs(variables["params"], 1)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
    assert not np.allclose(out_a, out_b)  # dropout 0.7 is active in train


def test_googlenet_module_subset_keeps_pools_and_rejects_unknown_names():
    from cnnjax.models.googlenet import GoogLeNet

    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    subset = GoogLeNet(num_classes=10, modules=("3a", "4a", "5a"), width_multiplier=0.125)
    variables = jax.eval_shape(functools.partial(subset.init, train=False), jax.random.key(0), x)
    assert sorted(k for k in variables["params"] if k.startswith("inception")) == [
        "inception3a", "inception4a", "inception5a"]
    with pytest.raises(ValueError, match="unknown inception modules"):
        GoogLeNet(modules=("3a", "6a")).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
