"""K seeds (or K learning rates) of one small model trained together in one jitted, vmapped program.

    from cnnjax.train.multiseed import train_many
    results = train_many(config, seeds=[0, 1, 2], workdir="runs/lenet_seeds")
    results = train_many(config, seeds=[0, 0], learning_rates=[1e-3, 3e-3], workdir=...)

Member i is the run `train_and_evaluate` would make with config.seed = seeds[i] (and, if given,
config.optimizer.learning_rate = learning_rates[i]): the same initial parameters, the same per-epoch
example order and augmentation keys, the same train step, so its results equal that single run to
fp32 tolerance (tests/test_multiseed.py). Every step gathers each member's batch from the
device-resident training set, augments it and takes the engine's `train_step`, all under one
`jax.vmap`, so one accelerator trains K small models for little more than the price of one.

Benchmark against K sequential single runs: `python -m cnnjax.train.multiseed bench --help`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cnnjax import config as config_lib
from cnnjax import distributed, xla_options
from cnnjax.data import load_dataset, preprocess, transforms
from cnnjax.data.config import augment_from_config
from cnnjax.data.pipeline import TrainOrder
from cnnjax.train import loop, metrics, optim
from cnnjax.train.setup import RunSetup
from cnnjax.train.state import TrainState, count_params, create_train_state, init_fn, jit_init
from cnnjax.train.step import eval_step, train_step

# Schedules whose value is learning_rate * f(step): only these can share one optimizer across
# learning-rate variants (the others also read learning_rate through end_learning_rate).
_LR_LINEAR_SCHEDULES = ("constant", "step", "multistep", "onecycle")


def _check_members(config: ml_collections.ConfigDict, seeds: Sequence[int],
                   learning_rates: Sequence[float] | None) -> None:
    if not seeds:
        raise ValueError("train_many needs at least one seed; pass seeds=[0, 1, ...]")
    if learning_rates is not None:
        if len(learning_rates) != len(seeds):
            raise ValueError(f"{len(learning_rates)} learning_rates for {len(seeds)} seeds; give one "
                             "learning rate per seed (repeat a seed to vary only the rate)")
        opt = config.optimizer
        linear = opt.schedule in _LR_LINEAR_SCHEDULES or (
            opt.schedule in ("cosine", "exponential") and opt.end_learning_rate == 0)
        if not linear:
            raise ValueError(f"learning-rate variants need a schedule proportional to the rate; "
                             f"schedule {opt.schedule!r} with end_learning_rate="
                             f"{opt.end_learning_rate} is not: set end_learning_rate=0 or run them apart")
    members = list(zip(seeds, learning_rates or [None] * len(seeds), strict=True))
    if len(set(members)) < len(members):
        raise ValueError(f"members {members} repeat a (seed, learning rate) pair; make each distinct")
    if config.init_from:
        raise ValueError("train_many starts from fresh weights; clear config.init_from or use launch.py")
    finetune = config.get("finetune") or {}
    if finetune.get("freeze") or finetune.get("lr_groups") or finetune.get("freeze_batch_stats") == "all":
        raise ValueError("train_many does not apply finetune.freeze, lr_groups or freeze_batch_stats="
                         "'all'; clear them or train with launch.py")
    if jax.process_count() > 1:
        raise ValueError("train_many runs in one process; launch it without multi-process flags")


def default_chunk(k: int, mesh: Mesh) -> int:
    """Members vmapped together by default: 1 on one CPU device, else all K.

    XLA turns a vmapped convolution into a grouped one, which XLA:CPU runs slowly, and cnnjax's CPU
    kernels run a vmapped call member by member anyway; with `chunk=1` (`jax.lax.map`) each member
    is a plain step. On the 2-core CPU chunk=1 gave 1.56x-1.97x the steady throughput of the plain
    vmap for 4 resnet20 members and 1.12x-1.16x for 4 lenet5 (benchmarks/MULTISEED.md). Elsewhere,
    and with members spread over several devices, the plain vmap (unmeasured on accelerators)."""
    return 1 if mesh.devices.flat[0].platform == "cpu" and mesh.size == 1 else k


class Members:
    """The engine's pieces for one run plus the K-member programs built around them."""

    def __init__(self, config: ml_collections.ConfigDict, seeds: Sequence[int],
                 learning_rates: Sequence[float] | None, chunk: int | None = None) -> None:
        """chunk: members vmapped together (default: `default_chunk`)."""
        _check_members(config, seeds, learning_rates)
        if chunk is not None and not 1 <= chunk <= len(seeds):
            raise ValueError(f"chunk={chunk} must lie in [1, {len(seeds)}] (members per vmap)")
        # The engine's own run set-up (validation, model, optimizer, schedule, eval pipeline), so the
        # members are built exactly as single runs are.
        self.run = run = RunSetup(config)
        self.chunk = default_chunk(len(seeds), run.mesh) if chunk is None else chunk
        self.config = config
        self.seeds = [int(s) for s in seeds]
        self.learning_rates = None if learning_rates is None else [float(r) for r in learning_rates]
        self.k = len(seeds)
        mesh = run.mesh
        self.options = xla_options.step_options(mesh, count_params(run.abstract_state.params))
        self.replicated = distributed.replicated(mesh)
        # Members spread over the devices when they divide evenly; else every device holds all.
        self.member = NamedSharding(mesh, P("data")) if self.k % mesh.size == 0 else self.replicated
        self.tx, self.schedule = run.tx, run.schedule
        if self.learning_rates is not None:
            self.tx, self.schedule = _unit_rate_optimizer(config, run.steps_per_epoch)
        self.aug = augment_from_config(config.data.get("augment"))
        self.images, self.labels = self._device_train_split()
        self.orders = [TrainOrder(s, run.pipeline.num_train, config.batch_size) for s in self.seeds]
        self.train_fn = self._compile_train()
        self.eval_fn = jax.jit(
            jax.vmap(functools.partial(eval_step, model=run.model, loss_cfg=config.loss,
                                       num_classes=run.num_classes, use_ema=run.use_ema),
                     in_axes=(0, None)),
            in_shardings=(self.member, distributed.batch_sharded(mesh)),
            out_shardings=self.replicated, compiler_options=self.options)

    def _device_train_split(self) -> tuple[jax.Array, jax.Array]:
        """The raw uint8 training images and labels, replicated on every device."""
        run = self.run
        dataset = load_dataset(self.config.data, image_size=run.input_shape[0],
                               channels=run.input_shape[2])
        train = dataset.splits["train"]
        if getattr(train, "image_shape", None) is None:
            raise ValueError(f"{dataset.name!r} has images of varying size; train_many needs a "
                             "fixed-size dataset it can hold on the device (resize it offline)")
        train = train.materialize()
        return tuple(self._put(a, self.replicated) for a in (train.images, train.labels))

    def _put(self, array: Any, sharding: NamedSharding) -> jax.Array:
        return jax.make_array_from_process_local_data(sharding, np.asarray(array), np.shape(array))

    def _compile_train(self):
        run, config, pipe = self.run, self.config, self.run.pipeline
        step_fn = functools.partial(
            train_step, model=run.model, tx=self.tx, schedule=self.schedule, loss_cfg=config.loss,
            num_classes=run.num_classes, ema_decay=float(config.optimizer.ema_decay),
            accumulate_steps=int(config.optimizer.accumulate_steps))
        prep = functools.partial(
            preprocess.train_batch, aug=self.aug, image_size=run.input_shape[0],
            channels=run.input_shape[2], mean=tuple(pipe.mean), std=tuple(pipe.std),
            num_classes=run.num_classes)

        def one(state: TrainState, seed, index, mix, images, labels):
            # The same gather and preprocessing as the single-run pipeline, with the seed traced.
            # The barrier keeps the gather out of the augmentation's fusion, where XLA would
            # re-gather on every access (the pipeline runs them as two programs for that reason).
            raw = jax.lax.optimization_barrier(images[index])
            batch = prep(raw, labels[index], state.step, mix, seed=seed)
            return step_fn(state, batch)

        def many(states, images, labels, seeds, indices, mix):
            def member(args):
                return one(*args, images, labels)

            members = (states, seeds, indices, mix)
            if self.chunk == self.k:  # a plain vmap: XLA's CPU backend runs loop bodies slower
                return jax.vmap(member)(members)
            # lax.map vmaps `chunk` members at a time and loops over the chunks.
            return jax.lax.map(member, members, batch_size=self.chunk)

        m, r = self.member, self.replicated
        return jax.jit(xla_options.traced_for(many, self.options),
                       in_shardings=(m, r, r, m, m, m), out_shardings=(m, m),
                       donate_argnums=0, compiler_options=self.options)

    # --- state and per-step inputs ---------------------------------------------------------------

    def initial_states(self) -> TrainState:
        """The K initial states stacked on a leading axis: member i as create_train_state(seed_i)."""
        run = self.run
        init = jax.vmap(init_fn(run.model, self.tx, run.input_shape, run.use_ema))
        keys = self._put(np.stack([jax.random.PRNGKey(s) for s in self.seeds]), self.member)
        states = jit_init(init, self.member)(keys)
        if self.learning_rates is None:
            return states
        # The rate lives in the optimizer state (optax.inject_hyperparams), one value per member.
        base, inject = states.opt_state
        rates = self._put(np.asarray(self.learning_rates, np.float32), self.member)
        return states.replace(opt_state=(base, inject._replace(hyperparams={"step_size": rates})))

    def step_inputs(self, step: int) -> tuple[jax.Array, jax.Array, Any]:
        """(seeds [K], example indices [K, B], mixup/cutmix draws or None) of train step `step`."""
        seeds = self._put(np.asarray(self.seeds, np.int32), self.member)
        indices = self._put(np.stack([order(step) for order in self.orders]), self.member)
        mix = None
        if self.aug.mixes:
            draws = [transforms.mix_params(s, step, self.config.batch_size, self.aug)
                     for s in self.seeds]
            mix = {key: self._put(np.stack([d[key] for d in draws]), self.member) for key in draws[0]}
        return seeds, indices, mix

    def train(self, states: TrainState, num_steps: int) -> tuple[TrainState, list[dict]]:
        """`num_steps` steps of every member; returns the states and per-step host metrics [K]."""
        history = []
        start = int(jax.device_get(states.step[0]))  # every member is at the same step
        for step in range(start, start + num_steps):
            seeds, indices, mix = self.step_inputs(step)
            states, step_metrics = self.train_fn(states, self.images, self.labels, seeds, indices, mix)
            history.append(step_metrics)
        return states, jax.device_get(history)

    def evaluate(self, states: TrainState, split: str) -> list[dict]:
        """Each member's metrics over every example of `split` once (the engine's eval step)."""
        probs, labels, losses = [], [], []
        for batch in self.run.pipeline.eval_batches(split):
            batch_probs, batch_losses, batch_labels, mask = jax.device_get(self.eval_fn(states, batch))
            keep = mask[0] > 0  # labels and mask come out stacked per member, all alike
            probs.append(batch_probs[:, keep])
            losses.append(batch_losses[:, keep])
            labels.append(batch_labels[0][keep])
        probs, losses = np.concatenate(probs, axis=1), np.concatenate(losses, axis=1)
        labels = np.concatenate(labels)
        return [metrics.classification_metrics(probs[i], labels, self.run.num_classes,
                                               loss=float(losses[i].mean())) for i in range(self.k)]


