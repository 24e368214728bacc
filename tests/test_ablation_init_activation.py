"""The init x activation ablation: its smoke sweep writes the study section, the per-layer numbers
match a direct computation from the layers' outputs, and the reading follows the numbers."""

import json

import jax
import numpy as np
import pytest

from cnnjax.config import load_config
from cnnjax.studies import init_activation as study
from cnnjax.studies import load_trial
from cnnjax.sweep import run_sweep

CONFIG = "experiments/ablation_init_activation.py"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    config, _ = load_config(f"{CONFIG}:smoke")
    workdir = tmp_path_factory.mktemp("init_act")
    summary = run_sweep(config, str(workdir), print_fn=lambda _: None)
    measured = json.loads((workdir / study.MEASURED_JSON).read_text())
    return workdir, summary, {m["label"]: m for m in measured["variants"]}


def test_cpu_grid_crosses_every_init_with_every_activation():
    config, _ = load_config(f"{CONFIG}:cpu")
    pairs = [(v["model.kwargs.kernel_init"], v["model.kwargs.act"]) for v in config.sweep.variants]
    inits = ("zeros", "small_normal", "xavier_normal", "he_normal")
    expected = {(i, a) for i in inits for a in ("sigmoid", "tanh", "relu")}
    assert set(pairs) == expected | {("large_normal", "sigmoid"), ("large_normal", "tanh")}
    assert len(pairs) == 14 and config.model.kwargs.norm is False
    assert config.sweep.study == "cnnjax.studies.init_activation"


def test_smoke_sweep_appends_the_study_with_its_plots(sweep):
    workdir, summary, measured = sweep
    assert len(summary["rows"]) == 2
    text = (workdir / "report.md").read_text()
    assert "## Initialisation and activation" in text and "### Reading" in text
    for png in (study.STATS_PNG, study.GRADS_PNG):
        assert f"]({png})" in text and (workdir / png).stat().st_size > 1000
    assert set(measured) == {"zeros-tanh", "N(0,1)-sigmoid"}
    zeros = measured["zeros-tanh"]  # all-zero weights: every unit the same, before and after
    assert study.summarise(zeros)["max spread trained"] == 0.0
    assert "the symmetry never breaks" in text


def _layer_outputs(trial, variables):
    """Each top-level layer's output, straight from flax's captured intermediates."""
    _, state = trial.model.apply(variables, trial.images, train=True, mutable=["batch_stats",
                                 "intermediates"], capture_intermediates=True)
    inter = state["intermediates"]
    names = ["stem", *[f"layer{i}" for i in range(1, trial.model.depth + 1)]]
    return {n: np.asarray(inter[n]["__call__"][0]) for n in names}


def test_layer_statistics_match_the_layer_outputs(sweep):
    workdir, summary, measured = sweep
    row = next(r for r in summary["rows"] if r["variant"].startswith("large_normal-sigmoid"))
    trial = load_trial(str(workdir / "trials" / row["variant"] / "seed_0"))
    outputs = _layer_outputs(trial, jax.device_get(trial.variables))
    stats = {s["name"]: s for s in measured["N(0,1)-sigmoid"]["stats_trained"]}
    for name, a in outputs.items():
        assert stats[name]["std"] == pytest.approx(a.std(), rel=1e-4)
        saturated = np.mean((a < 0.01) | (a > 0.99))
        assert stats[name]["fraction_saturated"] == pytest.approx(saturated, abs=1e-6)
        assert stats[name]["unit_spread"] == pytest.approx(a.std(axis=-1).mean(), rel=1e-4)
    assert max(s["fraction_saturated"] for s in stats.values()) > 0.3  # N(0,1) saturates sigmoids


def _fake(init, act, spread=0.0, last_std=1e-9, saturated=0.0, stem_grad=1e-9):
    layers = [{"name": "stem", "std": 1.0, "fraction_saturated": saturated, "unit_spread": spread},
              {"name": "layer1", "std": last_std, "fraction_saturated": saturated,
               "unit_spread": spread},
              {"name": "head", "std": 5.0, "fraction_saturated": 0.0, "unit_spread": 9.0}]
    grads = {"stem": stem_grad, "layer1": 1.0, "head": 1.0}
    label = f"{study.SHORT_INIT[init]}-{act}"
    return {"label": label, "init": init, "act": act, "depth": 1, "stats_init": layers,
            "stats_trained": layers, "grads_init": grads, "grads_trained": grads}


def test_summary_is_over_hidden_layers_only():
    row = study.summarise(_fake("zeros", "tanh"))  # the head's spread 9.0 is not a hidden layer's
    assert row["max spread trained"] == 0.0 and row["std last/first init"] == pytest.approx(1e-9)


def test_reading_is_decided_by_the_numbers():
    measured = [_fake("zeros", "tanh"), _fake("small_normal", "relu"),
                _fake("xavier_normal", "sigmoid", spread=0.5, last_std=0.5, saturated=0.2),
                _fake("xavier_normal", "tanh", spread=0.5, last_std=0.5, stem_grad=0.1),
                _fake("he_normal", "relu", spread=0.5, last_std=0.5, stem_grad=0.3)]
    acc = {"zeros-tanh": 0.1, "N(0,0.01)-relu": 0.1, "Xavier-sigmoid": 0.2, "Xavier-tanh": 0.9,
           "He-relu": 0.95}
    text = study.reading(measured, acc)
    assert "symmetry never breaks" in text
    assert "with relu the activations vanish with depth (last/first hidden-layer std 1.0e-09" in text
    assert "(He init: 3.0e-01)" in text and "Best overall: He-relu at 95.0%" in text
    assert "sigmoid with Xavier init 20.0% at init" in text and "the other 1 sigmoid/tanh" in text
    assert "Best init per activation: tanh Xavier (90.0%), relu He (95.0%), sigmoid Xavier" in text
    assert "2 of 5 variants end at or below 15%" in text
    broken = study.reading([_fake("zeros", "tanh", spread=0.1),
                            _fake("small_normal", "relu", last_std=0.5)], {})
    assert "the symmetry does break" in broken and "the activations do not vanish" in broken


def test_unknown_size_is_a_one_line_error():
    with pytest.raises(ValueError, match="use no arg"):
        load_config(f"{CONFIG}:tiny")


def test_cached_diagnostics_accept_models_with_list_fields():
    # A model read back from a JSON config can hold lists (unhashable): the compile cache that lets
    # a study measure one net at init and after training must fall back, not fail.
    from cnnjax import diagnostics
    from cnnjax.models.ablation import BottleneckNet

    x, y = jax.random.normal(jax.random.key(0), (4, 8, 8, 1)), np.arange(4)
    listed, tupled = BottleneckNet(width=4, stage_sizes=[1]), BottleneckNet(width=4, stage_sizes=(1,))
    variables = tupled.init(jax.random.key(0), x[:1])
    assert (diagnostics.gradient_norms(listed, variables, x, y)
            == diagnostics.gradient_norms(tupled, variables, x, y))
    assert (diagnostics.layer_statistics(listed, variables, x)
            == diagnostics.layer_statistics(tupled, variables, x))
