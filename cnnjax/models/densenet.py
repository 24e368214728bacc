"""DenseNet-BC (Huang et al. 2017): the torchvision ImageNet nets and the CIFAR DenseNet-BC-100."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnjax.cpu_rewrites import cpu_rewrites_enabled, first_entry, kept
from cnnjax.layers import (
    Conv,
    activation,
    avg_pool,
    batch_norm,
    global_avg_pool,
    initializer,
    max_pool,
    norm_act,
)

Array = jax.Array
ModuleDef = Any
STEMS = ("imagenet", "cifar")
# torch.nn.Linear's default weight init, U(+-1/sqrt(fan_in)); torchvision zeroes only the bias.
FC_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# On CPU, every GRADIENT_KEPT_EVERY-th layer of a block stores its output's gradient (`_concat`).
GRADIENT_KEPT_EVERY = 4


# --- the running concatenation -----------------------------------------------------------------


def _concat(x: Array, y: Array, keep_gradient: bool) -> Array:
    """[x, y] on the channel axis; with keep_gradient, on CPU, its gradient is stored before the split.

    Why: the gradient of a block's running tensor, channel group by channel group, is a sum over
    every later layer of that layer's batch-norm gradient. XLA:CPU fuses each group's whole sum into
    one loop, and the groups' sums overlap, so the fused code grows with the square of the block's
    depth: densenet201's train step held 214,509 fused instructions (its largest fusion 236 operands)
    and took 140 s to compile on the 2-core CPU. Storing the gradient at every 4th layer bounds each
    loop to four layers' terms: 83,821 instructions and 71 s, with no measurable change in step time
    (benchmarks/RESULTS.md). Storing it at every layer compiled no faster and ran about 20% slower.
    """
    if not (keep_gradient and cpu_rewrites_enabled()):
        return jnp.concatenate([x, y], axis=-1)
    return _concat_kept(x.shape[-1], x, y, first_entry(y))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _concat_kept(split: int, x: Array, y: Array, y0: Array) -> Array:
    # y0 (y's first entry) is `kept`'s condition: when it is NaN, the loss is NaN anyway.
    return jnp.concatenate([x, y], axis=-1)


def _concat_kept_fwd(split: int, x: Array, y: Array, y0: Array) -> tuple[Array, Array]:
    return _concat_kept(split, x, y, y0), y0


def _concat_kept_bwd(split: int, y0: Array, g: Array) -> tuple[Array, Array, Array]:
    g = lax.platform_dependent(g, y0, cpu=kept, default=lambda g, _: g)
    return g[..., :split], g[..., split:], jnp.zeros_like(y0)


_concat_kept.defvjp(_concat_kept_fwd, _concat_kept_bwd)


# --- blocks ------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv(bn_size*k)-BN-ReLU-3x3 conv(k), concatenated onto its input (DenseNet-B).

    The output is [input, new k channels], so every later layer sees every earlier feature map.
    One concat per layer onto the running tensor keeps the graph linear in depth (re-concatenating
    a list of all earlier maps at every layer would make it quadratic).
    """

    growth_rate: int
    bn_size: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array] = nn.relu
    drop_rate: float = 0.0
    keep_gradient: bool = False  # store the output's gradient on CPU (`_concat`)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        y = self.conv(self.bn_size * self.growth_rate, (1, 1), padding="VALID", name="conv1")(
            norm_act(self.norm(name="bn1"), x, self.act))
        y = self.conv(self.growth_rate, (3, 3), padding=1, name="conv2")(
            norm_act(self.norm(name="bn2"), y, self.act))
        # torchvision drops the new features only, after conv2.
        y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
        return _concat(x, y.astype(x.dtype), self.keep_gradient)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv(`features`)-2x2 average pool between dense blocks (the C of DenseNet-BC)."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array] = nn.relu

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = self.conv(self.features, (1, 1), padding="VALID", name="conv")(
            norm_act(self.norm(name="bn"), x, self.act))
        return avg_pool(x, 2)


