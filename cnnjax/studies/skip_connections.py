"""The skip-connection study's report: plain against residual PlainNets, training curves, gradient norms.

He et al. 2016 (fig. 1 and 6): a deeper plain net reaches a HIGHER training error than a shallower
one (the degradation problem, an optimisation effect, not overfitting), and identity shortcuts
remove it. The sweep trains PlainNet(depth=D, residual=False/True) at two or more depths; this
module reads back each variant's training curve (metrics.jsonl) and its first seed's variables at
initialisation and after training, and writes:
- the parameter arithmetic (identity skips add no weights), computed from the real modules;
- final training loss and accuracy (mean of the last epoch's logged train steps) beside test accuracy;
- training-loss curves per variant, and gradient norms per layer at init and after training;
- gradient norms at init of the same nets without batch norm and with Xavier init (untrained: with
  batch norm a plain net's early gradients are large at init, so vanishing shows only without it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from cnnjax import diagnostics
from cnnjax.profile import init_shapes
from cnnjax.studies import (
    Trial,
    figure,
    final_training,
    first_seed_dirs,
    init_variables,
    load_trial,
    rows_by_variant,
    training_curve,
)
from cnnjax.sweep.report import markdown_table
from cnnjax.sweep.runner import trial_dir

LOSS_PNG = "skip_training_loss.png"
GRADS_PNG = "skip_gradient_norms.png"
MEASURED_JSON = "skip_connections.json"  # every number of the section, for scripts and tests


# --- arithmetic --------------------------------------------------------------------------------


def parameter_arithmetic(model: Any, input_shape: tuple[int, int, int]) -> dict[str, int]:
    """Params of `model` counted on its real init shapes, and the same by formula.

    PlainNet: 3x3 stem Cin->C, depth 3x3 CxC convs, 2C batch-norm params per conv when norm is on
    (a bias C per conv without), head C*classes + classes. Skips are identities: nothing to count.
    """
    shapes = init_shapes(model, input_shape)["params"]
    counted = int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))
    c, cin, k = model.width, input_shape[-1], 3
    per_conv_extra = 2 * c if model.norm else c
    formula = (k * k * cin * c + model.depth * k * k * c * c
               + (model.depth + 1) * per_conv_extra + c * model.num_classes + model.num_classes)
    layer_kernel = int(np.prod(shapes["layer1"]["conv"]["kernel"].shape))
    return {"params": counted, "params_formula": formula, "layer_kernel": layer_kernel,
            "layer_kernel_formula": k * k * c * c}


# --- measurements ------------------------------------------------------------------------------


def _label(trial: Trial) -> str:
    return f"{'residual' if trial.model.residual else 'plain'}-{trial.model.depth}"


def measure_variant(workdir: str, name: str, records: Sequence[dict], trial: Trial) -> dict:
    """Final training loss/accuracy (mean over the finished seeds) and gradient norms of one variant."""
    finals = [final_training(training_curve(trial_dir(workdir, name, r["seed"])))
              for r in records if r["status"] == "done"]
    x, y = trial.images, trial.labels
    # Skips add no weights, so the plain twin's init is this net's init: one compile per depth.
    init = init_variables(trial.model.clone(residual=False), tuple(x.shape[1:]), trial.config.seed)
    return {
        "label": _label(trial),
        "depth": int(trial.model.depth),
        "residual": bool(trial.model.residual),
        "train_loss": float(np.mean([f["loss"] for f in finals])),
        "train_accuracy": float(np.mean([f["accuracy"] for f in finals])),
        "images": len(x),
        "grads_init": diagnostics.gradient_norms(trial.model, init, x, y),
        "grads_trained": diagnostics.gradient_norms(trial.model, trial.variables, x, y),
    }


def no_norm_gradients(trial: Trial) -> dict[str, float]:
    """Gradient norms at init of the trial's net rebuilt without batch norm and with Xavier init."""
    model = trial.model.clone(norm=False, kernel_init="xavier_normal")
    x, y = trial.images, trial.labels
    init = init_variables(model.clone(residual=False), tuple(x.shape[1:]), trial.config.seed)
    return diagnostics.gradient_norms(model, init, x, y)


