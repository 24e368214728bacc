"""Search spaces: the `config.sweep` defaults, parsed parameters, and the variants each strategy proposes."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

STRATEGIES = ("grid", "random", "tpe", "gp", "coarse_to_fine")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int", "intloguniform")


def sweep_config(**overrides: Any) -> ml_collections.ConfigDict:
    """`config.sweep` with its defaults; pass fields to override, e.g. sweep_config(strategy="tpe").

    `params` mirrors the run config (params.optimizer.learning_rate = ...) or uses dotted keys in a
    plain dict ({"optimizer.learning_rate": ...}). A leaf is either a list of values (a grid axis; a
    choice for the samplers) or a distribution tuple: ("choice", [values]), ("uniform", lo, hi),
    ("loguniform", lo, hi), ("int", lo, hi), ("intloguniform", lo, hi); a grid takes a numeric
    distribution as N evenly spaced points when given a fourth entry: ("loguniform", 1e-4, 1e-1, 4).
    `variants` lists explicit variants ({field: value}, optional "name"), crossed with the grid.
    """
    sweep = ml_collections.ConfigDict()
    sweep.strategy = "grid"  # grid | random | tpe | gp | coarse_to_fine
    sweep.params = ml_collections.ConfigDict()
    sweep.variants = []
    sweep.num_trials = 8  # random, tpe and gp: variants to try; coarse_to_fine: per round
    sweep.seeds = 1  # K: every variant runs with seeds config.seed, config.seed + 1, ..., + K - 1
    sweep.metric = "best_validation.accuracy"  # path into results.json that the search optimises
    sweep.direction = "maximize"
    sweep.baseline = ""  # variant name the report compares against ("" = the first variant)
    sweep.rounds = 3  # coarse_to_fine: rounds of num_trials random trials
    sweep.keep = 3  # coarse_to_fine: best variants of a round that bound the next round's ranges
    sweep.prune = False  # tpe/gp: stop hopeless variants early (median rule over per-epoch metric)
    sweep.prune_startup_trials = 3  # finished variants before pruning may start
    sweep.prune_warmup_epochs = 1  # epochs every variant trains before it may be pruned
    sweep.startup_trials = 4  # tpe/gp: random variants before the model of the space takes over
    sweep.sampler_seed = 0
    sweep.device_peak_tflops = 0.0  # > 0: the cost sheet also estimates seconds per step
    sweep.assumed_utilization = 0.4  # fraction of peak a training step reaches, for that estimate
    # "package.module[:function]" (function defaults to `report`), called after the sweep report as
    # function(workdir=, config=, summary=, results=) -> markdown appended to report.md: the
    # ablation studies add their arithmetic, diagnostics and plots this way (cnnjax.studies).
    sweep.study = ""
    # "package.module[:function]" called once before any variant trains, as
    # function(workdir=, config=) -> {dotted field: value} set on every variant's config (a
    # variant's own fields win): cnnjax.studies.transfer:pretrain trains the source run this way and
    # returns its checkpoints as init_from. It must skip work it finds done (the sweep reruns it).
    sweep.prepare = ""
    if "params" in overrides:
        sweep.params = nest(flatten_params(overrides.pop("params")))
    if "variants" in overrides:  # a list keeps its dicts as they are: dotted keys are fine there
        sweep.variants = [dict(v) for v in overrides.pop("variants")]
    sweep.update(overrides)
    return sweep


def nest(flat: Mapping[str, Any]) -> dict:
    """{"a.b": v} -> {"a": {"b": v}} (ConfigDict keys cannot hold dots)."""
    nested: dict = {}
    for field, value in flat.items():
        *parents, key = field.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return nested


@dataclasses.dataclass(frozen=True)
class Param:
    """One swept field: a finite list of `values`, or a numeric range [low, high]."""

    field: str
    kind: str  # one of DISTRIBUTIONS
    values: tuple = ()  # choice
    low: float = 0.0
    high: float = 0.0
    grid_points: int = 0  # numeric ranges: points a grid takes (0: a grid cannot use this param)

    @property
    def log(self) -> bool:
        return self.kind in ("loguniform", "intloguniform")

    @property
    def is_int(self) -> bool:
        return self.kind in ("int", "intloguniform")

    def grid(self) -> list:
        """The values a grid search takes."""
        if self.kind == "choice":
            return list(self.values)
        if not self.grid_points:
            raise ValueError(f"sweep param {self.field!r} is a {self.kind} range; a grid needs a point "
                             f"count: ({self.kind!r}, {self.low}, {self.high}, N) or a list of values")
        unit = np.linspace(0.0, 1.0, self.grid_points)
        return sorted({self.from_unit(u) for u in unit})

    def from_unit(self, u: float) -> Any:
        """The value at fraction `u` of the range (in log space for log ranges)."""
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        return int(round(value)) if self.is_int else float(value)

    def sample(self, rng: np.random.Generator) -> Any:
        if self.kind == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        return self.from_unit(float(rng.uniform()))


def flatten_params(params: Mapping, prefix: str = "") -> dict[str, Any]:
    """{dotted field: leaf} from a nested ConfigDict/dict, dotted keys or both."""
    flat = {}
    for key, value in params.items():
        field = f"{prefix}{key}"
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            flat.update(flatten_params(value, field + "."))
        else:
            flat[field] = value
    return flat


def parse_param(field: str, spec: Any) -> Param:
    """A Param from one leaf of `sweep.params`; a ValueError names a malformed leaf and its fix."""
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"sweep param {field!r} is an empty list; give at least one value")
        return Param(field, "choice", values=tuple(_plain(v) for v in spec))
    usage = ("a list of values or (kind, ...) with kind in " + ", ".join(DISTRIBUTIONS))
    if not (isinstance(spec, tuple) and spec and spec[0] in DISTRIBUTIONS):
        raise ValueError(f"sweep param {field!r} = {spec!r}: expected {usage}")
    kind, *args = spec
    if kind == "choice":
        if len(args) != 1 or not isinstance(args[0], list | tuple) or not args[0]:
            raise ValueError(f"sweep param {field!r}: write ('choice', [v1, v2, ...])")
        return Param(field, "choice", values=tuple(_plain(v) for v in args[0]))
    if len(args) not in (2, 3):
        raise ValueError(f"sweep param {field!r}: write ({kind!r}, low, high) or ({kind!r}, low, high, N)")
    low, high = float(args[0]), float(args[1])
    if not low < high or (kind in ("loguniform", "intloguniform") and low <= 0):
        raise ValueError(f"sweep param {field!r}: need low < high (and low > 0 for a log range), "
                         f"got {low}, {high}")
    points = int(args[2]) if len(args) == 3 else 0
    return Param(field, kind, low=low, high=high, grid_points=points)


def parse_space(params: Mapping) -> list[Param]:
    return [parse_param(field, spec) for field, spec in sorted(flatten_params(params).items())]


def _plain(value: Any) -> Any:
    """numpy scalars and nested lists as plain Python values (JSON- and ConfigDict-safe)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def grid_variants(space: Sequence[Param], explicit: Sequence[Mapping] = ()) -> list[dict]:
    """Every combination of the grid axes, crossed with the explicit variants (in order)."""
    bases = [dict(flatten_params(v)) for v in explicit] or [{}]
    axes = [[(p.field, v) for v in p.grid()] for p in space]
    return [{**base, **dict(combo)} for base in bases for combo in itertools.product(*axes)]


