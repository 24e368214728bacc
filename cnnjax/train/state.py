"""The train-state pytree (params, batch stats, optimizer state, step, RNG, EMA) and how a run starts it."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding

from cnnjax import distributed, xla_options
from cnnjax.train import init_batching


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


def jit_init(init: Callable[..., Any], out_shardings: NamedSharding | None = None) -> Callable[..., Any]:
    """`init` jitted for a quick compile with the same values: on CPU with its random draws batched
    (`init_batching`) and at LLVM -O1 (`xla_options.init_options`)."""
    platform = (out_shardings.mesh.devices.flat[0].platform if out_shardings is not None
                else jax.default_backend())
    if platform == "cpu" and init_batching.enabled():
        init = init_batching.batch_random(init)
    return jax.jit(init, out_shardings=out_shardings,
                   compiler_options=xla_options.init_options(platform))


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
    return jit_init(init, distributed.replicated(mesh))(jax.random.PRNGKey(seed))


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


def read_checkpoint_variables(directory: str) -> dict[str, Any]:
    """{params, batch_stats} of the latest checkpoint under `directory` as host numpy arrays, at the
    shapes the checkpoint holds (not the model's): fine-tuning decides what fits.

    Reads a cnnjax run's checkpoints/ (only those two entries of its TrainState) or a converted
    torchvision/timm checkpoint (`python -m cnnjax.pretrained convert`).
    """
    if not os.path.isdir(directory):
        raise ValueError(
            f"init_from directory {directory!r} does not exist; give a run's checkpoints/ directory "
            "or the output of `python -m cnnjax.pretrained convert`"
        )
    manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers=ocp.PyTreeCheckpointHandler(),
    )
    try:
        step = manager.latest_step()
        if step is None:
            raise ValueError(f"init_from directory {directory!r} holds no checkpoint")
        tree = manager.item_metadata(step).tree
        target = {k: tree[k] for k in ("params", "batch_stats") if jax.tree.leaves(tree.get(k, {}))}
        if "params" not in target:
            raise ValueError(f"init_from checkpoint {directory!r} holds no params")
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), target)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        return {"batch_stats": {}, **manager.restore(step, args=args)}
    finally:
        manager.close()


def host_copy(tree: Any) -> Any:
    """Numpy copies of replicated arrays (each process reads its own local copy)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def start_from_variables(
    state: TrainState,
    variables: dict[str, Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    use_ema: bool = False,
) -> TrainState:
    """`state` (step 0) with host `variables` as its params and batch stats, a fresh optimizer
    state for them, and the EMA starting there; replicated over `mesh`."""
    sharding = distributed.replicated(mesh)
    variables = jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index]), variables
    )

    def start(state: TrainState, params: Any, batch_stats: Any) -> TrainState:
        return state.replace(
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            ema_params=params if use_ema else None,
        )

    return jax.jit(start, out_shardings=sharding)(
        state, variables["params"], variables["batch_stats"]
    )
