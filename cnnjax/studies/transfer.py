"""The transfer study: pretrain a source run before the sweep, then report fine-tuning against scratch.

An experiment sets `sweep.prepare = "cnnjax.studies.transfer:pretrain"` and puts the source run's
whole config in `sweep.pretrain`; `pretrain` trains it in WORKDIR/pretrain (train_and_evaluate
resumes it, and returns at once when it has finished) and hands its checkpoints to every variant as
`init_from`. A variant that sets `init_from: ""` trains from scratch. `report` (sweep.study) adds
what was transferred, trainable parameters, accuracy after the first evaluation and at the end, a
validation-accuracy plot, and a reading computed from those numbers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from cnnjax.studies import figure, first_seed_dirs, rows_by_variant
from cnnjax.sweep.report import markdown_table

PRETRAIN_DIR = "pretrain"
CURVES_PNG = "transfer_curves.png"


def pretrain(*, workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains `config.sweep.pretrain` in WORKDIR/pretrain; returns {"init_from": its checkpoints}."""
    from cnnjax.sweep.runner import SweepStopped
    from cnnjax.train.loop import train_and_evaluate

    if not isinstance(config.sweep.get("pretrain"), ml_collections.ConfigDict):
        raise ValueError("sweep.prepare 'cnnjax.studies.transfer:pretrain' needs the source run's "
                         "config in config.sweep.pretrain (a base_config() with its own data)")
    directory = os.path.join(workdir, PRETRAIN_DIR)
    print(f"--- pretraining {config.sweep.pretrain.model.name} on "
          f"{config.sweep.pretrain.data.name} in {directory}")
    results = train_and_evaluate(config.sweep.pretrain, directory)
    if results.get("status") == "interrupted":
        raise SweepStopped(f"pretraining was interrupted at step {results.get('step')}; rerun to resume")
    return {"init_from": os.path.join(directory, "checkpoints")}


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _validation(directory: str) -> list[dict]:
    from cnnjax.train.report import read_metrics

    return read_metrics(os.path.join(directory, "metrics.jsonl")).get("validation", [])


def variant_facts(directory: str) -> dict[str, Any]:
    """What one finished trial transferred and how it learned, read from its own files."""
    config = _read_json(os.path.join(directory, "config.json"))
    results = _read_json(os.path.join(directory, "results.json"))
    finetune = config.get("finetune", {})
    validation = _validation(directory)
    lr_groups = ", ".join(f"{p} x{s:g}" for p, s in finetune.get("lr_groups", ())) or "-"
    pretrained = bool(config.get("init_from"))
    return {
        "start": "pretrained" if pretrained else "scratch",
        "frozen": ", ".join(finetune.get("freeze", ())) or "-",
        "new_layers": (", ".join(finetune.get("reinit", ())) or "-") if pretrained else "all",
        "lr_groups": lr_groups,
        "trained_params": results.get("trainable_params", results["params"]),
        "params": results["params"],
        "first_eval_step": validation[0]["step"] if validation else None,
        "first_val_accuracy": validation[0]["accuracy"] if validation else None,
        "steps": results["steps"],
        "curve": [(r["step"], r["accuracy"]) for r in validation],
    }


def plot_curves(facts: Mapping[str, dict], out_png: str) -> None:
    """Validation accuracy against step, one line per variant (its first seed)."""
    fig, ax = figure(6.5, 4, layout="constrained")
    for name, fact in facts.items():
        if fact["curve"]:
            style = "--" if fact["start"] == "scratch" else "-"
            ax.plot(*zip(*fact["curve"], strict=True), style, marker="o", ms=3, label=name)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out_png, dpi=110)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _points(value: float | None, reference: float | None) -> str:
    return "-" if value is None or reference is None else f"{100 * (value - reference):+.1f} points"


def _p_value(test: Mapping | None) -> str:
    if not test or test.get("p") is None or not math.isfinite(test["p"]):
        return ""
    return f" (paired t-test over {test['n']} seeds: p = {test['p']:.2g})"


