"""The 1x1-bottleneck study's report: the notes' arithmetic on the real blocks, then each pair measured.

Called by `run_sweep` for `experiments/ablation_bottleneck.py` (sweep.study). The study compares
pairs of variants that differ in one choice: a `reference` (no 1x1 reductions) and a `candidate`
(with them). `cnnjax.studies.receptive_field` uses the same pair machinery (Unit, unit_rows,
measure_pairs, the tables, plots and the reading) with its own pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnjax import bench, models
from cnnjax.layers import Conv, batch_norm
from cnnjax.models import ablation, resnet
from cnnjax.profile import init_shapes, profile_module
from cnnjax.studies import figure
from cnnjax.sweep import costs, space, stats
from cnnjax.sweep.report import markdown_table

# --- units: the blocks the source notes count --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
    """One real block and the notes' arithmetic for it.

    `terms` lists (k, C_in, C_out) of each convolution, the notes' k*k*Cin*Cout; `path` is the
    kernel sizes along the block's deepest stride-1 path, for `ablation.receptive_field`.
    """

    label: str
    module: nn.Module  # unbound; called as module(x) in eval mode
    input_shape: tuple[int, int, int]  # H, W, C of one example
    terms: tuple[tuple[int, int, int], ...]
    path: tuple[int, ...]

    @property
    def formula_weights(self) -> int:
        return sum(k * k * c_in * c_out for k, c_in, c_out in self.terms)

    @property
    def formula(self) -> str:
        return " + ".join(f"{k}*{k}*{c_in}*{c_out}" for k, c_in, c_out in self.terms)


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two variants (by their sweep "name") that differ in the studied choice, and their units."""

    label: str
    reference: str
    candidate: str
    units: tuple[Unit, Unit]  # (reference's unit, candidate's unit) for the arithmetic


ROLES = (("reference", "tab:gray"), ("candidate", "tab:blue"))  # and their colour in the plots


class _Probe(nn.Module):
    """Gives any block the model call `apply(variables, x, train=False)` that the profiler uses."""

    unit: nn.Module

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.unit(x)


def block_parts() -> dict[str, Any]:
    """conv / norm / act as the nets bind them: bias-free convs, eval-mode batch norm, ReLU."""
    return dict(conv=functools.partial(Conv, use_bias=False),
                norm=functools.partial(batch_norm, False), act=nn.relu)


@functools.lru_cache(maxsize=8)
def bottleneck_pairs(channels: int = 128, reduced: int = 32) -> tuple[Pair, ...]:
    """The notes' three comparisons: GoogLeNet's 3a block, ResNet blocks, one 3x3 CxC conv.

    Cached, so the same Pair objects come back and `unit_rows` computes their arithmetic once."""
    c, r = channels, reduced
    inception = (64, 96, 128, 16, 32, 32)  # GoogLeNet 3a on its 28x28x192 input (Table 1)
    shape = (28, 28, 192)
    return (
        Pair("Inception 3a block", "inception_naive", "inception_1x1", (
            Unit("3a without 1x1 reductions", ablation.InceptionBlock(inception, reduce=False), shape,
                 ((1, 192, 64), (3, 192, 128), (5, 192, 32), (1, 192, 32)), (5,)),
            Unit("3a with 1x1 reductions", ablation.InceptionBlock(inception, reduce=True), shape,
                 ((1, 192, 64), (1, 192, 96), (3, 96, 128), (1, 192, 16), (5, 16, 32),
                  (1, 192, 32)), (1, 5)))),
        Pair("ResNet block (conv2_x, 56x56)", "resnet_basic", "resnet_bottleneck", (
            Unit("basic 3x3-3x3, 64 ch", resnet.BasicBlock(64, **block_parts()), (56, 56, 64),
                 ((3, 64, 64), (3, 64, 64)), (3, 3)),
            Unit("bottleneck 1x1-3x3-1x1, 256 ch", resnet.BottleneckBlock(64, **block_parts()),
                 (56, 56, 256), ((1, 256, 64), (3, 64, 64), (1, 64, 256)), (1, 3, 1)))),
        Pair(f"3x3 conv {c}->{c}", "conv_3x3", "conv_1x1_3x3", (
            Unit(f"3x3 {c}->{c}", ablation.PlainConv(c, **block_parts()), (32, 32, c),
                 ((3, c, c),), (3,)),
            Unit(f"1x1 {c}->{r}, 3x3 {r}->{c}", ablation.BottleneckConv(c, reduced=r, **block_parts()),
                 (32, 32, c), ((1, c, r), (3, r, c)), (1, 3)))),
    )


def count_kernel_weights(variables: Mapping) -> int:
    """Entries of every convolution/dense `kernel` (no biases, no batch-norm parameters)."""
    leaves = jax.tree_util.tree_leaves_with_path(variables.get("params", {}))
    return sum(math.prod(leaf.shape) for path, leaf in leaves
               if getattr(path[-1], "key", None) == "kernel")


