"""The DenseNet growth-rate study's report: concatenation arithmetic traced in the real net, cost and accuracy per k.

Huang et al. 2017: every dense layer concatenates k new feature maps onto its input, so a block entered
at k0 channels leaves at k0 + L*k after L layers, and a DenseNet-BC transition keeps floor(theta * c)
of its c channels (theta = 0.5). The widths here are read from one `jax.eval_shape` trace of the very
`DenseNet` each variant trained, and set beside those formulas.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cnnjax import models
from cnnjax.models.densenet import DenseLayer, DenseNet, Transition
from cnnjax.studies import figure, rows_by_variant
from cnnjax.sweep import space
from cnnjax.sweep.report import markdown_table

ACCURACY_PNG = "densenet_growth_accuracy.png"
CHANNELS_PNG = "densenet_growth_channels.png"
JSON_NAME = "densenet_growth.json"


def traced_widths(model: nn.Module, input_shape: tuple[int, int, int]) -> list[dict]:
    """Every dense layer and transition of `model` in call order, {"name", "in", "out"} channels,
    recorded while `jax.eval_shape` traces its init (no memory, nothing computed)."""
    layers: list[dict] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, DenseLayer | Transition):
            layers.append({"name": context.module.name, "in": int(args[0].shape[-1]),
                           "out": int(out.shape[-1])})
        return out

    def init(x):
        with nn.intercept_methods(record):
            return model.init(jax.random.key(0), x, train=False)

    jax.eval_shape(init, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return layers


def concatenation_rows(layers: Sequence[dict], growth_rate: int, compression: float) -> list[dict]:
    """One row per dense block: its traced input width k0, L layers, k0 + L*k against the traced
    output, then the following transition's floor(theta * c) against its traced output."""
    dense = [layer for layer in layers if layer["name"].startswith("block")]
    transitions = {layer["name"]: layer for layer in layers if layer["name"].startswith("transition")}
    rows = []
    for block, group in itertools.groupby(dense, key=lambda layer: layer["name"].split("_")[0]):
        group = list(group)
        k0, out = group[0]["in"], group[-1]["out"]
        transition = transitions.get("transition" + block.removeprefix("block"))
        rows.append({
            "block": block,
            "k0": k0,
            "layers": len(group),
            "k0 + L*k": k0 + len(group) * growth_rate,
            "traced out": out,
            "every layer adds k": all(g["out"] - g["in"] == growth_rate for g in group),
            "floor(theta*c)": math.floor(compression * out) if transition else None,
            "traced transition": transition["out"] if transition else None,
        })
    return rows


def _variant_model(config: ml_collections.ConfigDict, fields: Mapping) -> tuple[nn.Module, tuple]:
    """The variant's network and input shape, built from its run config as the trainer builds it."""
    trial = space.apply_variant(config, fields)
    spec = models.get_spec(trial.model.name)
    size = trial.model.image_size or spec.input_size
    channels = trial.model.in_channels or spec.in_channels
    model = models.create_model(trial.model.name, **trial.model.kwargs.to_dict())
    if not isinstance(model, DenseNet):
        raise ValueError(f"cnnjax.studies.densenet_growth needs DenseNet variants, got model "
                         f"{trial.model.name!r}; set model.name to a densenet* registry entry")
    return model, (size, size, channels)


def variant_entries(config: ml_collections.ConfigDict, summary: Mapping,
                    results: Sequence[tuple[Mapping, list[dict]]]) -> list[dict]:
    """Per variant, sorted by k: its growth rate, traced widths, per-block arithmetic and the
    sweep's measured params, MACs and accuracy."""
    rows = rows_by_variant(summary)
    entries = []
    for fields, _ in results:
        name = space.variant_name(fields)
        model, input_shape = _variant_model(config, fields)
        layers = traced_widths(model, input_shape)
        row = rows.get(name, {})
        entries.append({
            "variant": name,
            "growth_rate": int(model.growth_rate),
            "compression": float(model.compression),
            "params": row.get("params"),
            "macs": row.get("macs"),
            "accuracy": row.get("accuracy"),
            "accuracy_ci95": row.get("accuracy_ci95"),
            "blocks": concatenation_rows(layers, model.growth_rate, model.compression),
            "layers": layers,
        })
    return sorted(entries, key=lambda e: e["growth_rate"])


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def cost_rows(entries: Sequence[dict]) -> list[dict]:
    """Params and MACs per k against the smallest k's, beside (k / k_min)^2."""
    base = entries[0]
    rows = []
    for e in entries:
        ratio = (e["growth_rate"] / base["growth_rate"]) ** 2
        rows.append({
            "k": e["growth_rate"],
            "params": e["params"],
            "MACs": e["macs"],
            "params / smallest": e["params"] / base["params"] if e["params"] and base["params"] else None,
            "MACs / smallest": e["macs"] / base["macs"] if e["macs"] and base["macs"] else None,
            "(k/k_min)^2": ratio,
            "test accuracy": e["accuracy"],
            "ci95": e["accuracy_ci95"],
            "widths (block out > transition)": " > ".join(
                f"{b['traced out']}" + (f" > {b['traced transition']}" if b["traced transition"] else "")
                for b in e["blocks"]),
        })
    return rows


def _arithmetic_rows(entries: Sequence[dict]) -> list[dict]:
    return [{"k": e["growth_rate"], **b}
            for e in entries for b in e["blocks"]]


