"""VGG (Simonyan & Zisserman 2014): configs A, B, D, E of stacked 3x3 convs, with or without BN."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import layers

ModuleDef = Any

# Table 1 of the paper: conv widths in order, "M" = 2x2 max pool. A/B/D/E are VGG11/13/16/19.
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"),
}
MIN_INPUT = 32  # five 2x2 pools leave a 1x1 map


def _scaled(channels: int, multiplier: float) -> int:
    return max(1, round(channels * multiplier))


class VGG(nn.Module):
    """VGG, "Very Deep Convolutional Networks for Large-Scale Image Recognition" (Simonyan 2014).

    Showed that depth built from small 3x3 convolutions (two 3x3 see what one 5x5 sees, with fewer
    parameters and one more nonlinearity) beats wide shallow filters. `cfg` is a CONFIGS key or a
    sequence of widths and "M"; batch_norm=True inserts BN after every conv (torchvision's *_bn,
    conv bias kept). The 7x7 adaptive average pool makes any input >= 32 px work: smaller maps are
    repeated up to 7x7, as torch does. Layers are named conv{block}_{i} as in the paper.
    """

    cfg: str | Sequence[int | str]
    batch_norm: bool = False
    num_classes: int = 1000
    width_multiplier: float = 1.0
    hidden: int = 4096
    dropout_rate: float = 0.5
    act: str | Callable[[jax.Array], jax.Array] = "relu"
    dtype: Any = jnp.float32
    conv: ModuleDef = layers.Conv
    norm: Callable[..., nn.Module] = layers.batch_norm
    kernel_init: str | Callable[..., jax.Array] = "he_normal_fan_out"
    dense_init: str | Callable[..., jax.Array] = "normal_0.01"

    def __post_init__(self) -> None:
        if isinstance(self.cfg, str) and self.cfg not in CONFIGS:
            raise ValueError(f"VGG: unknown cfg {self.cfg!r}; use one of {sorted(CONFIGS)} "
                             "or a sequence of conv widths and 'M'.")
        if self.width_multiplier <= 0:
            raise ValueError(f"VGG: width_multiplier must be > 0, got {self.width_multiplier}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4 or min(x.shape[1:3]) < MIN_INPUT:
            raise ValueError(f"VGG needs NHWC input of at least {MIN_INPUT}x{MIN_INPUT}, "
                             f"got shape {x.shape}; resize the images (224 is the default).")
        cfg = CONFIGS[self.cfg] if isinstance(self.cfg, str) else self.cfg
        act, init = layers.activation(self.act), layers.initializer(self.kernel_init)
        x = x.astype(self.dtype)
        block, index = 1, 1
        for item in cfg:
            if item == "M":
                x = layers.max_pool(x, 2)
                block, index = block + 1, 1
                continue
            name = f"{block}_{index}"
            x = self.conv(_scaled(item, self.width_multiplier), (3, 3), padding=1, dtype=self.dtype,
                          kernel_init=init, name=f"conv{name}")(x)
            if self.batch_norm:
                x = self.norm(train, dtype=self.dtype, name=f"bn{name}")(x)
            x = act(x)
            index += 1
        x = layers.adaptive_avg_pool(x, 7)
        return self._classifier(x.reshape(x.shape[0], -1), train)

    def _classifier(self, x: jax.Array, train: bool) -> jax.Array:
        # torchvision order: fc, relu, dropout, fc, relu, dropout, fc.
        act, init = layers.activation(self.act), layers.initializer(self.dense_init)
        for i in (1, 2):
            x = act(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=init, name=f"fc{i}")(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init, name="fc3")(x)


VGG11 = functools.partial(VGG, cfg="A")
VGG13 = functools.partial(VGG, cfg="B")
VGG16 = functools.partial(VGG, cfg="D")
VGG19 = functools.partial(VGG, cfg="E")
VGG11_BN = functools.partial(VGG, cfg="A", batch_norm=True)
VGG13_BN = functools.partial(VGG, cfg="B", batch_norm=True)
VGG16_BN = functools.partial(VGG, cfg="D", batch_norm=True)
VGG19_BN = functools.partial(VGG, cfg="E", batch_norm=True)
