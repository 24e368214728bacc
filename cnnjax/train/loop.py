"""`train_and_evaluate(config, workdir)`: the training loop, evaluation, resume and run outputs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnjax import config as config_lib
from cnnjax import distributed
from cnnjax.train import checkpoint, metrics, report
from cnnjax.train.setup import RunSetup
from cnnjax.train.state import count_params

SUMMARY_KEYS = (
    "model",
    "dataset",
    "params",
    "macs",
    "steps",
    "train_seconds",
    "images_per_second",
    "devices",
)
TEST_KEYS = ("loss", "accuracy", "top5_error", "precision", "recall", "f1", "roc_auc")


class NonFiniteLossError(RuntimeError):
    """Training diverged; the message names the step and the checkpoint kept."""


def evaluate(eval_fn: Callable, state: Any, batches: Iterator[dict], num_classes: int) -> dict:
    """Metrics over every example of one split exactly once (padding masked out)."""
    probs, labels, losses = [], [], []
    for batch in batches:
        batch_probs, batch_losses, batch_labels, mask = jax.device_get(eval_fn(state, batch))
        keep = mask > 0
        probs.append(batch_probs[keep])
        labels.append(batch_labels[keep])
        losses.append(batch_losses[keep])
    all_losses = np.concatenate(losses)
    return metrics.classification_metrics(
        np.concatenate(probs), np.concatenate(labels), num_classes, loss=float(all_losses.mean())
    )


class _StopFlag:
    """Set by SIGTERM; the loop saves and exits at the next step boundary."""

    def __init__(self) -> None:
        self.set = False
        self._previous = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.set = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
    host = jax.device_get(pending)
    return {key: float(np.mean([m[key] for m in host])) for key in host[0]}


def _check_finite(values: dict[str, float], step: int, manager) -> None:
    """Raises if the loss or a norm went inf/nan: the state is then not worth saving."""
    bad = [name for name in ("loss", "grad_norm", "param_norm") if not np.isfinite(values[name])]
    if bad:
        manager.wait_until_finished()
        last = manager.latest_step()
        kept = (
            f"the last good checkpoint is step {last}" if last is not None else "no checkpoint kept"
        )
        raise NonFiniteLossError(
            f"non-finite {' and '.join(bad)} ({values[bad[0]]}) by step {step}; {kept} (not "
            "overwritten); lower optimizer.learning_rate or set optimizer.grad_clip_norm, then rerun"
        )


def _epoch_line(epoch: int, num_epochs: int, step: int, train: dict, val: dict, secs: float) -> str:
    return (
        f"epoch {epoch:3d}/{num_epochs}  step {step:6d}  train loss {train['loss']:.4f}  "
        f"val loss {val['loss']:.4f}  acc {val['accuracy']:.4f}  f1 {val['f1']:.4f}  "
        f"top5 err {val['top5_error']:.4f}  ({secs:.1f} s)"
    )


def profile_run(model: Any, input_shape: tuple[int, int, int]) -> dict:
    """params/macs/flops from cnnjax.profile (one example); empty if it cannot tell."""
    try:
        from cnnjax.profile import profile_module

        return profile_module(model, input_shape)
    except Exception as error:  # profiling is informational; never fail a finished run over it
        print(f"note: no MAC count ({type(error).__name__}: {error})")
        return {}


def library_versions() -> dict[str, str]:
    import flax
    import jaxlib
    import optax
    import orbax.checkpoint

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": orbax.checkpoint.__version__,
        "numpy": np.__version__,
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming from its checkpoints) and returns results.json's dict.

    Returns {"status": "interrupted", "step": N} instead when SIGTERM stopped the run after saving.
    """
    run = RunSetup(config)  # every config error surfaces here, before the workdir is touched
    primary = distributed.is_primary()
    os.makedirs(workdir, exist_ok=True)
    manager = checkpoint.make_manager(
        os.path.join(workdir, "checkpoints"),
        keep=config.keep_checkpoints,
        best_metric=config.best_metric,
    )
    state = run.initial_state(config, manager)
    step = int(state.step)
    results_path = os.path.join(workdir, "results.json")
    if step >= run.total_steps and os.path.exists(results_path):
        manager.close()
        print(f"{workdir} already finished at step {step}; results.json is unchanged")
        with open(results_path) as f:
            return json.load(f)
    # purge_step hides TensorBoard events logged after the checkpoint we resume from.
    writer = report.RunWriter(workdir, purge_step=step or None) if primary else None
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))
        print(
            f"{config.model.name} on {run.pipeline.name} {run.input_shape}: "
            f"{count_params(state.params):,} params, {jax.device_count()} device(s), "
            f"{run.total_steps} steps, workdir {workdir}"
        )
        frozen = run.plan.frozen_count(state.params)
        if frozen:
            print(f"finetune: {frozen:,} frozen params (finetune.freeze / lr_groups at 0), "
                  f"{count_params(state.params) - frozen:,} trained")
        if run.plan.running_bn:
            print(f"finetune: {len(run.plan.running_bn)} BatchNorm layers normalise with their "
                  f"running statistics (finetune.frozen_bn=running)")
        if step:
            print(f"resumed from the checkpoint at step {step}")
    try:
        with _StopFlag() as stop:
            outcome = _train(config, run, state, manager, writer, stop)
        if outcome["status"] == "interrupted":
            return outcome
        return _finish(config, run, outcome, workdir, writer)
    finally:
        manager.wait_until_finished()
        manager.close()
        if writer is not None:
            writer.close()


