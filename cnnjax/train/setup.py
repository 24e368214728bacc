"""`RunSetup`: the pieces one run is built from (mesh, pipeline, model, fine-tuning plan, optimizer,
compiled steps), validated before anything is written to the workdir, and the run's first state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cnnjax import distributed, finetune, xla_options
from cnnjax.data import build_pipeline
from cnnjax.models import get_spec
from cnnjax.train import checkpoint
from cnnjax.train.state import (
    abstract_train_state,
    count_params,
    create_train_state,
    host_copy,
    read_checkpoint_variables,
    start_from_variables,
)
from cnnjax.train.step import compile_steps

PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def resolve_precision(name: str) -> Any:
    """Compute dtype for config.precision ("auto": bf16 on gpu/tpu, fp32 on cpu)."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in PRECISIONS:
        raise ValueError(f"config.precision must be auto, fp32 or bf16, got {name!r}")
    return PRECISIONS[name]


class RunSetup:
    """The pieces one run is built from, validated before anything is written to the workdir."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.mesh = distributed.make_mesh()
        self.dtype = resolve_precision(config.precision)
        spec = get_spec(config.model.name)
        image_size = config.model.image_size or spec.input_size
        channels = config.model.in_channels or spec.in_channels
        if config.batch_size % jax.device_count():
            raise ValueError(
                f"batch_size {config.batch_size} is not divisible by the "
                f"{jax.device_count()} devices; pick a multiple of {jax.device_count()}"
            )
        self.pipeline = build_pipeline(
            config.data,
            image_size=image_size,
            channels=channels,
            global_batch_size=config.batch_size,
            mesh=self.mesh,
            seed=config.seed,
        )
        if self.pipeline.steps_per_epoch < 1:
            raise ValueError(
                f"batch_size {config.batch_size} exceeds the {self.pipeline.num_train} "
                "training examples; lower batch_size"
            )
        self.num_classes = self.pipeline.num_classes
        self.finetune = finetune.resolve_config(config)
        self.model = finetune.build_model(
            config.model.name,
            self.num_classes,
            self.finetune,
            dtype=self.dtype,
            **config.model.kwargs.to_dict(),
        )
        self.steps_per_epoch = self.pipeline.steps_per_epoch
        self.total_steps = config.num_epochs * self.steps_per_epoch
        if config.num_train_steps > 0:
            self.total_steps = min(self.total_steps, config.num_train_steps)
        self.input_shape = tuple(self.pipeline.image_shape)
        # Frozen parameters and LR groups shape the optimizer state, so they come first.
        self.plan = finetune.make_plan(self.finetune, self.model, self.input_shape)
        self.tx, self.schedule = finetune.make_optimizer(
            config.optimizer,
            self.plan,
            steps_per_epoch=self.steps_per_epoch,
            num_epochs=config.num_epochs,
        )
        self.use_ema = config.optimizer.ema_decay > 0
        self.abstract_state = abstract_train_state(
            self.model, self.tx, input_shape=self.input_shape, mesh=self.mesh, use_ema=self.use_ema
        )
        self.train_fn, self.eval_fn = compile_steps(
            self.mesh,
            compiler_options=xla_options.step_options(
                self.mesh, count_params(self.abstract_state.params)),
            model=self.model,
            tx=self.tx,
            schedule=self.schedule,
            loss_cfg=config.loss,
            num_classes=self.num_classes,
            ema_decay=float(config.optimizer.ema_decay),
            accumulate_steps=int(config.optimizer.accumulate_steps),
            frozen=self.plan.frozen,
            frozen_stats=self.plan.frozen_stats,
            running_bn=self.plan.running_bn,
        )
        if config.best_metric not in checkpoint.BEST_METRICS:
            raise ValueError(
                f"config.best_metric {config.best_metric!r} is not one of "
                f"{', '.join(checkpoint.BEST_METRICS)}"
            )
        for name in ("log_every_steps", "eval_every_epochs"):
            if config[name] < 1:
                raise ValueError(f"config.{name} must be >= 1, got {config[name]}")

    def initial_state(self, config: ml_collections.ConfigDict, manager) -> Any:
        """The latest checkpoint in the workdir, else a fresh state (optionally from init_from)."""
        state = checkpoint.restore_latest(manager, self.abstract_state)
        if state is not None:
            return state
        state = create_train_state(
            self.model,
            self.tx,
            seed=config.seed,
            input_shape=self.input_shape,
            mesh=self.mesh,
            use_ema=self.use_ema,
        )
        if config.init_from:
            fresh = host_copy({"params": state.params, "batch_stats": state.batch_stats})
            source = read_checkpoint_variables(config.init_from)
            variables, loaded = finetune.merge_variables(source, fresh, self.finetune)
            state = start_from_variables(state, variables, self.tx, self.mesh, self.use_ema)
            if distributed.is_primary():
                print("\n".join(loaded.lines(config.init_from)))
        return state
