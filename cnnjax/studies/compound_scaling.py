"""The compound-scaling study (Tan & Le 2019): plans its depth/width/resolution/compound variants and reports them.

`plan_variants` turns a small EfficientNet into sweep variants: each single dimension and the compound
rule scaled to 2x, 4x, 8x the baseline's FLOPs, plus (alpha, beta, gamma) triples with
alpha * beta^2 * gamma^2 ~= 2 at phi = 1. Planning counts FLOPs with `efficientnet_macs`, a closed
form of the same layers (instant, so a config loads fast); the report measures every variant again
with `cnnjax.profile` (jax.eval_shape). Variant names carry the plan ("depth_4x",
"compound_8x_a1.20_b1.10_g1.15", "grid_a1.40_b1.20_g1.00"); `parse_name` reads them back.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from cnnjax.layers import make_divisible
from cnnjax.models.efficientnet import (
    B0_STAGES,
    StageConfig,
    compound_coefficients,
    round_filters,
    scaled_stages,
)
from cnnjax.studies import figure, rows_by_variant
from cnnjax.sweep.space import variant_name as dir_name

RULES = ("depth", "width", "resolution", "compound")
PAPER_TRIPLE = (1.2, 1.1, 1.15)  # Tan & Le 2019, section 3.3: found by grid search at phi = 1
DEPTH, WIDTH, SIZE = "model.kwargs.depth_coefficient", "model.kwargs.width_coefficient", "model.image_size"


# --- arithmetic --------------------------------------------------------------------------------


def _out(size: int, kernel: int, stride: int) -> int:
    """Output side of a conv with padding kernel // 2 (the EfficientNet convs)."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def efficientnet_macs(image_size: int, width: float = 1.0, depth: float = 1.0, *,
                      stages: Sequence[StageConfig] = B0_STAGES, stem_channels: int = 32,
                      head_channels: int = 1280, in_channels: int = 3, num_classes: int = 1000,
                      se_ratio: float = 0.25) -> int:
    """Multiply-accumulates of one EfficientNet forward pass, counted layer by layer in closed form.

    The same layers cnnjax.profile traces (convs and the classifier; batch norm and activations not
    counted): stem 3x3/2, per MBConv 1x1 expand (when the width changes), kxk depthwise, the two
    1x1 squeeze-excitation convs on the pooled 1x1 map, 1x1 project; head 1x1; classifier.
    """
    size = _out(image_size, 3, 2)
    channels = round_filters(stem_channels, width)
    macs = size * size * 9 * in_channels * channels
    for stage in scaled_stages(width, depth, stages):
        for j in range(stage.repeats):
            hidden = make_divisible(channels * stage.expand_ratio)
            if hidden != channels:
                macs += size * size * channels * hidden
            size = _out(size, stage.kernel_size, stage.stride if j == 0 else 1)
            macs += size * size * stage.kernel_size**2 * hidden
            if se_ratio > 0:
                macs += 2 * hidden * max(1, int(channels * se_ratio))
            macs += size * size * hidden * stage.out_channels
            channels = stage.out_channels
    head = round_filters(head_channels, width)
    return macs + size * size * channels * head + head * num_classes


