"""The skip-connection ablation: its smoke sweep writes the study section, and each number in it
matches an independent computation (parameter arithmetic, training curve, init, gradient norms)."""

import json

import jax
import numpy as np
import optax
import pytest

from cnnjax.config import load_config
from cnnjax.distributed import make_mesh
from cnnjax.models.ablation import PlainNet
from cnnjax.profile import profile_module
from cnnjax.studies import final_training, initial_variables, load_trial
from cnnjax.studies import skip_connections as study
from cnnjax.sweep import run_sweep
from cnnjax.train.state import create_train_state

CONFIG = "experiments/ablation_skip_connections.py"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    config, _ = load_config(f"{CONFIG}:smoke")
    config.num_train_steps = 2
    # plain2 | plain4 vs residual4 is enough for every section; dropping residual2 saves a run
    config.sweep.variants = [v for v in config.sweep.variants if v["name"] != "residual2"]
    workdir = tmp_path_factory.mktemp("skip")
    summary = run_sweep(config, str(workdir), print_fn=lambda _: None)
    return workdir, summary


def test_smoke_sweep_appends_the_study_with_its_plots(sweep):
    workdir, summary = sweep
    assert [r["variant"].rsplit("_", 1)[0] for r in summary["rows"]] == [
        "plain2", "plain4", "residual4"]
    text = (workdir / "report.md").read_text()
    assert "## Skip connections" in text and "### Reading" in text
    for png in (study.LOSS_PNG, study.GRADS_PNG):
        assert f"]({png})" in text and (workdir / png).stat().st_size > 1000
    measured = json.loads((workdir / study.MEASURED_JSON).read_text())
    assert [m["label"] for m in measured["variants"]] == ["plain-2", "plain-4", "residual-4"]
    assert {a["params"] for a in measured["arithmetic"][1:]} == {702}  # skips add no weights
    assert "grads_no_norm_init" not in measured["variants"][0]  # only for the deepest pair


def _seed_dir(workdir, summary, name):
    row = next(r for r in summary["rows"] if r["variant"].startswith(name + "_"))
    return workdir / "trials" / row["variant"] / "seed_0"


def test_final_training_loss_is_the_last_epochs_logged_mean(sweep):
    workdir, summary = sweep
    seed_dir = _seed_dir(workdir, summary, "plain4")
    lines = [json.loads(line) for line in (seed_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r.get("split") == "train"]
    assert len(train) == 2  # smoke: 2 steps, logged every step, all inside epoch 1
    expected = np.mean([r["loss"] for r in train])
    measured = json.loads((workdir / study.MEASURED_JSON).read_text())["variants"]
    plain4 = next(m for m in measured if m["label"] == "plain-4")
    assert plain4["train_loss"] == pytest.approx(expected, rel=1e-6)
    late = [{"epoch": e, "loss": v, "accuracy": 0.0} for e, v in ((0.5, 9.0), (1.0, 3.0), (1.5, 2.0),
                                                                  (2.0, 1.0))]
    assert final_training(late)["loss"] == pytest.approx(1.5)  # epochs in (1, 2] only


def test_initial_variables_are_the_trainings_and_gradients_match_jax_grad(sweep):
    workdir, summary = sweep
    trial = load_trial(str(_seed_dir(workdir, summary, "residual4")))
    state = create_train_state(trial.model, optax.identity(), seed=trial.config.seed,
                               input_shape=tuple(trial.images.shape[1:]), mesh=make_mesh())
    init = initial_variables(trial)
    jax.tree.map(np.testing.assert_array_equal, init["params"], jax.device_get(state.params))

    def loss(params):
        logits, _ = trial.model.apply({**init, "params": params}, trial.images, train=True,
                                      mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, trial.labels).mean()

    stem = jax.jit(jax.grad(loss))(init["params"])["stem"]
    expected = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(stem)))
    measured = json.loads((workdir / study.MEASURED_JSON).read_text())["variants"]
    residual4 = next(m for m in measured if m["label"] == "residual-4")
    assert residual4["grads_init"]["stem"] == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("depth, residual", [(20, False), (20, True)])
def test_parameter_arithmetic_from_the_real_module(depth, residual):
    # README: 47,066 params at depth 20, width 16 (1 input channel); 9*16*16 = 2,304 per layer.
    counts = study.parameter_arithmetic(PlainNet(depth=depth, residual=residual), (8, 8, 1))
    assert counts == {"params": 47066, "params_formula": 47066, "layer_kernel": 2304,
                      "layer_kernel_formula": 2304}
    # MACs: 64 positions x (stem 9*1*16 + 20 layers x 9*16*16) + head 16*10 = 2,958,496.
    assert profile_module(PlainNet(depth=depth, residual=residual), (8, 8, 1))["macs"] == 2958496


def test_parameter_arithmetic_cifar_depth_56():
    counts = study.parameter_arithmetic(PlainNet(depth=56), (32, 32, 3))
    # 9*3*16 + 56*2,304 + 57*2*16 (batch norm) + 16*10 + 10
    assert counts["params"] == counts["params_formula"] == 432 + 129024 + 1824 + 170


def _fake(depth, residual, loss, stem_bn=1.0, stem_plain=1e-4):
    label = f"{'residual' if residual else 'plain'}-{depth}"
    grads = {"stem": stem_bn, f"layer{depth}": 1.0}
    return {"label": label, "depth": depth, "residual": residual, "train_loss": loss,
            "train_accuracy": 1.0 - loss, "grads_init": grads, "grads_trained": grads,
            "grads_no_norm_init": {"stem": 1.0 if residual else stem_plain}}


def test_reading_is_decided_by_the_numbers():
    degraded = [_fake(8, False, 0.01), _fake(8, True, 0.01), _fake(56, False, 0.8),
                _fake(56, True, 0.05)]
    text = study.reading(degraded, {})
    assert "the deeper plain net trains worse (the degradation problem)" in text
    assert "At depth 56 identity skips lower the final training loss" in text
    assert "1e+04x" in text  # stem gradient without batch norm: 1.0 residual / 1e-4 plain
    healthy = [_fake(8, False, 0.5), _fake(56, False, 0.1), _fake(56, True, 0.2)]
    text = study.reading(healthy, {})
    assert "no degradation at this size" in text and "identity skips do not lower" in text


def test_unknown_size_is_a_one_line_error():
    with pytest.raises(ValueError, match="use no arg"):
        load_config(f"{CONFIG}:tiny")
