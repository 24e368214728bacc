"""Fine-tuning as pure functions: freeze by path pattern, new heads, first-conv channels, per-group LRs."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax.train import optim

FROZEN = "frozen"
DEFAULT_GROUP = "default"


def path_name(path: Sequence[Any]) -> str:
    """'layer1_0/conv1/kernel' for a jax key path: the string that freeze/group patterns match."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def freeze_mask(params: Any, patterns: Sequence[str]) -> Any:
    """A tree of bools like `params`: True where the path matches a regex (re.search) in `patterns`.

    E.g. ("^stem_", "^layer[1-3]_") freezes a ResNet's stem and first three stages.
    """
    for p in patterns:
        re.compile(p)  # a bad pattern fails here with re.error naming it, not deep inside a tree map
    return jax.tree_util.tree_map_with_path(lambda path, _: _matches(path_name(path), patterns),
                                            params)


def stop_frozen_gradients(params: Any, mask: Any) -> Any:
    """`params` with stop_gradient on the frozen leaves; used inside the loss so that XLA drops the
    backward pass of a frozen backbone (everything before the first trainable layer)."""
    return jax.tree.map(lambda p, frozen: jax.lax.stop_gradient(p) if frozen else p, params, mask)


def keep_frozen_stats(new_stats: Any, old_stats: Any, patterns: Sequence[str]) -> Any:
    """Batch statistics after a step, with the ones under frozen paths put back to their old values."""
    mask = freeze_mask(old_stats, patterns)
    return jax.tree.map(lambda new, old, frozen: old if frozen else new, new_stats, old_stats, mask)


# --- new heads and new inputs ------------------------------------------------------------------


def transfer_variables(source: Mapping[str, Any], target: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """`target` with every leaf that `source` has at the same path and shape copied over.

    Returns (variables, paths kept from `target`): the layers that start fresh (a new head).
    """
    flat_source = {path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(dict(source))}
    fresh: list[str] = []

    def pick(path, value):
        name = path_name(path)
        old = flat_source.get(name)
        if old is not None and tuple(old.shape) == tuple(value.shape):
            return old
        fresh.append(name)
        return value

    return jax.tree_util.tree_map_with_path(pick, dict(target)), fresh


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
    out, new_paths = transfer_variables(variables, fresh)
    return new_model, out, new_paths


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


# --- learning-rate groups ----------------------------------------------------------------------


def param_labels(params: Any, groups: Mapping[str, Mapping[str, Any]]) -> Any:
    """Each leaf's group: the first group (in dict order) with a matching pattern, else 'default'."""
    def label(path, _):
        name = path_name(path)
        for group, spec in groups.items():
            if _matches(name, spec["patterns"]):
                return FROZEN if float(spec.get("lr_scale", 1.0)) == 0.0 else group
        return DEFAULT_GROUP

    return jax.tree_util.tree_map_with_path(label, params)


def multi_lr_optimizer(cfg: Any, groups: Mapping[str, Mapping[str, Any]], *, steps_per_epoch: int,
                       num_epochs: float) -> tuple[optax.GradientTransformation, Any]:
    """(optimizer, default-group schedule) with one learning rate per parameter group.

    groups: {"head": {"patterns": ("^fc/",), "lr_scale": 10.0}, "backbone": {"patterns":
    ("^stem_",), "lr_scale": 0.0}, ...}; lr_scale multiplies cfg.learning_rate (and so the whole
    schedule); 0 freezes the group: optax.set_to_zero, so it gets no optimizer state and no update.
    Unmatched leaves form the 'default' group at lr_scale 1. Gradient clipping is over all groups
    together and gradient accumulation wraps the whole, as in optim.make_optimizer.
    """
    if DEFAULT_GROUP in groups or FROZEN in groups:
        raise ValueError(f"group names {DEFAULT_GROUP!r} and {FROZEN!r} are reserved; rename it.")
    for name, spec in groups.items():
        if "patterns" not in spec or float(spec.get("lr_scale", 1.0)) < 0:
            raise ValueError(f"lr group {name!r} needs 'patterns' (regexes) and lr_scale >= 0, "
                             f"got {dict(spec)}.")
    transforms, schedule = {FROZEN: optax.set_to_zero()}, None
    scales = {DEFAULT_GROUP: 1.0, **{n: float(s.get("lr_scale", 1.0)) for n, s in groups.items()}}
    for name, scale in scales.items():
        if scale == 0.0:
            continue
        group_cfg = copy.deepcopy(cfg)
        group_cfg.learning_rate = cfg.learning_rate * scale
        group_cfg.end_learning_rate = cfg.end_learning_rate * scale
        group_cfg.grad_clip_norm, group_cfg.accumulate_steps = 0.0, 1
        transforms[name], group_schedule = optim.make_optimizer(
            group_cfg, steps_per_epoch=steps_per_epoch / cfg.accumulate_steps,
            num_epochs=num_epochs)
        schedule = group_schedule if name == DEFAULT_GROUP else schedule
    tx = optax.multi_transform(transforms, lambda params: param_labels(params, groups))
    if cfg.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    if cfg.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate_steps).gradient_transformation()
    return tx, schedule