def random_variants(space: Sequence[Param], num: int, seed: int,
                    explicit: Sequence[Mapping] = ()) -> list[dict]:
    """`num` independent draws (the same `seed` gives the same variants: a rerun resumes them)."""
    rng = np.random.default_rng(seed)
    bases = [dict(flatten_params(v)) for v in explicit] or [{}]
    return [{**bases[i % len(bases)], **{p.field: p.sample(rng) for p in space}} for i in range(num)]


def corner_variants(space: Sequence[Param], limit: int = 64) -> list[dict]:
    """Every choice with each numeric range at its two ends: the cost envelope of a sampled search."""
    axes = [[(p.field, v) for v in (p.values if p.kind == "choice" else (p.from_unit(0), p.from_unit(1)))]
            for p in space]
    return [dict(combo) for combo in itertools.islice(itertools.product(*axes), limit)]


def planned_variants(sweep: ml_collections.ConfigDict, space: Sequence[Param]) -> list[dict]:
    """The variants whose costs the sheet shows before training: all of a grid or random search,
    the first round of coarse-to-fine, the corners of the space for tpe and gp."""
    if sweep.strategy == "grid":
        return grid_variants(space, sweep.variants)
    if sweep.strategy in ("random", "coarse_to_fine"):
        return random_variants(space, sweep.num_trials, sweep.sampler_seed, sweep.variants)
    return corner_variants(space)