def reading(facts: Mapping[str, dict], rows: Mapping[str, dict],
            tests: Mapping[str, dict] | None = None) -> str:
    """One paragraph comparing every pretrained variant with the scratch one, from the numbers;
    `tests` holds the sweep's paired t-tests against scratch when scratch is its baseline."""
    scratch = [n for n, f in facts.items() if f["start"] == "scratch" and rows[n]["accuracy"] is not None]
    if not scratch:
        return "No scratch variant finished, so there is nothing to compare the transfer with."
    base, base_fact = scratch[0], facts[scratch[0]]
    base_acc = rows[base]["accuracy"]
    parts = [f"Trained from scratch for {base_fact['steps']} steps, the model reaches "
             f"{base_acc:.2%} test accuracy ({_percent(base_fact['first_val_accuracy'])} validation "
             f"accuracy at step {base_fact['first_eval_step']})."]
    for name, fact in facts.items():
        acc = rows[name]["accuracy"]
        if fact["start"] == "scratch" or acc is None or not math.isfinite(acc):
            continue
        share = fact["trained_params"] / fact["params"]
        parts.append(
            f"{name} (pretrained, {fact['trained_params']:,} of {fact['params']:,} parameters "
            f"trained, {share:.0%}) reaches {acc:.2%}, {100 * (acc - base_acc):+.1f} points against "
            f"scratch{_p_value((tests or {}).get(name))}, and {_percent(fact['first_val_accuracy'])} validation accuracy at step "
            f"{fact['first_eval_step']} ({_points(fact['first_val_accuracy'], base_fact['first_val_accuracy'])}).")
    best = max((n for n in facts if rows[n]["accuracy"] is not None), key=lambda n: rows[n]["accuracy"])
    parts.append(f"Best: {best}.")
    return " ".join(parts)


def _pretrain_lines(workdir: str) -> list[str]:
    path = os.path.join(workdir, PRETRAIN_DIR, "results.json")
    if not os.path.exists(path):
        return ["No pretraining run in this sweep (every variant started from its own init_from)."]
    source = _read_json(path)
    data = _read_json(os.path.join(workdir, PRETRAIN_DIR, "config.json"))["data"]
    dataset = f"{source['dataset']} ({data['path']})" if data.get("path") else source["dataset"]
    return [f"Source: {source['model']} trained on {dataset} for {source['steps']} steps "
            f"({source['train_seconds']:.0f} s): {source['test']['accuracy']:.2%} test accuracy "
            f"there. Its checkpoints (`{PRETRAIN_DIR}/checkpoints`) start every pretrained variant; "
            "each run's log lists the arrays that start fresh."]


def report(*, workdir: str, config: ml_collections.ConfigDict, summary: Mapping,
           results: Sequence[tuple[Mapping, list[dict]]]) -> str:
    """The transfer section of report.md (see the module docstring)."""
    rows = rows_by_variant(summary)
    dirs = first_seed_dirs(workdir, results)
    facts = {name: variant_facts(d) for name, d in dirs.items() if name in rows}
    scratch = [n for n, f in facts.items() if f["start"] == "scratch"]
    tests = ({c["variant"]: c for c in summary.get("comparisons", ())}
             if scratch and summary.get("baseline") == scratch[0] else {})
    table = [{
        "variant": name, "start": f["start"], "frozen": f["frozen"], "new layers": f["new_layers"],
        "lr groups": f["lr_groups"], "trained params": f["trained_params"],
        "first eval step": f["first_eval_step"], "val acc there": f["first_val_accuracy"],
        "test acc": rows[name]["accuracy"], "ci95": rows[name]["accuracy_ci95"],
        "seeds": rows[name]["seeds"], "train s": rows[name]["train_seconds"],
    } for name, f in facts.items()]
    plot_curves(facts, os.path.join(workdir, CURVES_PNG))
    with open(os.path.join(workdir, "transfer.json"), "w") as f:
        json.dump(facts, f, indent=2)
    target = f"{config.model.name} on {config.data.name}"
    return "\n".join([
        f"## Transfer to {target}", "", *_pretrain_lines(workdir), "",
        "Test accuracy is the mean over seeds; the validation accuracy is at the first evaluation "
        "(first seed), which shows how much the start is worth before training has caught up.", "",
        markdown_table(table), "", f"![validation accuracy while fine-tuning]({CURVES_PNG})", "",
        "Reading: " + reading(facts, rows, tests), "",
    ])
