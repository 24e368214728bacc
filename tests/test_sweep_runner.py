"""Sweep strategies, seeds, resume and pruning, driven by a stand-in trainer (no compiles): grid,
random, coarse-to-fine, TPE and GP propose the right variants, and a rerun skips finished runs."""

import json
import math
import os

import pytest

from cnnjax.config import load_config
from cnnjax.sweep import costs, run_sweep, space, sweep_config


class FakeTrainer:
    """Validation accuracy peaks at learning_rate 1e-2 and grows with the steps trained."""

    def __init__(self):
        self.calls = []

    def __call__(self, config, workdir):
        os.makedirs(workdir, exist_ok=True)
        self.calls.append((workdir, config.num_train_steps))
        lr = config.optimizer.learning_rate
        steps = config.num_train_steps if config.num_train_steps > 0 else 100
        acc = 1 - abs(math.log10(lr) + 2) / 4 + 0.01 * config.seed - 1 / steps
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({"steps": steps}, f)
        return {"test": {"accuracy": acc}, "best_validation": {"accuracy": acc}, "params": 10,
                "macs": 100 if config.model.kwargs.get("pool", "avg") == "avg" else 200,
                "train_seconds": 1.0, "images_per_second": 10.0}


def _config(**sweep):
    config, _ = load_config("experiments/lenet5_digits.py:smoke")
    config.sweep = sweep_config(**sweep)
    return config


def test_grid_runs_every_combination_and_seed_and_resumes(tmp_path):
    config = _config(strategy="grid", seeds=2, params={
        "optimizer.learning_rate": [1e-3, 1e-2], "model.kwargs.pool": ["avg", "max"]})
    trainer = FakeTrainer()
    summary = run_sweep(config, str(tmp_path), train_fn=trainer, max_runs=3)
    assert summary["status"] == "stopped" and len(trainer.calls) == 3
    summary = run_sweep(config, str(tmp_path), train_fn=trainer)
    assert summary["status"] == "done"
    dirs = [d for d, _ in trainer.calls]
    assert len(dirs) == 8 and len(set(dirs)) == 8  # 4 variants x 2 seeds, none run twice
    assert {os.path.basename(d) for d in dirs} == {"seed_0", "seed_1"}
    assert len(summary["rows"]) == 4 and summary["rows"][0]["seeds"] == 2
    assert "learning_rate-0.01" in summary["best"]
    assert (tmp_path / "costs.csv").exists() and (tmp_path / "report.md").exists()
    run_sweep(config, str(tmp_path), train_fn=trainer)
    assert len(trainer.calls) == 8  # a finished sweep trains nothing


def test_random_variants_are_reproducible_and_in_range(tmp_path):
    params = space.parse_space(space.nest({"optimizer.learning_rate": ("loguniform", 1e-4, 1e-1),
                                           "num_epochs": ("int", 1, 5), "model.kwargs.act": ["relu", "tanh"]}))
    draws = space.random_variants(params, 20, seed=3)
    assert draws == space.random_variants(params, 20, seed=3)
    assert all(1e-4 <= d["optimizer.learning_rate"] <= 1e-1 and d["num_epochs"] in range(1, 6)
               for d in draws)
    assert {d["model.kwargs.act"] for d in draws} == {"relu", "tanh"}
    config = _config(strategy="random", num_trials=3, params={"optimizer.learning_rate": ("loguniform", 1e-4, 1e-1)})
    trainer = FakeTrainer()
    summary = run_sweep(config, str(tmp_path), train_fn=trainer)
    assert len(trainer.calls) == 3 and len(summary["rows"]) == 3


