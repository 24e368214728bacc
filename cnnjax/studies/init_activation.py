"""The initialisation x activation study's report: what each init and activation does inside a deep plain net.

Every variant is PlainNet(kernel_init=, act=, norm=False): without batch norm nothing rescales
the signal, so the init alone sets it. For each variant's first seed this module measures, at
initialisation (the trial's own init) and after training, on the first validation images:
- per layer (stem, layer1..N, head): activation std, fraction saturated (sigmoid outside
  [0.01, 0.99], tanh beyond +-0.99), unit_spread (0 exactly when every unit of the layer is the same)
  and the gradient norm of the loss w.r.t. the layer's weights (cnnjax.diagnostics);
- test accuracy and the final training loss.
It writes the tables, two PNGs (activation statistics; gradient norms) and a reading computed from
the numbers: zero init's symmetry, small init's vanishing signal, sigmoid saturation.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cnnjax import diagnostics
from cnnjax.studies import (
    Trial,
    figure,
    final_training,
    first_seed_dirs,
    initial_variables,
    load_trial,
    rows_by_variant,
    training_curve,
)
from cnnjax.sweep.report import markdown_table

STATS_PNG = "init_activation_stats.png"
GRADS_PNG = "init_activation_gradients.png"
MEASURED_JSON = "init_activation.json"  # every number of the section, for scripts and tests
STAT_KEYS = ("std", "fraction_saturated", "unit_spread")
SHORT_INIT = {"zeros": "zeros", "small_normal": "N(0,0.01)", "xavier_normal": "Xavier",
              "he_normal": "He", "large_normal": "N(0,1)"}


def measure_variant(trial: Trial, seed_dir: str) -> dict[str, Any]:
    """Layer statistics and gradient norms at init and after training, and the final training fit."""
    x, y = trial.images, trial.labels
    init = initial_variables(trial)
    final = final_training(training_curve(seed_dir))
    return {
        "init": str(trial.model.kernel_init),
        "act": str(trial.model.act),
        "depth": int(trial.model.depth),
        "images": len(x),
        "train_loss": final["loss"],
        "train_accuracy": final["accuracy"],
        "stats_init": diagnostics.layer_statistics(trial.model, init, x),
        "stats_trained": diagnostics.layer_statistics(trial.model, trial.variables, x),
        "grads_init": diagnostics.gradient_norms(trial.model, init, x, y),
        "grads_trained": diagnostics.gradient_norms(trial.model, trial.variables, x, y),
    }


def hidden(stats: Sequence[dict]) -> list[dict]:
    """The layers whose output passes through the activation: all but the head (logits)."""
    return [s for s in stats if s["name"] != "head"]


def summarise(m: Mapping[str, Any]) -> dict[str, float]:
    """One row of numbers per variant, each over the hidden layers (stem..layerN)."""
    row = {}
    for when in ("init", "trained"):
        layers = hidden(m[f"stats_{when}"])
        row[f"last std {when}"] = layers[-1]["std"]
        row[f"saturated {when}"] = float(np.mean([s["fraction_saturated"] for s in layers]))
        row[f"max spread {when}"] = max(s["unit_spread"] for s in layers)
        row[f"stem grad {when}"] = m[f"grads_{when}"]["stem"]
    first = hidden(m["stats_init"])[0]["std"]
    row["std last/first init"] = row["last std init"] / first if first > 0 else math.nan
    return row


def _plot_stats(measured: Sequence[Mapping], path: str) -> None:
    """Rows: activations; columns: std, fraction saturated, unit_spread, each at init | trained."""
    acts = list(dict.fromkeys(m["act"] for m in measured))
    columns = [(key, when) for key in STAT_KEYS for when in ("init", "trained")]
    fig, axes = figure(2.9 * len(columns), 2.4 * len(acts), len(columns), rows=len(acts),
                       layout="constrained")
    for row, act in enumerate(acts):
        for col, (key, when) in enumerate(columns):
            ax = axes[row, col]
            for m in (m for m in measured if m["act"] == act):
                layers = hidden(m[f"stats_{when}"])
                values = [s[key] for s in layers]
                if key != "fraction_saturated":
                    values = [max(v, 1e-30) for v in values]  # log axis: exact 0 at the floor
                ax.plot(range(len(values)), values, marker="o", ms=2,
                        label=SHORT_INIT.get(m["init"], m["init"]))
            if key != "fraction_saturated":
                ax.set_yscale("log")
            ax.set_title(f"{act}: {key} @{when}", fontsize=8)
            ax.tick_params(labelsize=6)
        axes[row, 0].legend(fontsize=6)
    fig.supxlabel("hidden layer (stem = 0)", fontsize=8)
    fig.savefig(path, dpi=90)


def _plot_gradients(measured: Sequence[Mapping], path: str) -> None:
    panels = {}
    for act in dict.fromkeys(m["act"] for m in measured):
        for when in ("init", "trained"):
            panels[f"{act} @{when}"] = {SHORT_INIT.get(m["init"], m["init"]): m[f"grads_{when}"]
                                        for m in measured if m["act"] == act}
    diagnostics.plot_layer_panels(panels, path, ylabel="||dL/dW||", ncols=2,
                                  title="gradient norm per layer, at init and after training")


# --- the reading -------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _pick(measured: Sequence[Mapping], init: str) -> list[Mapping]:
    return [m for m in measured if m["init"] == init]


def _zero_sentence(zeros: Sequence[Mapping], acc: Mapping) -> str:
    spread = max(summarise(m)["max spread trained"] for m in zeros)
    acts = ", ".join(f"{m['act']} {_pct(acc.get(m['label']))}" for m in zeros)
    if spread == 0:
        return (f"Zero init: unit_spread is 0 in every hidden layer after training, so the symmetry "
                f"never breaks (every unit of a layer computes the same value); test accuracy {acts}.")
    return (f"Zero init: unit_spread reaches {spread:.2g} after training, so the symmetry does break "
            f"here; test accuracy {acts}.")


def _small_sentence(small: Sequence[Mapping], measured: Sequence[Mapping], acc: Mapping) -> str:
    """Per activation: does the activation std vanish with depth at init, and the stem gradient."""
    parts = []
    for m in small:
        s = summarise(m)
        ratio = s["std last/first init"]
        he = next((h for h in measured if h["init"] == "he_normal" and h["act"] == m["act"]), None)
        versus = f" (He init: {summarise(he)['stem grad init']:.1e})" if he else ""
        verdict = "vanish with depth" if ratio < 1e-2 else "do not vanish"
        parts.append(f"with {m['act']} the activations {verdict} (last/first hidden-layer std "
                     f"{ratio:.1e} at init), the stem's gradient norm is {s['stem grad init']:.1e}"
                     f"{versus}, test accuracy {_pct(acc.get(m['label']))}")
    return "N(0, 0.01) init: " + "; ".join(parts) + "."


def _saturation_sentence(bounded: Sequence[Mapping]) -> str:
    """The sigmoid/tanh variants with 1% or more of their units saturated, the rest summed up."""
    rows = sorted(((m, summarise(m)) for m in bounded), key=lambda ms: -ms[1]["saturated init"])
    heavy = [(m, s) for m, s in rows if max(s["saturated init"], s["saturated trained"]) >= 0.01]
    items = [f"{m['act']} with {SHORT_INIT.get(m['init'], m['init'])} init {_pct(s['saturated init'])}"
             f" at init, {_pct(s['saturated trained'])} after training" for m, s in heavy]
    rest = len(rows) - len(heavy)
    text = "Saturated units (hidden sigmoid/tanh outputs on their flat part): "
    text += "; ".join(items) if items else "none of the variants reach 1%"
    if items and rest:
        text += f"; the other {rest} sigmoid/tanh variants stay below 1% before and after training"
    return text + "."


def _best_per_activation(measured: Sequence[Mapping], acc: Mapping) -> str:
    items = []
    for act in dict.fromkeys(m["act"] for m in measured):
        scored = [m for m in measured if m["act"] == act and acc.get(m["label"]) is not None]
        if scored:
            best = max(scored, key=lambda m: acc[m["label"]])
            items.append(f"{act} {SHORT_INIT.get(best['init'], best['init'])} "
                         f"({_pct(acc[best['label']])})")
    return "Best init per activation: " + ", ".join(items) + "." if items else ""


def _sigmoid_gradient_sentence(measured: Sequence[Mapping]) -> str:
    sig = next((m for m in measured if m["act"] == "sigmoid" and m["init"] == "xavier_normal"), None)
    if sig is None:
        return ""
    stem, last = sig["grads_init"]["stem"], sig["grads_init"][f"layer{sig['depth']}"]
    tanh = next((m for m in measured if m["act"] == "tanh" and m["init"] == "xavier_normal"), None)
    versus = f" (tanh with Xavier: {tanh['grads_init']['stem']:.1e})" if tanh else ""
    return (f"Sigmoid with Xavier init: the stem's gradient norm at init is {stem:.1e} against "
            f"{last:.1e} at layer{sig['depth']}, {last / max(stem, 1e-30):.1e}x smaller toward "
            f"the input{versus}.")


def reading(measured: Sequence[Mapping], test_accuracy: Mapping[str, float]) -> str:
    """One paragraph, every comparison decided by the numbers (variants missing from the sweep are
    left out of it)."""
    parts = []
    if _pick(measured, "zeros"):
        parts.append(_zero_sentence(_pick(measured, "zeros"), test_accuracy))
    if _pick(measured, "small_normal"):
        parts.append(_small_sentence(_pick(measured, "small_normal"), measured, test_accuracy))
    bounded = [m for m in measured if m["act"] in ("sigmoid", "tanh") and m["init"] != "zeros"]
    if bounded:
        parts.append(_saturation_sentence(bounded))
    parts.append(_sigmoid_gradient_sentence(measured))
    parts.append(_best_per_activation(measured, test_accuracy))
    scored = [m for m in measured if test_accuracy.get(m["label"]) is not None]
    if scored:
        best = max(scored, key=lambda m: test_accuracy[m["label"]])
        chance = sum(test_accuracy[m["label"]] <= 0.15 for m in scored)  # 10 classes: 10% is chance
        parts.append(f"Best overall: {best['label']} at {_pct(test_accuracy[best['label']])} test "
                     f"accuracy; {chance} of {len(scored)} variants end at or below 15%.")
    return " ".join(p for p in parts if p)


# --- the report --------------------------------------------------------------------------------


def report(*, workdir: str, config: Any, summary: Mapping, results: Sequence) -> str:
    """The study's markdown: per-variant numbers, per-layer plots and the reading."""
    rows = rows_by_variant(summary)
    measured, test = [], {}
    for name, seed_dir in first_seed_dirs(workdir, results).items():
        m = measure_variant(load_trial(seed_dir), seed_dir)
        m["label"] = f"{SHORT_INIT.get(m['init'], m['init'])}-{m['act']}"
        measured.append(m)
        test[m["label"]] = rows[name]["accuracy"]
    if not measured:
        return "## Initialisation and activation\n\n(no finished trials)\n"
    with open(os.path.join(workdir, MEASURED_JSON), "w") as f:
        json.dump({"variants": measured, "test_accuracy": test}, f, indent=2)
    _plot_stats(measured, os.path.join(workdir, STATS_PNG))
    _plot_gradients(measured, os.path.join(workdir, GRADS_PNG))
    table = [{"variant": m["label"], "test acc": test[m["label"]],
              "final train loss": m["train_loss"], **summarise(m)} for m in measured]
    depth = measured[0]["depth"]
    return "\n".join([
        "## Initialisation and activation (Glorot & Bengio 2010; He et al. 2015)", "",
        f"PlainNet without batch norm, depth {depth}: every weight drawn by the variant's init "
        f"(biases 0). Numbers over the hidden layers (stem..layer{depth}) on the first "
        f"{measured[0]['images']} validation images of the first seed, model in train mode; `init` = the trial's own initialisation, "
        "`trained` = its last checkpoint. `saturated`: mean share of units on the flat part "
        "(sigmoid outside [0.01, 0.99], tanh beyond +-0.99; 0 for ReLU); `max spread`: the largest "
        "unit_spread of any hidden layer (0: all units of every layer identical); `stem grad`: "
        "gradient norm of the first layer's weights; final train loss: mean of the last epoch's "
        "logged train steps.", "",
        markdown_table(table), "",
        f"![activation std, saturation and unit spread per layer]({STATS_PNG})", "",
        f"![gradient norm per layer]({GRADS_PNG})", "",
        "### Reading", "", reading(measured, test), ""])