def _filled(abstract: Any, value: float) -> Any:
    """Concrete variables of the given shapes, every entry `value` (no random init to compile)."""
    return jax.tree.map(lambda leaf: jnp.full(leaf.shape, value, leaf.dtype), abstract)


def measured_receptive_field(unit: Unit, size: int = 15) -> int:
    """Rows of input pixels the centre output depends on: the support of d out[centre] / d x.

    Every weight, batch-norm statistic and input pixel is 1, so all paths add with one sign and
    no gradient cancels or is cut by a ReLU: the support is exactly the receptive field.
    """
    probe = _Probe(unit.module)
    x = jnp.ones((1, size, size, unit.input_shape[-1]))
    variables = _filled(init_shapes(probe, (size, size, unit.input_shape[-1])), 1.0)
    centre = size // 2
    # One compiled program: eager mode would compile every op of the block separately.
    grad = jax.jit(jax.grad(lambda x: probe.apply(variables, x)[0, centre, centre].sum()))(x)
    rows = np.flatnonzero(np.abs(np.asarray(grad[0])).sum(axis=(1, 2)) > 0)
    return int(rows.max() - rows.min() + 1)


def unit_rows(pairs: Sequence[Pair]) -> list[dict]:
    """One row per unit: the notes' formula, the kernel weights counted on the real module
    (initialised with jax.eval_shape), its MACs at its input size, and its receptive field."""
    return [dict(row) for row in _unit_rows(tuple(pairs))]


@functools.lru_cache(maxsize=8)
def _unit_rows(pairs: tuple[Pair, ...]) -> tuple[dict, ...]:
    # A constant of the pairs; the receptive-field measurement compiles, so it is done once.
    rows = []
    for pair in pairs:
        for unit in pair.units:
            probe = _Probe(unit.module)
            rows.append({
                "pair": pair.label,
                "unit": unit.label,
                "input": "x".join(map(str, unit.input_shape)),
                "formula (k*k*Cin*Cout)": unit.formula,
                "formula weights": unit.formula_weights,
                "counted weights": count_kernel_weights(init_shapes(probe, unit.input_shape)),
                "MACs": profile_module(probe, unit.input_shape)["macs"],
                "receptive field": ablation.receptive_field(unit.path),
                "measured receptive field": measured_receptive_field(unit),
                "ReLUs on that path": len(unit.path),
            })
    return tuple(rows)


# --- measurements of the trained variants ------------------------------------------------------


def forward_images_per_second(config: ml_collections.ConfigDict, fields: Mapping,
                              repeats: int = 5, round_seconds: float = 0.2) -> float:
    """Eval-mode forward throughput of a variant's model at the run's batch and input size,
    compile excluded: the best of `repeats` rounds of about `round_seconds` each (the best, since
    other jobs only ever slow a round down). Constant weights: the cost does not depend on them."""
    trial = space.apply_variant(config, fields)
    facts = costs.input_facts(trial)
    model = models.create_model(trial.model.name, num_classes=facts["num_classes"],
                                **trial.model.kwargs.to_dict())
    shape = (facts["image_size"], facts["image_size"], facts["channels"])
    x = jnp.ones((trial.batch_size, *shape))
    variables = _filled(init_shapes(model, shape), 0.01)
    forward = jax.jit(functools.partial(model.apply, train=False))
    jax.block_until_ready(forward(variables, x))
    (once,) = bench.time_loop(lambda: forward(variables, x), 1, 1)
    steps = max(1, min(200, round(round_seconds / max(once, 1e-6))))
    seconds = min(bench.time_loop(lambda: forward(variables, x), steps, repeats))
    return trial.batch_size / seconds


def _by_name(results: Sequence[tuple[Mapping, list[dict]]]) -> dict[str, tuple[Mapping, list]]:
    return {f.get("name", space.variant_name(f)): (f, r) for f, r in results}


def _accuracies(records: Sequence[dict]) -> dict[int, float]:
    return {r["seed"]: r["results"]["test"]["accuracy"] for r in records if r["status"] == "done"}