def _unit_rate_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """The configured optimizer at learning rate 1, then a per-member scale held in its state.

    Every update rule here is linear in its rate (the rate multiplies the final update), so
    rate * unit_update equals the update at that rate up to fp32 rounding.
    """
    unit = ml_collections.ConfigDict(config.optimizer.to_dict())
    unit.learning_rate = 1.0
    tx, schedule = optim.make_optimizer(unit, steps_per_epoch=steps_per_epoch,
                                        num_epochs=config.num_epochs)
    return optax.chain(tx, optax.inject_hyperparams(optax.scale)(step_size=1.0)), schedule


def member_name(seed: int, learning_rate: float | None) -> str:
    """The member's run directory under the workdir: seed3, or seed3_lr0.001 for rate variants."""
    return f"seed{seed}" if learning_rate is None else f"seed{seed}_lr{learning_rate:g}"


def train_many(config: ml_collections.ConfigDict, seeds: Sequence[int], workdir: str | None = None,
               *, learning_rates: Sequence[float] | None = None,
               chunk: int | None = None) -> list[dict]:
    """Trains one member per seed (and learning rate) together; returns each member's results.

    With a workdir, each member's results.json goes to workdir/member_name(...)/ and the shared
    timing to workdir/multiseed.json. No checkpoints: a K-member run of a small model is short.
    """
    members = Members(config, seeds, learning_rates, chunk)
    run = members.run
    tick = time.time()
    states = members.initial_states()
    states, history = members.train(states, run.total_steps)
    jax.block_until_ready(states)
    seconds = time.time() - tick
    validation = members.evaluate(states, "validation")
    test = members.evaluate(states, "test")
    shared = _shared_results(members, states, seconds)
    results = []
    for i, seed in enumerate(members.seeds):
        rate = None if members.learning_rates is None else members.learning_rates[i]
        recent = history[-max(1, min(config.log_every_steps, len(history))):]
        train = {key: float(np.mean([h[key][i] for h in recent])) for key in ("loss", "accuracy")}
        results.append({
            **shared,
            "status": "done" if np.isfinite(train["loss"]) else "diverged",
            "test": {k: test[i][k] for k in loop.TEST_KEYS},
            "test_details": {k: v for k, v in test[i].items() if k not in loop.TEST_KEYS},
            "validation": {k: validation[i][k] for k in loop.TEST_KEYS},
            "train": train,
            "seed": seed,
            "learning_rate": rate if rate is not None else float(config.optimizer.learning_rate),
        })
    if workdir:
        _write(workdir, members, results, shared)
    return results


