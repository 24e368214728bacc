"""Run-directory outputs for people: metrics.jsonl + TensorBoard events, PNG plots, progress bar, summary."""

import collections
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any, TextIO

import numpy as np
from matplotlib.figure import Figure  # the OO API: no pyplot global state, no GUI backend

METRICS_FILE = "metrics.jsonl"


def _import_summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without importing torch.

    Where torch is installed, tensorboardX imports it at import time only to name torch tensors in
    its type hints: 0.8-1.4 s of every run's start and torch's memory, on the 2-core CPU. cnnjax logs
    Python numbers, so unless something has loaded torch already, torch is hidden (None in
    sys.modules: its import fails, and tensorboardX falls back to numpy) for that one import, and
    stays importable afterwards.
    """
    if "torch" in sys.modules or importlib.util.find_spec("torch") is None:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None
        try:
            from tensorboardX import SummaryWriter
        finally:
            if sys.modules.get("torch", 0) is None:
                del sys.modules["torch"]
    return SummaryWriter


SummaryWriter = _import_summary_writer()


def _to_json(value: Any) -> Any:
    """Plain Python for json: numpy / jax scalars become numbers, arrays become lists."""
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # np / jax arrays and scalars
        return np.asarray(value).tolist()
    return value


def _end_partial_line(path: str) -> None:
    """A run killed mid-write leaves a line without its newline; end it so the next record parses."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