def base_of(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The baseline a config describes: model kwargs (with width/depth coefficients) and image size."""
    kwargs = config.model.kwargs.to_dict()
    return {"kwargs": kwargs, "width": float(kwargs.get("width_coefficient", 1.0)),
            "depth": float(kwargs.get("depth_coefficient", 1.0)),
            "image_size": int(config.model.image_size), "in_channels": int(config.model.in_channels)}


def macs_of(base: Mapping, depth: float = 1.0, width: float = 1.0, resolution: float = 1.0,
            num_classes: int = 10) -> int:
    """Closed-form MACs of the baseline scaled by depth, width and resolution multipliers."""
    kw = base["kwargs"]
    return efficientnet_macs(
        scaled_size(base, resolution), base["width"] * width, base["depth"] * depth,
        stages=kw.get("stages", B0_STAGES), stem_channels=kw.get("stem_channels", 32),
        head_channels=kw.get("head_channels", 1280), in_channels=base["in_channels"] or 3,
        num_classes=num_classes, se_ratio=kw.get("se_ratio", 0.25))


def scaled_size(base: Mapping, resolution: float) -> int:
    """Input side after scaling the resolution (rounded to whole pixels)."""
    return int(round(base["image_size"] * resolution))


def nominal_factor(depth: float, width: float, resolution: float) -> float:
    """FLOPs growth the paper's rule predicts: d * w^2 * r^2 (Tan & Le 2019, section 3.3)."""
    return depth * width**2 * resolution**2


def solve_single(base: Mapping, dimension: str, target: float) -> float:
    """The multiplier of one dimension whose closed-form FLOPs come closest to `target` x baseline
    (nearest in log ratio; the smallest such multiplier). Rounding makes FLOPs a step function."""
    base_macs = macs_of(base)
    if dimension == "resolution":  # whole pixels: every size from the base to 4x the base side
        candidates = [s / base["image_size"] for s in range(base["image_size"],
                                                           4 * base["image_size"] + 1)]
    else:
        candidates = list(np.round(np.arange(1.0, 10.0, 0.01), 2))
    errors = [abs(math.log(macs_of(base, **{dimension: c}) / base_macs / target))
              for c in candidates]
    return float(candidates[int(np.argmin(errors))])


def constrained_grid(alphas: Sequence[float], betas: Sequence[float], gammas: Sequence[float],
                     low: float = 1.9, high: float = 2.1) -> list[tuple[float, float, float]]:
    """Every (alpha, beta, gamma) of the axes with low <= alpha * beta^2 * gamma^2 <= high."""
    if min((*alphas, *betas, *gammas)) < 1:
        raise ValueError("grid values of alpha, beta, gamma must be >= 1 (each dimension only grows); "
                         "fix the axes in the experiment config")
    return [t for t in itertools.product(alphas, betas, gammas)
            if low <= nominal_factor(*t) <= high]


# --- the plan: variant names and fields --------------------------------------------------------


def variant_name(rule: str, target: float | None = None,
                 triple: tuple[float, float, float] | None = None) -> str:
    """The name a variant carries in the sweep; `parse_name` inverts it."""
    parts = [rule] + ([f"{target:g}x"] if target is not None else [])
    if triple is not None:
        parts.append("a{:.2f}_b{:.2f}_g{:.2f}".format(*triple))
    return "_".join(parts)


_NAME = re.compile(r"^(?P<rule>[a-z]+)(?:_(?P<target>[0-9.]+)x)?"
                   r"(?:_a(?P<a>[0-9.]+)_b(?P<b>[0-9.]+)_g(?P<g>[0-9.]+))?$")


def parse_name(name: str) -> dict[str, Any]:
    """{"rule", "target", "triple"} from a variant name ("grid" variants have no target)."""
    match = _NAME.match(name)
    if match is None:
        raise ValueError(f"variant {name!r} is not a compound-scaling name such as 'depth_4x'; "
                         "build the variants with plan_variants")
    triple = tuple(float(match[k]) for k in "abg") if match["a"] else None
    target = float(match["target"]) if match["target"] else None
    return {"rule": match["rule"], "target": target, "triple": triple}


def _fields(base: Mapping, name: str, depth: float, width: float, resolution: float) -> dict:
    return {"name": name, DEPTH: round(base["depth"] * depth, 6),
            WIDTH: round(base["width"] * width, 6), SIZE: scaled_size(base, resolution)}


def plan_variants(config: ml_collections.ConfigDict, targets: Sequence[float] = (2, 4, 8),
                  compound: tuple[float, float, float] = PAPER_TRIPLE,
                  grid: Sequence[tuple[float, float, float]] = ()) -> list[dict]:
    """Sweep variants: the baseline; depth, width, resolution each solved to every target; the
    compound rule at phi = log2(target); each grid triple at phi = 1. A grid triple equal to the
    compound triple is not trained twice (compound_2x is that point)."""
    base = base_of(config)
    if not base["image_size"]:
        raise ValueError("set config.model.image_size: resolution scaling needs the baseline's size")
    if min(targets, default=2) <= 1:
        raise ValueError(f"FLOPs targets must be > 1 (multiples of the baseline), got {targets}")
    variants = [_fields(base, "baseline", 1.0, 1.0, 1.0)]
    for rule in RULES[:3]:
        for target in targets:
            value = solve_single(base, rule, target)
            variants.append(_fields(base, variant_name(rule, target), **{
                "depth": 1.0, "width": 1.0, "resolution": 1.0, rule: value}))
    for target in targets:
        d, w, r = compound_coefficients(math.log2(target), *compound)
        variants.append(_fields(base, variant_name("compound", target, compound), d, w, r))
    for triple in grid:
        if tuple(triple) == tuple(compound) and 2 in targets:
            continue
        d, w, r = compound_coefficients(1.0, *triple)
        variants.append(_fields(base, variant_name("grid", None, triple), d, w, r))
    return variants


# --- the report --------------------------------------------------------------------------------


def measure(config: ml_collections.ConfigDict, fields: Mapping, num_classes: int) -> dict[str, Any]:
    """cnnjax.profile's count (jax.eval_shape trace) of one variant, plus its realised shape."""
    from cnnjax.profile import profile_model

    kwargs = {**config.model.kwargs.to_dict(), "depth_coefficient": fields[DEPTH],
              "width_coefficient": fields[WIDTH]}
    result = profile_model(config.model.name, image_size=fields[SIZE], num_classes=num_classes,
                           in_channels=config.model.in_channels or None, **kwargs)
    stages = scaled_stages(fields[WIDTH], fields[DEPTH], kwargs.get("stages", B0_STAGES))
    shape = ("blocks " + "-".join(str(s.repeats) for s in stages) + ", ch "
             + "-".join(str(s.out_channels) for s in stages) + f", {fields[SIZE]}px")
    return {"macs": result["macs"], "params": result["params"], "shape": shape}


def _rows(config, summary, results, num_classes: int) -> list[dict]:
    """One row per trained variant: plan, multipliers, measured cost ratio and accuracy."""
    base, by_name = base_of(config), rows_by_variant(summary)
    rows = []
    for fields, _ in results:
        plan = parse_name(fields["name"])
        d, w = fields[DEPTH] / base["depth"], fields[WIDTH] / base["width"]
        r = fields[SIZE] / base["image_size"]
        row = by_name.get(dir_name(fields), {})
        rows.append({"variant": fields["name"], **plan, "d": d, "w": w, "r": r,
                     "nominal": nominal_factor(d, w, r),
                     "closed_form_macs": macs_of(base, d, w, r, num_classes),
                     **measure(config, fields, num_classes),
                     "accuracy": row.get("accuracy"), "ci": row.get("accuracy_ci95")})
    baseline = next((row for row in rows if row["rule"] == "baseline"), None)
    if baseline is None:
        raise ValueError("the compound-scaling report needs the variant named 'baseline'; "
                         "build the variants with plan_variants")
    for row in rows:
        row["ratio"] = row["macs"] / baseline["macs"]
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"


def _arithmetic(config, rows: list[dict], num_classes: int) -> list[str]:
    """The source notes' FLOPs arithmetic, computed: alpha*beta^2*gamma^2, phi, rule vs solved."""
    base = base_of(config)
    lines = ["### FLOPs arithmetic", "",
             "FLOPs grow as d * w^2 * r^2 (depth, width, resolution multipliers; Tan & Le 2019, "
             "section 3.3). Measured ratios are cnnjax.profile's counts (a jax.eval_shape trace)."]
    for triple in sorted({r["triple"] for r in rows if r["rule"] == "compound"}):
        a, b, g = triple
        lines += ["", f"Compound rule alpha={a}, beta={b}, gamma={g}: alpha * beta^2 * gamma^2 = "
                  f"{a} * {b}^2 * {g}^2 = {nominal_factor(a, b, g):.4f}; at phi = log2(target) the "
                  "rule promises (alpha * beta^2 * gamma^2)^phi:", "",
                  "| target | phi | depth alpha^phi | width beta^phi | resolution gamma^phi | promised "
                  "| realised shape | measured |", "|---|---|---|---|---|---|---|---|"]
        for row in sorted((r for r in rows if r["triple"] == triple and r["rule"] == "compound"),
                          key=lambda r: r["target"]):
            phi = math.log2(row["target"])
            d, w, r = compound_coefficients(phi, a, b, g)
            lines.append(f"| {row['target']:g}x | {phi:.3g} | {d:.3f} | {w:.3f} | {r:.3f} | "
                         f"{nominal_factor(a, b, g) ** phi:.2f}x | {row['shape']} | "
                         f"{row['ratio']:.2f}x |")
    lines += ["", "Single dimensions: the rule's own multiplier (2^phi for depth, 2^(phi/2) for width "
              "and resolution, closed-form count) against the multiplier solved for the FLOPs "
              "closest to the target (nearest in log ratio), which is the one trained:", "",
              "| rule | target | rule multiplier | its FLOPs ratio | solved multiplier | "
              "measured ratio |", "|---|---|---|---|---|---|"]
    base_macs = macs_of(base, num_classes=num_classes)
    for row in (r for r in rows if r["rule"] in RULES[:3]):
        rule_value = row["target"] ** (1.0 if row["rule"] == "depth" else 0.5)
        ratio = macs_of(base, **{row["rule"]: rule_value}, num_classes=num_classes) / base_macs
        solved = {"depth": row["d"], "width": row["w"], "resolution": row["r"]}[row["rule"]]
        lines.append(f"| {row['rule']} | {row['target']:g}x | {rule_value:.3f} | {ratio:.2f}x | "
                     f"{solved:.3f} | {row['ratio']:.2f}x |")
    agree = sum(r["closed_form_macs"] == r["macs"] for r in rows)
    lines += ["", f"The closed-form count used to plan the variants equals the traced count for "
              f"{agree} of {len(rows)} variants."]
    return lines


def _variant_table(rows: list[dict]) -> list[str]:
    lines = ["### Variants", "", "| variant | d | w | r | shape | params | MACs | FLOPs ratio "
             "| promised d*w^2*r^2 | test accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f" +- {100 * r['ci']:.2f}" if r["ci"] is not None and math.isfinite(r["ci"]) else ""
        lines.append(f"| {r['variant']} | {r['d']:.3f} | {r['w']:.3f} | {r['r']:.3f} | {r['shape']} "
                     f"| {r['params']:,} | {r['macs']:,} | {r['ratio']:.2f}x | {r['nominal']:.2f}x "
                     f"| {_pct(r['accuracy'])}{ci} |")
    return lines


def _accurate(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["accuracy"] is not None and math.isfinite(r["accuracy"])]


def plot_scaling(rows: list[dict], out_png: str) -> None:
    """Left: test accuracy against measured FLOPs, one line per rule from the baseline, log2 axis.
    Right: the (alpha, beta, gamma) grid at phi = 1, accuracy against measured FLOPs."""
    rows = _accurate(rows)
    base = [r for r in rows if r["rule"] == "baseline"]
    fig, (left, right) = figure(12, 4.5, panels=2)
    for rule, marker in zip(RULES, "osD^", strict=True):
        points = sorted((2 * r["macs"], r["accuracy"]) for r in base + [
            r for r in rows if r["rule"] == rule])
        if len(points) > len(base):
            left.plot(*zip(*points, strict=True), "-" + marker, label=rule)
    grid = [r for r in rows if r["triple"] is not None and (r["rule"] == "grid" or r["target"] == 2)]
    for i, r in enumerate(sorted(grid, key=lambda r: r["macs"])):
        right.plot(2 * r["macs"], r["accuracy"], "o", color="tab:purple")
        right.annotate("({:g}, {:g}, {:g})".format(*r["triple"]), (2 * r["macs"], r["accuracy"]),
                       xytext=(4, 4 - 10 * (i % 3)), textcoords="offset points", fontsize=7)
    for ax in (left, right):
        for r in base:
            ax.plot(2 * r["macs"], r["accuracy"], "k*", markersize=14, label="baseline")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("FLOPs per example (measured, log2)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    left.set_title("scaling rules at 2x, 4x, 8x the baseline FLOPs")
    right.set_title("(alpha, beta, gamma) with alpha*beta^2*gamma^2 ~ 2, phi = 1")
    left.legend(fontsize=8)
    fig.savefig(out_png, dpi=110)


def _grid(rows: list[dict]) -> tuple[list[str], list[dict]]:
    grid = [r for r in rows if r["triple"] is not None and (r["rule"] == "grid" or r["target"] == 2)]
    if not grid:
        return [], []
    lines = ["### The (alpha, beta, gamma) grid at phi = 1", "",
             "| alpha | beta | gamma | alpha*beta^2*gamma^2 | shape | FLOPs ratio | test accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(grid, key=lambda r: r["triple"]):
        lines.append("| {:g} | {:g} | {:g} | ".format(*r["triple"])
                     + f"{nominal_factor(*r['triple']):.3f} | {r['shape']} | {r['ratio']:.2f}x | "
                     f"{_pct(r['accuracy'])} |")
    scored = _accurate(grid)
    top = max((r["accuracy"] for r in scored), default=None)
    best = sorted((r for r in scored if r["accuracy"] == top), key=lambda r: r["ratio"])
    if best:
        lines += ["", ("Best triple: " if len(best) == 1 else f"Best triples (tied at {_pct(top)}): ")
                  + "; ".join("alpha={:g}, beta={:g}, gamma={:g}".format(*r["triple"])
                              + f" ({_pct(r['accuracy'])} at {r['ratio']:.2f}x the baseline FLOPs)"
                              for r in best) + "."]
    return lines, best


def _test_size(results: Sequence[tuple[Mapping, list[dict]]]) -> int | None:
    sizes = (r.get("results", {}).get("test_details", {}).get("num_examples")
             for _, records in results for r in records)
    return next((int(n) for n in sizes if n), None)


def reading(rows: list[dict], best_triples: list[dict], test_size: int | None, seeds: int) -> str:
    """One paragraph read off the numbers: the best rule at each target, compound against the best
    single dimension at the largest target, the best grid triple, and how much noise to expect."""
    scored = _accurate(rows)
    base = next((r for r in scored if r["rule"] == "baseline"), None)
    if base is None:
        return "The baseline did not finish, so no rule can be compared with it."
    parts = [f"The baseline reached {_pct(base['accuracy'])}."]
    targets = sorted({r["target"] for r in scored if r["rule"] in RULES})
    for target in targets:
        at = sorted((r for r in scored if r["rule"] in RULES and r["target"] == target),
                    key=lambda r: -r["accuracy"])
        parts.append(f"At {target:g}x: " + ", ".join(
            f"{r['rule']} {_pct(r['accuracy'])} ({r['ratio']:.2f}x FLOPs)" for r in at) + ".")
    if targets:
        top = [r for r in scored if r["rule"] in RULES and r["target"] == targets[-1]]
        compound = next((r for r in top if r["rule"] == "compound"), None)
        single = max((r for r in top if r["rule"] != "compound"), key=lambda r: r["accuracy"],
                     default=None)
        if compound and single:
            diff = 100 * (compound["accuracy"] - single["accuracy"])
            parts.append(f"At the largest target the compound rule is {abs(diff):.2f} points "
                         f"{'above' if diff >= 0 else 'below'} the best single dimension "
                         f"({single['rule']}), at {compound['ratio']:.2f}x against "
                         f"{single['ratio']:.2f}x the baseline FLOPs.")
    if best_triples:
        paper = next((r for r in scored if r["triple"] == PAPER_TRIPLE and r["target"] in (2, None)),
                     None)
        names = " and ".join("({:g}, {:g}, {:g})".format(*r["triple"]) for r in best_triples)
        text = f"The best grid triple{'s (tied) are' if len(best_triples) > 1 else ' is'} {names}"
        if paper is not None and paper not in best_triples:
            text += (f", {100 * (best_triples[0]['accuracy'] - paper['accuracy']):.2f} points above "
                     "the paper's (1.2, 1.1, 1.15)")
        parts.append(text + ".")
    if seeds == 1 and test_size:
        p = base["accuracy"]
        se = 100 * math.sqrt(max(p * (1 - p), 1e-12) / test_size)
        parts.append(f"One seed per variant on {test_size:,} test images: one binomial standard "
                     f"error at the baseline's accuracy is {se:.2f} points, so differences under "
                     f"about {2 * se:.1f} points are not evidence.")
    return " ".join(parts)


def report(*, workdir: str, config: ml_collections.ConfigDict, summary: Mapping,
           results: Sequence[tuple[Mapping, list[dict]]]) -> str:
    """The study's sections for report.md; writes compound_scaling.png into `workdir`."""
    from cnnjax.sweep.costs import input_facts

    num_classes = input_facts(config)["num_classes"]
    rows = _rows(config, summary, results, num_classes)
    grid_lines, best = _grid(rows)
    plot_scaling(rows, os.path.join(workdir, "compound_scaling.png"))
    base = base_of(config)
    lines = ["## Compound scaling (Tan & Le 2019)", "",
             f"Baseline: {config.model.name} with width {base['width']:g}, depth {base['depth']:g}, "
             f"{base['image_size']}px input ({next(r['shape'] for r in rows if r['rule'] == 'baseline')}"
             f"), {next(r['macs'] for r in rows if r['rule'] == 'baseline'):,} MACs. d, w, r below "
             "are multipliers of the baseline's depth coefficient, width coefficient and input side.",
             "", "![accuracy against FLOPs per scaling rule](compound_scaling.png)", "",
             *_arithmetic(config, rows, num_classes), "", *_variant_table(rows), ""]
    if grid_lines:
        lines += [*grid_lines, ""]
    lines += ["### Reading", "", reading(rows, best, _test_size(results), config.sweep.seeds)]
    return "\n".join(lines) + "\n"