def _shared_results(members: Members, states: TrainState, seconds: float) -> dict:
    run, config = members.run, members.config
    steps = run.total_steps
    profile = loop.profile_run(run.model, run.input_shape)
    all_members = members.k * steps * config.batch_size / seconds
    return {
        "model": config.model.name,
        "dataset": run.pipeline.name,
        "input_shape": list(run.input_shape),
        "params": count_params(jax.tree.map(lambda p: p[0], states.params)),
        "macs": profile.get("macs"),
        "flops": profile.get("flops"),
        "steps": steps,
        "members": members.k,
        # Wall time of the whole K-member program (compile included, as the engine counts it).
        "train_seconds": round(seconds, 3),
        "images_per_second": round(all_members / members.k, 1),
        "images_per_second_all_members": round(all_members, 1),
        "devices": jax.device_count(),
        "platform": jax.default_backend(),
        "precision": jnp.dtype(run.dtype).name,
        "versions": loop.library_versions(),
    }


def _write(workdir: str, members: Members, results: list[dict], shared: dict) -> None:
    for result in results:
        rate = None if members.learning_rates is None else result["learning_rate"]
        path = os.path.join(workdir, member_name(result["seed"], rate))
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
    with open(os.path.join(workdir, "multiseed.json"), "w") as f:
        json.dump({**shared, "seeds": members.seeds, "learning_rates": members.learning_rates}, f,
                  indent=2)


