"""The ablation studies' report steps: each module here adds its own sections to a sweep's report.md.

An experiment `experiments/ablation_NAME.py` declares its variants with `cnnjax.sweep.sweep_config`
and sets `sweep.study = "cnnjax.studies.NAME"`; after the sweep has trained every variant and
written its report, `run_sweep` calls that module's `report(workdir=, config=, summary=, results=)`
and appends the markdown it returns (arithmetic from the source notes, diagnostics, extra plots).

Shared helpers for those modules live here: reading a finished trial back (its config, trained
variables, its variables at initialisation, its training curve and a batch of its data) so a study
can look inside the network before and after training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from cnnjax.sweep.runner import trial_dir
from cnnjax.train.report import METRICS_FILE, read_metrics
from cnnjax.train.state import init_fn, jit_init

__all__ = ["Trial", "load_trial", "first_seed_dirs", "rows_by_variant", "initial_variables",
           "init_variables", "training_curve", "final_training"]


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
    from cnnjax.train.setup import RunSetup

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


def initial_variables(trial: Trial) -> dict[str, Any]:
    """The trial's variables at step 0: create_train_state's init with the trial's seed and key."""
    return init_variables(trial.model, tuple(trial.images.shape[1:]), trial.config.seed)


@functools.lru_cache(maxsize=8)
def init_variables(model: Any, input_shape: tuple[int, ...], seed: int) -> dict[str, Any]:
    """`model`'s variables as create_train_state initialises them from `seed` (params and, when the
    model has them, batch statistics); jitted, so init costs one compile, not one per initialiser."""
    state = jit_init(init_fn(model, optax.identity(), input_shape, False))(jax.random.PRNGKey(seed))
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return jax.device_get(variables)


def training_curve(seed_dir: str) -> list[dict]:
    """The run's logged train records (step, epoch, loss, accuracy ...), sorted by step."""
    return read_metrics(os.path.join(seed_dir, METRICS_FILE)).get("train", [])


def final_training(records: Sequence[dict]) -> dict[str, float]:
    """Training loss and accuracy over the last epoch: the mean of the records logged in it.

    Each record is itself the mean over the steps since the previous one, so this is the training
    error the net had while finishing, not a single noisy batch.
    """
    if not records:
        return {"loss": float("nan"), "accuracy": float("nan")}
    last = records[-1]["epoch"]
    tail = [r for r in records if r["epoch"] > last - 1]
    return {key: float(np.mean([r[key] for r in tail])) for key in ("loss", "accuracy")}


def figure(width: float, height: float, panels: int = 1, *, rows: int | None = None,
           layout: str = "tight") -> tuple[Any, Any]:
    """A matplotlib Figure of `panels` side by side and its axes (one Axes, or an array of them);
    with `rows`, a rows x panels grid and always a 2-D array of axes.

    Built without pyplot: no global backend switch, nothing registered that needs closing, so a
    report can draw from any process (a notebook keeps its own backend).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    if rows is None:
        return fig, fig.subplots(1, panels)
    return fig, fig.subplots(rows, panels, squeeze=False)
