"""benchmarks/gpu_session.sh: the plan a short GPU lease runs, and how it collects results (with
a stand-in for python that answers each benchmark with a JSON line, so nothing is measured)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
ENTRIES = ["resnet50@224", "resnet20-epoch", "depthwise", "mobilenet_v2@224",
           "efficientnet_b0@224", "resnet18-epoch", "resnet20@32", "resnet18@32"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

# Runs `-c` code with the real interpreter (the script's own helpers); answers anything else (a
# benchmark) with one JSON line naming what it was asked, after a line of other output, except
# resnet18's, which fail with exit 3 and no JSON.
FAKE_PYTHON = f"""#!{sys.executable}
import json, subprocess, sys
if sys.argv[1] == "-c":
    sys.exit(subprocess.run([{sys.executable!r}, *sys.argv[1:]]).returncode)
print("warming up")
if "resnet18" in sys.argv:
    print("error: out of memory", file=sys.stderr)
    sys.exit(3)
print(json.dumps({{"asked": sys.argv[1:]}}))
"""


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    full = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True,
                          timeout=120, check=True)


def test_dry_run_lists_the_plan_most_important_first(tmp_path):
    done = _run(tmp_path, DRY_RUN="1")
    lines = done.stdout.strip().splitlines()
    assert [line.split(" ")[0] for line in lines] == ENTRIES
    first = lines[0]
    for flag in ("-m cnnjax.bench resnet50", "--image-size 224", "--batch-size 256",
                 "--precision bf16", "--json", "--compare-torch"):
        assert flag in first
    assert "-m cnnjax.bench_epoch resnet20 --batch-size 512" in lines[1]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_every_entry_lands_in_results_jsonl(tmp_path):
    _run(tmp_path)
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["name"] for row in rows] == ENTRIES
    failed = {"resnet18-epoch", "resnet18@32"}
    assert all(row["exit"] == (3 if row["name"] in failed else 0) for row in rows)
    assert all("asked" not in row and row["last_line"] == "warming up"
               for row in rows if row["name"] in failed)
    assert "error: out of memory" in (out / "log.txt").read_text()
    # The benchmark's last line is parsed and kept with the command that printed it.
    assert rows[0]["asked"][:3] == ["-m", "cnnjax.bench", "resnet50"]
    assert rows[0]["command"].endswith("--json --compare-torch")
    assert "depthwise.py" in " ".join(rows[2]["asked"])
    assert all("last_line" not in row for row in rows if row["name"] not in failed)
    env = (out / "env.txt").read_text()
    assert "jax " in env and "devices" in env
    assert "done after" in (out / "log.txt").read_text()
    # What comes back from a device run: at most 8 plain files, no folders.
    assert len(list(out.iterdir())) <= 8


def test_a_spent_budget_skips_the_rest(tmp_path):
    _run(tmp_path, BUDGET="30")
    results = (tmp_path / "out" / "results.jsonl").read_text()
    rows = [json.loads(line) for line in results.splitlines()]
    assert rows == [{"name": name, "skipped": "budget"} for name in ENTRIES]


def test_the_plans_benchmark_commands_parse(tmp_path):
    from cnnjax import bench, models

    lines = _run(tmp_path, DRY_RUN="1").stdout.strip().splitlines()
    commands = [line.split(": ", 1)[1].split() for line in lines]
    for words in commands:
        if words[1:3] == ["-m", "cnnjax.bench"]:
            args = bench.parse_args(words[3:])  # argparse exits on a flag it does not know
            assert args.json and args.compare_torch
        elif words[1:3] == ["-m", "cnnjax.bench_epoch"]:
            assert words[3] in models.list_models()
    assert all(words[3] in models.list_models() for words in commands if words[1] == "-m")