# --- benchmark: K members in one program against K sequential single runs ---------------------------


def _bench_config(model: str, batch_size: int, steps: int) -> ml_collections.ConfigDict:
    """The digits run (32x32) with `model`; CIFAR-size nets see the digits as 3-channel images."""
    config, _ = config_lib.load_config(config_lib.DEFAULT_CONFIG)
    config.model.name = model
    config.model.image_size = 32
    config.model.in_channels = 0 if model == "lenet5" else 3
    config.batch_size = batch_size
    config.num_train_steps = steps + 1  # the first step compiles
    return config


def _time_single(config: ml_collections.ConfigDict, seed: int, steps: int) -> tuple[float, float]:
    """(seconds to the end of the compiled first step, seconds of the next `steps`) of one engine run."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.seed = seed
    tick = time.perf_counter()
    run = RunSetup(config)
    state = create_train_state(run.model, run.tx, seed=seed, input_shape=run.input_shape,
                               mesh=run.mesh)
    batches = run.pipeline.train_batches(0)
    state, _ = run.train_fn(state, next(batches))
    jax.block_until_ready(state)
    first = time.perf_counter()
    for _ in range(steps):
        state, _ = run.train_fn(state, next(batches))
    jax.block_until_ready(state)
    return first - tick, time.perf_counter() - first


def _time_members(config: ml_collections.ConfigDict, k: int, steps: int,
                  chunk: int | None) -> tuple[float, float]:
    """The same two times for K members in one program."""
    tick = time.perf_counter()
    members = Members(config, list(range(k)), None, chunk)
    states, _ = members.train(members.initial_states(), 1)
    jax.block_until_ready(states)
    first = time.perf_counter()
    states, _ = members.train(states, steps)
    jax.block_until_ready(states)
    return first - tick, time.perf_counter() - first


def bench(models: Sequence[str], ks: Sequence[int], steps: int, batch_size: int) -> str:
    """A markdown table: steady-state images/s and total wall (compile included), K sequential
    engine runs (measured one after another, each compiling afresh as a separate run would)
    against K members in one program."""
    lines = ["| model | K | program | sequential img/s | one-program img/s | speed-up "
             "| sequential wall s | one-program wall s | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        config = _bench_config(model, batch_size, steps)
        singles = [_time_single(config, seed, steps) for seed in range(max(ks))]
        for k in ks:
            seq_steady = sum(s for _, s in singles[:k])
            seq_wall = sum(c + s for c, s in singles[:k])
            images = k * steps * batch_size
            for chunk, name in ((k, "vmap K"), (1, "lax.map, chunk 1"))[:1 if k == 1 else 2]:
                compile_s, steady = _time_members(config, k, steps, chunk)
                lines.append(
                    f"| {model} | {k} | {name} | {images / seq_steady:,.0f} | "
                    f"{images / steady:,.0f} | {seq_steady / steady:.2f}x | {seq_wall:.1f} | "
                    f"{compile_s + steady:.1f} | {seq_wall / (compile_s + steady):.2f}x |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cnnjax.train.multiseed",
                                     description="K members in one vmapped program: benchmark")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="speed-up against K sequential single runs, on digits")
    b.add_argument("--models", default="lenet5,resnet20", help="comma-separated model names")
    b.add_argument("--ks", default="1,4,8", help="comma-separated member counts")
    b.add_argument("--steps", type=int, default=20, help="timed steps after the compiling one")
    b.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(bench(args.models.split(","), [int(k) for k in args.ks.split(",")], args.steps,
                args.batch_size))


if __name__ == "__main__":
    main()
