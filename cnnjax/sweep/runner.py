"""`run_sweep(config, workdir)`: runs every (variant, seed) of `config.sweep` in its own directory, resumably.

Layout: WORKDIR/trials/VARIANT/seed_S/ is one ordinary training run (train_and_evaluate's outputs);
its trial.json, written when the run ends, marks it finished, so a rerun skips it. A run stopped
midway resumes from its own checkpoints. Optuna studies live in WORKDIR/study.db (sqlite).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from cnnjax.sweep import costs, space

TrainFn = Callable[[ml_collections.ConfigDict, str], dict]
FINISHED = ("done", "pruned", "diverged")


class SweepStopped(Exception):
    """The run budget of this call (max_runs) is spent or SIGTERM stopped a run; rerun to resume."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The engine's trainer, imported only when a trial runs."""
    from cnnjax.train.loop import train_and_evaluate as train

    return train(config, workdir)


@dataclasses.dataclass
class _Context:
    config: ml_collections.ConfigDict
    workdir: str
    train_fn: TrainFn
    max_runs: int | None
    print_fn: Callable[[str], None]
    runs: int = 0

    @property
    def sweep(self) -> ml_collections.ConfigDict:
        return self.config.sweep

    def seeds(self) -> list[int]:
        return [self.config.seed + k for k in range(self.sweep.seeds)]


def metric_value(results: Mapping, path: str) -> float:
    """The number at dotted `path` of a results dict (nan when absent)."""
    node: Any = results
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return math.nan
        node = node[part]
    return float(node) if isinstance(node, int | float) else math.nan


def trial_dir(workdir: str, name: str, seed: int) -> str:
    return os.path.join(workdir, "trials", name, f"seed_{seed}")


