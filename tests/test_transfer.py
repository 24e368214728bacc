"""Fine-tuning through the engine: frozen parameters and statistics stay bit-identical over real train
steps and a resume, new heads and first convolutions load as configured, and the transfer
experiment's smoke sweep (pretraining included) writes its report and skips finished work."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cnnjax import config as config_lib
from cnnjax.finetune import path_name
from cnnjax.models import create_model
from cnnjax.pretrained.checkpoint import save_variables
from cnnjax.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"stage_sizes": (1, 1, 1), "width": 4}  # the registry's small CIFAR ResNet


def _source(directory, name, num_classes, shape, **kwargs):
    """A converted-style checkpoint ({params, batch_stats}) of a registry model, random weights."""
    model = create_model(name, num_classes=num_classes, **kwargs)
    variables = model.init(jax.random.PRNGKey(7), jnp.zeros((1, *shape)))
    save_variables(str(directory), variables)
    return jax.device_get(variables)


def _config(name, init_from, steps, **finetune):
    config = config_lib.base_config()
    config.model.name = name
    config = config_lib.smoke(config)
    config.num_train_steps = steps
    config.init_from = str(init_from)
    config.finetune.update(finetune)
    return config


def _saved(workdir, step):
    return ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).restore(step)


def _flat(tree):
    return {path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _is_frozen(name):
    return name.startswith(("stem_", "layer1_"))


def _check_frozen(source, saved):
    for collection in ("params", "batch_stats"):
        before, after = _flat(source[collection]), _flat(saved[collection])
        assert before.keys() == after.keys()
        for name in before:
            same = before[name].tobytes() == after[name].tobytes()
            assert same == _is_frozen(name), (collection, name)


@pytest.mark.parametrize("frozen_bn", ["batch", "running"])
def test_frozen_layers_and_their_statistics_stay_bit_identical(tmp_path, capsys, frozen_bn):
    source = _source(tmp_path / "source", "resnet20", 10, (8, 8, 3), **SMALL)
    workdir = str(tmp_path / "run")
    config = _config("resnet20", tmp_path / "source", 2, freeze=("^stem_", "^layer1_"),
                     frozen_bn=frozen_bn)
    config.model.image_size = 8
    results = train_and_evaluate(config, workdir)
    saved = _saved(workdir, 2)
    _check_frozen(source, saved)  # params and BN statistics (freeze_batch_stats="frozen")
    frozen = sum(v.size for n, v in _flat(source["params"]).items() if _is_frozen(n))
    assert results["trainable_params"] == results["params"] - frozen
    # SGD momentum keeps a trace for the trained parameters only (plus its step counters).
    state_size = sum(np.size(x) for x in jax.tree.leaves(saved["opt_state"]))
    assert results["trainable_params"] <= state_size <= results["trainable_params"] + 4
    out = capsys.readouterr().out
    assert "finetune: " in out
    # stem_bn and layer1_0's bn1, bn2 (SMALL has one block per stage) keep running statistics.
    assert ("finetune: 3 BatchNorm layers normalise with their running statistics" in out) == (
        frozen_bn == "running")


def test_new_head_and_grayscale_first_conv_from_an_rgb_checkpoint_then_resume(tmp_path, capsys):
    source = _source(tmp_path / "source", "lenet5", 3, (32, 32, 3))  # RGB input, 3 classes
    settings = dict(first_conv="repeat", head=(8,), freeze=("^c1/",))
    config = _config("lenet5", tmp_path / "source", 1, **settings)
    config.model.in_channels = 1
    with pytest.raises(ValueError, match="finetune.strict=false") as error:  # 84 -> 3 there
        train_and_evaluate(config, str(tmp_path / "strict"))
    assert "params/head_out/bias" in str(error.value) and "\n" not in str(error.value)

    config.finetune.strict = False
    train_and_evaluate(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "adapted: params/c1/kernel (3 -> 1 input channels, repeat)" in out
    assert "params/output/kernel (checkpoint (84, 3), model (84, 8))" in out
    assert "params/head_out/kernel (not in the checkpoint)" in out
    params = _saved(str(tmp_path / "run"), 1)["params"]
    rgb = source["params"]["c1"]["kernel"]  # frozen, so still exactly the adapted kernel
    np.testing.assert_array_equal(params["c1"]["kernel"], rgb.sum(axis=2, keepdims=True))
    assert params["output"]["kernel"].shape == (84, 8) and params["head_out"]["kernel"].shape == (8, 10)
    assert not np.array_equal(params["c3"]["kernel"], source["params"]["c3"]["kernel"])

    config.num_train_steps = 2  # the same command with a longer run resumes: same optimizer state tree
    results = train_and_evaluate(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "resumed from the checkpoint at step 1" in out and "init_from" not in out
    params = _saved(str(tmp_path / "run"), 2)["params"]
    assert results["steps"] == 2
    np.testing.assert_array_equal(params["c1"]["kernel"], rgb.sum(axis=2, keepdims=True))

    config.finetune.freeze = ()  # other trained params: another optimizer state tree
    config.num_train_steps = 3
    with pytest.raises(ValueError, match="does not fit this run's train state") as error:
        train_and_evaluate(config, str(tmp_path / "run"))
    assert "new workdir" in str(error.value) and "\n" not in str(error.value)
    assert ocp.CheckpointManager(os.path.join(str(tmp_path / "run"), "checkpoints")).latest_step() == 2


def test_transfer_smoke_sweep_writes_its_report_and_skips_finished_work(tmp_path, monkeypatch, capsys):
    from cnnjax.sweep import run_sweep

    monkeypatch.chdir(ROOT)
    config, _ = config_lib.load_config("experiments/transfer_mnist_digits.py:smoke")
    config.sweep.variants = config.sweep.variants[:3]  # scratch, frozen backbone, full fine-tune
    workdir = str(tmp_path / "sweep")
    summary = run_sweep(config, workdir)
    assert summary["status"] == "done" and len(summary["rows"]) == 3
    report = open(os.path.join(workdir, "report.md")).read()
    assert "## Transfer to lenet5 on digits" in report and "Reading: Trained from scratch" in report
    assert os.path.exists(os.path.join(workdir, "transfer_curves.png"))
    out = capsys.readouterr().out
    assert out.count("init_from ") == 2  # every variant but scratch starts from the pretraining
    assert "trained on digits for 3 steps" in report

    run_sweep(config, workdir)  # a rerun trains nothing: pretraining and trials are finished
    out = capsys.readouterr().out
    assert "already finished at step 3" in out and "--- scratch" not in out
