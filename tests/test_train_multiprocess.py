"""A 2-process run on localhost through jax.distributed (gloo CPU collectives, one device each)
matches a 1-process run on 2 devices: the same global batch, mesh and program."""

import json
import os
import socket
import subprocess
import sys

import pytest
from launch_env import ROOT, subprocess_env

# device_resident=always: both processes must take the same path whatever their memory stats say.
ARGS = [
    "--config",
    "experiments/lenet5_digits.py:smoke",
    "--config.num_train_steps=4",
    "--config.data.device_resident=always",
]


def _env(devices):
    return subprocess_env(devices)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _test_metrics(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    return results, results["test"]


def test_two_processes_match_one_process(tmp_path):
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "launch.py",
                *ARGS,
                "--workdir",
                multi,
                "--coordinator_address",
                address,
                "--num_processes",
                "2",
                "--process_id",
                str(i),
            ],
            cwd=ROOT,
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    reference = subprocess.run(
        [sys.executable, "launch.py", *ARGS, "--workdir", single],
        cwd=ROOT,
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=300,
    )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert reference.returncode == 0, reference.stderr[-2000:]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    multi_results, multi_test = _test_metrics(multi)
    single_results, single_test = _test_metrics(single)
    assert multi_results["processes"] == 2 and multi_results["devices"] == 2
    assert single_results["processes"] == 1 and single_results["devices"] == 2
    for key, value in single_test.items():
        assert multi_test[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert (
        multi_results["test_details"]["confusion_matrix"]
        == single_results["test_details"]["confusion_matrix"]
    )