def test_grid_takes_points_of_a_range_and_rejects_bad_specs():
    (param,) = space.parse_space({"lr": ("loguniform", 1e-4, 1e-2, 3)})
    assert param.grid() == pytest.approx([1e-4, 1e-3, 1e-2])
    with pytest.raises(ValueError, match="point count"):
        space.parse_space({"lr": ("uniform", 0.0, 1.0)})[0].grid()
    with pytest.raises(ValueError, match="low < high"):
        space.parse_param("lr", ("loguniform", 0.0, 1.0))
    with pytest.raises(ValueError, match="expected a list"):
        space.parse_param("lr", 0.1)
    with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
        space.apply_variant(_config(), {"optimizer.learning_rat": 0.1})


def test_coarse_to_fine_narrows_around_the_best(tmp_path):
    config = _config(strategy="coarse_to_fine", rounds=2, num_trials=4, keep=2,
                     params={"optimizer.learning_rate": ("loguniform", 1e-5, 1.0)})
    trainer = FakeTrainer()
    summary = run_sweep(config, str(tmp_path), train_fn=trainer)
    assert len(trainer.calls) == 8
    first = space.random_variants(space.parse_space(config.sweep.params), 4, 0)
    lrs = sorted(v["optimizer.learning_rate"] for v in first)
    best2 = sorted(lrs, key=lambda lr: abs(math.log10(lr) + 2))[:2]
    (narrowed,) = space.narrow(space.parse_space(config.sweep.params),
                               [{"optimizer.learning_rate": lr} for lr in best2])
    assert narrowed.low >= 1e-5 and narrowed.high <= 1.0
    assert narrowed.high / narrowed.low < 1e5  # a narrower range than the first round's
    second = [json.load(open(os.path.join(d, "trial.json")))["fields"]["optimizer.learning_rate"]
              for d, _ in trainer.calls[4:]]
    assert all(narrowed.low <= lr <= narrowed.high for lr in second)
    assert len(summary["rows"]) == 8


def test_gp_without_torch_is_a_one_line_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    config = _config(strategy="gp", num_trials=2, startup_trials=1,
                     params={"optimizer.learning_rate": ("loguniform", 1e-4, 1e-1)})
    with pytest.raises(ValueError, match="needs PyTorch: pip install torch"):
        run_sweep(config, str(tmp_path), train_fn=FakeTrainer(), max_runs=1)


@pytest.mark.parametrize("strategy", ["tpe", "gp"])
def test_optuna_search_resumes_its_study(tmp_path, strategy):
    if strategy == "gp":
        pytest.importorskip("torch", reason="Optuna's GPSampler needs PyTorch")
    config = _config(strategy=strategy, num_trials=4, startup_trials=2,
                     params={"optimizer.learning_rate": ("loguniform", 1e-4, 1e-1),
                             "model.kwargs.pool": ["avg", "max"]})
    trainer = FakeTrainer()
    assert run_sweep(config, str(tmp_path), train_fn=trainer, max_runs=2)["status"] == "stopped"
    assert (tmp_path / "study.db").exists()
    summary = run_sweep(config, str(tmp_path), train_fn=trainer)
    assert summary["status"] == "done"
    assert len(trainer.calls) == 4 and len({d for d, _ in trainer.calls}) == 4
    assert len(summary["rows"]) == 4


def test_interrupted_trial_is_rerun_in_its_own_directory(tmp_path):
    config = _config(strategy="tpe", num_trials=2, startup_trials=2,
                     params={"optimizer.learning_rate": ("loguniform", 1e-4, 1e-1)})
    first = FakeTrainer()

    def interrupted(trial_config, workdir):
        first(trial_config, workdir)
        return {"status": "interrupted", "step": 1}

    assert run_sweep(config, str(tmp_path), train_fn=interrupted)["status"] == "stopped"
    again = FakeTrainer()
    run_sweep(config, str(tmp_path), train_fn=again)
    assert again.calls[0][0] == first.calls[0][0]  # resumes where the SIGTERM left it
    assert len(again.calls) == 2