def reading(entries: Sequence[dict]) -> str:
    """A paragraph of what the numbers say, written from the numbers."""
    done = [e for e in entries if _finite(e["accuracy"]) and e["params"] and e["macs"]]
    if len(done) < 2:
        return "Fewer than two variants finished, so there is nothing to compare yet."
    lo, hi = done[0], done[-1]
    best = max(done, key=lambda e: e["accuracy"])
    text = (f"Raising k from {lo['growth_rate']} to {hi['growth_rate']} multiplies the parameters by "
            f"{hi['params'] / lo['params']:.1f}x and the MACs by {hi['macs'] / lo['macs']:.1f}x "
            f"((k ratio)^2 = {(hi['growth_rate'] / lo['growth_rate']) ** 2:.1f}x: the stem is 2k, "
            "each bottleneck 4k and each layer adds k, so every conv's input and output widths grow "
            "about in proportion to k and its weights about as k^2). "
            f"Test accuracy goes from {lo['accuracy']:.2%} to {hi['accuracy']:.2%} "
            f"({100 * (hi['accuracy'] - lo['accuracy']):+.2f} points); the most accurate is "
            f"k={best['growth_rate']} ({best['accuracy']:.2%}, {best['params']:,} params).")
    cheapest = next(e for e in done if e["accuracy"] >= best["accuracy"] - 0.005)
    if cheapest is not best:
        text += (f" k={cheapest['growth_rate']} comes within half a point of it with "
                 f"{best['params'] / cheapest['params']:.1f}x fewer parameters.")
    if not all(_finite(e["accuracy_ci95"]) for e in (lo, hi)):
        text += " One seed per variant: no confidence interval, so small differences may be noise."
    elif lo["accuracy"] + lo["accuracy_ci95"] >= hi["accuracy"] - hi["accuracy_ci95"] and \
            hi["accuracy"] + hi["accuracy_ci95"] >= lo["accuracy"] - lo["accuracy_ci95"]:
        text += (f" The 95% intervals of k={lo['growth_rate']} and k={hi['growth_rate']} overlap: "
                 "the seeds do not separate them.")
    else:
        text += (f" The 95% intervals of k={lo['growth_rate']} and k={hi['growth_rate']} do not "
                 "overlap.")
    return text


def plot_accuracy(entries: Sequence[dict], out_png: str) -> None:
    """Test accuracy against parameters, one point per k with its 95% interval."""
    from matplotlib.ticker import NullFormatter

    done = [e for e in entries if _finite(e["accuracy"]) and e["params"]]
    fig, ax = figure(5.5, 4)
    params = [e["params"] for e in done]
    accuracy = [e["accuracy"] for e in done]
    errors = [e["accuracy_ci95"] if _finite(e["accuracy_ci95"]) else 0.0 for e in done]
    ax.errorbar(params, accuracy, yerr=errors, fmt="-o", color="tab:blue", capsize=3)
    for e in done:
        ax.annotate(f"k={e['growth_rate']}", (e["params"], e["accuracy"]), fontsize=8,
                    textcoords="offset points", xytext=(4, -10))
    if len(set(params)) > 1:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # crowded minor labels
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title("DenseNet-BC: accuracy against parameters per growth rate k", fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(out_png, dpi=110)


def plot_channels(entries: Sequence[dict], out_png: str) -> None:
    """Channels after the stem and after every dense layer and transition, one line per k."""
    fig, ax = figure(6.5, 4)
    for e in entries:
        widths = [e["layers"][0]["in"]] + [layer["out"] for layer in e["layers"]]
        ax.plot(range(len(widths)), widths, "-", marker=".", label=f"k={e['growth_rate']}")
    ax.set_xlabel("module (stem, then each dense layer and transition in order)")
    ax.set_ylabel("channels")
    ax.set_title(f"Concatenation adds k per layer; transitions keep theta={entries[0]['compression']:g}",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(out_png, dpi=110)


def report(*, workdir: str, config: ml_collections.ConfigDict, summary: Mapping,
           results: Sequence[tuple[Mapping, list[dict]]]) -> str:
    """The study's sections for report.md; also writes its two PNGs and densenet_growth.json."""
    entries = variant_entries(config, summary, results)
    if not entries:
        return "## DenseNet growth rate k\n\nNo variant finished; nothing to report.\n"
    text = reading(entries)
    plot_accuracy(entries, os.path.join(workdir, ACCURACY_PNG))
    plot_channels(entries, os.path.join(workdir, CHANNELS_PNG))
    with open(os.path.join(workdir, JSON_NAME), "w") as f:
        json.dump({"variants": entries, "reading": text}, f, indent=2)
    theta = entries[0]["compression"]
    parts = [
        "## DenseNet growth rate k (Huang et al. 2017)", "",
        "Each dense layer concatenates k new feature maps onto everything before it in its block, so "
        "a block entered at k0 channels leaves at **k0 + L*k** after L layers; a DenseNet-BC "
        f"transition keeps **floor(theta * c)** of its c channels (theta = {theta:g}). The widths "
        "below are traced from each variant's own `DenseNet` with `jax.eval_shape` and set beside "
        "those formulas; params and MACs are the trained runs' (MACs per example, convs and the "
        "classifier).", "",
        "### Cost and accuracy per k", "",
        markdown_table(cost_rows(entries)), "",
        "### Concatenation arithmetic, traced against the formulas", "",
        markdown_table(_arithmetic_rows(entries)), "",
        f"![accuracy against parameters per k]({ACCURACY_PNG})", "",
        f"![channels through the network per k]({CHANNELS_PNG})", "",
        "### Reading", "", text, "",
        f"All numbers: [{JSON_NAME}]({JSON_NAME}).",
    ]
    return "\n".join(parts) + "\n"
