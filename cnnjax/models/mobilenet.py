"""MobileNet v1 and v2: depthwise separable convolutions and inverted residual bottlenecks."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.layers import Conv, activation, batch_norm, global_avg_pool, initializer, make_divisible

Array = jax.Array
ModuleDef = Any

# torchvision initialises every classifier of the MobileNet family with N(0, 0.01).
_CLASSIFIER_INIT = nn.initializers.normal(0.01)

# Howard 2017 Table 1 as (output channels, stride) for the 13 depthwise separable blocks. The table
# prints stride 2 for the last block, yet its input and output are both 7x7; every reference
# implementation (TF-slim, Keras) uses stride 1 there, and so do we.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)

# Sandler 2018 Table 2 as (expansion t, output channels c, repeats n, first stride s).
MOBILENET_V2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def _check_images(x: Array, model: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{model} expects NHWC images [N, H, W, C], got shape {x.shape}; "
                         "add a batch axis or transpose NCHW input to NHWC.")


def _check_width(width_multiplier: float, model: str) -> None:
    if width_multiplier <= 0:
        raise ValueError(f"{model}: width_multiplier must be > 0, got {width_multiplier}; "
                         "use e.g. 1.0, 0.75, 0.5 or 0.25.")


def mobilenet_v1_channels(channels: int, width_multiplier: float) -> int:
    """Howard 2017's width multiplier alpha: int(channels * alpha), at least 8 (TF-slim's min_depth)."""
    return max(8, int(channels * width_multiplier))


def mobilenet_v1_input_size(resolution_multiplier: float) -> int:
    """Howard 2017's resolution multiplier rho, which only sets the input size: round(224 * rho).

    The network itself is resolution-agnostic (global average pooling before the classifier), so
    rho = 6/7, 5/7, 4/7 gives the paper's 192, 160 and 128 pixel models with the same parameters.
    """
    if resolution_multiplier <= 0:
        raise ValueError(f"resolution_multiplier must be > 0, got {resolution_multiplier}; "
                         "the paper uses 1, 6/7, 5/7 or 4/7.")
    return int(round(224 * resolution_multiplier))


# --- blocks ------------------------------------------------------------------------------------


class DepthwiseSeparableConv(nn.Module):
    """3x3 depthwise conv, BN, act, then 1x1 pointwise conv, BN, act (Howard 2017 Figure 3).

    `conv` and `norm` arrive with everything but features/name bound (bias off, dtype, init, train).
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array]
    strides: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        # feature_group_count = channels makes each 3x3 filter see exactly one input channel.
        x = self.conv(channels, (3, 3), strides=self.strides, padding=1,
                      feature_group_count=channels, name="dw_conv")(x)
        x = self.act(self.norm(name="dw_bn")(x))
        x = self.conv(self.features, (1, 1), name="pw_conv")(x)
        return self.act(self.norm(name="pw_bn")(x))


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t=1), 3x3 depthwise, 1x1 linear projection, identity shortcut.

    Sandler 2018: the projection has no activation (a "linear bottleneck"), because ReLU on the
    narrow representation destroys information; the shortcut joins the narrow ends.
    """

    features: int
    expand_ratio: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array]
    strides: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_channels = x.shape[-1]
        hidden = int(round(in_channels * self.expand_ratio))
        y = x
        if self.expand_ratio != 1:
            y = self.conv(hidden, (1, 1), name="expand_conv")(y)
            y = self.act(self.norm(name="expand_bn")(y))
        y = self.conv(hidden, (3, 3), strides=self.strides, padding=1,
                      feature_group_count=hidden, name="dw_conv")(y)
        y = self.act(self.norm(name="dw_bn")(y))
        y = self.conv(self.features, (1, 1), name="project_conv")(y)
        y = self.norm(name="project_bn")(y)
        if self.strides == 1 and in_channels == self.features:
            return x + y
        return y


# --- models ------------------------------------------------------------------------------------


class MobileNetV1(nn.Module):
    """MobileNet (Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for
    Mobile Vision Applications"): a standard conv replaced by a depthwise and a pointwise conv,
    8-9x fewer multiply-adds, with width (alpha) and resolution (rho) multipliers to trade accuracy
    for cost. alpha = `width_multiplier` (see `mobilenet_v1_channels`); rho is the input size (see
    `mobilenet_v1_input_size`). 4,231,976 parameters at alpha = 1 with 1000 classes.

    Names: stem_conv, stem_bn, block1..block13 (dw_conv, dw_bn, pw_conv, pw_bn), classifier.
    """

    num_classes: int = 1000
    width_multiplier: float = 1.0
    dropout_rate: float = 0.0
    act: str | Callable[[Array], Array] = "relu"
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv
    norm: Callable[..., nn.Module] = batch_norm
    block_cls: ModuleDef = DepthwiseSeparableConv
    blocks: Sequence[tuple[int, int]] = MOBILENET_V1_BLOCKS
    kernel_init: str | Callable[..., Array] = "he_normal_fan_out"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_images(x, "MobileNetV1")
        _check_width(self.width_multiplier, "MobileNetV1")
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                                 kernel_init=initializer(self.kernel_init))
        norm = functools.partial(self.norm, train, dtype=self.dtype)
        act = activation(self.act)
        width = functools.partial(mobilenet_v1_channels, width_multiplier=self.width_multiplier)

        x = conv(width(32), (3, 3), strides=2, padding=1, name="stem_conv")(x.astype(self.dtype))
        x = act(norm(name="stem_bn")(x))
        for i, (channels, stride) in enumerate(self.blocks, start=1):
            x = self.block_cls(width(channels), conv=conv, norm=norm, act=act, strides=stride,
                               name=f"block{i}")(x)
        x = global_avg_pool(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_CLASSIFIER_INIT,
                        name="classifier")(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"):
    residual blocks that expand a narrow input t times, filter it depthwise and project it back
    linearly. torchvision layout: every width is make_divisible(c * alpha, 8) and the last conv has
    make_divisible(1280 * max(1, alpha), 8) channels. 3,504,872 parameters at alpha = 1.

    Names: stem_conv, stem_bn, block1..block17 (torchvision's features.1..17; expand_conv,
    expand_bn, dw_conv, dw_bn, project_conv, project_bn), head_conv, head_bn, classifier.
    """

    num_classes: int = 1000
    width_multiplier: float = 1.0
    dropout_rate: float = 0.2
    act: str | Callable[[Array], Array] = "relu6"
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv
    norm: Callable[..., nn.Module] = batch_norm
    block_cls: ModuleDef = InvertedResidual
    stages: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_STAGES
    kernel_init: str | Callable[..., Array] = "he_normal_fan_out"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_images(x, "MobileNetV2")
        _check_width(self.width_multiplier, "MobileNetV2")
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                                 kernel_init=initializer(self.kernel_init))
        norm = functools.partial(self.norm, train, dtype=self.dtype)
        act = activation(self.act)
        alpha = self.width_multiplier

        x = conv(make_divisible(32 * alpha), (3, 3), strides=2, padding=1,
                 name="stem_conv")(x.astype(self.dtype))
        x = act(norm(name="stem_bn")(x))
        index = 1
        for expand_ratio, channels, repeats, stride in self.stages:
            for j in range(repeats):
                x = self.block_cls(make_divisible(channels * alpha), expand_ratio, conv=conv,
                                   norm=norm, act=act, strides=stride if j == 0 else 1,
                                   name=f"block{index}")(x)
                index += 1
        # The head never narrows below 1280: thin models keep a wide final feature.
        x = conv(make_divisible(1280 * max(1.0, alpha)), (1, 1), name="head_conv")(x)
        x = act(norm(name="head_bn")(x))
        x = global_avg_pool(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_CLASSIFIER_INIT,
                        name="classifier")(x)


# --- presets -----------------------------------------------------------------------------------

MobileNetV1_075 = functools.partial(MobileNetV1, width_multiplier=0.75)
MobileNetV1_050 = functools.partial(MobileNetV1, width_multiplier=0.5)
MobileNetV1_025 = functools.partial(MobileNetV1, width_multiplier=0.25)
MobileNetV2_075 = functools.partial(MobileNetV2, width_multiplier=0.75)
MobileNetV2_050 = functools.partial(MobileNetV2, width_multiplier=0.5)
MobileNetV2_140 = functools.partial(MobileNetV2, width_multiplier=1.4)
