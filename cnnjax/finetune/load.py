"""New classifier heads and starting from a checkpoint: `merge_variables` decides, leaf by leaf, what
an `init_from` checkpoint provides, what is adapted (a first conv that reads other channels) and what
starts fresh."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnjax import layers
from cnnjax.finetune.plan import finetune_config, matches, path_name, regexes

# --- new heads ---------------------------------------------------------------------------------


class MLPHead(nn.Module):
    """`base` (a model whose classifier outputs hidden[0] features) followed by act -> Dense for
    each further width and the classes, e.g. ResNet-50's fc 2048 -> 512, ReLU, 512 -> classes.

    The base shares this module's scope, so its parameter paths stay those of the bare model
    ("layer1_0/conv1/kernel", "fc/kernel") and a checkpoint of the bare model still fits it.
    """

    base: nn.Module
    hidden: tuple[int, ...]  # widths after the base's output; may be empty
    num_classes: int
    act: str = "relu"
    dropout: float = 0.0
    dtype: Any = jnp.float32

    def setup(self) -> None:
        nn.share_scope(self, self.base)
        self.head_hidden = [nn.Dense(w, dtype=self.dtype) for w in self.hidden]
        self.head_out = nn.Dense(self.num_classes, dtype=self.dtype)
        self.head_dropout = nn.Dropout(self.dropout)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = self.base(x, train=train)
        for dense in [*self.head_hidden, self.head_out]:
            y = dense(self.head_dropout(layers.activation(self.act)(y), deterministic=not train))
        return y


def build_model(name: str, num_classes: int, cfg: ml_collections.ConfigDict, **kwargs: Any) -> nn.Module:
    """The registry model `name`, wrapped in an MLPHead when `cfg.head` lists hidden widths."""
    from cnnjax.models import create_model  # the model table imports every model file

    if not cfg.head:
        return create_model(name, num_classes=num_classes, **kwargs)
    base = create_model(name, num_classes=cfg.head[0], **kwargs)
    return MLPHead(base, hidden=tuple(cfg.head[1:]), num_classes=num_classes, act=cfg.head_act,
                   dropout=cfg.head_dropout, dtype=kwargs.get("dtype", jnp.float32))


def replace_head(variables: Mapping[str, Any], model: nn.Module, num_classes: int, *,
                 input_shape: tuple[int, int, int], rng: jax.Array | None = None,
                 **overrides: Any) -> tuple[nn.Module, dict, list[str]]:
    """(new model, variables, fresh paths): `model` rebuilt with `num_classes` (and constructor
    overrides, e.g. a different head module), the pretrained variables copied wherever path and
    shape still fit, and a fresh initialisation for the rest (the classifier).
    """
    new_model = model.clone(num_classes=num_classes, **overrides)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    fresh = jax.jit(lambda r: new_model.init({"params": r, "dropout": r}, dummy, train=False))(rng)
    cfg = finetune_config()
    cfg.strict = False
    out, report = merge_variables(variables, jax.device_get(fresh), cfg)
    return new_model, out, sorted(report.fresh)


# --- new inputs and starting from a checkpoint -------------------------------------------------


def adapt_first_conv(kernel: Any, in_channels: int) -> np.ndarray:
    """An HWIO kernel trained on RGB (I = 3) made to read `in_channels` channels.

    Grayscale sums the three filters (a gray image x behaves like RGB (x, x, x)); other counts cycle
    through the RGB filters and rescale by 3 / in_channels to keep the activation scale.
    """
    kernel = np.asarray(kernel)
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
    if in_channels == kernel.shape[2]:
        return kernel
    if in_channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    repeats = -(-in_channels // kernel.shape[2])
    tiled = np.tile(kernel, (1, 1, repeats, 1))[:, :, :in_channels]
    return tiled * (kernel.shape[2] / in_channels)


def _reads_other_channels(source: np.ndarray, target: np.ndarray) -> bool:
    """A conv kernel that differs from the checkpoint's only in its input channels (HWIO axis 2)."""
    return (source.ndim == target.ndim == 4 and source.shape[2] != target.shape[2]
            and source.shape[:2] + source.shape[3:] == target.shape[:2] + target.shape[3:])


