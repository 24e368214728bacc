"""Bayesian search with Optuna (TPE or Gaussian process), persisted in WORKDIR/study.db, with pruning."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import optuna

from cnnjax.sweep import space

_PRIMITIVE = (type(None), bool, int, float, str)


def distribution(param: space.Param) -> optuna.distributions.BaseDistribution:
    if param.kind == "choice":
        return optuna.distributions.CategoricalDistribution([_encode(v) for v in param.values])
    if param.is_int:
        return optuna.distributions.IntDistribution(int(param.low), int(param.high), log=param.log)
    return optuna.distributions.FloatDistribution(param.low, param.high, log=param.log)


def _encode(value: Any) -> Any:
    """Optuna's categories must be primitives: others (tuples) travel as JSON text."""
    return value if isinstance(value, _PRIMITIVE) else "json:" + json.dumps(value)


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("json:"):
        decoded = json.loads(value[5:])
        return tuple(decoded) if isinstance(decoded, list) else decoded
    return value


def make_study(ctx) -> optuna.Study:
    """The study in WORKDIR/study.db, created or loaded (resumed)."""
    sweep = ctx.sweep
    path = os.path.abspath(os.path.join(ctx.workdir, "study.db"))
    storage = "sqlite:///" + path
    # A resumed study reseeds its sampler past the trials it holds: the same seed would propose the
    # same (already finished) variants again.
    asked = len(optuna.load_study(study_name="sweep", storage=storage).trials) if os.path.exists(path) else 0
    seed = sweep.sampler_seed + asked
    if sweep.strategy == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=sweep.startup_trials)
    else:
        # Optuna's Gaussian-process sampler is written in PyTorch; cnnjax does not depend on torch.
        if importlib.util.find_spec("torch") is None:
            raise ValueError("sweep.strategy 'gp' uses Optuna's GPSampler, which needs PyTorch: "
                             "pip install torch (a CPU build is enough), or use strategy 'tpe'")
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=sweep.startup_trials)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=sweep.prune_startup_trials,
                                          n_warmup_steps=sweep.prune_warmup_epochs)
              if sweep.prune else optuna.pruners.NopPruner())
    return optuna.create_study(storage=storage, study_name="sweep", load_if_exists=True,
                               direction=sweep.direction, sampler=sampler, pruner=pruner)


def _requeue_stale(study: optuna.Study) -> None:
    """Trials left RUNNING by an interrupted sweep: failed, and their values asked again first, so
    the rerun lands in the same trial directory and resumes from its checkpoint."""
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(stale.params, user_attrs={"requeued": stale.number})


def _finished(study: optuna.Study) -> int:
    """Trials that count against num_trials: complete, pruned, or failed by divergence."""
    states = optuna.trial.TrialState
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (states.COMPLETE, states.PRUNED)
               or (t.state == states.FAIL and t.user_attrs.get("diverged")))


def run_optuna(ctx, params: list[space.Param]) -> list[tuple[dict, list[dict]]]:
    """Asks, trains and tells until sweep.num_trials variants have finished; returns them all."""
    from cnnjax.sweep.runner import _print_costs, run_variant, variant_score

    if ctx.sweep.variants:
        raise ValueError("sweep.variants (explicit variants) work with grid, random and "
                         "coarse_to_fine; for tpe/gp put every field in sweep.params")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _print_costs(ctx, space.corner_variants(params), "Bayesian search: the rows are the corners of the space (every choice, "
                 "each range at its ends); trials fall between them.")
    study = make_study(ctx)
    _requeue_stale(study)
    distributions = {p.field: distribution(p) for p in params}
    results = []
    states = optuna.trial.TrialState
    while _finished(study) < ctx.sweep.num_trials:
        trial = study.ask(distributions)
        variant = {field: _decode(value) for field, value in trial.params.items()}
        records = run_variant(ctx, variant, trial)
        results.append((variant, records))
        if records[0]["status"] == "pruned":
            study.tell(trial, state=states.PRUNED)
        elif any(r["status"] == "diverged" for r in records):
            trial.set_user_attr("diverged", True)
            study.tell(trial, state=states.FAIL)
        else:
            study.tell(trial, variant_score(records))
    return _all_variants(ctx, study, results)


def _all_variants(ctx, study: optuna.Study, fresh: list) -> list[tuple[dict, list[dict]]]:
    """Every finished variant of the study, also those finished by earlier (interrupted) calls."""
    from cnnjax.sweep.runner import read_trial, trial_dir

    seen, results = set(), []
    for t in study.get_trials(deepcopy=False):
        variant = {field: _decode(value) for field, value in t.params.items()}
        name = space.variant_name(variant)
        if name in seen or t.state == optuna.trial.TrialState.RUNNING:
            continue
        records = [read_trial(trial_dir(ctx.workdir, name, s)) for s in ctx.seeds()]
        records = [r for r in records if r is not None]
        if records:
            seen.add(name)
            results.append((variant, records))
    return results or fresh
