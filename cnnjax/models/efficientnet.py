"""EfficientNet B0-B7: MBConv blocks with squeeze-excitation, scaled from B0 by compound coefficients."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.layers import Conv, activation, batch_norm, global_avg_pool, initializer, make_divisible

Array = jax.Array
ModuleDef = Any


class StageConfig(NamedTuple):
    """One row of Tan & Le 2019 Table 1 (B0); in/out channels and repeats are scaled per variant."""

    expand_ratio: int
    kernel_size: int
    stride: int
    in_channels: int
    out_channels: int
    repeats: int


B0_STAGES: tuple[StageConfig, ...] = (
    StageConfig(1, 3, 1, 32, 16, 1),
    StageConfig(6, 3, 2, 16, 24, 2),
    StageConfig(6, 5, 2, 24, 40, 2),
    StageConfig(6, 3, 2, 40, 80, 3),
    StageConfig(6, 5, 1, 80, 112, 3),
    StageConfig(6, 5, 2, 112, 192, 4),
    StageConfig(6, 3, 1, 192, 320, 1),
)

# variant -> (width_coefficient, depth_coefficient, resolution, dropout), as torchvision and the paper.
SCALING: dict[str, tuple[float, float, int, float]] = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}

# torchvision ports B5-B7 from TensorFlow and so gives them TF's batch norm (torch momentum 0.01 =
# flax 0.99, eps 1e-3); B0-B4 keep torch's defaults. Parameter counts are unaffected.
_TF_BATCH_NORM = dict(bn_momentum=0.99, bn_epsilon=1e-3)
_VARIANT_NORM: dict[str, dict[str, float]] = {"b5": _TF_BATCH_NORM, "b6": _TF_BATCH_NORM,
                                              "b7": _TF_BATCH_NORM}


def round_filters(channels: int, width_coefficient: float, divisor: int = 8) -> int:
    """Channels scaled by the width coefficient, rounded to a multiple of 8 (never 10% lower)."""
    return make_divisible(channels * width_coefficient, divisor)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
    """Blocks in a stage scaled by the depth coefficient, rounded up so every stage keeps one."""
    return int(math.ceil(repeats * depth_coefficient))


def scaled_stages(width_coefficient: float, depth_coefficient: float,
                  base: Sequence[StageConfig] = B0_STAGES) -> list[StageConfig]:
    """The B0 table widened and deepened: how every B1-B7 stage table is derived."""
    if width_coefficient <= 0 or depth_coefficient <= 0:
        raise ValueError(f"width and depth coefficients must be > 0, got {width_coefficient} and "
                         f"{depth_coefficient}; B0 uses 1.0 and 1.0.")
    # StageConfig(*row): a stage table read back from a run's config.json arrives as plain lists.
    stages = [StageConfig(*row) for row in base]
    return [s._replace(in_channels=round_filters(s.in_channels, width_coefficient),
                       out_channels=round_filters(s.out_channels, width_coefficient),
                       repeats=round_repeats(s.repeats, depth_coefficient)) for s in stages]


def compound_coefficients(phi: float, alpha: float = 1.2, beta: float = 1.1,
                          gamma: float = 1.15) -> tuple[float, float, float]:
    """Tan & Le 2019 eq. 3: depth alpha^phi, width beta^phi, resolution gamma^phi.

    With alpha * beta^2 * gamma^2 ~= 2 the FLOPs grow by about 2^phi. Returns the multipliers
    (depth, width, resolution) relative to B0; the resolution one multiplies 224.
    """
    if min(alpha, beta, gamma) < 1:
        raise ValueError(f"alpha, beta, gamma must be >= 1 (got {alpha}, {beta}, {gamma}); "
                         "the paper's grid search found 1.2, 1.1, 1.15.")
    return alpha**phi, beta**phi, gamma**phi


# --- blocks ------------------------------------------------------------------------------------


class SqueezeExcitation(nn.Module):
    """Hu et al. 2018: global pool, 1x1 conv down, act, 1x1 conv up, sigmoid, rescale channels.

    The two 1x1 convs have biases (torchvision's fc1/fc2); `conv` arrives with use_bias bound to
    False for the rest of the net, so it is overridden here.
    """

    squeeze_channels: int
    conv: ModuleDef
    act: Callable[[Array], Array]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        scale = self.act(self.conv(self.squeeze_channels, (1, 1), use_bias=True, name="fc1")(scale))
        scale = nn.sigmoid(self.conv(x.shape[-1], (1, 1), use_bias=True, name="fc2")(scale))
        return x * scale


class MBConv(nn.Module):
    """Mobile inverted bottleneck (Sandler 2018) with squeeze-excitation, as in EfficientNet.

    1x1 expand + BN + act (skipped when expand_ratio is 1), kxk depthwise + BN + act, SE, 1x1
    project + BN with no activation. When the shape is kept, the residual branch is dropped per
    example with probability `stochastic_depth_rate` during training (Huang et al. 2016) and the
    input added back.
    """

    features: int
    expand_ratio: int
    kernel_size: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array]
    strides: int = 1
    se_ratio: float = 0.25
    stochastic_depth_rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        in_channels = x.shape[-1]
        hidden = make_divisible(in_channels * self.expand_ratio)
        y = x
        if hidden != in_channels:
            y = self.conv(hidden, (1, 1), name="expand_conv")(y)
            y = self.act(self.norm(name="expand_bn")(y))
        y = self.conv(hidden, (self.kernel_size, self.kernel_size), strides=self.strides,
                      padding=self.kernel_size // 2, feature_group_count=hidden, name="dw_conv")(y)
        y = self.act(self.norm(name="dw_bn")(y))
        if self.se_ratio > 0:
            # Squeeze width comes from the block's input, not its expanded width (torchvision, TF).
            squeeze = max(1, int(in_channels * self.se_ratio))
            y = SqueezeExcitation(squeeze, conv=self.conv, act=self.act, name="se")(y)
        y = self.conv(self.features, (1, 1), name="project_conv")(y)
        y = self.norm(name="project_bn")(y)
        if self.strides != 1 or in_channels != self.features:
            return y
        # One Bernoulli draw per example, broadcast over H, W, C: the whole branch survives or not;
        # survivors are scaled by 1 / (1 - rate) so the expectation matches evaluation.
        y = nn.Dropout(self.stochastic_depth_rate, broadcast_dims=(1, 2, 3),
                       deterministic=not train, name="stochastic_depth")(y)
        return x + y


# --- model -------------------------------------------------------------------------------------


class EfficientNet(nn.Module):
    """EfficientNet (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional
    Neural Networks"): a searched MBConv + squeeze-excitation + swish baseline (B0), scaled up by
    one compound coefficient that grows depth, width and resolution together. torchvision layout:
    3x3/2 stem, seven MBConv stages, 1x1 head, global pool, dropout, linear.

    Build a variant with `EfficientNet.from_variant("b3", num_classes=..., **overrides)`.
    Names: stem_conv, stem_bn, stage{1..7}_{j} (torchvision's features.{s}.{j}; expand_conv,
    expand_bn, dw_conv, dw_bn, se/fc1, se/fc2, project_conv, project_bn), head_conv, head_bn,
    classifier. Stochastic depth of block b (counted over the whole net, from 0) is
    stochastic_depth_rate * b / num_blocks, torchvision's linear rule.
    """

    num_classes: int = 1000
    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    dropout_rate: float = 0.2
    stochastic_depth_rate: float = 0.2
    act: str | Callable[[Array], Array] = "silu"
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv
    norm: Callable[..., nn.Module] = batch_norm
    block_cls: ModuleDef = MBConv
    se_ratio: float = 0.25
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    stages: Sequence[StageConfig] = B0_STAGES
    stem_channels: int = 32
    head_channels: int = 1280
    kernel_init: str | Callable[..., Array] = "he_normal_fan_out"

    @classmethod
    def from_variant(cls, variant: str, num_classes: int = 1000, **overrides: Any) -> EfficientNet:
        """B0-B7 from the SCALING table; keyword overrides (e.g. width_coefficient=0.25) win."""
        if variant not in SCALING:
            raise ValueError(f"unknown EfficientNet variant {variant!r}; choose one of "
                             f"{', '.join(SCALING)}.")
        width, depth, _, dropout = SCALING[variant]
        kwargs = dict(width_coefficient=width, depth_coefficient=depth, dropout_rate=dropout,
                      **_VARIANT_NORM.get(variant, {}))
        return cls(num_classes=num_classes, **{**kwargs, **overrides})

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if x.ndim != 4:
            raise ValueError(f"EfficientNet expects NHWC images [N, H, W, C], got shape {x.shape}; "
                             "add a batch axis or transpose NCHW input to NHWC.")
        stages = scaled_stages(self.width_coefficient, self.depth_coefficient, self.stages)
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                                 kernel_init=initializer(self.kernel_init))
        norm = functools.partial(self.norm, train, dtype=self.dtype, momentum=self.bn_momentum,
                                 epsilon=self.bn_epsilon)
        act = activation(self.act)

        x = conv(round_filters(self.stem_channels, self.width_coefficient), (3, 3), strides=2,
                 padding=1, name="stem_conv")(x.astype(self.dtype))
        x = act(norm(name="stem_bn")(x))
        num_blocks, block_id = sum(s.repeats for s in stages), 0
        for s, stage in enumerate(stages, start=1):
            for j in range(stage.repeats):
                x = self.block_cls(
                    stage.out_channels, stage.expand_ratio, stage.kernel_size, conv=conv,
                    norm=norm, act=act, strides=stage.stride if j == 0 else 1,
                    se_ratio=self.se_ratio,
                    stochastic_depth_rate=self.stochastic_depth_rate * block_id / num_blocks,
                    name=f"stage{s}_{j}")(x, train)
                block_id += 1
        x = conv(round_filters(self.head_channels, self.width_coefficient), (1, 1),
                 name="head_conv")(x)
        x = act(norm(name="head_bn")(x))
        x = global_avg_pool(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        # torchvision: U(-1/sqrt(num_classes), 1/sqrt(num_classes)); variance_scaling(1/3, fan_out,
        # uniform) has exactly that limit, sqrt(3 * (1/3) / fan_out).
        head_init = nn.initializers.variance_scaling(1 / 3, "fan_out", "uniform")
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=head_init,
                        name="classifier")(x)


# --- presets -----------------------------------------------------------------------------------

EfficientNetB0 = functools.partial(EfficientNet.from_variant, "b0")
EfficientNetB1 = functools.partial(EfficientNet.from_variant, "b1")
EfficientNetB2 = functools.partial(EfficientNet.from_variant, "b2")
EfficientNetB3 = functools.partial(EfficientNet.from_variant, "b3")
EfficientNetB4 = functools.partial(EfficientNet.from_variant, "b4")
EfficientNetB5 = functools.partial(EfficientNet.from_variant, "b5")
EfficientNetB6 = functools.partial(EfficientNet.from_variant, "b6")
EfficientNetB7 = functools.partial(EfficientNet.from_variant, "b7")
