"""Small configurable networks for the ablation studies, one design choice per constructor argument."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.layers import (
    Conv,
    activation,
    batch_norm,
    global_avg_pool,
    initializer,
    max_pool,
    norm_act,
)

Array = jax.Array
ModuleDef = Any

# Kernel sizes of each VGG-style unit; "3x3x2" and "5x5" see 5x5 pixels, "3x3x3" and "7x7" see 7x7.
RECEPTIVE_FIELD_UNITS: dict[str, tuple[int, ...]] = {
    "3x3x2": (3, 3),
    "5x5": (5,),
    "3x3x3": (3, 3, 3),
    "7x7": (7,),
}

# A deliberately too-large init for the activation study: sigmoid and tanh units saturate under it.
STUDY_INITIALIZERS: dict[str, Callable[..., Array]] = {
    "large_normal": nn.initializers.normal(1.0),
}

# GoogLeNet's inception 3a and 3b widths (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) / 4.
SMALL_INCEPTION: tuple[tuple[int, ...], ...] = ((16, 24, 32, 4, 8, 8), (32, 32, 48, 8, 24, 16))


def receptive_field(kernels: Sequence[int]) -> int:
    """Pixels one output of a stack of stride-1 convolutions sees: 1 + sum(k - 1)."""
    return 1 + sum(k - 1 for k in kernels)


def study_initializer(name: str | Callable[..., Array]) -> Callable[..., Array]:
    """`cnnjax.layers.initializer`, plus the study-only names in STUDY_INITIALIZERS."""
    if isinstance(name, str) and name.lower() in STUDY_INITIALIZERS:
        return STUDY_INITIALIZERS[name.lower()]
    return initializer(name)


def _check_images(x: Array, model: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{model} expects NHWC images [N, H, W, C], got shape {x.shape}; "
                         "add the missing batch or channel axis.")


def _bound_parts(module: nn.Module, train: bool, norm: Callable[..., nn.Module] | None
                 ) -> tuple[ModuleDef, ModuleDef | None, Callable[[Array], Array]]:
    """conv, norm and act bound to the module's dtype, init and train mode (norm None: no norm).

    Without a norm the convolutions get a bias, as they would in a plain VGG.
    """
    conv = functools.partial(module.conv, use_bias=norm is None, dtype=module.dtype,
                             kernel_init=study_initializer(module.kernel_init))
    bound_norm = None if norm is None else functools.partial(norm, train, dtype=module.dtype)
    return conv, bound_norm, activation(module.act)


# --- building blocks ---------------------------------------------------------------------------


class ConvNormAct(nn.Module):
    """kxk convolution ('SAME' size at stride 1), optional norm, activation: the unit of every net here.

    `conv` and `norm` come in bound to dtype, init and train mode; `shortcut`, when given, is added
    before the activation (ResNet v1's post-activation residual).
    """

    features: int
    kernel: int
    conv: ModuleDef
    norm: ModuleDef | None
    act: Callable[[Array], Array]
    strides: int = 1

    @nn.compact
    def __call__(self, x: Array, shortcut: Array | None = None) -> Array:
        k = self.kernel
        x = self.conv(self.features, (k, k), strides=self.strides, padding=k // 2, name="conv")(x)
        if self.norm is not None:
            return norm_act(self.norm(name="bn"), x, self.act, shortcut)
        return self.act(x if shortcut is None else x + shortcut)


class StackedConv(nn.Module):
    """Stride-1 convolutions of the given kernel sizes at constant width (VGG's stacked units)."""

    features: int
    conv: ModuleDef
    norm: ModuleDef | None
    act: Callable[[Array], Array]
    kernels: Sequence[int] = (3, 3)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i, k in enumerate(self.kernels):
            x = ConvNormAct(self.features, k, self.conv, self.norm, self.act, name=f"conv{i}")(x)
        return x


PlainConv = functools.partial(StackedConv, kernels=(3,))


class BottleneckConv(nn.Module):
    """A 3x3 CxC convolution made cheap: 1x1 down to `reduced` channels, then 3x3 back up to C.

    At C = 128, reduced = 32: 128*32 + 9*32*128 = 40,960 weights against 147,456 for PlainConv.
    `reduced` None means features // 4.
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef | None
    act: Callable[[Array], Array]
    reduced: int | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        reduced = self.features // 4 if self.reduced is None else self.reduced
        if not 0 < reduced:
            raise ValueError(f"BottleneckConv needs reduced >= 1 channels, got {reduced}; "
                             "pass reduced= or use more features.")
        x = ConvNormAct(reduced, 1, self.conv, self.norm, self.act, name="reduce")(x)
        return ConvNormAct(self.features, 3, self.conv, self.norm, self.act, name="conv")(x)


class InceptionBlock(nn.Module):
    """GoogLeNet's module: 1x1 | [1x1 reduce ->] 3x3 | [1x1 reduce ->] 5x5 | 3x3 max pool [-> 1x1].

    reduce=False drops the 1x1 reductions in front of the 3x3 and 5x5 convolutions (they then read
    all input channels); pool_projection=False drops the 1x1 after the pool, so the pool branch
    passes every input channel through. reduce=False, pool_projection=False is the paper's naive
    module (Szegedy 2014, fig. 2a). `widths` is one row of GoogLeNet's Table 1; the reduce entries
    are ignored without reductions. Call as block(x, train).
    """

    widths: Sequence[int]
    reduce: bool = True
    pool_projection: bool = True
    act: str | Callable[[Array], Array] = "relu"
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv
    norm: Callable[..., nn.Module] | None = batch_norm
    kernel_init: str | Callable[..., Array] = "he_normal"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if len(self.widths) != 6:
            raise ValueError(f"InceptionBlock widths need 6 entries (#1x1, #3x3 reduce, #3x3, "
                             f"#5x5 reduce, #5x5, pool proj), got {tuple(self.widths)}.")
        c1, r3, c3, r5, c5, proj = self.widths
        unit = functools.partial(ConvNormAct, **_unit_parts(self, train))
        b1 = unit(c1, 1, name="branch1")(x)
        b2 = unit(r3, 1, name="branch2_reduce")(x) if self.reduce else x
        b2 = unit(c3, 3, name="branch2")(b2)
        b3 = unit(r5, 1, name="branch3_reduce")(x) if self.reduce else x
        b3 = unit(c5, 5, name="branch3")(b3)
        b4 = max_pool(x, 3, 1, padding=1)
        if self.pool_projection:
            b4 = unit(proj, 1, name="branch4_proj")(b4)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


def _unit_parts(module: nn.Module, train: bool) -> dict[str, Any]:
    conv, norm, act = _bound_parts(module, train, module.norm)
    return dict(conv=conv, norm=norm, act=act)


# --- networks ----------------------------------------------------------------------------------


def _unit_body(x: Array, unit: ModuleDef, *, width: int, stage_sizes: Sequence[int],
               parts: dict[str, Any]) -> Array:
    """3x3 stem to `width`, then stages of units at that width with a 2x2 max pool between stages.

    Units are named `stage{i}_{j}` (1-based stage), so unit weights can be read off by prefix.
    """
    if not stage_sizes or any(int(n) < 1 for n in stage_sizes):
        raise ValueError(f"stage_sizes must be a non-empty list of positive unit counts, "
                         f"got {tuple(stage_sizes)}.")
    x = ConvNormAct(width, 3, name="stem", **parts)(x)
    for i, num_units in enumerate(stage_sizes):
        if i > 0:
            x = max_pool(x, 2)
        for j in range(num_units):
            x = unit(width, name=f"stage{i + 1}_{j}", **parts)(x)
    return x


def _classifier(x: Array, num_classes: int, dtype: Any, kernel_init: Callable[..., Array]) -> Array:
    x = global_avg_pool(x)
    return nn.Dense(num_classes, dtype=dtype, kernel_init=kernel_init, name="head")(x)


class ReceptiveFieldNet(nn.Module):
    """VGG-style net whose units are two 3x3 vs one 5x5, or three 3x3 vs one 7x7 (same receptive field).

    Simonyan & Zisserman 2014, sec. 2.3: the stacks see as much, have more non-linearities and
    fewer weights: at 128 channels (no bias) 294,912 vs 409,600 and 442,368 vs 802,816 per unit.
    Layout: 3x3 stem to `width`, `stage_sizes` units per stage at constant width with 2x2 max pools
    between stages, global average pool, dense head.
    """

    unit: str = "3x3x2"
    num_classes: int = 10
    width: int = 128
    stage_sizes: Sequence[int] = (1, 1, 1)
    act: str | Callable[[Array], Array] = "relu"
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv
    norm: Callable[..., nn.Module] | None = batch_norm
    kernel_init: str | Callable[..., Array] = "he_normal"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_images(x, "ReceptiveFieldNet")
        if self.unit not in RECEPTIVE_FIELD_UNITS:
            raise ValueError(f"unknown receptive-field unit {self.unit!r}; choose one of "
                             f"{', '.join(RECEPTIVE_FIELD_UNITS)}.")
        unit = functools.partial(StackedConv, kernels=RECEPTIVE_FIELD_UNITS[self.unit])
        x = _unit_body(x.astype(self.dtype), unit, width=self.width, stage_sizes=self.stage_sizes,
                       parts=_unit_parts(self, train))
        return _classifier(x, self.num_classes, self.dtype, study_initializer(self.kernel_init))


class BottleneckNet(nn.Module):
    """The same VGG-style net with plain 3x3 CxC units or 1x1-reduced ones (`BottleneckConv`).

    bottleneck=False: every unit is a 3x3 convolution at `width` channels; bottleneck=True: a 1x1
    down to `reduced` (default width // 4), then a 3x3 back to `width`.
    """

    bottleneck: bool = True
    num_classes: int = 10
    width: int = 128
    reduced: int | None = None
    stage_sizes: Sequence[int] = (1, 1, 1)
    act: str | Callable[[Array], Array] = "relu"
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv
    norm: Callable[..., nn.Module] | None = batch_norm
    kernel_init: str | Callable[..., Array] = "he_normal"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_images(x, "BottleneckNet")
        unit = functools.partial(BottleneckConv, reduced=self.reduced) if self.bottleneck else PlainConv
        x = _unit_body(x.astype(self.dtype), unit, width=self.width, stage_sizes=self.stage_sizes,
                       parts=_unit_parts(self, train))
        return _classifier(x, self.num_classes, self.dtype, study_initializer(self.kernel_init))


class InceptionNet(nn.Module):
    """A small GoogLeNet: 3x3 stem, one InceptionBlock per row of `blocks` with 2x2 max pools
    between them, global average pool, dense head. `reduce` / `pool_projection` go to every block.
    """

    reduce: bool = True
    pool_projection: bool = True
    num_classes: int = 10
    stem_width: int = 32
    blocks: Sequence[Sequence[int]] = SMALL_INCEPTION
    act: str | Callable[[Array], Array] = "relu"
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv
    norm: Callable[..., nn.Module] | None = batch_norm
    kernel_init: str | Callable[..., Array] = "he_normal"
    block_cls: ModuleDef = InceptionBlock

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_images(x, "InceptionNet")
        x = ConvNormAct(self.stem_width, 3, name="stem", **_unit_parts(self, train))(
            x.astype(self.dtype))
        for i, widths in enumerate(self.blocks):
            if i > 0:
                x = max_pool(x, 2)
            x = self.block_cls(widths=tuple(widths), reduce=self.reduce,
                               pool_projection=self.pool_projection, act=self.act,
                               dtype=self.dtype, conv=self.conv, norm=self.norm,
                               kernel_init=self.kernel_init, name=f"inception{i + 1}")(x, train)
        return _classifier(x, self.num_classes, self.dtype, study_initializer(self.kernel_init))


class PlainNet(nn.Module):
    """A deep CNN at constant width and resolution, with or without identity skip connections.

    3x3 stem to `width`, then `depth` layers named layer1..layer{depth}, each 3x3 conv, [norm],
    act; global average pool; dense `head`. residual=True adds the input of every pair of layers
    to the second one's output before its activation (He et al. 2016, basic block): identity
    shortcuts, so both variants have exactly the same parameters. Every weight, the head's
    included, uses `kernel_init` (by name: "zeros", "small_normal", "xavier_normal", "he_normal",
    "large_normal", ... or a callable), which is what the initialisation study varies. Without
    norm the convolutions carry a (zero-initialised) bias.
    """

    depth: int = 20
    residual: bool = False
    act: str | Callable[[Array], Array] = "relu"
    kernel_init: str | Callable[..., Array] = "he_normal"
    norm: bool = True
    num_classes: int = 10
    width: int = 16
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv
    norm_layer: Callable[..., nn.Module] = batch_norm

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_images(x, "PlainNet")
        if self.depth < 1 or (self.residual and self.depth % 2):
            raise ValueError(f"PlainNet depth must be >= 1, and even with residual=True (skips "
                             f"span pairs of layers), got depth={self.depth}.")
        conv, norm, act = _bound_parts(self, train, self.norm_layer if self.norm else None)
        layer = functools.partial(ConvNormAct, self.width, 3, conv, norm, act)
        x = layer(name="stem")(x.astype(self.dtype))
        block_input = x
        for i in range(1, self.depth + 1):
            closes_block = self.residual and i % 2 == 0
            x = layer(name=f"layer{i}")(x, block_input if closes_block else None)
            if i % 2 == 0:
                block_input = x
        return _classifier(x, self.num_classes, self.dtype, study_initializer(self.kernel_init))
