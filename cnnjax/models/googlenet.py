"""GoogLeNet / Inception v1 (Szegedy et al. 2014) with batch norm, optional auxiliary heads."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import layers

ModuleDef = Any

# Table 1 of the paper, per module: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
INCEPTION: dict[str, tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
AUX_AFTER = ("4a", "4d")  # the auxiliary classifiers read these modules' outputs
MIN_INPUT = 32  # every max pool still gets a map at least as large as its window


def _scaled(channels: int, multiplier: float) -> int:
    return max(1, round(channels * multiplier))


class BasicConv(nn.Module):
    """Conv (no bias) -> BN (eps 1e-3, as torchvision's BasicConv2d) -> activation."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    conv: ModuleDef = layers.Conv
    norm: Callable[..., nn.Module] = layers.batch_norm
    act: str | Callable[[jax.Array], jax.Array] = "relu"
    dtype: Any = jnp.float32
    kernel_init: str | Callable[..., jax.Array] = "normal_0.01"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = self.conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                      padding=self.padding, use_bias=False, dtype=self.dtype,
                      kernel_init=layers.initializer(self.kernel_init), name="conv")(x)
        x = self.norm(train, dtype=self.dtype, epsilon=1e-3, name="bn")(x)
        return layers.activation(self.act)(x)


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1->3x3 | 1x1->kxk | maxpool->1x1.

    The 1x1 reductions before the expensive 3x3/5x5 convolutions are what keep the module cheap.
    Names follow torchvision (branch2_0 is its branch2[0]) so weights map over one to one.
    """

    widths: Sequence[int]
    branch5x5_kernel: int = 5
    basic_conv: ModuleDef = BasicConv

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c1, r3, c3, r5, c5, proj = self.widths
        k, block = self.branch5x5_kernel, self.basic_conv
        b1 = block(c1, 1, name="branch1")(x, train)
        b2 = block(r3, 1, name="branch2_0")(x, train)
        b2 = block(c3, 3, padding=1, name="branch2_1")(b2, train)
        b3 = block(r5, 1, name="branch3_0")(x, train)
        b3 = block(c5, k, padding=k // 2, name="branch3_1")(b3, train)
        b4 = layers.max_pool_ceil(x, 3, 1, padding=1)
        b4 = block(proj, 1, name="branch4_1")(b4, train)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: adaptive 4x4 avg pool, 1x1 conv 128, fc 1024, ReLU, dropout, fc."""

    num_classes: int
    width_multiplier: float = 1.0
    dropout_rate: float = 0.7
    basic_conv: ModuleDef = BasicConv
    act: str | Callable[[jax.Array], jax.Array] = "relu"
    dtype: Any = jnp.float32
    kernel_init: str | Callable[..., jax.Array] = "normal_0.01"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # torchvision's adaptive 4x4 pool; at 14x14 the paper's 5x5/3 average pool gives 4x4 too.
        x = layers.adaptive_avg_pool(x, 4)
        x = self.basic_conv(_scaled(128, self.width_multiplier), 1, name="conv")(x, train)
        x = x.reshape(x.shape[0], -1)
        init = layers.initializer(self.kernel_init)
        x = nn.Dense(_scaled(1024, self.width_multiplier), dtype=self.dtype, kernel_init=init,
                     name="fc1")(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(layers.activation(self.act)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init, name="fc2")(x)


class GoogLeNet(nn.Module):
    """GoogLeNet from "Going Deeper with Convolutions" (Szegedy et al. 2014), Table 1.

    Introduced the Inception module (parallel 1x1/3x3/5x5/pool branches with 1x1 reductions) and
    global average pooling in place of large fully connected layers: 22 layers for ~7M parameters.
    As in torchvision every conv is followed by BN, and max pools use ceil_mode. The paper's real
    5x5 branch gives 7,005,832 parameters; branch5x5_kernel=3 reproduces torchvision's 6,624,904.

    aux_logits=True adds the two auxiliary classifiers (after 4a and 4d). They only run in
    training: apply(..., train=True, mutable=["batch_stats", "intermediates"]) returns the main
    logits and stores (aux1, aux2) in intermediates["aux_logits"]; the paper adds them to the loss
    with weight 0.3. In eval they are skipped (they still run under init so their params exist).
    """

    num_classes: int = 1000
    aux_logits: bool = False
    branch5x5_kernel: int = 5
    width_multiplier: float = 1.0
    dropout_rate: float = 0.4
    aux_dropout_rate: float = 0.7
    dtype: Any = jnp.float32
    conv: ModuleDef = layers.Conv
    norm: Callable[..., nn.Module] = layers.batch_norm
    act: str | Callable[[jax.Array], jax.Array] = "relu"
    kernel_init: str | Callable[..., jax.Array] = "normal_0.01"
    inception: ModuleDef = Inception
    aux_head: ModuleDef = InceptionAux
    # Which rows of INCEPTION to build, in order; a subset keeps the same pools and heads (the
    # tests' small variant uses one module per stage plus 4d).
    modules: Sequence[str] = tuple(INCEPTION)

    def __post_init__(self) -> None:
        if self.branch5x5_kernel < 1 or self.branch5x5_kernel % 2 == 0:
            raise ValueError(f"GoogLeNet: branch5x5_kernel must be odd to keep the map size "
                             f"(5 = paper, 3 = torchvision), got {self.branch5x5_kernel}.")
        if self.width_multiplier <= 0:
            raise ValueError(f"GoogLeNet: width_multiplier must be > 0, "
                             f"got {self.width_multiplier}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4 or min(x.shape[1:3]) < MIN_INPUT:
            raise ValueError(f"GoogLeNet needs NHWC input of at least {MIN_INPUT}x{MIN_INPUT}, "
                             f"got shape {x.shape}; resize the images (224 is the default).")
        block = functools.partial(BasicConv, conv=self.conv, norm=self.norm, act=self.act,
                                  dtype=self.dtype, kernel_init=self.kernel_init)
        w = self.width_multiplier
        x = x.astype(self.dtype)
        x = block(_scaled(64, w), 7, stride=2, padding=3, name="conv1")(x, train)
        x = layers.max_pool_ceil(x, 3, 2)
        x = block(_scaled(64, w), 1, name="conv2")(x, train)
        x = block(_scaled(192, w), 3, padding=1, name="conv3")(x, train)
        x = layers.max_pool_ceil(x, 3, 2)
        run_aux = self.aux_logits and (train or self.is_initializing())
        unknown = sorted(set(self.modules) - set(INCEPTION))
        if unknown:
            raise ValueError(f"GoogLeNet: unknown inception modules {unknown}; "
                             f"choose from {', '.join(INCEPTION)}.")
        for name in self.modules:
            widths = INCEPTION[name]
            if name in ("4a", "5a"):
                x = layers.max_pool_ceil(x, 3 if name == "4a" else 2, 2)
            x = self.inception(widths=tuple(_scaled(c, w) for c in widths),
                               branch5x5_kernel=self.branch5x5_kernel, basic_conv=block,
                               name=f"inception{name}")(x, train)
            if run_aux and name in AUX_AFTER:
                aux = self.aux_head(num_classes=self.num_classes, width_multiplier=w,
                                    dropout_rate=self.aux_dropout_rate, basic_conv=block,
                                    act=self.act, dtype=self.dtype, kernel_init=self.kernel_init,
                                    name=f"aux{AUX_AFTER.index(name) + 1}")(x, train)
                if train:
                    self.sow("intermediates", "aux_logits", aux)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(layers.global_avg_pool(x))
        return nn.Dense(self.num_classes, dtype=self.dtype,
                        kernel_init=layers.initializer(self.kernel_init), name="fc")(x)