def _variant(name: str, found: Mapping, summary: Mapping, config: ml_collections.ConfigDict,
             throughput: bool) -> dict:
    """One variant's measured row ('-' cells when it did not run)."""
    row = {"variant": name, "params": None, "macs": None, "seeds": 0, "accuracy": None,
           "accuracy_ci95": None, "train images/s": None, "eval images/s": None}
    if name not in found:
        return row
    fields, records = found[name]
    summary_row = {r["variant"]: r for r in summary["rows"]}.get(space.variant_name(fields), {})
    accuracy = list(_accuracies(records).values())
    mean, ci = stats.mean_ci(accuracy) if accuracy else (None, None)
    row.update(params=summary_row.get("params"), macs=summary_row.get("macs"),
               seeds=len(accuracy), accuracy=mean, accuracy_ci95=ci,
               **{"train images/s": summary_row.get("images_per_second")})
    if throughput and accuracy:
        row["eval images/s"] = round(forward_images_per_second(config, fields))
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def measure_pairs(pairs: Sequence[Pair], config: ml_collections.ConfigDict, summary: Mapping,
                  results: Sequence[tuple[Mapping, list[dict]]], throughput: bool = True
                  ) -> list[dict]:
    """Per pair: both variants' rows and the candidate against the reference (cost ratios
    reference / candidate, speed-up candidate / reference, accuracy difference in points with a
    paired t-test over the seeds both finished)."""
    found = _by_name(results)
    measured = []
    for pair in pairs:
        ref, cand = (_variant(n, found, summary, config, throughput)
                     for n in (pair.reference, pair.candidate))
        seeds = sorted(set(_accuracies(found.get(pair.reference, ({}, []))[1]))
                       & set(_accuracies(found.get(pair.candidate, ({}, []))[1])))
        test = {"diff": None, "diff_ci": None, "p": None, "n": 0}
        if seeds:
            a, b = (_accuracies(found[n][1]) for n in (pair.candidate, pair.reference))
            test = stats.paired_test([a[s] for s in seeds], [b[s] for s in seeds])
        measured.append({
            "pair": pair, "reference": ref, "candidate": cand,
            "params_ratio": _ratio(ref["params"], cand["params"]),
            "macs_ratio": _ratio(ref["macs"], cand["macs"]),
            "speedup": _ratio(cand["eval images/s"], ref["eval images/s"]),
            "accuracy_diff_points": None if test["diff"] is None else 100 * test["diff"],
            "accuracy_diff_ci_points": None if test["diff_ci"] is None else 100 * test["diff_ci"],
            "p": test["p"], "n": test["n"],
        })
    return measured


# --- markdown and plots ------------------------------------------------------------------------


def arithmetic_section(rows: Sequence[dict], pairs: Sequence[Pair]) -> str:
    """The units table and one line per pair: reference / candidate weights, both counts agreeing."""
    lines = [markdown_table(rows), ""]
    by_unit = {(r["pair"], r["unit"]): r for r in rows}
    for pair in pairs:
        ref, cand = (by_unit[(pair.label, u.label)] for u in pair.units)
        agree = all(r["formula weights"] == r["counted weights"] for r in (ref, cand))
        lines.append(f"- {pair.label}: {ref['counted weights']:,} against "
                     f"{cand['counted weights']:,} weights, "
                     f"{ref['counted weights'] / cand['counted weights']:.2f}x "
                     f"({'formula and module agree' if agree else 'FORMULA AND MODULE DISAGREE'}).")
    return "\n".join(lines)


def measured_table(measured: Sequence[dict]) -> str:
    return markdown_table([{"pair": m["pair"].label, "role": role, **m[role]}
                           for m in measured for role, _ in ROLES])


def _times(ratio: float, fewer: str, more: str) -> str:
    if math.isclose(ratio, 1.0, rel_tol=5e-3):
        return f"as many {fewer.split()[-1]}"
    return f"{ratio:.2f}x {fewer}" if ratio > 1 else f"{1 / ratio:.2f}x {more}"


def _significance(m: Mapping) -> str:
    if m["n"] < 2 or m["p"] is None or not math.isfinite(m["p"]):
        return f"{m['n']} paired seed(s), no test"
    verdict = "significant" if m["p"] < 0.05 else "not significant"
    return (f"+-{m['accuracy_diff_ci_points']:.2f} points, paired t-test over {m['n']} seeds "
            f"p = {m['p']:.3g}, {verdict} at 5%")


def reading(measured: Sequence[dict]) -> str:
    """One sentence per pair, every figure computed from the measurements."""
    sentences = []
    for m in measured:
        pair, ref, cand = m["pair"], m["reference"], m["candidate"]
        if m["params_ratio"] is None or m["accuracy_diff_points"] is None:
            sentences.append(f"{pair.label}: {pair.reference} or {pair.candidate} did not finish.")
            continue
        diff = m["accuracy_diff_points"]
        speed = ("" if m["speedup"] is None else
                 f", runs the forward pass {_times(m['speedup'], 'faster', 'slower')}")
        sentences.append(
            f"{pair.label}: {pair.candidate} has {_times(m['params_ratio'], 'fewer parameters', 'more parameters')} "
            f"and {_times(m['macs_ratio'], 'fewer MACs', 'more MACs')} than {pair.reference}{speed}, "
            f"and is {abs(diff):.2f} points {'more' if diff >= 0 else 'less'} accurate "
            f"({100 * cand['accuracy']:.2f}% against {100 * ref['accuracy']:.2f}%; "
            f"{_significance(m)}).")
    return " ".join(sentences)


