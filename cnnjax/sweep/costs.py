"""The cost sheet: what every variant of a sweep costs (params, MACs, memory, step FLOPs) before it trains.

Counts come from `cnnjax.profile.profile_model` (traced with `jax.eval_shape`: no compile, no memory).
A training step is estimated at 3x the forward pass (forward + backward for activations and weights):
FLOPs/step = 3 x 2 x MACs x batch_size. Activation memory is the forward activations of one
example at fp32 (bf16 compute halves it), times the batch for a step. A time is estimated only
when the device peak is given (sweep.device_peak_tflops), as FLOPs / (peak x assumed_utilization).
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Mapping, Sequence

import ml_collections

from cnnjax.sweep.space import apply_variant, variant_name

COLUMNS = ("variant", "params", "macs", "activation_mib_per_example", "batch_size", "gflops_per_step",
           "activation_gib_per_step", "steps", "seeds", "total_pflops", "est_seconds_per_step",
           "est_total_hours")


@functools.lru_cache(maxsize=16)
def _data_facts(data_json: str, image_size: int, channels: int) -> tuple[int, int]:
    """(num_classes, num_train) of a dataset, loaded once per data config."""
    from cnnjax.data import load_dataset

    data_cfg = ml_collections.ConfigDict(json.loads(data_json))
    dataset = load_dataset(data_cfg, image_size=image_size, channels=channels)
    return dataset.num_classes, len(dataset.splits["train"])


def input_facts(config: ml_collections.ConfigDict) -> dict:
    """Image size, channels, class count and training steps of one run config."""
    from cnnjax.models import get_spec

    spec = get_spec(config.model.name)
    image_size = config.model.image_size or spec.input_size
    channels = config.model.in_channels or spec.in_channels
    num_classes, num_train = _data_facts(json.dumps(config.data.to_dict(), default=list),
                                         image_size, channels)
    steps = config.num_epochs * (num_train // config.batch_size)
    if config.num_train_steps > 0:
        steps = min(steps, config.num_train_steps)
    return {"image_size": image_size, "channels": channels, "num_classes": num_classes,
            "steps_per_epoch": num_train // config.batch_size, "steps": steps}


def variant_cost(config: ml_collections.ConfigDict, *, seeds: int = 1, peak_tflops: float = 0.0,
                 utilization: float = 0.4) -> dict:
    """One cost-sheet row for a run config (a variant already applied)."""
    from cnnjax.profile import profile_model

    facts = input_facts(config)
    profile = profile_model(config.model.name, image_size=facts["image_size"],
                            num_classes=facts["num_classes"], in_channels=facts["channels"],
                            activations=True, **config.model.kwargs.to_dict())
    batch = config.batch_size
    step_flops = 3 * profile["flops"] * batch
    act = profile["activation_bytes_per_example"]
    row = {
        "params": profile["params"],
        "macs": profile["macs"],
        "activation_bytes_per_example": act,
        "activation_mib_per_example": act / 2**20,
        "batch_size": batch,
        "flops_per_step": step_flops,
        "gflops_per_step": step_flops / 1e9,
        "activation_gib_per_step": act * batch / 2**30,
        "steps": facts["steps"],
        "seeds": seeds,
        "total_pflops": step_flops * facts["steps"] * seeds / 1e15,
        "est_seconds_per_step": None,
        "est_total_hours": None,
    }
    if peak_tflops > 0:
        seconds = step_flops / (peak_tflops * 1e12 * utilization)
        row["est_seconds_per_step"] = seconds
        row["est_total_hours"] = seconds * facts["steps"] * seeds / 3600
    return row


def cost_sheet(config: ml_collections.ConfigDict, variants: Sequence[Mapping]) -> list[dict]:
    """Rows for every variant of `config.sweep` (costs of identical architectures computed once)."""
    sweep = config.sweep
    rows, cache = [], {}
    for variant in variants:
        trial = apply_variant(config, variant)
        key = json.dumps({k: trial[k].to_dict() if isinstance(trial[k], ml_collections.ConfigDict)
                          else trial[k] for k in ("model", "data", "batch_size", "num_epochs",
                                                  "num_train_steps")}, sort_keys=True, default=str)
        if key not in cache:
            cache[key] = variant_cost(trial, seeds=sweep.seeds, peak_tflops=sweep.device_peak_tflops,
                                      utilization=sweep.assumed_utilization)
        rows.append({"variant": variant_name(variant), **cache[key]})
    return rows


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(rows: Sequence[dict], note: str = "") -> str:
    """The sheet as a markdown table, with a total line and how the numbers are estimated."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    total = sum(row["total_pflops"] for row in rows)
    lines.append("")
    lines.append(f"Total: {len(rows)} variants, {total:.4g} PFLOPs of training. "
                 "FLOPs/step = 3 x 2 x MACs x batch (forward + backward); activation memory is the "
                 "forward activations at fp32.")
    hours = [row["est_total_hours"] for row in rows if row["est_total_hours"] is not None]
    if hours:
        lines.append(f"Estimated time: {sum(hours):.3g} h at the given device peak and utilization.")
    if note:
        lines.append(note)
    return "\n".join(lines)


def write(rows: Sequence[dict], workdir: str, note: str = "") -> str:
    """Saves costs.csv and costs.md in `workdir`; returns the markdown."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "costs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["variant", *[k for k in rows[0] if k != "variant"]])
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, note)
    with open(os.path.join(workdir, "costs.md"), "w") as f:
        f.write("# Cost sheet\n\n" + text + "\n")
    return text
