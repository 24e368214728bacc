"""Writing converted variables as an orbax checkpoint that `config.init_from` can start a run from."""

from __future__ import annotations

import json
import os
from typing import Any

import orbax.checkpoint as ocp

INFO_FILE = "cnnjax_pretrained.json"  # beside the step folders: model name and constructor overrides


def save_variables(directory: str, variables: dict[str, Any], info: dict[str, Any] | None = None) -> str:
    """Saves {params, batch_stats} as step 0 of a checkpoint manager under `directory`.

    Only the weights are stored (no optimizer state, step or RNG): the run that starts from them
    builds its own optimizer, which may differ from run to run.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and os.listdir(directory):
        raise ValueError(f"output directory {directory!r} is not empty; give a new directory.")
    item = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    with ocp.CheckpointManager(directory) as manager:
        manager.save(0, args=ocp.args.StandardSave(item))
        manager.wait_until_finished()
    if info is not None:
        with open(os.path.join(directory, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
    return directory


def restore_variables(directory: str, abstract: dict[str, Any]) -> dict[str, Any]:
    """{params, batch_stats} of the latest step under `directory`, onto `abstract`'s shapes/shardings.

    Reads both a converted checkpoint (only those two entries) and a cnnjax run's checkpoint (a whole
    TrainState, of which only those two entries are read), so `init_from` accepts either.
    """
    target = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    manager = ocp.CheckpointManager(os.path.abspath(directory),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        step = manager.latest_step()
        if step is None:
            raise ValueError(f"init_from directory {directory!r} holds no checkpoint")
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        return manager.restore(step, args=args)
    finally:
        manager.close()
