"""The ablation studies' report steps: each module here adds its own sections to a sweep's report.md.

An experiment `experiments/ablation_NAME.py` declares its variants with `cnnjax.sweep.sweep_config`
and sets `sweep.study = "cnnjax.studies.NAME"`; after the sweep has trained every variant and
written its report, `run_sweep` calls that module's `report(workdir=, config=, summary=, results=)`
and appends the markdown it returns (arithmetic from the source notes, diagnostics, extra plots).

Shared helpers for those modules live here: reading a finished trial back (its config, trained
variables and a batch of its data) so a study can look inside the network after training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from cnnjax.sweep.runner import trial_dir

__all__ = ["Trial", "load_trial", "first_seed_dirs", "rows_by_variant"]


@dataclasses.dataclass
class Trial:
    """One finished run read back: its config, model, trained variables and a training batch."""

    config: ml_collections.ConfigDict
    model: nn.Module
    variables: dict[str, Any]
    images: np.ndarray  # [N, H, W, C] validation (else test) images, preprocessed as in evaluation
    labels: np.ndarray  # [N] integer classes


def load_trial(directory: str, num_examples: int = 64) -> Trial:
    """Rebuilds the run in `directory` (a trial's seed_S/ folder) from its config.json and restores
    the last checkpoint's params and batch statistics; `images` are its first validation examples."""
    from cnnjax.pretrained.checkpoint import restore_variables
    from cnnjax.train.loop import RunSetup

    with open(os.path.join(directory, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    run = RunSetup(config)
    abstract = {"params": run.abstract_state.params, "batch_stats": run.abstract_state.batch_stats}
    variables = restore_variables(os.path.join(directory, "checkpoints"), abstract)
    if not variables["batch_stats"]:
        variables = {"params": variables["params"]}
    split = "validation" if run.pipeline.num_examples("validation") else "test"
    images, labels = _take(run.pipeline.eval_batches(split), num_examples)
    return Trial(config, run.model, jax.device_get(variables), images, labels)


def _take(batches: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n real (unpadded) examples of an eval batch stream."""
    images, labels = [], []
    for batch in batches:
        keep = np.asarray(batch["mask"]).astype(bool) if "mask" in batch else slice(None)
        images.append(np.asarray(batch["image"])[keep])
        labels.append(np.asarray(batch["label"])[keep])
        if sum(len(x) for x in labels) >= n:
            break
    return np.concatenate(images)[:n], np.concatenate(labels)[:n]


def first_seed_dirs(workdir: str, results: Sequence[tuple[Mapping, list[dict]]]) -> dict[str, str]:
    """{variant name: directory of its first finished seed} for the variants that trained."""
    dirs = {}
    for _, records in results:
        done = [r for r in records if r["status"] == "done"]
        if done:
            dirs[done[0]["variant"]] = trial_dir(workdir, done[0]["variant"], done[0]["seed"])
    return dirs


def rows_by_variant(summary: Mapping) -> dict[str, dict]:
    """The sweep report's rows keyed by variant name."""
    return {row["variant"]: row for row in summary["rows"]}
