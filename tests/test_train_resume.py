"""Checkpoints: SIGKILL + restart and SIGTERM + restart give bit-identical results, a checkpoint
restores onto another device count, and a diverging run keeps only finite checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from launch_env import ROOT, subprocess_env

BASE = [
    "--config",
    "experiments/lenet5_digits.py",
    "--config.log_every_steps=5",
    "--config.checkpoint_every_steps=5",
    "--config.keep_checkpoints=2",
]


def _launch(args, devices=1):
    env = subprocess_env(devices)
    return subprocess.Popen(
        [sys.executable, "launch.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _signal_when_saved(proc, checkpoints, step, signum):
    """Sends `signum` as soon as the checkpoint of `step` is committed (orbax renames it last)."""
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(checkpoints, str(step))):
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signum)


def _results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    return results["test"], results["test_details"], results["best_validation"], results["steps"]


def test_killed_and_terminated_runs_resume_to_identical_results(tmp_path):
    args = [*BASE, "--config.num_train_steps=60"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    reference = _launch([*args, "--workdir", straight])  # runs while the other one is killed

    proc = _launch([*args, "--workdir", resumed])
    _signal_when_saved(proc, os.path.join(resumed, "checkpoints"), 5, signal.SIGKILL)
    code, _ = _finish(proc)
    assert code == -signal.SIGKILL
    assert not os.path.exists(os.path.join(resumed, "results.json")), "killed too late"

    proc = _launch([*args, "--workdir", resumed])
    _signal_when_saved(proc, os.path.join(resumed, "checkpoints"), 20, signal.SIGTERM)
    code, out = _finish(proc)
    assert code == 0, out[-2000:]
    assert "resumed from the checkpoint at step" in out and "SIGTERM: saved step" in out
    assert not os.path.exists(os.path.join(resumed, "results.json"))

    code, out = _finish(_launch([*args, "--workdir", resumed]))
    assert code == 0, out[-2000:]
    ref_code, ref_out = _finish(reference)
    assert ref_code == 0, ref_out[-2000:]
    assert _results(resumed) == _results(straight)  # every digit, confusion matrix included
    assert _results(straight)[3] == 60


def test_checkpoint_restores_onto_a_different_device_count(tmp_path):
    workdir = str(tmp_path / "run")
    args = [*BASE, "--workdir", workdir]
    code, out = _finish(_launch([*args, "--config.num_train_steps=5"], devices=8))
    assert code == 0, out[-2000:]
    assert "8 device(s)" in out
    code, out = _finish(_launch([*args, "--config.num_train_steps=8"], devices=1))
    assert code == 0, out[-2000:]
    assert "1 device(s)" in out and "resumed from the checkpoint at step 5" in out
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["steps"] == 8 and results["devices"] == 1


def test_init_from_starts_from_another_runs_weights(tmp_path, capsys, monkeypatch):
    import launch

    monkeypatch.setenv("CNNJAX_COMPILATION_CACHE", "off")
    source, target = str(tmp_path / "source"), str(tmp_path / "target")
    args = ["--config", "experiments/lenet5_digits.py:smoke", "--config.log_every_steps=100"]
    assert launch.main([*args, "--workdir", source]) == 0
    assert (
        launch.main(
            [
                *args,
                "--workdir",
                target,
                "--config.num_train_steps=1",
                f"--config.init_from={source}/checkpoints",
            ]
        )
        == 0
    )
    saved = ocp.CheckpointManager(os.path.join(source, "checkpoints")).restore(3)["params"]
    manager = ocp.CheckpointManager(os.path.join(target, "checkpoints"))
    started = manager.restore(1)["params"]  # one step away from the source's weights
    for a, b in zip(_leaves(saved), _leaves(started), strict=True):
        assert np.abs(a - b).max() < 0.05
    assert (
        launch.main(
            [*args, "--workdir", str(tmp_path / "bad"), f"--config.init_from={tmp_path}/missing"]
        )
        == 1
    )
    assert "init_from directory" in capsys.readouterr().err


def test_diverging_run_stops_and_keeps_only_finite_checkpoints(tmp_path, capsys, monkeypatch):
    import launch

    monkeypatch.setenv("CNNJAX_COMPILATION_CACHE", "off")  # keep this session's JAX cache as is

    workdir = str(tmp_path / "run")
    code = launch.main(
        [
            "--config",
            "experiments/lenet5_digits.py",
            "--workdir",
            workdir,
            "--config.loss.name=mse",
            "--config.optimizer.name=sgd",
            "--config.optimizer.learning_rate=1e4",
            "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=1",
            "--config.num_train_steps=50",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: non-finite") and len(err.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    steps = manager.all_steps()
    assert steps, "the good steps before divergence must stay saved"
    assert f"the last good checkpoint is step {max(steps)}" in err
    restored = manager.restore(max(steps))
    assert all(np.isfinite(leaf).all() for leaf in _leaves(restored["params"]))


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield np.asarray(tree)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