def _bars(ax: Any, groups: Sequence[Sequence[tuple[str, float | None, float | None]]],
          title: str) -> None:
    """One group of (label, value, error bar) bars per pair: reference grey, candidate blue."""
    ticks, labels = [], []
    for i, group in enumerate(groups):
        for j, ((label, value, err), (role, color)) in enumerate(zip(group, ROLES, strict=True)):
            ticks.append(i + (j - 0.5) * 0.4)
            labels.append(label)
            if value is not None:
                ax.bar(ticks[-1], value, 0.4, color=color, label=role if i == 0 else None,
                       yerr=err if err is not None and math.isfinite(err) else None)
    ax.set_xticks(ticks, labels, fontsize=6, rotation=20, ha="right")
    ax.set_title(title, fontsize=9)


def _save(fig: Any, axes: Sequence[Any], out_png: str) -> None:
    if axes[0].get_legend_handles_labels()[0]:  # nothing to label when no pair ran
        axes[0].legend(fontsize=7)
    fig.savefig(out_png, dpi=110)


def _figure(panels: int) -> tuple[Any, Sequence[Any]]:
    return figure(3.8 * panels, 4.0, panels)


def plot_units(rows: Sequence[dict], pairs: Sequence[Pair], out_png: str) -> None:
    """Kernel weights and MACs per unit, reference and candidate side by side for each pair."""
    by_unit = {(r["pair"], r["unit"]): r for r in rows}
    fig, axes = _figure(2)
    for ax, key in zip(axes, ("counted weights", "MACs"), strict=True):
        _bars(ax, [[(u.label, by_unit[(p.label, u.label)][key], None) for u in p.units]
                   for p in pairs], f"{key} per unit")
    _save(fig, axes, out_png)


def plot_pairs(measured: Sequence[dict], out_png: str) -> None:
    """Params, MACs, test accuracy (95% CI) and eval images/s of each pair's two variants."""
    keys = ("params", "macs", "accuracy", "eval images/s")
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        _bars(ax, [[(m[role]["variant"], m[role][key],
                     m[role]["accuracy_ci95"] if key == "accuracy" else None)
                    for role, _ in ROLES] for m in measured], key)
        if key == "accuracy":
            low = [m[r]["accuracy"] for m in measured for r, _ in ROLES
                   if m[r]["accuracy"] is not None]
            ax.set_ylim(max(0.0, min(low, default=0.0) - 0.05), 1.0)
    _save(fig, axes, out_png)


def study_sections(title: str, prefix: str, pairs: Sequence[Pair], workdir: str,
                   config: ml_collections.ConfigDict, summary: Mapping,
                   results: Sequence[tuple[Mapping, list[dict]]]) -> str:
    """The arithmetic and measured sections of a pair study, with PREFIX_units.png and
    PREFIX_pairs.png written into workdir."""
    rows = unit_rows(pairs)
    plot_units(rows, pairs, os.path.join(workdir, f"{prefix}_units.png"))
    measured = measure_pairs(pairs, config, summary, results)
    plot_pairs(measured, os.path.join(workdir, f"{prefix}_pairs.png"))
    device = jax.devices()[0]
    return "\n".join([
        f"## {title}: the source notes' arithmetic", "",
        "Kernel weights counted on the real blocks (initialised with jax.eval_shape; no biases, no "
        "batch-norm parameters) next to the notes' formula k*k*Cin*Cout; MACs per unit at its input "
        "size (cnnjax.profile); receptive field from `ablation.receptive_field` and measured as the "
        "support of the centre output's gradient.", "",
        arithmetic_section(rows, pairs), "",
        f"![weights and MACs per unit]({prefix}_units.png)", "",
        f"## {title}: measured", "",
        "reference / candidate per pair; accuracy is test accuracy, mean over seeds with its 95% CI "
        "half-width; train images/s is the training run's (compilation included); eval images/s is "
        f"the forward pass at batch {config.batch_size} without compilation, best of 5 rounds of "
        f"~0.2 s, measured for this report on {device.platform} ({device.device_kind}).", "",
        measured_table(measured), "",
        f"![each pair's costs and accuracy]({prefix}_pairs.png)", "",
        "**Reading.** " + reading(measured), ""])


def report(workdir: str, config: ml_collections.ConfigDict, summary: Mapping,
           results: Sequence[tuple[Mapping, list[dict]]]) -> str:
    """The sweep.study hook: this study's markdown for report.md."""
    return study_sections("1x1 bottleneck", "bottleneck", bottleneck_pairs(), workdir, config,
                          summary, results)
