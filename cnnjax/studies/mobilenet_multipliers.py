"""The MobileNet width/resolution study's report: separable-conv arithmetic and cost scaling traced in the real modules.

Howard et al. 2017: a D_K x D_K standard conv from M to N channels on a D_F x D_F map costs
D_K^2*M*N*D_F^2 multiply-adds; the depthwise separable one D_K^2*M*D_F^2 + M*N*D_F^2, a ratio of
1/N + 1/D_K^2. The width multiplier alpha thins every layer (cost ~alpha^2), the resolution
multiplier rho shrinks the input (cost ~rho^2, parameters unchanged). Every count here comes from
tracing the real `DepthwiseSeparableConv` / `MobileNetV1` with `cnnjax.profile` (jax.eval_shape).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from cnnjax import models
from cnnjax.layers import Conv, batch_norm
from cnnjax.models.mobilenet import MOBILENET_V1_BLOCKS, DepthwiseSeparableConv, MobileNetV1
from cnnjax.profile import profile_module
from cnnjax.studies import figure, rows_by_variant
from cnnjax.sweep import space
from cnnjax.sweep.report import markdown_table

Array = jax.Array
COST_PNG = "mobilenet_cost_scaling.png"
ACCURACY_PNG = "mobilenet_accuracy.png"
JSON_NAME = "mobilenet_multipliers.json"

# Howard et al. 2017, the numbers the paper prints (millions), for comparison only.
# Table 3: 3x3 conv on 14x14x512 -> 512, then the modifications in turn: (mult-adds, parameters).
PAPER_TABLE3 = {"standard": (462, 2.36), "separable": (52.3, 0.27), "alpha=0.75": (29.6, 0.15),
                "rho=0.714": (15.1, 0.15)}
# Table 2: share (%) of mult-adds and of parameters by layer type in MobileNet-224. The paper's four
# mult-add shares add up to 99.29%; traced, the stem's is 1.91% (not 1.19%) and they add up to 100%.
PAPER_TABLE2 = {"Conv 1x1 (pointwise)": (94.86, 74.59), "Conv DW 3x3": (3.06, 1.06),
                "Conv 3x3 (stem)": (1.19, 0.02), "Fully connected": (0.18, 24.33)}
# Tables 6 and 7: ImageNet top-1 (%), mult-adds and parameters of the 1-D width and resolution sweeps.
PAPER_WIDTH = {1.0: (70.6, 569, 4.2), 0.75: (68.4, 325, 2.6), 0.5: (63.7, 149, 1.3), 0.25: (50.6, 41, 0.5)}
PAPER_RESOLUTION = {224: (70.6, 569, 4.2), 192: (69.1, 418, 4.2), 160: (67.2, 290, 4.2),
                    128: (64.4, 186, 4.2)}


class SingleConv(nn.Module):
    """One 3x3 layer from M to `features` channels, standard or depthwise separable, callable as a
    model (x, train=) so `cnnjax.profile` can trace it. The separable one is the real
    `DepthwiseSeparableConv`, bound as MobileNetV1 binds it (no bias)."""

    features: int
    separable: bool

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv = functools.partial(Conv, use_bias=False)
        if self.separable:
            return DepthwiseSeparableConv(self.features, conv=conv,
                                          norm=functools.partial(batch_norm, train), act=nn.relu,
                                          name="block")(x)
        return conv(self.features, (3, 3), padding=1, name="conv")(x)


def conv_cost(m: int, n: int, d_f: int, separable: bool) -> dict:
    """Traced multiply-adds and conv weights of one 3x3 layer M -> N on a D_F x D_F map, with the
    paper's formula for the same quantity."""
    result = profile_module(SingleConv(n, separable), (d_f, d_f, m))
    d_k = 3
    formula = d_k * d_k * m * d_f * d_f + m * n * d_f * d_f if separable else d_k * d_k * m * n * d_f * d_f
    return {"macs": result["macs"], "weights": sum(layer["params"] for layer in result["layers"]),
            "formula_macs": formula}


