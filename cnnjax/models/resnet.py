"""ResNet: ImageNet nets in torchvision's layout and the CIFAR nets of He et al. 2016 (sec. 4.2)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.layers import (
    Conv,
    activation,
    batch_norm,
    conv_and_input,
    global_avg_pool,
    initializer,
    max_pool,
    norm_act,
)

Array = jax.Array
ModuleDef = Any
SHORTCUTS = ("A", "B")

# torch.nn.Linear's default weight init, U(+-1/sqrt(fan_in)); torchvision keeps it for the fc.
FC_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# --- shortcuts ---------------------------------------------------------------------------------


def pad_shortcut(x: Array, out_channels: int, strides: int = 1) -> Array:
    """Option A shortcut (He 2016, sec. 4.2): identity subsampled by `strides`, new channels zero.

    Parameter-free, so a CIFAR ResNet has exactly as many parameters as its plain counterpart.
    """
    extra = out_channels - x.shape[-1]
    if extra < 0:
        raise ValueError(
            f"option A shortcut cannot shrink channels ({x.shape[-1]} -> {out_channels}); "
            "use shortcut='B' (1x1 projection) for that."
        )
    x = x[:, ::strides, ::strides, :]
    return jnp.pad(x, [(0, 0), (0, 0), (0, 0), (0, extra)])


def residual_shortcut(x: Array, out_channels: int, strides: int, kind: str, conv: ModuleDef,
                      norm: ModuleDef) -> Array:
    """Identity when the shape is kept; otherwise option A (zero pad) or B (1x1 conv + BN).

    Called from inside a block's compact method, so the projection is named `downsample_conv` /
    `downsample_bn` in that block (torchvision's `downsample.0` / `downsample.1`).
    """
    if strides == 1 and x.shape[-1] == out_channels:
        return x
    if kind == "A":
        return pad_shortcut(x, out_channels, strides)
    s = (strides, strides)
    y = conv(out_channels, (1, 1), strides=s, padding="VALID", name="downsample_conv")(x)
    return norm(name="downsample_bn")(y)


def _last_norm_kwargs(zero_init_residual: bool) -> dict[str, Any]:
    # Zero gamma on a block's last BN makes the block start as its shortcut (Goyal et al. 2017).
    return {"scale_init": nn.initializers.zeros} if zero_init_residual else {}


# --- blocks ------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut around them (He 2016, fig. 2): ResNet-18/34 and CIFAR.

    `conv` and `norm` come in bound to dtype, init and train mode; `norm(name=...)` builds one.
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array] = nn.relu
    strides: int = 1
    shortcut: str = "B"
    skip_connection: bool = True
    zero_init_residual: bool = False
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = (self.strides, self.strides)
        y, x = conv_and_input(self.conv(self.filters, (3, 3), strides=s, padding=1, name="conv1"), x)
        y = norm_act(self.norm(name="bn1"), y, self.act)
        y = self.conv(self.filters, (3, 3), padding=1, name="conv2")(y)
        bn2 = self.norm(name="bn2", **_last_norm_kwargs(self.zero_init_residual))
        shortcut = (residual_shortcut(x, self.filters, self.strides, self.shortcut, self.conv,
                                      self.norm) if self.skip_connection else None)
        return norm_act(bn2, y, self.act, shortcut)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a shortcut (He 2016, fig. 5 right): ResNet-50/101/152.

    ResNet v1.5 as in torchvision: the stride sits on the 3x3 convolution, not on the first 1x1,
    so no activations are skipped when downsampling.
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array] = nn.relu
    strides: int = 1
    shortcut: str = "B"
    skip_connection: bool = True
    zero_init_residual: bool = False
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out = self.filters * self.expansion
        y = self.conv(self.filters, (1, 1), padding="VALID", name="conv1")(x)
        y = norm_act(self.norm(name="bn1"), y, self.act)
        s = (self.strides, self.strides)
        y = self.conv(self.filters, (3, 3), strides=s, padding=1, name="conv2")(y)
        y = norm_act(self.norm(name="bn2"), y, self.act)
        y = self.conv(out, (1, 1), padding="VALID", name="conv3")(y)
        bn3 = self.norm(name="bn3", **_last_norm_kwargs(self.zero_init_residual))
        shortcut = (residual_shortcut(x, out, self.strides, self.shortcut, self.conv, self.norm)
                    if self.skip_connection else None)
        return norm_act(bn3, y, self.act, shortcut)


# --- shared model plumbing ---------------------------------------------------------------------


def _check(x: Array, model: str, stage_sizes: Sequence[int], shortcut_kind: str,
           skip_connections: bool, zero_init_residual: bool) -> None:
    if x.ndim != 4:
        raise ValueError(f"{model} expects NHWC input [N, H, W, C], got shape {x.shape}; "
                         "add the missing batch or channel axis.")
    if not stage_sizes or any(int(n) < 1 for n in stage_sizes):
        raise ValueError(f"{model} stage_sizes must be a non-empty list of positive block counts, "
                         f"got {tuple(stage_sizes)}.")
    if shortcut_kind not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut_kind!r}; choose 'A' (zero-pad identity) or "
                         "'B' (1x1 projection when the shape changes).")
    if zero_init_residual and not skip_connections:
        raise ValueError("zero_init_residual=True needs skip_connections=True: without the "
                         "shortcut every block would output zeros.")


def _parts(module: nn.Module, train: bool) -> tuple[ModuleDef, ModuleDef, Callable[[Array], Array]]:
    """The conv, norm and activation every block of `module` shares, bound to dtype/init/train."""
    conv = functools.partial(module.conv, use_bias=False, dtype=module.dtype,
                             kernel_init=initializer(module.kernel_init))
    norm = functools.partial(module.norm, train, dtype=module.dtype)
    return conv, norm, activation(module.act)


def _stages(x: Array, *, stage_sizes: Sequence[int], block_cls: ModuleDef, width: int,
            **block_kwargs: Any) -> Array:
    """Stage i has width * 2**i filters; its first block halves the resolution (except stage 1).

    Blocks are named `layer{i}_{j}` to mirror torchvision's `layer{i}.{j}`.
    """
    for i, num_blocks in enumerate(stage_sizes):
        for j in range(num_blocks):
            strides = 2 if i > 0 and j == 0 else 1
            x = block_cls(filters=width * 2**i, strides=strides, name=f"layer{i + 1}_{j}",
                          **block_kwargs)(x)
    return x


def _head(x: Array, num_classes: int, dtype: Any) -> Array:
    x = global_avg_pool(x)
    return nn.Dense(num_classes, dtype=dtype, kernel_init=FC_INIT, name="fc")(x)


# --- models ------------------------------------------------------------------------------------


class ResNet(nn.Module):
    """ImageNet ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition").

    Introduced identity shortcuts so a block learns a residual F(x) + x, which made 100+ layer nets
    trainable. Layout matches torchvision: 7x7/2 stem, BN, ReLU, 3x3/2 max pool, four stages,
    projection (option B) shortcuts where the shape changes, global average pool, fc.
    `skip_connections=False` builds the same net without shortcuts (the paper's plain baseline).
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int = 1000
    width: int = 64
    skip_connections: bool = True
    zero_init_residual: bool = False
    act: str | Callable[[Array], Array] = "relu"
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv
    norm: Callable[..., nn.Module] = batch_norm
    kernel_init: str | Callable[..., Array] = "he_normal_fan_out"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check(x, "ResNet", self.stage_sizes, "B", self.skip_connections, self.zero_init_residual)
        conv, norm, act = _parts(self, train)
        x = conv(self.width, (7, 7), strides=(2, 2), padding=3, name="stem_conv")(x)
        x = norm_act(norm(name="stem_bn"), x, act)
        x = max_pool(x, 3, 2, padding=1)
        x = _stages(x, stage_sizes=self.stage_sizes, block_cls=self.block_cls, width=self.width,
                    conv=conv, norm=norm, act=act, shortcut="B",
                    skip_connection=self.skip_connections,
                    zero_init_residual=self.zero_init_residual)
        return _head(x, self.num_classes, self.dtype)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) (He et al. 2016, section 4.2).

    3x3 conv with `width` filters, three stages of n blocks at width, 2*width, 4*width on 32, 16, 8
    pixels, global average pool, fc. The default option A shortcuts are parameter-free (subsample,
    zero-pad the new channels), so the plain and residual nets have identical parameters.
    """

    stage_sizes: Sequence[int] = (3, 3, 3)
    num_classes: int = 10
    width: int = 16
    shortcut: str = "A"
    skip_connections: bool = True
    zero_init_residual: bool = False
    block_cls: ModuleDef = BasicBlock
    act: str | Callable[[Array], Array] = "relu"
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv
    norm: Callable[..., nn.Module] = batch_norm
    kernel_init: str | Callable[..., Array] = "he_normal_fan_out"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check(x, "CifarResNet", self.stage_sizes, self.shortcut, self.skip_connections,
               self.zero_init_residual)
        conv, norm, act = _parts(self, train)
        x = conv(self.width, (3, 3), padding=1, name="stem_conv")(x)
        x = norm_act(norm(name="stem_bn"), x, act)
        x = _stages(x, stage_sizes=self.stage_sizes, block_cls=self.block_cls, width=self.width,
                    conv=conv, norm=norm, act=act, shortcut=self.shortcut,
                    skip_connection=self.skip_connections,
                    zero_init_residual=self.zero_init_residual)
        return _head(x, self.num_classes, self.dtype)


# --- presets -----------------------------------------------------------------------------------

ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=BottleneckBlock)

ResNet20 = functools.partial(CifarResNet, stage_sizes=(3, 3, 3))
ResNet32 = functools.partial(CifarResNet, stage_sizes=(5, 5, 5))
ResNet44 = functools.partial(CifarResNet, stage_sizes=(7, 7, 7))
ResNet56 = functools.partial(CifarResNet, stage_sizes=(9, 9, 9))
ResNet110 = functools.partial(CifarResNet, stage_sizes=(18, 18, 18))
