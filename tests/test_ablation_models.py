"""The ablation nets have the weight counts the source notes quote, run, and the zoo knobs scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.models import ablation, densenet, efficientnet, mobilenet, resnet
from cnnjax.profile import profile_module


def _unit_cost(result, prefix):
    """Conv weights and MACs of the layers under `prefix` (e.g. 'stage1_0/')."""
    unit = [layer for layer in result["layers"] if layer["name"].startswith(prefix)]
    return sum(layer["params"] for layer in unit), sum(layer["macs"] for layer in unit)


@pytest.mark.parametrize("unit, weights, field", [
    ("3x3x2", 294_912, 5), ("5x5", 409_600, 5), ("3x3x3", 442_368, 7), ("7x7", 802_816, 7)])
def test_receptive_field_unit_weights_at_128_channels(unit, weights, field):
    result = profile_module(ablation.ReceptiveFieldNet(unit=unit, width=128), (32, 32, 3))
    params, macs = _unit_cost(result, "stage1_0/")
    assert params == weights  # no bias: the units carry batch norm
    assert macs == weights * 32 * 32  # stride 1, 'SAME' size: one weight use per output pixel
    assert ablation.receptive_field(ablation.RECEPTIVE_FIELD_UNITS[unit]) == field


def test_bottleneck_conv_arithmetic_of_the_source_notes():
    costs = {b: _unit_cost(profile_module(ablation.BottleneckNet(bottleneck=b, width=128),
                                          (16, 16, 3)), "stage1_0/") for b in (False, True)}
    assert costs[False] == (147_456, 147_456 * 256)  # 3x3 128->128
    assert costs[True] == (40_960, 40_960 * 256)  # 1x1 128->32 + 3x3 32->128


def test_inception_block_with_and_without_reductions():
    widths = (64, 96, 128, 16, 32, 32)  # GoogLeNet 3a on its 28x28x192 input
    shape = (28, 28, 192)
    reduced = profile_module(ablation.InceptionBlock(widths, reduce=True), shape)
    direct = profile_module(ablation.InceptionBlock(widths, reduce=False), shape)
    naive = profile_module(ablation.InceptionBlock(widths, reduce=False, pool_projection=False),
                           shape)
    conv_weights = lambda r: sum(layer["params"] for layer in r["layers"])  # noqa: E731
    # 192*64 + 192*96 + 9*96*128 + 192*16 + 25*16*32 + 192*32 against 192*64 + 9*192*128 + ...
    assert conv_weights(reduced) == 163_328 and conv_weights(direct) == 393_216
    assert conv_weights(naive) == 387_072
    assert reduced["macs"] == 163_328 * 28 * 28 and direct["macs"] == 393_216 * 28 * 28
    out = lambda m: jax.eval_shape(  # noqa: E731
        lambda: m.init_with_output(jax.random.key(0), jnp.zeros((1, *shape)))[0]).shape
    assert out(ablation.InceptionBlock(widths)) == out(ablation.InceptionBlock(widths, False))
    assert out(ablation.InceptionBlock(widths, False, False))[-1] == 64 + 128 + 32 + 192


def test_plain_and_residual_nets_have_the_same_parameters():
    counts = {r: profile_module(ablation.PlainNet(depth=20, residual=r), (8, 8, 1))["params"]
              for r in (False, True)}
    assert counts[False] == counts[True] == 47_066
    with pytest.raises(ValueError, match="even with residual=True"):
        ablation.PlainNet(depth=5, residual=True).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="unknown receptive-field unit"):
        ablation.ReceptiveFieldNet(unit="9x9").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="unknown initializer"):
        ablation.study_initializer("huge")


@pytest.mark.parametrize("model", [
    ablation.InceptionNet(reduce=False, stem_width=8, blocks=((4, 4, 8, 2, 4, 4),) * 2),
    ablation.BottleneckNet(width=8, stage_sizes=(1, 1)),
    ablation.ReceptiveFieldNet(unit="7x7", width=8, stage_sizes=(1, 1), norm=None),
    ablation.PlainNet(depth=4, residual=True, width=4, act="sigmoid"),
], ids=["inception", "bottleneck", "receptive_field", "plain"])
def test_small_nets_train_mode_forward(model):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))

    @jax.jit  # one compile: cheaper than running init and apply op by op
    def init_and_apply(x):
        variables = model.init(jax.random.key(1), x)
        return variables, *model.apply(variables, x, train=True, mutable=["batch_stats"])

    variables, logits, updates = init_and_apply(x)
    assert logits.shape == (2, 10) and bool(jnp.isfinite(logits).all())
    assert ("batch_stats" in variables) == bool(updates)  # BN stats move only when there is BN


def test_zoo_knobs_the_other_studies_use():
    """Basic vs bottleneck ResNet at matched depth, DenseNet k, MobileNet alpha, EfficientNet phi."""
    convs = {}
    for name, blocks, block_cls in (("basic", (3, 3, 3), resnet.BasicBlock),
                                    ("bottleneck", (2, 2, 2), resnet.BottleneckBlock)):
        result = profile_module(resnet.CifarResNet(stage_sizes=blocks, block_cls=block_cls),
                                (32, 32, 3))
        convs[name] = sum(layer["kind"] == "Conv" for layer in result["layers"])
    assert convs == {"basic": 19, "bottleneck": 19}  # + fc: both 20 weight layers deep
    dense = [profile_module(densenet.DenseNet(block_config=(2, 2, 2), growth_rate=k,
                                              stem="cifar", num_classes=10),
                            (32, 32, 3))["params"] for k in (4, 12)]
    assert dense == [5_466, 44_410]
    mobile = [profile_module(mobilenet.MobileNetV1(num_classes=10, width_multiplier=a),
                             (32, 32, 3))["params"] for a in (0.25, 0.5)]
    assert mobile == [215_642, 823_722]
    macs = []
    for phi in (0, 1):
        depth, width, resolution = efficientnet.compound_coefficients(phi)
        net = efficientnet.EfficientNet(num_classes=10, width_coefficient=0.25 * width,
                                        depth_coefficient=0.25 * depth)
        size = round(32 * resolution)
        macs.append(profile_module(net, (size, size, 3))["macs"])
    # measured 500,352 -> 1,266,272 (2.5x, not 2x): channel rounding to 8 dominates a tiny base
    assert macs == [500_352, 1_266_272]
    np.testing.assert_allclose(efficientnet.compound_coefficients(1), (1.2, 1.1, 1.15))