def _plot_training_loss(curves: Mapping[str, Sequence[dict]], path: str) -> None:
    fig, ax = figure(7, 4, layout="constrained")
    for label, records in curves.items():
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean since the previous log)")
    ax.legend(fontsize=8)
    ax.set_title("training loss: the degradation problem is a training-error effect")
    fig.savefig(path, dpi=100)


# --- the report --------------------------------------------------------------------------------


def reading(measured: Sequence[dict], test_accuracy: Mapping[str, float]) -> str:
    """One paragraph, every word of comparison decided by the numbers in `measured`."""
    by = {(m["depth"], m["residual"]): m for m in measured}
    depths = sorted({m["depth"] for m in measured})
    parts = []
    if len(depths) >= 2 and (depths[0], False) in by and (depths[-1], False) in by:
        shallow, deep = by[(depths[0], False)], by[(depths[-1], False)]
        ratio = deep["train_loss"] / max(shallow["train_loss"], 1e-12)
        verdict = ("the deeper plain net trains worse (the degradation problem)"
                   if ratio > 1.1  # more than 10% higher counts as worse; closer reads as a tie
                   else "no degradation at this size: the deeper plain net trains as well or better")
        parts.append(f"{deep['label']} ends training with loss {deep['train_loss']:.3g} (training "
                     f"accuracy {100 * deep['train_accuracy']:.1f}%) against {shallow['label']}'s "
                     f"{shallow['train_loss']:.3g} ({100 * shallow['train_accuracy']:.1f}%), "
                     f"{ratio:.3g}x: {verdict}.")
    for depth in depths:
        plain, res = by.get((depth, False)), by.get((depth, True))
        if plain is None or res is None:
            continue
        ratio = plain["train_loss"] / max(res["train_loss"], 1e-12)
        effect = ("leave the final training loss about the same (within 10%: "
                  if 1 / 1.1 <= ratio <= 1.1 else
                  "lower the final training loss (" if ratio > 1 else
                  "do not lower the final training loss (")
        parts.append(f"At depth {depth} identity skips {effect}"
                     f"{plain['train_loss']:.3g} plain, {res['train_loss']:.3g} residual, "
                     f"{ratio:.3g}x); test accuracy {_pct(test_accuracy.get(plain['label']))} "
                     f"plain, {_pct(test_accuracy.get(res['label']))} residual.")
    deep = depths[-1] if depths else None
    if (deep, False) in by and (deep, True) in by:
        plain, res = by[(deep, False)], by[(deep, True)]
        p, r = plain["grads_no_norm_init"]["stem"], res["grads_no_norm_init"]["stem"]
        pb, rb = plain["grads_init"]["stem"], res["grads_init"]["stem"]
        sentence = (f"Without batch norm (Xavier init, at init) the stem's gradient norm is {p:.2g} "
                    f"in plain-{deep} against {r:.2g} with skips ({r / max(p, 1e-30):.3g}x); with "
                    f"batch norm, as trained, it is {pb:.2g} plain against {rb:.2g} residual")
        if pb >= rb:  # the BN plain net's early gradients are not small: say where the effect is
            sentence += (", so with batch norm the degradation is not vanishing gradients at "
                         "step 0 but slower optimisation, visible in the training curves")
        parts.append(sentence + ".")
    return " ".join(parts)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def report(*, workdir: str, config: Any, summary: Mapping, results: Sequence) -> str:
    """The study's markdown: arithmetic, training table and curves, gradient norms, the reading."""
    rows = rows_by_variant(summary)
    records = {name: recs for name, recs in ((_name(r), r) for _, r in results) if name}
    measured, curves, arithmetic, test, trials = [], {}, [], {}, {}
    for name, seed_dir in first_seed_dirs(workdir, results).items():
        trial = load_trial(seed_dir)
        m = measure_variant(workdir, name, records[name], trial)
        measured.append(m)
        trials[m["label"]] = trial
        curves[m["label"]] = training_curve(seed_dir)
        test[m["label"]] = rows[name]["accuracy"]
        counts = parameter_arithmetic(trial.model, tuple(trial.images.shape[1:]))
        arithmetic.append({"variant": m["label"], **counts, "macs": rows[name]["macs"]})
    if not measured:
        return "## Skip connections\n\n(no finished trials)\n"
    measured.sort(key=lambda m: (m["depth"], m["residual"]))
    deepest = measured[-1]["depth"]
    for m in measured:  # the vanishing-gradient diagnostic needs only the deepest pair
        if m["depth"] == deepest:
            m["grads_no_norm_init"] = no_norm_gradients(trials[m["label"]])
    with open(os.path.join(workdir, MEASURED_JSON), "w") as f:
        json.dump({"variants": measured, "arithmetic": arithmetic}, f, indent=2)
    _plot_training_loss({m["label"]: curves[m["label"]] for m in measured},
                        os.path.join(workdir, LOSS_PNG))
    diagnostics.plot_layer_panels(
        {"at initialisation": {m["label"]: m["grads_init"] for m in measured},
         "after training": {m["label"]: m["grads_trained"] for m in measured},
         "no batch norm, Xavier init, at init (not trained)":
             {m["label"]: m["grads_no_norm_init"] for m in measured if "grads_no_norm_init" in m}},
        os.path.join(workdir, GRADS_PNG), ylabel="||dL/dW||", ncols=3,
        title="gradient norm per layer")
    return _markdown(measured, arithmetic, test)