class RunWriter:
    """Appends one JSON line per log_scalars call to WORKDIR/metrics.jsonl and mirrors the numeric
    values to TensorBoard event files in WORKDIR/tensorboard (tensorboardX, no TensorFlow).

    Resuming reopens both in append mode and never rewrites earlier lines; a resumed run may log a
    step twice (steps after the last checkpoint), and readers such as plot_curves keep the last
    record of each (split, step). Pass purge_step=the restored step to hide the stale events from
    TensorBoard as well.
    """

    def __init__(self, workdir: str, *, purge_step: int | None = None, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        _end_partial_line(self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the whole run
        self._tb = None
        if tensorboard:
            # Event files are named by the second they open in; a unique suffix keeps a quick
            # restart from truncating the previous file.
            self._tb = SummaryWriter(
                os.path.join(workdir, "tensorboard"),
                purge_step=purge_step,
                filename_suffix=f".{os.getpid()}.{time.time_ns()}",
            )

    def log_scalars(
        self, step: int, values: dict, prefix: str = "", *, epoch: float | None = None
    ) -> None:
        """Record `values` at `step`. prefix ("train/", "validation" ...) names the split: it becomes
        the "split" field of the JSON line and the TensorBoard tag prefix ("train/loss")."""
        split = prefix.strip("/")
        record: dict[str, Any] = {"step": int(step)}
        if epoch is not None:
            record["epoch"] = epoch
        if split:
            record["split"] = split
        record.update(_to_json(values))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a SIGKILL must not lose what was already logged
        if self._tb is None:
            return
        for key, value in record.items():
            if key in ("step", "split") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                self._tb.add_scalar(f"{split}/{key}" if split else key, value, int(step))

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close; safe to call more than once."""
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str) -> dict[str, list[dict]]:
    """{split: records sorted by step}, the last record of each (split, step) winning."""
    by_split: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if isinstance(record, dict) and "step" in record:
                by_split[record.get("split", "")][record["step"]] = record
    return {split: [steps[s] for s in sorted(steps)] for split, steps in by_split.items()}


def plot_curves(metrics_jsonl_path: str, out_png: str) -> None:
    """Loss and accuracy against step, train and validation, from a metrics.jsonl."""
    splits = read_metrics(metrics_jsonl_path)
    fig = Figure(figsize=(11, 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for split, style in (("train", {"lw": 1}), ("validation", {"marker": "o", "ms": 3})):
            points = [
                (r["step"], r[metric]) for r in splits.get(split, []) if r.get(metric) is not None
            ]
            if points:
                ax.plot(*zip(*points, strict=True), label=split, **style)
        ax.set_xlabel("step")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(out_png, dpi=100)


def plot_confusion(matrix: Any, class_names: list[str] | None, out_png: str) -> None:
    """Confusion matrix (rows true, columns predicted), coloured by the fraction of each true class
    so rare classes stay visible; counts written in the cells for up to 20 classes."""
    counts = np.asarray(matrix)
    n = counts.shape[0]
    if counts.shape != (n, n) or (class_names is not None and len(class_names) != n):
        raise ValueError(
            f"confusion matrix of shape {counts.shape} and {len(class_names or [])} class names "
            "do not match; pass a square [C, C] matrix and C names"
        )
    fractions = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(4 + 0.4 * n, 20)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="fraction of true class")
    if n <= 50:
        names = class_names or [str(i) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), names)
    if n <= 20:
        for i, j in np.ndindex(n, n):
            color = "white" if fractions[i, j] > 0.5 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({int(counts.sum())} examples)")
    fig.savefig(out_png, dpi=100)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """One-line progress bar (epoch, step/s, ETA) redrawn in place on a terminal.

    Prints nothing at all when the stream is not a TTY (logs, pipes, batch jobs). Call clear()
    before printing a line of your own; the next update() redraws the bar below it.
    """

    def __init__(
        self,
        total_steps: int,
        steps_per_epoch: int,
        initial_step: int = 0,
        stream: TextIO | None = None,
        min_interval: float = 0.1,
        width: int = 30,
    ):
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total_steps, self.steps_per_epoch = total_steps, max(steps_per_epoch, 1)
        self.num_epochs = math.ceil(total_steps / self.steps_per_epoch)
        self.min_interval, self.width = min_interval, width
        # Rate over the last few redraws, so compilation and evaluation pauses fade out of the ETA.
        self._recent: collections.deque = collections.deque(
            [(time.time(), initial_step)], maxlen=20
        )
        self._last_draw, self._drawn = 0.0, 0
        self._step = initial_step

    def line(self, step: int, rate: float | None) -> str:
        """The bar text for `step` at `rate` steps per second (None: not measured yet)."""
        epoch = min(max(math.ceil(step / self.steps_per_epoch), 1), self.num_epochs)
        filled = int(self.width * step / max(self.total_steps, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        speed = f"{rate:.1f} step/s" if rate else "-- step/s"
        eta = _clock((self.total_steps - step) / rate) if rate else "--:--:--"
        return (
            f"epoch {epoch}/{self.num_epochs} [{bar}] {step}/{self.total_steps} {speed} ETA {eta}"
        )

    def update(self, step: int, force: bool = False) -> None:
        self._step = step
        now = time.time()
        if not self.enabled or (not force and now - self._last_draw < self.min_interval):
            return
        self._recent.append((now, step))
        (t0, s0), (t1, s1) = self._recent[0], self._recent[-1]
        rate = (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None
        text = self.line(step, rate)
        self.stream.write("\r" + text + " " * max(self._drawn - len(text), 0))
        self.stream.flush()
        self._last_draw, self._drawn = now, len(text)

    def clear(self) -> None:
        """Erase the bar so a normal print starts at column 0 of an empty line."""
        if self.enabled and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn, self._last_draw = 0, 0.0

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self.update(self._step, force=True)
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value) or abs(value) < 1000:
        return f"{value:.4f}"
    return f"{value:,.1f}"


def _flatten(results: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, name + ".")
        elif isinstance(value, list | tuple):
            # Short scalar lists (an input shape) fit a cell; per-class lists and matrices do not.
            if len(value) <= 4 and all(isinstance(v, int | float | str) for v in value):
                rows.append((name, " x ".join(str(v) for v in value)))
        else:
            rows.append((name, _format_value(value)))
    return rows


def summary_table(results: dict) -> str:
    """A two-column text table of a results dict: nested keys dotted (test.accuracy), numbers
    formatted, long lists (per-class metrics, confusion matrix) left out."""
    rows = _flatten(_to_json(results))
    if not rows:
        return "(no results)"
    key_width = max(len(k) for k, _ in rows + [("result", "")])
    value_width = max(len(v) for _, v in rows + [("", "value")])
    rule = f"+-{'-' * key_width}-+-{'-' * value_width}-+"
    lines = [rule, f"| {'result':<{key_width}} | {'value':>{value_width}} |", rule]
    lines += [f"| {k:<{key_width}} | {v:>{value_width}} |" for k, v in rows]
    lines.append(rule)
    return "\n".join(lines)
