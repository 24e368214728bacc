"""Orbax checkpointing of the train state: periodic async saves, keep last K + best, restore anywhere."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cnnjax.train.state import TrainState

BEST_METRICS = ("accuracy", "loss", "top5_error", "precision", "recall", "f1", "roc_auc")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of validation `metric` is the better one."""
    return metric == "loss" or metric.endswith("error")


def make_manager(
    directory: str, *, keep: int, best_metric: str = "accuracy", async_save: bool = True
) -> ocp.CheckpointManager:
    """A manager that keeps the `keep` latest checkpoints plus the best by `best_metric`.

    Only saves given metrics compete for "best" (the end-of-epoch saves carry validation metrics);
    mid-epoch saves have none and are kept only while among the latest `keep`.
    """
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep}; the resume needs the latest")
    preservation = policies.AnyPreservationPolicy(
        [
            policies.LatestN(n=keep),
            policies.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric],
                reverse=lower_is_better(best_metric),
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation,
        enable_async_checkpointing=async_save,
        # The loop decides when to save; the manager must not veto a step.
        save_interval_steps=1,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(
    manager: ocp.CheckpointManager, state: TrainState, metrics: dict[str, float] | None = None
) -> bool:
    """Starts an async save of `state` at its step (no-op if that step is saved already)."""
    step = int(state.step)
    if step in manager.all_steps():
        return False
    scalars = None
    if metrics is not None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    return manager.save(step, args=ocp.args.StandardSave(state), metrics=scalars)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState) -> TrainState | None:
    """The latest saved state placed on `abstract_state`'s shardings, or None if nothing is saved.

    The target shardings come from the current mesh, so a checkpoint written on N devices
    restores onto any other device count.
    """
    step = manager.latest_step()
    if step is None:
        return None
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except ValueError as error:  # orbax explains a tree mismatch over many lines; keep its first
        first = str(error).strip().splitlines()[0].rstrip(":")
        raise ValueError(
            f"the checkpoint at step {step} in {manager.directory} does not fit this run's train "
            f"state ({first}); a resumed run keeps its model, optimizer and finetune.freeze / "
            "lr_groups, so train with other settings in a new workdir") from None
