"""The train-state pytree (params, batch stats, optimizer state, step, RNG, EMA) and its creation."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cnnjax import distributed


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped.

    `step` counts train steps taken; it is also the data position, because the pipeline's batch for a
    step depends only on (seed, step). `rng` is a raw uint32 key (checkpoints store it as an array);
    each step folds the step number into it, so no key is ever threaded or split across steps.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None  # a copy of params averaged over steps; None when ema_decay is 0


def init_fn(
    model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...], use_ema: bool
):
    def init(rng: jax.Array) -> TrainState:
        params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
        dummy = jnp.zeros((1, *input_shape), jnp.float32)
        variables = model.init({"params": params_rng, "dropout": dropout_rng}, dummy, train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=state_rng,
            ema_params=params if use_ema else None,
        )

    return init


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    seed: int,
    input_shape: tuple[int, int, int],
    mesh: Mesh,
    use_ema: bool = False,
) -> TrainState:
    """Initialises the state on device, replicated over `mesh` (input_shape is one image, HWC)."""
    init = init_fn(model, tx, input_shape, use_ema)
    # Initialising inside jit places every leaf straight onto its replicated sharding.
    return jax.jit(init, out_shardings=distributed.replicated(mesh))(jax.random.PRNGKey(seed))


def abstract_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    input_shape: tuple[int, int, int],
    mesh: Mesh,
    use_ema: bool = False,
) -> TrainState:
    """Shapes, dtypes and target shardings of the state without computing it (for restoring)."""
    init = init_fn(model, tx, input_shape, use_ema)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    sharding = distributed.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