@dataclasses.dataclass
class LoadReport:
    """What `merge_variables` did, leaf by leaf ("params/fc/kernel": why)."""

    loaded: list[str] = dataclasses.field(default_factory=list)
    fresh: dict[str, str] = dataclasses.field(default_factory=dict)
    adapted: dict[str, str] = dataclasses.field(default_factory=dict)
    unused: list[str] = dataclasses.field(default_factory=list)

    def lines(self, source: str) -> list[str]:
        total = len(self.loaded) + len(self.fresh) + len(self.adapted)
        out = [f"init_from {source}: {len(self.loaded) + len(self.adapted)} of {total} arrays loaded"]
        for label, names in (("adapted", self.adapted), ("fresh", self.fresh)):
            if names:
                out.append(f"  {label}: " + ", ".join(f"{n} ({why})" for n, why in names.items()))
        if self.unused:
            out.append(f"  unused from the checkpoint: {', '.join(self.unused)}")
        return out


def merge_variables(source: Mapping[str, Any], target: Mapping[str, Any],
                    cfg: ml_collections.ConfigDict) -> tuple[dict, LoadReport]:
    """`target` (fresh {params, batch_stats}, host arrays) with the `source` checkpoint's leaves
    wherever path and shape fit; `cfg` (config.finetune) says what else happens:
    reinit patterns start fresh, first_conv adapts kernels that read another channel count, and
    with strict any other leaf the checkpoint lacks or holds at another shape, and any checkpoint
    array the model has no place for, is an error.
    """
    report = LoadReport()
    reinit = regexes("finetune.reinit", cfg.reinit)
    hint = ("use the same model and num_classes, or set --config.finetune.strict=false to start "
            "such layers fresh (finetune.first_conv for another in_channels)")

    def pick(collection, path, fresh):
        name = path_name(path)
        key, old = f"{collection}/{name}", flat[collection].pop(name, None)
        if matches(name, reinit):
            report.fresh[key] = "reinit"
            return fresh
        if old is not None and old.shape == fresh.shape:
            report.loaded.append(key)
            return np.asarray(old, fresh.dtype)
        if old is not None and cfg.first_conv and _reads_other_channels(old, fresh):
            if cfg.first_conv == "new":
                report.fresh[key] = "first_conv=new"
                return fresh
            channels = fresh.shape[2]
            kernel = (adapt_first_conv(old, channels) if cfg.first_conv == "repeat" else
                      np.repeat(old.mean(axis=2, keepdims=True), channels, axis=2))
            report.adapted[key] = f"{old.shape[2]} -> {channels} input channels, {cfg.first_conv}"
            return np.asarray(kernel, fresh.dtype)
        why = "not in the checkpoint" if old is None else f"checkpoint {old.shape}, model {fresh.shape}"
        if cfg.strict:
            raise ValueError(f"init_from checkpoint does not fit this model: {key}: {why}; {hint}")
        report.fresh[key] = why
        return fresh

    flat = {c: {path_name(p): np.asarray(v) for p, v in
                jax.tree_util.tree_leaves_with_path(source.get(c) or {})} for c in target}
    merged = {c: jax.tree_util.tree_map_with_path(lambda p, v, c=c: pick(c, p, np.asarray(v)),
                                                  target[c]) for c in target}
    report.unused = [f"{c}/{n}" for c in flat for n in flat[c]]
    if cfg.strict and report.unused:  # e.g. a resnet34 checkpoint would silently half-fill a resnet18
        raise ValueError(f"init_from checkpoint has {len(report.unused)} arrays this model lacks "
                         f"(first: {report.unused[0]}); {hint}")
    return merged, report
