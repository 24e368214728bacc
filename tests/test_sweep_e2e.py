"""Sweeps end to end with the real trainer in smoke size (LeNet-5 on the embedded digits, 1 step per run):
a grid through the command line, then a TPE search; reruns train nothing."""

import json
import os

from cnnjax.config import load_config
from cnnjax.sweep import __main__ as cli
from cnnjax.sweep import run_sweep, sweep_config


def _sweep_file(tmp_path, **sweep):
    """An experiment file that declares a sweep over the smoke LeNet-5."""
    path = tmp_path / "lenet_sweep.py"
    path.write_text(
        "from cnnjax.config import base_config, smoke\n"
        "from cnnjax.sweep import sweep_config\n\n"
        "def get_config(arg=None):\n"
        "    config = base_config()\n"
        "    config.data.name = 'digits'\n"
        f"    config.sweep = sweep_config(**{sweep!r})\n"
        "    return smoke(config)\n")
    return str(path)


def test_grid_sweep_end_to_end_through_the_cli(tmp_path, capsys):
    config = _sweep_file(tmp_path, strategy="grid", params={"model.kwargs.pool": ["avg", "max"]})
    workdir = tmp_path / "sweep"
    args = ["--config", config, "--config.num_train_steps=1", "--workdir", str(workdir)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.index("Cost sheet") < out.index("--- pool-avg")  # costs before anything trains
    summary = json.loads((workdir / "summary.json").read_text())
    assert [r["pool"] for r in summary["rows"]] == ["avg", "max"]
    row = summary["rows"][0]
    assert row["params"] == 61706 and row["macs"] == 416520 and row["seeds"] == 1
    assert 0.0 <= row["accuracy"] <= 1.0 and row["images_per_second"] > 0
    results = [workdir / "trials" / r["variant"] / "seed_0" / "results.json" for r in summary["rows"]]
    assert all(p.exists() for p in results)
    stamps = [os.path.getmtime(p) for p in results]
    assert cli.main(args) == 0  # resumed: both runs finished, nothing trains again
    assert "--- pool" not in capsys.readouterr().out
    assert stamps == [os.path.getmtime(p) for p in results]
    for name in ("report.md", "summary.csv", "tradeoffs.png", "costs.md"):
        assert (workdir / name).exists()


def test_tpe_sweep_end_to_end(tmp_path):
    config, _ = load_config("experiments/lenet5_digits.py:smoke")
    config.num_train_steps = 1
    config.sweep = sweep_config(strategy="tpe", num_trials=1,
                                params={"optimizer.learning_rate": ("loguniform", 1e-3, 1e-2)})
    summary = run_sweep(config, str(tmp_path))
    assert summary["status"] == "done" and len(summary["rows"]) == 1
    (trial,) = (tmp_path / "trials").iterdir()
    record = json.loads((trial / "seed_0" / "trial.json").read_text())
    assert 1e-3 <= record["fields"]["optimizer.learning_rate"] <= 1e-2
    assert record["metric"] == record["results"]["best_validation"]["accuracy"]
    saved = json.loads((trial / "seed_0" / "config.json").read_text())
    assert saved["optimizer"]["learning_rate"] == record["fields"]["optimizer.learning_rate"]
    assert "sweep" not in saved  # each trial dir holds an ordinary run config
