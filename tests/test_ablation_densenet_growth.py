"""The DenseNet growth-rate ablation: concatenation arithmetic traced from the real DenseNet, and the
smoke sweep's report checked against hand arithmetic and an independent parameter count."""

import json
import math

import jax
import jax.numpy as jnp
import pytest

from cnnjax.config import ConfigError, load_config
from cnnjax.models.densenet import DenseNet, DenseNetBC100
from cnnjax.profile import count_params
from cnnjax.studies import densenet_growth
from cnnjax.sweep import run_sweep

CONFIG = "experiments/ablation_densenet_growth.py"


def test_densenet_bc100_concatenation_arithmetic():
    layers = densenet_growth.traced_widths(DenseNetBC100(growth_rate=12), (8, 8, 3))
    rows = densenet_growth.concatenation_rows(layers, 12, 0.5)
    # Huang et al. 2017, DenseNet-BC-100 with k = 12: the stem is 2k = 24; 24 + 16*12 = 216, halved
    # to 108; 108 + 192 = 300, halved to 150; 150 + 192 = 342.
    assert [(r["k0"], r["traced out"], r["traced transition"]) for r in rows] == [
        (24, 216, 108), (108, 300, 150), (150, 342, None)]
    assert all(r["k0 + L*k"] == r["traced out"] and r["every layer adds k"] for r in rows)
    assert [r["floor(theta*c)"] for r in rows] == [108, 150, None]
    assert len(layers) == 3 * 16 + 2


def test_concatenation_rows_expose_a_layer_that_breaks_the_formula():
    layers = [{"name": "block1_layer1", "in": 8, "out": 12}, {"name": "block1_layer2", "in": 12, "out": 17},
              {"name": "transition1", "in": 17, "out": 8}, {"name": "block2_layer1", "in": 8, "out": 12}]
    first, second = densenet_growth.concatenation_rows(layers, 4, 0.5)
    assert (first["k0 + L*k"], first["traced out"], first["every layer adds k"]) == (16, 17, False)
    assert first["floor(theta*c)"] == 8 and second["every layer adds k"]


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    config, _ = load_config(f"{CONFIG}:smoke")
    workdir = tmp_path_factory.mktemp("densenet_growth")
    summary = run_sweep(config, str(workdir), print_fn=lambda _: None)
    return config, workdir, summary


def test_smoke_sweep_reports_arithmetic_costs_and_plots(smoke_sweep):
    config, workdir, summary = smoke_sweep
    report = (workdir / "report.md").read_text()
    assert "## DenseNet growth rate k" in report and "### Reading" in report
    for png in (densenet_growth.ACCURACY_PNG, densenet_growth.CHANNELS_PNG):
        assert f"]({png})" in report and (workdir / png).stat().st_size > 0
    data = json.loads((workdir / densenet_growth.JSON_NAME).read_text())
    assert [v["growth_rate"] for v in data["variants"]] == [3, 5]
    rows = {row["variant"]: row for row in summary["rows"]}
    block_config = tuple(config.model.kwargs.block_config)
    assert block_config == (1, 1)
    for v, by_hand in zip(data["variants"], ([(6, 9, 4), (4, 7, None)], [(10, 15, 7), (7, 12, None)]),
                          strict=True):
        # stem 2k, one layer adds k (3k), the transition keeps floor(1.5k), one more layer adds k.
        assert [(b["k0"], b["traced out"], b["traced transition"]) for b in v["blocks"]] == by_hand
        k = v["growth_rate"]
        model = DenseNet(block_config=block_config, growth_rate=k, stem="cifar", num_classes=10)
        shapes = jax.eval_shape(model.init, jax.random.key(0),
                                jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
        assert v["params"] == rows[v["variant"]]["params"] == count_params(shapes["params"])
    small, large = data["variants"]
    assert f"multiplies the parameters by {large['params'] / small['params']:.1f}x" in data["reading"]
    assert "(k ratio)^2 = 2.8x" in data["reading"] and data["reading"] in report
    assert math.isfinite(small["accuracy"])


def test_configs_for_each_size():
    full, _ = load_config(CONFIG)
    assert full.model.name == "densenet_bc100" and full.data.name == "cifar10"
    assert [v["model.kwargs.growth_rate"] for v in full.sweep.variants] == [12, 24, 32, 40]
    assert full.sweep.seeds == 3 and full.sweep.study == "cnnjax.studies.densenet_growth"
    cpu, _ = load_config(f"{CONFIG}:cpu")
    assert cpu.data.name == "idx" and cpu.data.path == "../shared/datasets/mnist"
    with pytest.raises(ConfigError, match="unknown size 'gpu'.*cpu, smoke"):
        load_config(f"{CONFIG}:gpu")
