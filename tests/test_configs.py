"""Every experiments/*.py config: loads, has the contract fields and a docstring with its command
and expected result, and its `:smoke` version trains offline on the CPU."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

import launch
from cnnjax import config as config_lib
from cnnjax.models import MODELS
from cnnjax.train import losses, optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments", "[a-z]*.py"))
)
REQUIRED = [
    "lenet5_digits",
    "lenet5_mnist",
    "resnet20_cifar10",
    "resnet18_cifar10",
    "vgg16_cifar10",
    "googlenet_cifar10",
    "densenet_bc100_cifar10",
    "mobilenet_v2_cifar10",
    "efficientnet_b0_cifar10",
    "resnet50_imagenet",
    "efficientnet_b0_imagenet",
    "alexnet_imagenet",
    "vgg16_imagenet",
]
FIELDS = [
    "model.name",
    "data.name",
    "data.path",
    "batch_size",
    "num_epochs",
    "seed",
    "optimizer.name",
    "optimizer.learning_rate",
]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name data paths relative to the repository root
    # In-process launch.main calls must not repoint this test session's JAX compilation cache.
    monkeypatch.setenv("CNNJAX_COMPILATION_CACHE", "off")


def test_all_required_configs_exist():
    assert set(REQUIRED) <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_fields_and_docstring(name):
    path = f"experiments/{name}.py"
    config, run_name = config_lib.load_config(path)
    assert isinstance(config, ml_collections.ConfigDict) and run_name == name
    for field in FIELDS:
        node = config
        for part in field.split("."):
            node = node[part]
    assert config.model.name in MODELS
    json.loads(config_lib.to_json(config))
    doc = open(path).read().split('"""')[1]
    command = "python launch.py" if name == "lenet5_digits" else f"python launch.py --config {path}"
    assert command in doc and "Measured" in doc
    if name.startswith(("ablation_", "transfer_")):  # a study states its sweep command and result
        assert "--sweep" in doc
    else:
        assert "Expected" in doc and "Measured:" in doc


# Studies (a sweep of variants plus a report) run their whole smoke sweep in their own test files.
STUDIES = [c for c in CONFIGS if c.startswith(("ablation_", "transfer_"))]


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_declares_a_sweep_and_has_its_own_test(name):
    config, _ = config_lib.load_config(f"experiments/{name}.py:smoke")
    assert config.sweep.variants and config.sweep.study.startswith("cnnjax.studies.")
    family = "transfer" if name.startswith("transfer_") else name
    assert os.path.exists(os.path.join(ROOT, "tests", f"test_{family}.py"))


@pytest.mark.parametrize("name", [c for c in STUDIES if c.startswith("ablation_")])
def test_every_ablation_names_its_sizes_on_an_unknown_one(name):
    with pytest.raises(config_lib.ConfigError,
                       match=f"unknown size 'gpu' for {name}; use no argument .* cpu, smoke"):
        config_lib.load_config(f"experiments/{name}.py:gpu")


# A config whose `:smoke` model another config already trains (its small variant on digits, at the
# same size) runs its own training settings on that model in test_smoke_settings instead: each
# efficientnet_b0 smoke run cost about 30 s of the suite's 10-minute budget.
RUNS = [c for c in CONFIGS if c != "lenet5_digits" and c not in STUDIES]
_SMOKE_MODELS = {c: config_lib.load_config(f"experiments/{c}.py:smoke")[0].model.name for c in RUNS}
SMOKE_RUNS = [c for i, c in enumerate(RUNS)
              if _SMOKE_MODELS[c] not in {_SMOKE_MODELS[r] for r in RUNS[:i]}]


def test_smoke_settings_of_configs_sharing_a_model(tmp_path):
    """The optimizer, schedule and loss of each config left out of SMOKE_RUNS build and take one
    step (its model and data pipeline are the smoke run's of the config that shares them)."""
    shared = [c for c in RUNS if c not in SMOKE_RUNS]
    assert "efficientnet_b0_imagenet" in shared
    for name in shared:
        config = config_lib.load_config(f"experiments/{name}.py:smoke")[0]
        tx, schedule = optim.make_optimizer(config.optimizer, steps_per_epoch=10,
                                            num_epochs=config.num_epochs)
        params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}

        def loss(params, loss_cfg):
            logits = jnp.ones((2, 3)) @ params["w"] + params["b"]
            return losses.compute_loss(loss_cfg, logits, jnp.array([0, 1]), 4)

        grads = jax.grad(loss)(params, config.loss)
        updates, _ = tx.update(grads, tx.init(params), params)
        assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates)), name
        assert float(schedule(0)) >= 0, name


# lenet5_digits:smoke runs as a real subprocess in test_launch.py.
@pytest.mark.slow
@pytest.mark.parametrize("name", SMOKE_RUNS)
def test_smoke_run(name, tmp_path):
    workdir = tmp_path / name
    assert (
        launch.main(
            [
                "--config",
                f"experiments/{name}.py:smoke",
                "--workdir",
                str(workdir),
                "--config.log_every_steps=100",
            ]
        )
        == 0
    )
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 3 and results["dataset"] == "digits"
