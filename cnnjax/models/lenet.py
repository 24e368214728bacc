"""LeNet-5 (LeCun et al. 1998), the first convolutional network trained end to end by backprop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import layers

ModuleDef = Any

_POOLS: dict[str, Callable[..., jax.Array]] = {"avg": layers.avg_pool, "max": layers.max_pool}
MIN_INPUT = 32  # C5's 5x5 kernel needs S4 to be at least 5x5


class LeNet5(nn.Module):
    """LeNet-5 from "Gradient-Based Learning Applied to Document Recognition" (LeCun et al. 1998).

    Introduced the convolution -> subsampling -> nonlinearity pattern learned end to end:
    C1 6@5x5 -> S2 pool 2x2 -> C3 16@5x5 -> S4 pool 2x2 -> C5 120@5x5 -> F6 84 -> output, on
    32x32x1 inputs (pad 28x28 MNIST digits by 2). Two simplifications of the paper, as is usual:
    C3 connects to all 6 S2 maps (not the paper's sparse table), and S2/S4 are plain pools without
    the trainable coefficient and bias; the output is a dense layer, not the RBF units. 61,706
    parameters with 10 classes.
    """

    num_classes: int = 10
    act: str | Callable[[jax.Array], jax.Array] = "tanh"
    pool: str = "avg"
    dtype: Any = jnp.float32
    conv: ModuleDef = layers.Conv
    kernel_init: str | Callable[..., jax.Array] = "lecun_uniform"

    def __post_init__(self) -> None:
        if self.pool not in _POOLS:
            raise ValueError(f"LeNet5: unknown pool {self.pool!r}; use pool='avg' or pool='max'.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm in LeNet-5; kept for the shared model contract
        if x.ndim != 4 or min(x.shape[1:3]) < MIN_INPUT:
            raise ValueError(f"LeNet5 needs NHWC input of at least {MIN_INPUT}x{MIN_INPUT}, got "
                             f"shape {x.shape}; pad 28x28 digits by 2 pixels on each side.")
        act, pool = layers.activation(self.act), _POOLS[self.pool]
        init = layers.initializer(self.kernel_init)
        x = x.astype(self.dtype)
        for name, features in (("c1", 6), ("c3", 16)):
            x = self.conv(features, (5, 5), padding="VALID", dtype=self.dtype, kernel_init=init,
                          name=name)(x)
            x = pool(act(x), 2)
        x = self.conv(120, (5, 5), padding="VALID", dtype=self.dtype, kernel_init=init,
                      name="c5")(x)
        x = act(x)
        x = x.reshape(x.shape[0], -1)
        x = act(nn.Dense(84, dtype=self.dtype, kernel_init=init, name="f6")(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init, name="output")(x)