def narrow(space: Sequence[Param], best: Sequence[Mapping], margin: float = 0.25) -> list[Param]:
    """Coarse-to-fine: each range shrunk to the span of the `best` variants' values, padded by
    `margin` of the old range on each side (kept inside it); choices keep only the values seen."""
    narrowed = []
    for p in space:
        seen = [v[p.field] for v in best if p.field in v]
        if not seen:
            narrowed.append(p)
        elif p.kind == "choice":
            narrowed.append(dataclasses.replace(p, values=tuple(v for v in p.values if v in seen)))
        else:
            to = (lambda x: math.log(x)) if p.log else float
            back = (lambda x: math.exp(x)) if p.log else float
            lo, hi = to(p.low), to(p.high)
            pad = margin * (hi - lo)
            new_lo = max(lo, min(to(v) for v in seen) - pad)
            new_hi = min(hi, max(to(v) for v in seen) + pad)
            narrowed.append(dataclasses.replace(p, low=back(new_lo), high=back(new_hi)))
    return narrowed


def variant_name(variant: Mapping) -> str:
    """A readable, filesystem-safe and stable name: short field names, values and a content hash."""
    if "name" in variant:
        label = str(variant["name"])
    else:
        label = "_".join(f"{short_field(k, variant)}-{_short_value(v)}"
                         for k, v in sorted(variant.items())) or "base"
    label = "".join(c if c.isalnum() or c in "-_." else "-" for c in label)[:60]
    digest = hashlib.sha1(json.dumps(variant, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{label}_{digest}"


def short_field(field: str, variant: Mapping) -> str:
    """The last component of a dotted field, or more when another field shares it."""
    parts = field.split(".")
    for n in range(1, len(parts) + 1):
        tail = ".".join(parts[-n:])
        if sum(1 for other in variant if other.split(".")[-n:] == parts[-n:]) == 1:
            return tail
    return field


def _short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def apply_variant(config: ml_collections.ConfigDict, variant: Mapping) -> ml_collections.ConfigDict:
    """A copy of `config` (without its `sweep`) with every field of `variant` set."""
    trial = ml_collections.ConfigDict(config.to_dict())
    if "sweep" in trial:
        del trial["sweep"]
    for field, value in variant.items():
        if field == "name":
            continue
        *parents, key = field.split(".")
        node = trial
        for i, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ValueError(_unknown_field(field, ".".join(parents[:i + 1]), part, node))
            node = node[part]
        if key not in node and ".".join(parents) != "model.kwargs":
            raise ValueError(_unknown_field(field, field, key, node))
        if key in node and isinstance(node[key], tuple) and isinstance(value, list | tuple):
            value = tuple(value)
        try:
            node[key] = value
        except TypeError as error:
            raise ValueError(f"sweep value {value!r} for {field!r} has the wrong type ({error}); "
                             "use a value of the field's type") from None
    return trial


def _unknown_field(field: str, path: str, key: str, node: ml_collections.ConfigDict) -> str:
    close = difflib.get_close_matches(key, list(node.keys()), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"sweep field {field!r}: the config has no {path!r}{hint}"
