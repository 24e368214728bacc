"""launch.py end to end (the run directory it writes) and its one-line errors for bad configs."""

import json
import os
import subprocess
import sys

import pytest
from launch_env import ROOT, subprocess_env

import launch
from cnnjax import config as config_lib


@pytest.fixture(autouse=True)
def _no_persistent_cache(monkeypatch):
    """In-process launch.main calls must not repoint this test session's JAX compilation cache."""
    monkeypatch.setenv("CNNJAX_COMPILATION_CACHE", "off")


def test_smoke_run_writes_the_whole_run_directory(tmp_path):
    workdir = tmp_path / "run"
    env = subprocess_env()
    out = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "--config",
            "experiments/lenet5_digits.py:smoke",
            "--workdir",
            str(workdir),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "epoch" in out.stdout and "test.accuracy" in out.stdout  # epoch line + summary table
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["name"] == "lenet5" and config["num_train_steps"] == 3
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["test"]) == {
        "loss",
        "accuracy",
        "top5_error",
        "precision",
        "recall",
        "f1",
        "roc_auc",
    }
    assert results["model"] == "lenet5" and results["dataset"] == "digits"
    assert results["params"] == 61_706 and results["macs"] > 0
    for key in ("train_seconds", "images_per_second", "devices", "seed", "versions"):
        assert results[key] is not None, key
    assert len(results["test_details"]["confusion_matrix"]) == 10
    splits = {json.loads(line).get("split") for line in (workdir / "metrics.jsonl").open()}
    assert {"train", "validation", "test"} <= splits
    assert any(
        name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard")
    )
    assert (workdir / "curves.png").stat().st_size > 0
    assert (workdir / "confusion_matrix.png").stat().st_size > 0
    assert os.listdir(workdir / "checkpoints") == ["3"]


BAD = [
    (["--config.batch_sise=3"], "unknown config field 'batch_sise'; did you mean 'batch_size'?"),
    (["--config.batch_size=abc"], "config field 'batch_size' expects an int, got 'abc'"),
    (["--config.optimizer.learning_rate=fast"], "'optimizer.learning_rate' expects a float"),
    (["--config.data.augment.hflip=maybe"], "'data.augment.hflip' expects a bool"),
    (["--config.optimizer=adam"], "'optimizer' is a group"),
    (["--config.modle.name=vgg16"], "unknown config field 'modle'"),
    (["--config.model.name=resnet5O"], "unknown model 'resnet5O'"),
    (["--config.optimizer.name=adamm"], "adamm"),
    (["--config.precision=fp16"], "precision must be auto, fp32 or bf16"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[a[0] for a, _ in BAD])
def test_bad_config_is_one_line_error_and_leaves_workdir_alone(tmp_path, capsys, args, message):
    workdir = tmp_path / "existing"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("x")
    code = launch.main(["--workdir", str(workdir), *args])
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert message in err
    assert sorted(os.listdir(workdir)) == ["keep.txt"]


def test_missing_and_broken_config_files(tmp_path, capsys):
    assert launch.main(["--config", str(tmp_path / "nope.py")]) == 1
    assert "not found" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg:\n")
    assert launch.main(["--config", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "failed to load: SyntaxError" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    assert launch.main(["--config", str(empty)]) == 1
    assert "defines no get_config" in capsys.readouterr().err


def test_overrides_are_typed_and_model_kwargs_are_open(tmp_path):
    config, name = config_lib.load_config(
        "experiments/lenet5_digits.py:smoke",
        [
            ("model.kwargs.act", "relu"),
            ("model.kwargs.pool", "max"),
            ("batch_size", "16"),
            ("optimizer.learning_rate", "3"),
            ("optimizer.decay_epochs", "(30, 60)"),
            ("data.augment.hflip", "true"),
            ("data.mean", "(0.5,)"),
        ],
    )
    assert name == "lenet5_digits_smoke"
    assert config.model.kwargs.to_dict() == {"act": "relu", "pool": "max"}
    assert config.batch_size == 16 and config.optimizer.learning_rate == 3.0
    assert isinstance(config.optimizer.learning_rate, float)
    assert tuple(config.optimizer.decay_epochs) == (30, 60)
    assert config.data.augment.hflip is True and tuple(config.data.mean) == (0.5,)


def test_default_workdir_is_named_after_config_and_arg():
    args, overrides = launch.parse_args(
        [
            "--config",
            "experiments/resnet20_cifar10.py:smoke",
            "--config.seed",
            "3",
            "--config.batch_size=8",
        ]
    )
    assert args.config == "experiments/resnet20_cifar10.py:smoke" and args.workdir == ""
    assert overrides == [("seed", "3"), ("batch_size", "8")]
    assert launch.parse_args([])[0].config == "experiments/lenet5_digits.py"


def test_sweep_flag_needs_a_sweep_in_the_config(tmp_path, capsys):
    workdir = tmp_path / "sweep"
    code = launch.main(["--config", "experiments/lenet5_digits.py:smoke", "--sweep",
                        "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "config has no sweep" in err and "sweep_config" in err
    assert not workdir.exists()