def read_trial(directory: str) -> dict | None:
    path = os.path.join(directory, "trial.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_trial(directory: str, record: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, "trial.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(tmp, os.path.join(directory, "trial.json"))  # never a half-written marker


def _run_seed(ctx: _Context, variant: Mapping, seed: int, stop_step: int | None = None) -> dict:
    """One training run (to `stop_step` only, for a pruning stage); finished runs are read back."""
    name = space.variant_name(variant)
    directory = trial_dir(ctx.workdir, name, seed)
    record = read_trial(directory)
    if record is not None and record["status"] in FINISHED:
        return record
    if ctx.max_runs is not None and ctx.runs >= ctx.max_runs:
        raise SweepStopped(f"stopped after {ctx.runs} runs (max_runs); rerun to resume")
    ctx.runs += 1
    trial = space.apply_variant(ctx.config, variant)
    trial.seed = seed
    if stop_step is not None:
        trial.num_train_steps = stop_step
    from cnnjax.train.loop import NonFiniteLossError

    ctx.print_fn(f"--- {name} seed {seed}" + (f" (to step {stop_step})" if stop_step else ""))
    try:
        results = ctx.train_fn(trial, directory)
    except NonFiniteLossError as error:
        record = {"status": "diverged", "error": str(error), "results": {}}
    else:
        if results.get("status") == "interrupted":
            raise SweepStopped(f"{directory} was interrupted at step {results.get('step')}; rerun to resume")
        record = {"status": "done" if stop_step is None else "staged", "results": results}
    record.update(variant=name, fields=dict(variant), seed=seed,
                  metric=metric_value(record["results"], ctx.sweep.metric))
    if record["status"] != "staged":
        _write_trial(directory, record)
    return record


def run_variant(ctx: _Context, variant: Mapping, trial: Any = None) -> list[dict]:
    """Every seed of one variant; with an Optuna `trial` and sweep.prune, epoch by epoch across
    seeds, reporting the seed-mean metric after each epoch and stopping when the pruner says so."""
    if trial is None or not ctx.sweep.prune:
        return [_run_seed(ctx, variant, seed) for seed in ctx.seeds()]
    done = [read_trial(trial_dir(ctx.workdir, space.variant_name(variant), s)) for s in ctx.seeds()]
    if all(r is not None and r["status"] in FINISHED for r in done):
        return done
    facts = costs.input_facts(space.apply_variant(ctx.config, variant))
    per_epoch, total = facts["steps_per_epoch"], facts["steps"]
    epochs = max(1, -(-total // per_epoch))
    seconds = dict.fromkeys(ctx.seeds(), 0.0)
    for epoch in range(1, epochs + 1):
        stop = None if epoch == epochs else epoch * per_epoch
        records = [_run_seed(ctx, variant, seed, stop) for seed in ctx.seeds()]
        for record in records:
            seconds[record["seed"]] += record["results"].get("train_seconds") or 0.0
        value = _mean([r["metric"] for r in records])
        if stop is None:
            return [_total_seconds(ctx, r, seconds[r["seed"]]) for r in records]
        trial.report(value, epoch)
        if epoch >= ctx.sweep.prune_warmup_epochs and trial.should_prune():
            pruned = []
            for record in records:
                record = {**record, "status": "pruned", "epoch": epoch}
                _write_trial(trial_dir(ctx.workdir, record["variant"], record["seed"]), record)
                pruned.append(record)
            ctx.print_fn(f"pruned {space.variant_name(variant)} after epoch {epoch} ({value:.4f})")
            return pruned
    raise AssertionError("unreachable: the last epoch returns")


def _total_seconds(ctx: _Context, record: dict, seconds: float) -> dict:
    """A staged run's training time summed over its stages (each stage's results count only its own);
    a stage resumed from an earlier call counts from there on."""
    if record.get("staged_train_seconds") is None and record["status"] == "done":
        record = {**record, "staged_train_seconds": seconds}
        _write_trial(trial_dir(ctx.workdir, record["variant"], record["seed"]), record)
    return record


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if len(finite) == len(values) and finite else math.nan


def variant_score(records: Sequence[dict]) -> float:
    """The seed-mean search metric of a finished variant (nan if any seed diverged)."""
    return _mean([r["metric"] for r in records])


def _best(ctx: _Context, results: Sequence[tuple[dict, list[dict]]], k: int) -> list[dict]:
    sign = 1.0 if ctx.sweep.direction == "maximize" else -1.0
    scored = [(sign * variant_score(recs), i) for i, (_, recs) in enumerate(results)
              if math.isfinite(variant_score(recs)) and recs[0]["status"] == "done"]
    return [results[i][0] for _, i in sorted(scored, key=lambda t: (-t[0], t[1]))[:k]]


def _print_costs(ctx: _Context, variants: Sequence[Mapping], note: str = "") -> None:
    rows = costs.cost_sheet(ctx.config, variants)
    ctx.print_fn("Cost sheet (before training):\n" + costs.write(rows, ctx.workdir, note))


def _run_static(ctx: _Context, variants: Sequence[Mapping]) -> list[tuple[dict, list[dict]]]:
    _print_costs(ctx, variants)
    return [(dict(v), run_variant(ctx, v)) for v in variants]


def _run_coarse_to_fine(ctx: _Context, params: list[space.Param]) -> list[tuple[dict, list[dict]]]:
    sweep, results, sheet = ctx.sweep, [], []
    for round_index in range(sweep.rounds):
        variants = space.random_variants(params, sweep.num_trials, sweep.sampler_seed + round_index,
                                         sweep.variants)
        sheet += variants
        ranges = ", ".join(f"{p.field} in [{p.low:.4g}, {p.high:.4g}]" if p.kind != "choice"
                           else f"{p.field} in {list(p.values)}" for p in params)
        ctx.print_fn(f"coarse-to-fine round {round_index + 1}/{sweep.rounds}: {ranges}")
        _print_costs(ctx, sheet, "Later coarse-to-fine rounds sample inside the same ranges.")
        round_results = [(dict(v), run_variant(ctx, v)) for v in variants]
        results += round_results
        params = space.narrow(params, _best(ctx, round_results, sweep.keep))
    return results


def _check(sweep: ml_collections.ConfigDict) -> None:
    if sweep.strategy not in space.STRATEGIES:
        raise ValueError(f"sweep.strategy {sweep.strategy!r} is not one of {', '.join(space.STRATEGIES)}")
    if sweep.direction not in ("maximize", "minimize"):
        raise ValueError(f"sweep.direction must be maximize or minimize, got {sweep.direction!r}")
    if sweep.seeds < 1 or sweep.num_trials < 1 or sweep.rounds < 1 or sweep.keep < 1:
        raise ValueError("sweep.seeds, num_trials, rounds and keep must be >= 1")


def run_sweep(config: ml_collections.ConfigDict, workdir: str, *, train_fn: TrainFn | None = None,
              max_runs: int | None = None, print_fn: Callable[[str], None] = print) -> dict:
    """Runs `config.sweep` in `workdir` (resuming what is there) and writes the report.

    `train_fn(config, workdir) -> results` defaults to the engine's train_and_evaluate;
    `max_runs` stops after that many training runs (the summary then says "stopped").
    Returns the report's summary: {"status", "workdir", "best", "rows", ...}.
    """
    if "sweep" not in config:
        raise ValueError("the config has no sweep; set config.sweep = cnnjax.sweep.sweep_config(...)")
    sweep = config.sweep
    _check(sweep)
    for field in ("study", "prepare"):
        if sweep.get(field):  # a misspelt function fails here, before anything trains
            study_function(sweep[field], field=f"sweep.{field}")
    params = space.parse_space(sweep.params)
    _check_variants(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sweep_config.json"), "w") as f:
        f.write(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))
    ctx = _Context(config, workdir, train_fn or train_and_evaluate, max_runs, print_fn)
    status = "done"
    try:
        if sweep.get("prepare"):
            ctx.config = _prepared(ctx.config, workdir)
        if sweep.strategy == "grid":
            results = _run_static(ctx, space.grid_variants(params, sweep.variants))
        elif sweep.strategy == "random":
            results = _run_static(ctx, space.random_variants(params, sweep.num_trials,
                                                             sweep.sampler_seed, sweep.variants))
        elif sweep.strategy == "coarse_to_fine":
            results = _run_coarse_to_fine(ctx, params)
        else:
            from cnnjax.sweep import bayes

            results = bayes.run_optuna(ctx, params)
    except SweepStopped as stop:
        print_fn(str(stop))
        status, results = "stopped", collect(workdir)
    from cnnjax.sweep import report

    summary = report.write_report(workdir, results, sweep)
    summary["status"] = status
    if sweep.study and status == "stopped":  # a preempted sweep must exit fast; the rerun reports
        print_fn(f"{sweep.study} adds its sections when the sweep has finished; rerun to resume")
    elif sweep.study:
        sections = study_function(sweep.study)(workdir=workdir, config=config, summary=summary,
                                               results=[(v, r) for v, r in results if r])
        report.append_sections(workdir, sections)
    return summary


def _check_variants(config: ml_collections.ConfigDict) -> None:
    """Every explicit variant's fields exist and its finetune settings parse, before anything (a
    sweep.prepare pretraining included) runs; a typo would otherwise surface after hours."""
    from cnnjax import finetune

    for variant in config.sweep.variants:
        trial = space.apply_variant(config, variant)
        if "finetune" in trial:
            finetune.check_config(trial.finetune)
            finetune.lr_groups(trial.finetune)


def study_function(spec: str, field: str = "sweep.study") -> Callable[..., Any]:
    """The callable named by sweep.study (or sweep.prepare): "package.module[:function]", function
    defaulting to report."""
    import importlib

    module_name, _, function = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{field} {spec!r}: cannot import {module_name!r} ({error}); "
                         "give an importable module such as cnnjax.studies.bottleneck") from None
    fn = getattr(module, function or "report", None)
    if not callable(fn):
        raise ValueError(f"{field} {spec!r}: {module_name} has no function {function or 'report'!r}")
    return fn


def _prepared(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """`config` with the fields sweep.prepare returns set, before the variants apply their own."""
    overrides = study_function(config.sweep.prepare, field="sweep.prepare")(workdir=workdir,
                                                                             config=config)
    prepared = space.apply_variant(config, overrides or {})
    prepared.sweep = config.sweep  # apply_variant drops the sweep; the strategies read it
    return prepared


def collect(workdir: str) -> list[tuple[dict, list[dict]]]:
    """Every finished run under WORKDIR/trials, grouped by variant (for a stopped sweep's report)."""
    root = os.path.join(workdir, "trials")
    grouped: dict[str, list[dict]] = {}
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for seed_dir in sorted(os.listdir(os.path.join(root, name))):
            record = read_trial(os.path.join(root, name, seed_dir))
            if record is not None:
                grouped.setdefault(name, []).append(record)
    return [(records[0]["fields"], sorted(records, key=lambda r: r["seed"]))
            for records in grouped.values()]