def _train(config, run: RunSetup, state, manager, writer, stop: _StopFlag) -> dict:
    step = int(state.step)
    start_step = step
    batches = run.pipeline.train_batches(step)
    progress = (
        report.Progress(
            total_steps=run.total_steps, steps_per_epoch=run.steps_per_epoch, initial_step=step
        )
        if distributed.is_primary()
        else None
    )
    pending: list[dict] = []
    last_train: dict[str, float] = {}
    train_seconds, epoch_start = 0.0, time.time()
    tick = time.time()
    while step < run.total_steps:
        state, step_metrics = run.train_fn(state, next(batches))
        step += 1
        pending.append(step_metrics)
        if progress is not None:
            progress.update(step)
        epoch, in_epoch = divmod(step, run.steps_per_epoch)
        do_eval = step == run.total_steps or (
            in_epoch == 0 and epoch % config.eval_every_epochs == 0
        )
        do_save = (
            do_eval
            or stop.set
            or (config.checkpoint_every_steps > 0 and step % config.checkpoint_every_steps == 0)
        )
        if pending and (do_save or step % config.log_every_steps == 0):
            last_train = _mean_metrics(pending)
            pending = []
            _check_finite(last_train, step, manager)  # before any save: never save a bad state
            if writer is not None:
                writer.log_scalars(
                    step, last_train, prefix="train/", epoch=step / run.steps_per_epoch
                )
        if not do_save:
            continue
        jax.block_until_ready(state)
        train_seconds += time.time() - tick
        val = None
        if do_eval:
            val = evaluate(
                run.eval_fn, state, run.pipeline.eval_batches("validation"), run.num_classes
            )
            if writer is not None:
                writer.log_scalars(
                    step, _scalars(val), prefix="validation/", epoch=step / run.steps_per_epoch
                )
                if progress is not None:
                    progress.clear()
                print(
                    _epoch_line(
                        -(-step // run.steps_per_epoch),
                        config.num_epochs,
                        step,
                        last_train,
                        val,
                        time.time() - epoch_start,
                    ),
                    flush=True,
                )
            epoch_start = time.time()
        checkpoint.save(manager, state, metrics=_scalars(val) if val else None)
        tick = time.time()
        if stop.set and step < run.total_steps:
            manager.wait_until_finished()
            if distributed.is_primary():
                print(
                    f"SIGTERM: saved step {step}; run the same command again to resume", flush=True
                )
            return {"status": "interrupted", "step": step}
    if progress is not None:
        progress.close()
    return {
        "status": "done",
        "state": state,
        "step": step,
        "steps_run": step - start_step,
        "train_seconds": train_seconds,
    }


def _best_validation(metrics_path: str, metric: str) -> dict:
    """The best validation record in metrics.jsonl (so a resumed run reports the same as one that
    never stopped)."""
    records = report.read_metrics(metrics_path).get("validation", [])
    if not records:
        return {}
    sign = -1 if checkpoint.lower_is_better(metric) else 1
    return max(records, key=lambda r: (sign * r[metric], -r["step"]))


def _scalars(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float | np.floating)}


def _finish(config, run: RunSetup, outcome: dict, workdir: str, writer) -> dict:
    state = outcome["state"]
    test = evaluate(run.eval_fn, state, run.pipeline.eval_batches("test"), run.num_classes)
    if writer is not None:
        writer.log_scalars(outcome["step"], _scalars(test), prefix="test/")
    steps_run, seconds = outcome["steps_run"], outcome["train_seconds"]
    profile = profile_run(run.model, run.input_shape)
    results = {
        "test": {k: test[k] for k in TEST_KEYS},
        "test_details": {k: v for k, v in test.items() if k not in TEST_KEYS},
        "best_validation": _best_validation(
            os.path.join(workdir, "metrics.jsonl"), config.best_metric
        )
        if writer is not None
        else {},
        "model": config.model.name,
        "dataset": run.pipeline.name,
        "input_shape": list(run.input_shape),
        "params": count_params(state.params),
        "trainable_params": count_params(state.params) - run.plan.frozen_count(state.params),
        "macs": profile.get("macs"),
        "flops": profile.get("flops"),
        "steps": outcome["step"],
        "train_seconds": round(seconds, 3),
        "images_per_second": round(steps_run * config.batch_size / seconds, 1) if seconds else None,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "platform": jax.default_backend(),
        "precision": jnp.dtype(run.dtype).name,
        "seed": config.seed,
        "versions": library_versions(),
    }
    if distributed.is_primary():
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        writer.close()
        report.plot_curves(
            os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "curves.png")
        )
        class_names = getattr(run.pipeline, "class_names", None) or [
            str(i) for i in range(run.num_classes)
        ]
        report.plot_confusion(
            test["confusion_matrix"], class_names, os.path.join(workdir, "confusion_matrix.png")
        )
        summary = {key: results[key] for key in SUMMARY_KEYS}
        print(report.summary_table({**summary, "test": results["test"]}))
    return results