def table3_rows() -> list[dict]:
    """Howard 2017 Table 3 from the real modules: a 3x3 conv on 14x14x512 -> 512, made depthwise
    separable, then thinned (alpha = 0.75) and shrunk (rho = 0.714, 14 -> 10 pixels)."""
    cases = (("standard", 512, 512, 14, False), ("separable", 512, 512, 14, True),
             ("alpha=0.75", 384, 384, 14, True), ("rho=0.714", 384, 384, 10, True))
    rows = []
    for label, m, n, d_f, separable in cases:
        cost = conv_cost(m, n, d_f, separable)
        paper_macs, paper_params = PAPER_TABLE3[label]
        rows.append({"layer": label, "M": m, "N": n, "D_F": d_f, "MACs (traced)": cost["macs"],
                     "MACs (formula)": cost["formula_macs"], "paper MACs (M)": paper_macs,
                     "weights (traced)": cost["weights"], "paper params (M)": paper_params})
    return rows


@functools.lru_cache(maxsize=1)
def _imagenet_profiles() -> tuple[tuple[float, int, dict], ...]:
    """cnnjax.profile of MobileNetV1 at the paper's seven (alpha, input) points; the same in every
    report, so traced once per process."""
    points = [(alpha, 224) for alpha in PAPER_WIDTH] + [(1.0, s) for s in PAPER_RESOLUTION if s != 224]
    return tuple((alpha, size, profile_module(MobileNetV1(width_multiplier=alpha), (size, size, 3)))
                 for alpha, size in points)


def imagenet_rows() -> tuple[list[dict], list[dict]]:
    """The paper's two 1-D sweeps at ImageNet scale (224 px, 1000 classes), traced, beside Tables 6
    and 7; and Table 2 (where the cost of MobileNet-224 sits, by layer type)."""
    rows, base = [], None
    for alpha, size, result in _imagenet_profiles():
        base = base or result
        paper = PAPER_WIDTH[alpha] if size == 224 else PAPER_RESOLUTION[size]
        rows.append({"alpha": alpha, "rho": size / 224, "input": size, "params": result["params"],
                     "paper params (M)": paper[2], "MACs": result["macs"], "paper MACs (M)": paper[1],
                     "MACs / alpha=1,224": result["macs"] / base["macs"],
                     "alpha^2 rho^2": (alpha * size / 224) ** 2, "paper top-1 (%)": paper[0]})
    return rows, layer_type_rows(base["layers"])


def layer_type_rows(layers: Sequence[dict]) -> list[dict]:
    """Share of multiply-adds and weights by layer type (Howard 2017 Table 2's breakdown)."""
    kinds = {"Conv 1x1 (pointwise)": "pw_conv", "Conv DW 3x3": "dw_conv", "Conv 3x3 (stem)": "stem_conv",
             "Fully connected": "classifier"}
    total_macs = sum(layer["macs"] for layer in layers)
    total_params = sum(layer["params"] for layer in layers)
    rows = []
    for label, suffix in kinds.items():
        chosen = [layer for layer in layers if layer["name"].split("/")[-1] == suffix]
        rows.append({"type": label, "MACs": sum(x["macs"] for x in chosen),
                     "MACs %": 100 * sum(x["macs"] for x in chosen) / total_macs,
                     "paper MACs %": PAPER_TABLE2[label][0],
                     "weights %": 100 * sum(x["params"] for x in chosen) / total_params,
                     "paper params %": PAPER_TABLE2[label][1]})
    return rows


def _multipliers(config: ml_collections.ConfigDict, fields: Mapping) -> tuple[float, int, int, int]:
    """(alpha, input size, base input size, last feature map side) of a variant, from its run config."""
    trial = space.apply_variant(config, fields)
    spec = models.get_spec(trial.model.name)
    kwargs = trial.model.kwargs.to_dict()
    if not isinstance(models.create_model(trial.model.name, **kwargs), MobileNetV1):
        raise ValueError(f"cnnjax.studies.mobilenet_multipliers needs MobileNetV1 variants, got model "
                         f"{trial.model.name!r}; set model.name to mobilenet_v1")
    size = trial.model.image_size or spec.input_size
    last = last_map_size(size, kwargs.get("blocks", MOBILENET_V1_BLOCKS))
    return float(kwargs.get("width_multiplier", 1.0)), size, config.model.image_size or spec.input_size, last