def _name(records: Sequence[dict]) -> str:
    return records[0]["variant"] if records else ""


def _markdown(measured: Sequence[dict], arithmetic: Sequence[dict], test: Mapping[str, float]
              ) -> str:
    training = [{"variant": m["label"], "depth": m["depth"], "residual": m["residual"],
                 "final train loss": m["train_loss"], "final train acc": m["train_accuracy"],
                 "test acc": test[m["label"]]} for m in measured]
    grads = [{"variant": m["label"], "stem @init": m["grads_init"]["stem"],
              "last layer @init": m["grads_init"][f"layer{m['depth']}"],
              "stem trained": m["grads_trained"]["stem"],
              "stem @init, no BN, Xavier": m.get("grads_no_norm_init", {}).get("stem")}
             for m in measured]
    return "\n".join([
        "## Skip connections: plain against residual (He et al. 2016)", "",
        "Identity shortcuts add no weights: parameters counted on the real modules' init shapes "
        "(`params`) and by the formula 9*Cin*C + depth*9*C*C + (depth+1)*2C + C*classes + classes "
        "(`params_formula`); one 3x3 CxC layer is `layer_kernel` weights (formula 9*C*C).", "",
        markdown_table(arithmetic), "",
        "### Training error (the degradation problem is about training, not test, error)", "",
        "Final train loss/acc: mean of the train-step logs of the last epoch (metrics.jsonl), "
        "mean over finished seeds; test accuracy as in the table above.", "",
        markdown_table(training), "",
        f"![training loss per variant]({LOSS_PNG})", "",
        "### Gradient norm per layer", "",
        f"L2 norm of each layer's loss gradient on the first {measured[0]['images']} validation "
        "images, first seed, model in train mode (batch statistics); "
        "'@init' is the trial's own initialisation (same seed and key as training).", "",
        markdown_table(grads), "",
        f"![gradient norms at init, after training, and without batch norm]({GRADS_PNG})", "",
        "The third panel is a diagnostic, not a trained variant: the deepest plain and residual nets "
        "rebuilt with norm=False and Xavier init, at initialisation (with batch norm a plain net's "
        "early gradients are not small at init).", "",
        "### Reading", "", reading(measured, test), ""])
