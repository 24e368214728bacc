"""What a network does inside at one batch: per-layer activation statistics, gradient norms, their plots.

A "layer" is a submodule `depth` levels below the model (default 1: the top-level layers such as
PlainNet's stem, layer1..layerN, head), in call order. Statistics are of each layer's output, so for
ConvNormAct-style layers they are post-activation values. Both functions run the model in train
mode by default: at initialisation, batch norm in eval mode would use its unit running statistics
and not normalise at all. Batch-statistic updates are discarded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
LayerStats = dict[str, Any]

SATURATION_THRESHOLD = 0.99  # |tanh| above it, or sigmoid outside [0.01, 0.99], has a near-zero slope
_BOUNDED_ACTIVATIONS = ("sigmoid", "tanh")


def saturated(a: Array, act: str | None) -> Array:
    """Boolean mask of activations on the flat part of a sigmoid or tanh.

    Unbounded activations (relu and friends, or act None) never saturate above; relu's flat side is
    its zeros, reported separately as `fraction_zero`.
    """
    if act == "sigmoid":
        return (a < 1 - SATURATION_THRESHOLD) | (a > SATURATION_THRESHOLD)
    if act == "tanh":
        return jnp.abs(a) > SATURATION_THRESHOLD
    return jnp.zeros(a.shape, bool)


def _act_name(model: nn.Module, act: str | None) -> str | None:
    if act is None:
        act = getattr(model, "act", None)
    return act.lower() if isinstance(act, str) else None


def _apply_kwargs(train: bool) -> dict[str, Any]:
    if not train:
        return dict(train=False)
    return dict(train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])


def _recording_forward(model: nn.Module, depth: int, train: bool
                       ) -> tuple[Callable[[Any, Array], tuple[Any, list[Array]]], list[str]]:
    """A forward pass that also returns the output of every layer at `depth`, and their names.

    The names fill in while the function is traced; the outputs come back as a list, so their call
    order survives `jax.jit` (a dict of outputs would come back sorted by name: layer10 < layer2).
    """
    names: list[str] = []

    def forward(variables: Any, x: Array) -> tuple[Any, list[Array]]:
        names.clear()
        outputs: list[Array] = []

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            scope = context.module.scope
            if (context.method_name == "__call__" and scope is not None
                    and len(scope.path) == depth and isinstance(out, jax.Array)):
                names.append("/".join(scope.path))
                outputs.append(out)
            return out

        with nn.intercept_methods(record):
            result = model.apply(variables, x, **_apply_kwargs(train))
        logits = result[0] if train else result
        return logits, outputs

    return forward, names


def _statistics(a: Array, act: str | None) -> dict[str, Array]:
    a = a.astype(jnp.float32)
    return {
        "mean": jnp.mean(a),
        "std": jnp.std(a),
        "fraction_saturated": jnp.mean(saturated(a, act)),
        "fraction_zero": jnp.mean(a == 0),
        # std across the channels at each position, averaged: 0 exactly when every unit of the
        # layer computes the same value (the symmetry that all-equal initial weights never break)
        "unit_spread": jnp.mean(jnp.std(a, axis=-1)),
    }


def layer_statistics(model: nn.Module, variables: Any, x: Array, *, act: str | None = None,
                     train: bool = True, depth: int = 1) -> list[LayerStats]:
    """Per layer, in call order: {name, mean, std, fraction_saturated, fraction_zero, unit_spread}.

    fraction_saturated follows `act` (default: the model's `act` field when it is a name):
    sigmoid outside [0.01, 0.99], tanh beyond +-0.99, 0 for unbounded activations.
    fraction_zero is the share of exact zeros (dead ReLUs). unit_spread is 0 when all units of
    the layer are identical. Layers whose output is not an array are skipped; the head's row
    describes the logits, which pass through no activation.
    """
    run, names = _cached(_statistics_fn, model, _act_name(model, act), train, depth)
    stats = run(variables, x)
    return [{"name": name, **{k: float(v) for k, v in s.items()}}
            for name, s in zip(names, stats, strict=True)]


# Cached per (model, settings) so a study that measures the same net at init and after training
# traces and compiles it once (flax modules hash by their fields).
@functools.lru_cache(maxsize=16)
def _statistics_fn(model: nn.Module, act_name: str | None, train: bool, depth: int
                   ) -> tuple[Callable[[Any, Array], list[dict[str, Array]]], list[str]]:
    forward, names = _recording_forward(model, depth, train)

    @jax.jit
    def run(variables: Any, x: Array) -> list[dict[str, Array]]:
        _, outputs = forward(variables, x)
        return [_statistics(a, act_name) for a in outputs]

    return run, names


def parameter_gradients(model: nn.Module, variables: Any, x: Array, y: Array, *,
                        train: bool = True) -> Any:
    """Gradient of the mean softmax cross-entropy on (x, integer labels y) w.r.t. the params."""
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be integer class ids of shape [{x.shape[0]}], got shape "
                         f"{y.shape}; pass argmax of one-hot labels.")
    others = {k: v for k, v in variables.items() if k != "params"}
    return _cached(_gradient_fn, model, train)(variables["params"], others, x, y)


def _cached(builder: Any, model: nn.Module, *args: Any) -> Any:
    """builder(model, *args) from its lru_cache, or built afresh when the model cannot be hashed
    (a field holding a list, as configs read back from JSON give)."""
    try:
        hash(model)
    except TypeError:
        return builder.__wrapped__(model, *args)
    return builder(model, *args)


@functools.lru_cache(maxsize=16)
def _gradient_fn(model: nn.Module, train: bool) -> Callable[..., Any]:
    def loss(params: Any, others: Any, x: Array, y: Array) -> Array:
        result = model.apply({"params": params, **others}, x, **_apply_kwargs(train))
        logits = (result[0] if train else result).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.jit(jax.grad(loss))


_CALL_ORDERS: dict[Any, list[str]] = {}  # (model, depth, input, variables' tree) -> layer names


def _call_order(model: nn.Module, variables: Any, x: Array, depth: int) -> list[str]:
    # The order depends only on the model and the input's shape; tracing it is the slow part, so a
    # study measuring one net several times (at init, after training) traces it once.
    key = (model, depth, tuple(x.shape[1:]), str(x.dtype), jax.tree.structure(variables))
    try:
        hash(key)
    except TypeError:  # an unhashable model field: trace every time
        key = None
    if key is None or key not in _CALL_ORDERS:
        forward, names = _recording_forward(model, depth, train=False)
        jax.eval_shape(forward, variables, x)
        order = list(dict.fromkeys(names))
        if key is None:
            return order
        if len(_CALL_ORDERS) >= 64:
            _CALL_ORDERS.clear()
        _CALL_ORDERS[key] = order
    return _CALL_ORDERS[key]


def gradient_norms(model: nn.Module, variables: Any, x: Array, y: Array, *, train: bool = True,
                   depth: int = 1) -> dict[str, float]:
    """L2 norm of the loss gradient of each layer's parameters, layers in call order.

    `depth` 1 groups by top-level layer (PlainNet: stem, layer1..layerN, head).
    """
    grads = parameter_gradients(model, variables, x, y, train=train)
    groups: dict[str, list[Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        groups.setdefault("/".join(keys[:depth]), []).append(leaf)
    # numpy on the host: jnp here would compile one tiny program per leaf shape
    host = jax.device_get(groups)
    norms = {name: float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in leaves)))
             for name, leaves in host.items()}
    order = [n for n in _call_order(model, variables, x[:1], depth) if n in norms]
    return {name: norms[name] for name in order + sorted(set(norms) - set(order))}


# --- plots -------------------------------------------------------------------------------------


def _series(data: Any) -> Mapping[str, Any]:
    # One run (a list of layer stats, or a {layer: norm} dict of floats) or {label: run}.
    if isinstance(data, Mapping) and all(isinstance(v, int | float) for v in data.values()):
        return {"": data}
    return {"": data} if isinstance(data, Sequence) else data


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_layer_stats(stats: Sequence[LayerStats] | Mapping[str, Sequence[LayerStats]],
                     path: str | Path, *, title: str = "activations per layer") -> Path:
    """PNG of mean, std, fraction saturated and fraction zero against layer, one line per run.

    `stats` is one `layer_statistics` result or {label: result} to compare runs (e.g. inits).
    """
    plt = _pyplot()
    panels = ("mean", "std", "fraction_saturated", "fraction_zero")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for label, run in _series(stats).items():
        names = [s["name"] for s in run]
        for ax, key in zip(axes, panels, strict=True):
            # log axis for std (vanishing signals span decades): an exact 0 is drawn at 1e-12
            values = [max(s[key], 1e-12) if key == "std" else s[key] for s in run]
            ax.plot(range(len(run)), values, marker="o", ms=3, label=label or None)
            ax.set_title(key)
            ax.set_xticks(range(len(run)), names, rotation=90, fontsize=6)
    axes[1].set_yscale("log")
    if any(_series(stats)):
        axes[0].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path, plt)


def plot_gradient_norms(norms: Mapping[str, float] | Mapping[str, Mapping[str, float]],
                        path: str | Path, *, title: str = "gradient norm per layer") -> Path:
    """PNG of each layer's gradient norm (log scale), one line per run ({label: norms} compares)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for label, run in _series(norms).items():
        names = list(run)
        values = [max(run[n], 1e-30) for n in names]  # log axis: an exact 0 drawn at the floor
        ax.plot(range(len(names)), values, marker="o", ms=3, label=label or None)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("||dL/dW||")
    if any(_series(norms)):
        ax.legend(fontsize=7)
    ax.set_title(title)
    return _save(fig, path, plt)


def plot_layer_panels(panels: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path, *,
                      ylabel: str, log: bool = True, ncols: int = 2, title: str = "") -> Path:
    """PNG of one per-layer quantity in side-by-side panels, e.g. gradient norms at init | trained.

    `panels` is {panel title: {line label: {layer name: value}}}: a `gradient_norms` result is
    already a {layer: value} dict; for `layer_statistics` pass {s["name"]: s[key] for s in stats}.
    Panels share the y axis so "before" and "after" read on one scale; on a log axis an exact 0 is
    drawn at 1e-30.
    """
    plt = _pyplot()
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), sharey=True,
                             squeeze=False)
    for ax, (panel, runs) in zip(axes.flat, panels.items(), strict=False):
        # One x position per layer name, so nets of different depths line up by layer (a shallow
        # net's head sits at the deep net's head, not at its layer9).
        longest_first = sorted(runs.values(), key=len, reverse=True)
        position = {n: i for i, n in enumerate(dict.fromkeys(n for run in longest_first for n in run))}
        for label, run in runs.items():
            xs, values = [], []
            for name, value in run.items():
                if xs and position[name] != xs[-1] + 1:  # layers this net lacks: break the line
                    xs.append(float("nan"))
                    values.append(float("nan"))
                xs.append(position[name])
                values.append(max(value, 1e-30) if log else value)
            ax.plot(xs, values, marker="o", ms=3, label=label)
        ax.set_xticks(list(position.values()), list(position), rotation=90, fontsize=6)
        ax.set_title(panel, fontsize=9)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=6)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    return _save(fig, path, plt)


def _save(fig: Any, path: str | Path, plt: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