def test_pruning_stops_hopeless_variants_between_epochs(tmp_path):
    config = _config(strategy="tpe", num_trials=5, startup_trials=5, prune=True,
                     prune_startup_trials=1, prune_warmup_epochs=0,
                     params={"optimizer.learning_rate": ("loguniform", 1e-6, 1e-1)})
    per_epoch = costs.input_facts(config)["steps_per_epoch"]
    config.num_train_steps = 2 * per_epoch
    trainer = FakeTrainer()
    summary = run_sweep(config, str(tmp_path), train_fn=trainer)
    stages = [steps for _, steps in trainer.calls]
    assert set(stages) == {per_epoch, 2 * per_epoch}  # epoch 1 stops at its end; the last stage is the full config
    statuses = [row["status"] for row in summary["rows"]]
    assert "pruned" in statuses and "done" in statuses


def test_a_diverged_variant_is_recorded_not_fatal(tmp_path):
    from cnnjax.train.loop import NonFiniteLossError

    config = _config(strategy="grid", params={"optimizer.learning_rate": [1e-2, 10.0]})
    trainer = FakeTrainer()

    def explode_at_high_lr(trial_config, workdir):
        if trial_config.optimizer.learning_rate > 1:
            raise NonFiniteLossError("non-finite loss by step 2")
        return trainer(trial_config, workdir)

    summary = run_sweep(config, str(tmp_path), train_fn=explode_at_high_lr)
    assert [row["status"] for row in summary["rows"]] == ["done", "diverged"]
    assert summary["rows"][1]["accuracy"] is None or math.isnan(summary["rows"][1]["accuracy"])
    assert "learning_rate-0.01" in summary["best"]


def study_report(workdir, config, summary, results):
    """A stand-in study (sweep.study = "test_sweep_runner:study_report")."""
    names = ", ".join(sorted(r["variant"] for r in summary["rows"]))
    return f"## Study section\n\n{len(results)} variants: {names}; lr0 {config.optimizer.learning_rate}\n"


def test_study_hook_appends_its_sections_and_a_bad_name_fails_before_training(tmp_path):
    config = _config(strategy="grid", study="test_sweep_runner:study_report",
                     params={"optimizer.learning_rate": [1e-3, 1e-2]})
    trainer = FakeTrainer()
    run_sweep(config, str(tmp_path), train_fn=trainer, print_fn=lambda s: None)
    report = (tmp_path / "report.md").read_text()
    assert report.index("# Sweep report") < report.index("## Study section")
    assert "2 variants: learning_rate-0.001" in report
    config.sweep.study = "cnnjax.studies_missing"
    trainer.calls.clear()
    with pytest.raises(ValueError, match="cannot import 'cnnjax.studies_missing'"):
        run_sweep(config, str(tmp_path / "bad"), train_fn=trainer, print_fn=lambda s: None)
    assert trainer.calls == []


def test_a_misspelt_variant_field_fails_before_prepare_or_training(tmp_path):
    config = _config(strategy="grid", prepare="test_sweep_runner:record_prepare",
                     variants=[{"name": "ok"}, {"name": "typo", "finetune.freez": ("^c1/",)}])
    trainer = FakeTrainer()
    with pytest.raises(ValueError, match="finetune.freez"):
        run_sweep(config, str(tmp_path), train_fn=trainer, print_fn=lambda s: None)
    assert trainer.calls == [] and PREPARED == []


PREPARED = []


def record_prepare(workdir, config):
    PREPARED.append(workdir)
    return {}


def test_a_stopped_sweep_skips_the_study_hook(tmp_path):
    config = _config(strategy="grid", study="test_sweep_runner:study_report",
                     params={"optimizer.learning_rate": [1e-3, 1e-2]})
    lines = []
    summary = run_sweep(config, str(tmp_path), train_fn=FakeTrainer(), max_runs=1, print_fn=lines.append)
    assert summary["status"] == "stopped"
    assert "## Study section" not in (tmp_path / "report.md").read_text()
    assert any("rerun to resume" in line for line in lines)