def variant_rows(config: ml_collections.ConfigDict, summary: Mapping,
                 results: Sequence[tuple[Mapping, list[dict]]]) -> list[dict]:
    """The trained variants: alpha, rho = input / base input, measured params and MACs against the
    reference variant (the largest alpha and rho), beside alpha^2 and alpha^2 rho^2."""
    rows = rows_by_variant(summary)
    found = []
    for fields, _ in results:
        name = space.variant_name(fields)
        alpha, size, base, last = _multipliers(config, fields)
        row = rows.get(name, {})
        found.append({"variant": name, "alpha": alpha, "rho": size / base, "input": size, "last map": last,
                      "params": row.get("params"), "macs": row.get("macs"),
                      "accuracy": row.get("accuracy"), "accuracy_ci95": row.get("accuracy_ci95")})
    if not found:
        return []
    # The reference is the largest variant that has costs (a variant whose every seed diverged has none).
    costed = [r for r in found if r["macs"] and r["params"]] or found
    ref = max(costed, key=lambda r: (r["alpha"], r["rho"]))
    for r in found:
        r["params / ref"] = r["params"] / ref["params"] if r["params"] and ref["params"] else None
        r["(alpha/ref)^2"] = (r["alpha"] / ref["alpha"]) ** 2
        r["MACs / ref"] = r["macs"] / ref["macs"] if r["macs"] and ref["macs"] else None
        r["predicted (alpha rho / ref)^2"] = (r["alpha"] * r["rho"] / (ref["alpha"] * ref["rho"])) ** 2
    return found


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def last_map_size(size: int, blocks: Sequence[tuple[int, int]] = MOBILENET_V1_BLOCKS) -> int:
    """Side of MobileNetV1's last feature map: every stride-2 3x3 conv (padding 1) rounds up."""
    for stride in [2] + [stride for _, stride in blocks]:
        size = -(-size // stride)
    return size


def _sweep_lines(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The width sweep (at the reference rho) and the resolution sweep (at the reference alpha),
    each from the reference down."""
    ref = max(rows, key=lambda r: (r["alpha"], r["rho"]))
    width = sorted((r for r in rows if r["rho"] == ref["rho"]), key=lambda r: -r["alpha"])
    resolution = sorted((r for r in rows if r["alpha"] == ref["alpha"]), key=lambda r: -r["rho"])
    return width, resolution


def _change(first: dict, last: dict, label: str, predicted: float) -> str:
    text = (f"{label}: MACs fall {first['macs'] / last['macs']:.2f}x ({predicted:.2f}x predicted) and "
            f"parameters {first['params'] / last['params']:.2f}x")
    if _finite(first["accuracy"]) and _finite(last["accuracy"]):
        text += (f"; test accuracy {first['accuracy']:.2%} -> {last['accuracy']:.2%} "
                 f"({100 * (last['accuracy'] - first['accuracy']):+.2f} points)")
    return text + "."


def _gap(rows: Sequence[dict], pointwise_share: float) -> str:
    """Where measured MACs part most from alpha^2 rho^2, and why."""
    ratio, worst = max(((r["MACs / ref"] / r["predicted (alpha rho / ref)^2"], r) for r in rows
                        if r["MACs / ref"]), key=lambda t: t[0], default=(None, None))
    if ratio is None:
        return "No variant has measured MACs to compare."
    if ratio <= 1.02:
        return "Every variant's MACs are within 2% of alpha^2 rho^2 times the reference's."
    last = sorted({r["last map"] for r in rows})
    return (f"The widest gap is alpha={worst['alpha']:g} at {worst['input']} px: "
            f"{worst['MACs / ref']:.1%} of the reference MACs against {worst['predicted (alpha rho / ref)^2']:.1%} "
            f"predicted. Only the pointwise 1x1 convs ({pointwise_share:.1f}% of MobileNet-224's MACs) "
            "scale as alpha^2 (the stem, depthwise convs and classifier as alpha), and every stride-2 "
            "conv rounds an odd side up, so at small inputs the deep layers keep the same map whatever "
            f"rho is (last feature maps here: {', '.join(f'{s}x{s}' for s in last)}).")


def reading(rows: Sequence[dict], pointwise_share: float) -> str:
    """A paragraph of what the numbers say, written from the numbers."""
    rows = [r for r in rows if r["macs"] and r["params"]]
    if len(rows) < 2:
        return "Fewer than two variants finished, so there is nothing to compare yet."
    width, resolution = _sweep_lines(rows)
    parts = []
    if len(width) > 1:
        a, b = width[0], width[-1]
        parts.append(_change(a, b, f"Width alpha {a['alpha']:g} -> {b['alpha']:g}",
                             (a["alpha"] / b["alpha"]) ** 2))
    if len(resolution) > 1:
        a, b = resolution[0], resolution[-1]
        parts.append(_change(a, b, f"Resolution {a['input']} -> {b['input']} px (rho {b['rho']:.3g})",
                             (a["rho"] / b["rho"]) ** 2))
    parts.append(_gap(rows, pointwise_share))
    pairs = [(abs(math.log(w["macs"] / r["macs"])), w, r) for w in width[1:] for r in resolution[1:]]
    done = [p for p in pairs if _finite(p[1]["accuracy"]) and _finite(p[2]["accuracy"])]
    if done:
        gap, w, r = min(done, key=lambda p: p[0])
        if gap > math.log(1.25):
            parts.append(f"No thinned and shrunk variants cost about the same (the closest, alpha="
                         f"{w['alpha']:g} and rho={r['rho']:.3g}, differ {math.exp(gap):.2f}x in MACs), "
                         "so the two multipliers are not compared at equal cost.")
        else:
            better = "thinning" if w["accuracy"] > r["accuracy"] else "shrinking the input"
            if w["accuracy"] == r["accuracy"]:
                better = "neither"
            parts.append(f"At about the same cost, alpha={w['alpha']:g} ({w['macs']:,} MACs) reaches "
                         f"{w['accuracy']:.2%} and rho={r['rho']:.3g} ({r['macs']:,} MACs) "
                         f"{r['accuracy']:.2%}: {better} loses less here.")
    if not all(_finite(r["accuracy_ci95"]) for r in rows if _finite(r["accuracy"])):
        parts.append("One seed per variant: no confidence intervals, so small differences may be noise.")
    return " ".join(parts)


def plot_costs(imagenet: Sequence[dict], trained: Sequence[dict], out_png: str) -> None:
    """Measured MACs ratio against alpha^2 rho^2, at ImageNet scale and at the trained sizes."""
    fig, ax = figure(5.5, 4.5)
    series = (("224 px ImageNet (traced)", "o", (5, -8), [(r["alpha^2 rho^2"], r["MACs / alpha=1,224"], r)
                                                          for r in imagenet]),
              ("trained variants", "s", (-10, 6), [(r["predicted (alpha rho / ref)^2"], r["MACs / ref"], r)
                                                   for r in trained if r["MACs / ref"]]))
    for label, marker, offset, points in series:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker, alpha=0.8, label=label)
        for x, y, r in points:
            ax.annotate(f"a={r['alpha']:g},{r['input']}px", (x, y), fontsize=6, alpha=0.7,
                        textcoords="offset points", xytext=offset)
    ax.plot([0.03, 1.0], [0.03, 1.0], "--", color="grey", label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted MACs ratio (alpha^2 rho^2)")
    ax.set_ylabel("measured MACs ratio")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(out_png, dpi=110)


def plot_accuracy(rows: Sequence[dict], out_png: str) -> None:
    """Test accuracy against MACs: the width sweep and the resolution sweep as two lines."""
    from matplotlib.ticker import NullFormatter

    done = [r for r in rows if _finite(r["accuracy"]) and r["macs"]]
    fig, ax = figure(5.5, 4)
    if done:
        width, resolution = _sweep_lines(done)
        for label, line in (("width alpha", width), ("resolution rho", resolution)):
            err = [r["accuracy_ci95"] if _finite(r["accuracy_ci95"]) else 0.0 for r in line]
            ax.errorbar([r["macs"] for r in line], [r["accuracy"] for r in line], yerr=err,
                        fmt="-o", capsize=3, label=label)
        for r in done:
            ax.annotate(f"a={r['alpha']:g},{r['input']}px", (r["macs"], r["accuracy"]), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # crowded minor labels
    ax.set_xlabel("MACs per example")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(out_png, dpi=110)


def _trained_table(rows: Sequence[dict]) -> list[dict]:
    keys = ("alpha", "rho", "input", "params", "params / ref", "(alpha/ref)^2", "macs", "MACs / ref",
            "predicted (alpha rho / ref)^2", "accuracy", "accuracy_ci95")
    return [{**{k: r[k] for k in keys}, "last map": f"{r['last map']}x{r['last map']}"} for r in rows]


def report(*, workdir: str, config: ml_collections.ConfigDict, summary: Mapping,
           results: Sequence[tuple[Mapping, list[dict]]]) -> str:
    """The study's sections for report.md; also writes its two PNGs and mobilenet_multipliers.json."""
    table3 = table3_rows()
    imagenet, layer_types = imagenet_rows()
    trained = variant_rows(config, summary, results)
    pointwise = layer_types[0]["MACs %"]
    text = reading(trained, pointwise)
    plot_costs(imagenet, trained, os.path.join(workdir, COST_PNG))
    plot_accuracy(trained, os.path.join(workdir, ACCURACY_PNG))
    with open(os.path.join(workdir, JSON_NAME), "w") as f:
        json.dump({"table3": table3, "layer_types": layer_types, "imagenet": imagenet,
                   "trained": trained, "reading": text}, f, indent=2)
    std, sep = table3[0], table3[1]
    design = "the paper's two separate 1-D sweeps, Tables 6 and 7"
    if trained and any(r["alpha"] != max(x["alpha"] for x in trained)
                       and r["rho"] != max(x["rho"] for x in trained) for r in trained):
        design = "a grid over alpha and rho"
    parts = [
        "## MobileNet width (alpha) and resolution (rho) multipliers (Howard et al. 2017)", "",
        "### A depthwise separable conv against a standard one (Table 3)", "",
        "A D_K x D_K conv from M to N channels on a D_F x D_F map costs D_K^2*M*N*D_F^2 multiply-adds; "
        "the depthwise separable one D_K^2*M*D_F^2 + M*N*D_F^2. Traced from the real "
        "`DepthwiseSeparableConv` and a standard `Conv` with `cnnjax.profile` (weights are conv "
        "kernels only, as in the paper):", "",
        markdown_table(table3), "",
        f"Separable / standard = {sep['MACs (traced)'] / std['MACs (traced)']:.5f} traced, against "
        f"1/N + 1/D_K^2 = {1 / sep['N'] + 1 / 9:.5f}.", "",
        "### Where MobileNet-224's cost sits (Table 2)", "",
        markdown_table(layer_types), "",
        "### The two 1-D sweeps at ImageNet scale (224 px, 1000 classes; Tables 6 and 7)", "",
        markdown_table(imagenet), "",
        f"### The trained variants: {design}", "",
        "rho = input / base input; ratios against the reference variant (largest alpha and rho); "
        "params and MACs are the trained runs' own counts.", "",
        markdown_table(_trained_table(trained)), "",
        f"![measured against predicted MACs]({COST_PNG})", "",
        f"![accuracy against MACs]({ACCURACY_PNG})", "",
        "### Reading", "", text, "",
        f"All numbers: [{JSON_NAME}]({JSON_NAME}).",
    ]
    return "\n".join(parts) + "\n"
