"""The sweep report: report.md, summary.csv/json and accuracy-vs-cost plots from finished trial records."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from cnnjax.sweep import space, stats
from cnnjax.sweep.runner import metric_value

ACCURACY = "test.accuracy"


def differing_fields(variants: Sequence[Mapping]) -> list[str]:
    """Fields whose value is not the same in every variant (a missing field counts as a value)."""
    fields = sorted({f for v in variants for f in v if f != "name"})
    missing = object()
    return [f for f in fields
            if len({json.dumps(v.get(f, missing), default=id, sort_keys=True) for v in variants}) > 1]


def _mean_of(records: Sequence[dict], path: str) -> float | None:
    values = [metric_value(r["results"], path) for r in records]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def variant_rows(results: Sequence[tuple[dict, list[dict]]], metric: str) -> list[dict]:
    """One row per variant: its differing fields, costs, accuracy mean and 95% CI over seeds."""
    fields = differing_fields([v for v, _ in results])
    rows = []
    for variant, records in results:
        done = [r for r in records if r["status"] == "done"]
        acc_mean, acc_ci = stats.mean_ci([metric_value(r["results"], ACCURACY) for r in done])
        row = {"variant": space.variant_name(variant)}
        row.update({space.short_field(f, dict.fromkeys(fields)): variant.get(f, "-") for f in fields})
        first = next((r["results"] for r in records if r["results"].get("macs")), {})
        seconds = [r.get("staged_train_seconds") or metric_value(r["results"], "train_seconds")
                   for r in done]
        row.update({
            "params": first.get("params"),
            "macs": first.get("macs"),
            "seeds": len(done),
            "accuracy": acc_mean,
            "accuracy_ci95": acc_ci,
            # Pruned variants keep the metric they were pruned at.
            metric: _mean_of(records, metric) if metric != ACCURACY else None,
            "train_seconds": sum(seconds) / len(seconds) if seconds else None,
            "images_per_second": _mean_of(done, "images_per_second"),
            "status": _status(records),
        })
        if metric == ACCURACY:
            del row[metric]
        rows.append(row)
    return rows


def _status(records: Sequence[dict]) -> str:
    states = sorted({r["status"] for r in records})
    return "/".join(states)


def find_baseline(results: Sequence[tuple[dict, list[dict]]], baseline: str) -> int:
    """Index of the variant called `baseline` (its name, its "name" field, or its label); 0 if ""."""
    if not baseline:
        return 0
    for i, (variant, _) in enumerate(results):
        name = space.variant_name(variant)
        if baseline in (name, variant.get("name"), name.rsplit("_", 1)[0]):
            return i
    names = ", ".join(space.variant_name(v) for v, _ in results)
    raise ValueError(f"sweep.baseline {baseline!r} matches no variant; use one of: {names}")


def paired_comparisons(results: Sequence[tuple[dict, list[dict]]], base: int) -> list[dict]:
    """Each variant against the baseline on test accuracy over the seeds both finished."""
    def by_seed(records):
        return {r["seed"]: metric_value(r["results"], ACCURACY) for r in records
                if r["status"] == "done"}

    reference = by_seed(results[base][1])
    rows = []
    for i, (variant, records) in enumerate(results):
        if i == base:
            continue
        mine = by_seed(records)
        seeds = sorted(set(mine) & set(reference))
        test = stats.paired_test([mine[s] for s in seeds], [reference[s] for s in seeds])
        rows.append({"variant": space.variant_name(variant), **test})
    return rows


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    if not rows:
        return "(no finished trials)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_tradeoffs(rows: Sequence[dict], out_png: str) -> None:
    """Accuracy against MACs and against params, 95% CI bars, Pareto front marked and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["accuracy"] is not None and math.isfinite(r["accuracy"])
              and r["macs"] and r["params"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "macs", "MACs per example"), (axes[1], "params", "parameters")):
        cost = [r[key] for r in points]
        acc = [r["accuracy"] for r in points]
        err = [0.0 if r["accuracy_ci95"] is None or math.isnan(r["accuracy_ci95"])
               else r["accuracy_ci95"] for r in points]
        front = stats.pareto_front(cost, acc)
        ax.errorbar(cost, acc, yerr=err, fmt="o", color="tab:blue", alpha=0.7, label="variant")
        on = sorted((c, a) for c, a, f in zip(cost, acc, front, strict=True) if f)
        if on:
            ax.plot(*zip(*on, strict=True), "-s", color="tab:red", label="Pareto front")
        for r, c, a in zip(points, cost, acc, strict=True):
            ax.annotate(r["variant"].rsplit("_", 1)[0][:24], (c, a), fontsize=7, alpha=0.8)
        if len(set(cost)) > 1 and max(cost) / max(min(cost), 1) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def write_report(workdir: str, results: Sequence[tuple[dict, list[dict]]],
                 sweep: ml_collections.ConfigDict) -> dict:
    """Writes report.md, summary.csv, summary.json and tradeoffs.png; returns the summary."""
    results = [(v, recs) for v, recs in results if recs]
    rows = variant_rows(results, sweep.metric)
    summary: dict[str, Any] = {"workdir": workdir, "strategy": sweep.strategy, "metric": sweep.metric,
                               "rows": rows, "comparisons": [], "best": None}
    if rows:
        sign = 1 if sweep.direction == "maximize" else -1
        key = sweep.metric if sweep.metric in rows[0] else "accuracy"
        scored = [r for r in rows if r[key] is not None and math.isfinite(r[key])]
        summary["best"] = max(scored, key=lambda r: sign * r[key])["variant"] if scored else None
        base = find_baseline(results, sweep.baseline)
        summary["baseline"] = rows[base]["variant"]
        summary["comparisons"] = paired_comparisons(results, base)
        with open(os.path.join(workdir, "summary.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plot_tradeoffs(rows, os.path.join(workdir, "tradeoffs.png"))
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(_markdown(summary, sweep))
    return summary


def append_sections(workdir: str, markdown: str) -> None:
    """Adds a study's own sections (markdown) to the end of WORKDIR/report.md."""
    if not markdown:
        return
    with open(os.path.join(workdir, "report.md"), "a") as f:
        f.write("\n" + markdown.rstrip("\n") + "\n")


def _markdown(summary: dict, sweep: ml_collections.ConfigDict) -> str:
    parts = [f"# Sweep report ({sweep.strategy}, {sweep.seeds} seed(s) per variant)", "",
             f"Search metric: {sweep.metric} ({sweep.direction}); best variant: {summary['best']}.",
             "Accuracy is test accuracy, mean over seeds with the 95% confidence interval half-width "
             "(t-distribution, n-1 degrees of freedom; '-' with one seed).", "",
             markdown_table(summary["rows"]), ""]
    if summary["comparisons"]:
        parts += [f"## Against the baseline {summary['baseline']}", "",
                  "Paired two-sided t-test (scipy.stats.ttest_rel) of test accuracy over matched seeds; "
                  "diff = variant - baseline, diff_ci its 95% CI half-width.", "",
                  markdown_table(summary["comparisons"]), ""]
    if summary["rows"]:
        parts += ["## Accuracy against cost", "", "![accuracy vs MACs and params](tradeoffs.png)", "",
                  "Red squares: the Pareto front (no other variant is both cheaper and more accurate).",
                  "", "Costs before training: [costs.md](costs.md)."]
    return "\n".join(parts) + "\n"
