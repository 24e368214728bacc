"""AlexNet (Krizhevsky 2012) in torchvision's one-tower layout or the paper's two-group one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import layers

ModuleDef = Any

# Conv widths of conv1..conv5. The paper's 96-256-384-384-256 is split over two GPUs; conv2, conv4
# and conv5 only see the half of the previous layer on their own GPU, hence feature_group_count=2.
FEATURES = {
    "torchvision": (64, 192, 384, 256, 256),
    "paper": (96, 256, 384, 384, 256),
}
_GROUPS = {"torchvision": (1, 1, 1, 1, 1), "paper": (1, 2, 1, 2, 2)}
MIN_INPUT = 63  # smallest side whose last feature map still holds one 3x3 pooling window

# torch.nn.Conv2d/Linear's default weight init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)),
# which torchvision's AlexNet keeps.
TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class AlexNet(nn.Module):
    """AlexNet, "ImageNet Classification with Deep Convolutional Neural Networks" (Krizhevsky 2012).

    Introduced ReLU, dropout and overlapping (3/2) max pooling at ImageNet scale, trained on GPUs.
    variant="torchvision": 64-192-384-256-256, no LRN, 61,100,840 parameters.
    variant="paper": 96-256-384-384-256, conv2/4/5 in two groups, LRN after conv1 and conv2,
    60,965,224 parameters. Both use conv1 padding 2 so a 224 input ends on a 6x6 map; other sizes
    go through an adaptive 6x6 average pool as in torchvision.
    """

    num_classes: int = 1000
    variant: str = "torchvision"
    features: Sequence[int] | None = None
    hidden: int = 4096
    dropout_rate: float = 0.5
    act: str | Callable[[jax.Array], jax.Array] = "relu"
    dtype: Any = jnp.float32
    conv: ModuleDef = layers.Conv
    lrn: ModuleDef = layers.LocalResponseNorm
    kernel_init: str | Callable[..., jax.Array] = TORCH_DEFAULT_INIT

    def __post_init__(self) -> None:
        if self.variant not in FEATURES:
            raise ValueError(f"AlexNet: unknown variant {self.variant!r}; "
                             "use 'torchvision' or 'paper'.")
        widths = self._widths()
        if len(widths) != 5:
            raise ValueError(f"AlexNet: features needs 5 conv widths, got {widths}.")
        if self.variant == "paper" and any(w % 2 for w in widths):
            raise ValueError(f"AlexNet(variant='paper') splits convs in two groups, so every width "
                             f"must be even; got features={widths}.")
        super().__post_init__()

    def _widths(self) -> tuple[int, ...]:
        return tuple(FEATURES[self.variant] if self.features is None else self.features)

    def _conv(self, x: jax.Array, index: int, kernel: int, stride: int, padding: int) -> jax.Array:
        features, groups = self._widths()[index], _GROUPS[self.variant][index]
        x = self.conv(features, (kernel, kernel), strides=stride, padding=padding,
                      feature_group_count=groups, dtype=self.dtype,
                      kernel_init=layers.initializer(self.kernel_init), name=f"conv{index + 1}")(x)
        x = layers.activation(self.act)(x)
        # The paper normalises after the first two ReLUs, before their max pools.
        return self.lrn(name=f"lrn{index + 1}")(x) if self.variant == "paper" and index < 2 else x

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4 or min(x.shape[1:3]) < MIN_INPUT:
            raise ValueError(f"AlexNet needs NHWC input of at least {MIN_INPUT}x{MIN_INPUT}, "
                             f"got shape {x.shape}; resize the images (224 is the default).")
        x = x.astype(self.dtype)
        x = layers.max_pool(self._conv(x, 0, 11, 4, 2), 3, 2)
        x = layers.max_pool(self._conv(x, 1, 5, 1, 2), 3, 2)
        x = self._conv(x, 2, 3, 1, 1)
        x = self._conv(x, 3, 3, 1, 1)
        x = layers.max_pool(self._conv(x, 4, 3, 1, 1), 3, 2)
        x = layers.adaptive_avg_pool(x, 6)
        return self._classifier(x.reshape(x.shape[0], -1), train)

    def _classifier(self, x: jax.Array, train: bool) -> jax.Array:
        # torchvision order: dropout, fc, relu, dropout, fc, relu, fc.
        act, init = layers.activation(self.act), layers.initializer(self.kernel_init)
        for i in (1, 2):
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            x = act(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=init, name=f"fc{i}")(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init, name="fc3")(x)
