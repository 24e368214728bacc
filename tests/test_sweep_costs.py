"""The cost sheet's numbers are cnnjax.profile's, for every variant, and it is written before training."""

import pytest

from cnnjax.config import load_config
from cnnjax.profile import profile_model
from cnnjax.sweep import costs, space, sweep_config


def test_cost_sheet_equals_profile(tmp_path):
    config, _ = load_config("experiments/lenet5_digits.py:smoke")
    config.sweep = sweep_config(params={"model.image_size": [32, 40], "model.kwargs.pool": ["avg", "max"]},
                                device_peak_tflops=1.0, assumed_utilization=0.5)
    variants = space.grid_variants(space.parse_space(config.sweep.params))
    rows = costs.cost_sheet(config, variants)
    assert len(rows) == 4
    for variant, row in zip(variants, rows, strict=True):
        expected = profile_model("lenet5", image_size=variant["model.image_size"], num_classes=10,
                                 in_channels=1, activations=True, pool=variant["model.kwargs.pool"])
        assert row["params"] == expected["params"]
        assert row["macs"] == expected["macs"]
        assert row["activation_bytes_per_example"] == expected["activation_bytes_per_example"]
        assert row["flops_per_step"] == 3 * expected["flops"] * config.batch_size
        assert row["steps"] == config.num_train_steps
        assert row["est_seconds_per_step"] == pytest.approx(row["flops_per_step"] / 0.5e12)
    assert rows[0]["macs"] < rows[2]["macs"]  # the 40x40 input costs more
    text = costs.write(rows, str(tmp_path))
    assert f"{rows[2]['macs']:,}" in text
    assert (tmp_path / "costs.csv").read_text().count("\n") == 5
