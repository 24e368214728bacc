"""The model table: every architecture by name, its default input, and how to build it."""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from cnnjax.models import (
    ablation,
    alexnet,
    densenet,
    efficientnet,
    googlenet,
    lenet,
    mobilenet,
    resnet,
    vgg,
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one registry entry and what it is.

    `small` holds constructor overrides that shrink the same code path (fewer blocks, narrower) so
    the tests can run a real forward and backward pass of every entry on a CPU in seconds, at
    `small_input` pixels.
    """

    build: Callable[..., nn.Module]
    input_size: int
    introduced: str
    in_channels: int = 3
    num_classes: int = 1000
    small: dict[str, Any] = dataclasses.field(default_factory=dict)
    small_input: int = 32


_VGG_SMALL = dict(width_multiplier=1 / 16, hidden=32)
_RESNET_SMALL = dict(stage_sizes=(1, 1, 1, 1), width=8)
_CIFAR_SMALL = dict(stage_sizes=(1, 1, 1), width=4)
_DENSE_SMALL = dict(block_config=(1, 1, 1, 1), growth_rate=4, num_init_features=8)
# Dropout and batch-norm constants pinned so the eight variants shrink to one network, tested once.
_EFFNET_SMALL = dict(width_coefficient=0.25, depth_coefficient=0.25, dropout_rate=0.2,
                     bn_epsilon=1e-5, bn_momentum=0.9)
# One block per stage, two in the 24-channel stage so the identity-shortcut path is still built.
_MOBILENET_V2_SMALL_STAGES = tuple((t, c, 2 if c == 24 else 1, s)
                                   for t, c, n, s in mobilenet.MOBILENET_V2_STAGES)


def _efficientnet(variant: str) -> ModelSpec:
    width, depth, resolution, dropout = efficientnet.SCALING[variant]
    return ModelSpec(
        functools.partial(efficientnet.EfficientNet.from_variant, variant),
        resolution,
        f"compound scaling of B0 (width x{width}, depth x{depth}, {resolution}px, dropout {dropout})"
        if variant != "b0" else "MBConv + squeeze-excitation, swish, found by architecture search",
        small=_EFFNET_SMALL,
    )


MODELS: dict[str, ModelSpec] = {
    "lenet5": ModelSpec(lenet.LeNet5, 32, "convolution + subsampling + tanh, learned end to end",
                        in_channels=1, num_classes=10),
    "alexnet": ModelSpec(alexnet.AlexNet, 224, "ReLU, dropout, overlapping pooling, GPU training",
                         small=dict(features=(16, 32, 32, 32, 32), hidden=64), small_input=64),
    "vgg11": ModelSpec(vgg.VGG11, 224, "depth from stacked 3x3 convolutions", small=_VGG_SMALL),
    "vgg13": ModelSpec(vgg.VGG13, 224, "depth from stacked 3x3 convolutions", small=_VGG_SMALL),
    "vgg16": ModelSpec(vgg.VGG16, 224, "depth from stacked 3x3 convolutions", small=_VGG_SMALL),
    "vgg19": ModelSpec(vgg.VGG19, 224, "depth from stacked 3x3 convolutions", small=_VGG_SMALL),
    "vgg11_bn": ModelSpec(vgg.VGG11_BN, 224, "VGG with batch norm", small=_VGG_SMALL),
    "vgg13_bn": ModelSpec(vgg.VGG13_BN, 224, "VGG with batch norm", small=_VGG_SMALL),
    "vgg16_bn": ModelSpec(vgg.VGG16_BN, 224, "VGG with batch norm", small=_VGG_SMALL),
    "vgg19_bn": ModelSpec(vgg.VGG19_BN, 224, "VGG with batch norm", small=_VGG_SMALL),
    "googlenet": ModelSpec(googlenet.GoogLeNet, 224,
                           "inception modules with 1x1 reductions, global average pooling",
                           small=dict(width_multiplier=0.125, modules=("3a", "4a", "4d", "5a")),
                           small_input=64),
    "resnet18": ModelSpec(resnet.ResNet18, 224, "skip connections (basic blocks)", small=_RESNET_SMALL),
    "resnet34": ModelSpec(resnet.ResNet34, 224, "skip connections (basic blocks)", small=_RESNET_SMALL),
    "resnet50": ModelSpec(resnet.ResNet50, 224, "skip connections with 1x1 bottleneck blocks",
                          small=_RESNET_SMALL),
    "resnet101": ModelSpec(resnet.ResNet101, 224, "skip connections with 1x1 bottleneck blocks",
                           small=_RESNET_SMALL),
    "resnet152": ModelSpec(resnet.ResNet152, 224, "skip connections with 1x1 bottleneck blocks",
                           small=_RESNET_SMALL),
    "resnet20": ModelSpec(resnet.ResNet20, 32, "CIFAR ResNet, identity (option A) shortcuts",
                          num_classes=10, small=_CIFAR_SMALL),
    "resnet32": ModelSpec(resnet.ResNet32, 32, "CIFAR ResNet, identity (option A) shortcuts",
                          num_classes=10, small=_CIFAR_SMALL),
    "resnet44": ModelSpec(resnet.ResNet44, 32, "CIFAR ResNet, identity (option A) shortcuts",
                          num_classes=10, small=_CIFAR_SMALL),
    "resnet56": ModelSpec(resnet.ResNet56, 32, "CIFAR ResNet, identity (option A) shortcuts",
                          num_classes=10, small=_CIFAR_SMALL),
    "resnet110": ModelSpec(resnet.ResNet110, 32, "CIFAR ResNet, identity (option A) shortcuts",
                           num_classes=10, small=_CIFAR_SMALL),
    "densenet121": ModelSpec(densenet.DenseNet121, 224, "dense concatenation, transition layers",
                             small=_DENSE_SMALL),
    "densenet169": ModelSpec(densenet.DenseNet169, 224, "dense concatenation, transition layers",
                             small=_DENSE_SMALL),
    "densenet201": ModelSpec(densenet.DenseNet201, 224, "dense concatenation, transition layers",
                             small=_DENSE_SMALL),
    "densenet_bc100": ModelSpec(densenet.DenseNetBC100, 32, "DenseNet-BC for CIFAR (k=12)",
                                num_classes=10,
                                small=dict(block_config=(1, 1, 1), growth_rate=4)),
    "mobilenet_v1": ModelSpec(mobilenet.MobileNetV1, 224, "depthwise separable convolutions",
                              small=dict(width_multiplier=0.25)),
    "mobilenet_v2": ModelSpec(mobilenet.MobileNetV2, 224,
                              "inverted residuals with linear bottlenecks",
                              small=dict(width_multiplier=0.25, stages=_MOBILENET_V2_SMALL_STAGES)),
    **{f"efficientnet_{v}": _efficientnet(v) for v in efficientnet.SCALING},
    # Small nets for the ablation studies (cnnjax/models/ablation.py), one design choice as a switch.
    "ablation_inception": ModelSpec(ablation.InceptionNet, 32,
                                    "small GoogLeNet; 1x1 reductions on/off (reduce=)", num_classes=10,
                                    small=dict(stem_width=8, blocks=((4, 4, 8, 2, 4, 4),) * 2),
                                    small_input=8),
    "ablation_bottleneck": ModelSpec(ablation.BottleneckNet, 32,
                                     "plain 3x3 vs 1x1-reduced 3x3 units (bottleneck=)",
                                     num_classes=10, small=dict(width=8, stage_sizes=(1, 1)),
                                     small_input=8),
    "ablation_receptive_field": ModelSpec(ablation.ReceptiveFieldNet, 32,
                                          "stacked 3x3 vs one 5x5/7x7 unit (unit=)", num_classes=10,
                                          small=dict(width=8, stage_sizes=(1, 1)), small_input=8),
    "plainnet": ModelSpec(ablation.PlainNet, 28, "deep plain CNN, optional identity skips (residual=)",
                          in_channels=1, num_classes=10, small=dict(depth=4, width=4), small_input=8),
}


def list_models() -> list[str]:
    """Every registry name, in table order."""
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or a ValueError that lists the close matches."""
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} See `cnnjax.models.list_models()` for all names."
        ) from None


def create_model(name: str, *, num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """Builds registry entry `name`; overrides go to the constructor (dtype, act, conv, norm, ...)."""
    spec = get_spec(name)
    return spec.build(num_classes=spec.num_classes if num_classes is None else num_classes, **overrides)
