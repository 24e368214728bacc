"""RunWriter resume semantics and TensorBoard events, plots, the progress bar and the summary table."""

import glob
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from cnnjax.train import report


def _tensorboard_scalars(logdir):
    """{(tag, step): value} from every event file (TFRecord framing: length, crc, data, crc)."""
    scalars = {}
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            while header := f.read(12):
                (length,) = struct.unpack("<Q", header[:8])
                event = event_pb2.Event.FromString(f.read(length))
                f.read(4)
                for value in event.summary.value:
                    scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_run_writer_appends_on_resume_and_writes_tensorboard(tmp_path):
    workdir = str(tmp_path)
    with report.RunWriter(workdir) as writer:
        writer.log_scalars(10, {"loss": np.float32(2.5), "accuracy": 0.25}, prefix="train/")
        writer.log_scalars(10, {"loss": 2.0, "per_class": [0.5, 1.0]}, prefix="validation", epoch=1)
    path = os.path.join(workdir, "metrics.jsonl")
    first = open(path).read()
    with open(path, "a") as f:
        f.write('{"step": 11, "spl')  # killed mid-write
    writer = report.RunWriter(workdir)  # resume
    writer.log_scalars(20, {"loss": 1.0}, prefix="train/")
    writer.close()
    writer.close()  # idempotent: the trainer closes in finally as well
    text = open(path).read()
    assert text.startswith(first)
    lines = text.splitlines()
    assert json.loads(lines[0]) == {"step": 10, "split": "train", "loss": 2.5, "accuracy": 0.25}
    assert json.loads(lines[1]) == {
        "step": 10,
        "epoch": 1,
        "split": "validation",
        "loss": 2.0,
        "per_class": [0.5, 1.0],
    }
    assert json.loads(lines[-1]) == {"step": 20, "split": "train", "loss": 1.0}
    scalars = _tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    assert scalars[("train/loss", 10)] == 2.5 and scalars[("train/loss", 20)] == 1.0
    assert scalars[("validation/epoch", 10)] == 1 and ("validation/per_class", 10) not in scalars


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_plot_curves_keeps_the_last_record_of_a_repeated_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    records = [
        {"step": 5, "split": "train", "loss": 2.0, "accuracy": 0.3},
        {"step": 10, "split": "train", "loss": 1.5, "accuracy": 0.5},
        {"step": 10, "split": "validation", "loss": 1.6, "accuracy": 0.45},
        {"step": 10, "split": "train", "loss": 1.4, "accuracy": 0.55},  # re-logged after resume
    ]
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + '\n{"step": 1')
    splits = report.read_metrics(path)
    assert [r["loss"] for r in splits["train"]] == [2.0, 1.4]
    assert [r["step"] for r in splits["validation"]] == [10]
    report.plot_curves(path, str(tmp_path / "curves.png"))
    assert _png(tmp_path / "curves.png")


def test_plot_confusion(tmp_path):
    matrix = [[5, 1, 0], [2, 3, 0], [0, 0, 0]]
    report.plot_confusion(matrix, ["cat", "dog", "eel"], str(tmp_path / "cm.png"))
    assert _png(tmp_path / "cm.png")
    with pytest.raises(ValueError, match="do not match"):
        report.plot_confusion(matrix, ["cat", "dog"], str(tmp_path / "bad.png"))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_on_a_tty_only():
    quiet = io.StringIO()
    bar = report.Progress(total_steps=20, steps_per_epoch=10, stream=quiet)
    for step in range(1, 21):
        bar.update(step)
    bar.clear()
    bar.close()
    assert quiet.getvalue() == ""

    tty = _Terminal()
    bar = report.Progress(total_steps=20, steps_per_epoch=10, stream=tty, min_interval=0.0)
    bar.update(3)
    assert "epoch 1/2" in tty.getvalue() and "3/20" in tty.getvalue()
    bar.clear()
    assert tty.getvalue().endswith("\r")
    bar.update(15)
    bar.close()
    assert "epoch 2/2" in tty.getvalue() and tty.getvalue().endswith("\n")
    line = bar.line(10, rate=2.0)
    assert "2.0 step/s" in line and "ETA 0:00:05" in line


def test_summary_table():
    results = {
        "test": {"loss": 0.05234, "accuracy": 0.98333, "roc_auc": None},
        "test_details": {"f1_per_class": [0.9] * 10, "confusion_matrix": [[1, 0], [0, 1]]},
        "model": "lenet5",
        "params": 61706,
        "input_shape": [32, 32, 1],
        "images_per_second": np.float32(12345.67),
    }
    table = report.summary_table(results)
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()[3:-1]
    }
    assert rows == {
        "test.loss": "0.0523",
        "test.accuracy": "0.9833",
        "test.roc_auc": "-",
        "model": "lenet5",
        "params": "61,706",
        "input_shape": "32 x 32 x 1",
        "images_per_second": "12,345.7",
    }


def test_tensorboard_writer_does_not_import_torch(tmp_path):
    # tensorboardX imports an installed torch at import time; a stand-in torch tells if it ran.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("STAND_IN = True\n")
    script = (
        "import sys\n"
        "from cnnjax.train import report\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import torch\n"
        "assert torch.STAND_IN\n"  # and still importable afterwards
        f"w = report.SummaryWriter({str(tmp_path / 'tb')!r}); w.add_scalar('loss', 1.5, 0); w.close()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