# --- model -------------------------------------------------------------------------------------


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al. 2017, "Densely Connected Convolutional Networks").

    Introduced dense connectivity: each layer receives the concatenation of all earlier feature
    maps in its block and adds `growth_rate` (k) new ones, which reuses features and gives short
    gradient paths with few parameters. 1x1 bottlenecks (B) and transitions that keep a
    `compression` fraction of the channels (C) make it DenseNet-BC.

    stem="imagenet": 7x7/2 conv, BN, ReLU, 3x3/2 max pool (torchvision). stem="cifar": one 3x3
    conv, no pool (the paper's CIFAR nets). `num_init_features` is the stem width; None means
    2 * growth_rate, the paper's choice and torchvision's for every preset (64 for k=32).
    Layers are named `block{b}_layer{l}` and `transition{b}` (1-based, as torchvision's
    `denseblock{b}.denselayer{l}` and `transition{b}`); the final BN is `final_bn` (torch `norm5`).
    """

    block_config: Sequence[int]
    growth_rate: int = 32
    num_init_features: int | None = None
    bn_size: int = 4
    compression: float = 0.5
    drop_rate: float = 0.0
    stem: str = "imagenet"
    num_classes: int = 1000
    act: str | Callable[[Array], Array] = "relu"
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv
    norm: Callable[..., nn.Module] = batch_norm
    # torchvision: kaiming_normal_ (fan_in) on convs, BN at 1/0, classifier bias 0.
    kernel_init: str | Callable[..., Array] = "kaiming_normal"

    def _check(self, x: Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"DenseNet expects NHWC input [N, H, W, C], got shape {x.shape}; "
                             "add the missing batch or channel axis.")
        if self.stem not in STEMS:
            raise ValueError(f"unknown DenseNet stem {self.stem!r}; choose 'imagenet' (7x7/2 conv "
                             "+ max pool) or 'cifar' (one 3x3 conv).")
        if not self.block_config or any(int(n) < 1 for n in self.block_config):
            raise ValueError("DenseNet block_config must be a non-empty list of positive layer "
                             f"counts, got {tuple(self.block_config)}.")
        if not 0.0 < self.compression <= 1.0:
            raise ValueError(f"DenseNet compression must be in (0, 1], got {self.compression}; "
                             "0.5 is DenseNet-BC, 1.0 keeps every channel.")

    def _stem(self, x: Array, conv: ModuleDef, norm: ModuleDef, act: Callable) -> Array:
        features = self.num_init_features
        features = 2 * self.growth_rate if features is None else features
        if self.stem == "cifar":
            return conv(features, (3, 3), padding=1, name="stem_conv")(x)
        x = conv(features, (7, 7), strides=(2, 2), padding=3, name="stem_conv")(x)
        x = norm_act(norm(name="stem_bn"), x, act)
        return max_pool(x, 3, 2, padding=1)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        self._check(x)
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                                 kernel_init=initializer(self.kernel_init))
        norm = functools.partial(self.norm, train, dtype=self.dtype)
        act = activation(self.act)
        x = self._stem(x, conv, norm, act)
        for b, num_layers in enumerate(self.block_config):
            for i in range(num_layers):
                keep = (i + 1) % GRADIENT_KEPT_EVERY == 0
                x = DenseLayer(self.growth_rate, self.bn_size, conv, norm, act, self.drop_rate,
                               keep, name=f"block{b + 1}_layer{i + 1}")(x, train)
            if b + 1 < len(self.block_config):
                features = math.floor(x.shape[-1] * self.compression)
                x = Transition(features, conv, norm, act, name=f"transition{b + 1}")(x)
        x = norm_act(norm(name="final_bn"), x, act)
        x = global_avg_pool(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=FC_INIT, name="fc")(x)


# --- presets -----------------------------------------------------------------------------------

DenseNet121 = functools.partial(DenseNet, block_config=(6, 12, 24, 16), growth_rate=32)
DenseNet169 = functools.partial(DenseNet, block_config=(6, 12, 32, 32), growth_rate=32)
DenseNet201 = functools.partial(DenseNet, block_config=(6, 12, 48, 32), growth_rate=32)
# L = 100: 3 blocks x 16 layers x 2 convs + stem conv + 2 transitions + fc.
DenseNetBC100 = functools.partial(DenseNet, block_config=(16, 16, 16), growth_rate=12,
                                  stem="cifar", num_classes=10)
