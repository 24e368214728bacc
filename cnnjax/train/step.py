"""The pure train and eval step functions and their sharded jit compilation."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from cnnjax import distributed, finetune, xla_options
from cnnjax.train import losses, optim
from cnnjax.train.state import TrainState

Batch = dict[str, jax.Array]
AUX_LOSS_WEIGHT = 0.3  # Szegedy et al. 2014, section 5


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_cfg: ml_collections.ConfigDict,
    num_classes: int,
    ema_decay: float = 0.0,
    accumulate_steps: int = 1,
    frozen: Any = None,
    frozen_stats: Any = None,
    running_bn: frozenset[str] = frozenset(),
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on one global batch; returns the new state and scalar metrics.

    `frozen` / `frozen_stats` (trees of Python bools, finetune.Plan) name the parameters that do not
    train and the batch statistics that stay; both come back bit-identical. The BatchNorm layers
    named in `running_bn` normalise with their running statistics (finetune.frozen_bn="running").
    """
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        if frozen is not None:  # no gradient: XLA can skip the frozen layers' backward pass
            params = finetune.stop_frozen_gradients(params, frozen)
        variables = {"params": params, "batch_stats": state.batch_stats}
        with finetune.running_stats_bn(running_bn):
            logits, new_vars = model.apply(
                variables,
                batch["image"],
                train=True,
                rngs={"dropout": dropout_rng},
                mutable=["batch_stats", "intermediates"],
            )
        logits = logits.astype(jnp.float32)
        loss = losses.compute_loss(
            loss_cfg, logits, batch["label"], num_classes, batch.get("target")
        )
        # Auxiliary classifiers (GoogLeNet's aux_logits=True) sow their logits; the paper adds
        # their losses with weight 0.3. Models without aux heads sow nothing.
        for aux in jax.tree.leaves(new_vars.get("intermediates", {}).get("aux_logits", ())):
            loss = loss + AUX_LOSS_WEIGHT * losses.compute_loss(
                loss_cfg, aux.astype(jnp.float32), batch["label"], num_classes, batch.get("target")
            )
        return loss, (logits, new_vars.get("batch_stats", state.batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if frozen is not None:  # p + 0 would turn -0.0 into 0.0; keep the very same values
        params = finetune.keep_frozen(params, state.params, frozen)
    if frozen_stats is not None:
        batch_stats = finetune.keep_frozen(batch_stats, state.batch_stats, frozen_stats)
    ema_params = state.ema_params
    if ema_params is not None:
        ema_params = optim.ema_update(ema_params, params, ema_decay)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema_params,
    )
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        # With accumulation the schedule advances once per optimizer update, not per micro-batch.
        "learning_rate": jnp.asarray(schedule(state.step // accumulate_steps), jnp.float32),
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
        "update_norm": optax.global_norm(updates),
    }
    return new_state, metrics


def eval_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    loss_cfg: ml_collections.ConfigDict,
    num_classes: int,
    use_ema: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Softmax probabilities [B, C], per-example losses [B] (fp32), labels and mask of one eval batch."""
    params = state.ema_params if use_ema else state.params
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    per_example = losses.per_example_loss(loss_cfg, logits, batch["label"], num_classes)
    return jax.nn.softmax(logits, axis=-1), per_example, batch["label"], batch["mask"]


def compile_steps(mesh: Mesh, *, compiler_options: dict[str, str] | None = None,
                  **kwargs: Any) -> tuple[Callable, Callable]:
    """Jitted (train_step, eval_step): state replicated, batch split over "data", state donated.

    kwargs are train_step's keyword arguments; eval_step takes the ones it needs.
    compiler_options: XLA options for both, e.g. `cnnjax.xla_options.step_options(...)`.
    """
    replicated = distributed.replicated(mesh)
    batch = distributed.batch_sharded(mesh)
    train = jax.jit(
        xla_options.traced_for(functools.partial(train_step, **kwargs), compiler_options or {}),
        in_shardings=(replicated, batch),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=compiler_options,
    )
    eval_kwargs = {k: kwargs[k] for k in ("model", "loss_cfg", "num_classes")}
    use_ema = kwargs.get("ema_decay", 0.0) > 0
    # Outputs replicated so every process can read all predictions without a separate gather.
    evaluate = jax.jit(
        functools.partial(eval_step, use_ema=use_ema, **eval_kwargs),
        in_shardings=(replicated, batch),
        out_shardings=replicated,
        compiler_options=compiler_options,
    )
    return train, evaluate
