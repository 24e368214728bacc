"""What `config.finetune` means for one model: the config, path patterns and masks, the `Plan` the
train step closes over (frozen parameters and statistics, BN layers on running statistics), and the
optimizer with one learning rate per parameter group."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cnnjax import layers
from cnnjax.train import optim

FROZEN = "frozen"
DEFAULT_GROUP = "default"
BATCH_STATS_MODES = ("frozen", "all", "none")
FROZEN_BN_MODES = ("batch", "running")
FIRST_CONV_MODES = ("", "repeat", "mean", "new")


def finetune_config() -> ml_collections.ConfigDict:
    """Defaults for `config.finetune`: with them a run trains every parameter and `init_from` must
    fit the model exactly, as before fine-tuning existed."""
    cfg = ml_collections.ConfigDict()
    cfg.freeze = ()  # regexes: matching params get no gradient, no optimizer state, no update
    cfg.freeze_batch_stats = "frozen"  # running BN statistics kept: of frozen layers | all | none
    cfg.frozen_bn = "batch"  # BN layers whose statistics are kept normalise with: batch | running
    cfg.lr_groups = ()  # ((regex, lr_scale), ...): first match scales the LR (0 = frozen); others 1
    cfg.strict = True  # init_from: every param in the checkpoint at its shape; False: others fresh
    cfg.reinit = ()  # regexes: params and BN statistics that start fresh though the checkpoint fits
    cfg.first_conv = ""  # in_channels != the checkpoint's: repeat | mean | new ("" = a mismatch)
    cfg.head = ()  # (512,): the model's classifier outputs 512, then act -> Dense(num_classes)
    cfg.head_act = "relu"
    cfg.head_dropout = 0.0  # before each Dense of the new head
    return cfg


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.finetune` over the defaults (a run's config.json from before fine-tuning has none);
    JSON lists become tuples again."""
    cfg = finetune_config()
    for key, value in (config.get("finetune") or {}).items():
        if key not in cfg:
            raise ValueError(f"unknown config field 'finetune.{key}'; known: {', '.join(cfg.keys())}")
        if isinstance(value, list | tuple):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        cfg[key] = value
    return cfg


# --- paths and masks ---------------------------------------------------------------------------


def path_name(path: Sequence[Any]) -> str:
    """'layer1_0/conv1/kernel' for a jax key path: the string that freeze/group patterns match."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def leaf_names(tree: Any) -> list[str]:
    return [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def freeze_mask(params: Any, patterns: Sequence[str]) -> Any:
    """A tree of bools like `params`: True where the path matches a regex (re.search) in `patterns`.

    E.g. ("^stem_", "^layer[1-3]_") freezes a ResNet's stem and first three stages.
    """
    for p in patterns:
        re.compile(p)  # a bad pattern fails here with re.error naming it, not deep inside a tree map
    return jax.tree_util.tree_map_with_path(lambda path, _: matches(path_name(path), patterns),
                                            params)


def stop_frozen_gradients(params: Any, mask: Any) -> Any:
    """`params` with stop_gradient on the frozen leaves; used inside the loss so that XLA drops the
    backward pass of a frozen backbone (everything before the first trainable layer)."""
    return jax.tree.map(lambda p, frozen: jax.lax.stop_gradient(p) if frozen else p, params, mask)


def keep_frozen(new: Any, old: Any, mask: Any) -> Any:
    """`new` with the leaves where `mask` is True taken from `old` unchanged (bit for bit)."""
    return jax.tree.map(lambda n, o, frozen: o if frozen else n, new, old, mask)


def keep_frozen_stats(new_stats: Any, old_stats: Any, patterns: Sequence[str]) -> Any:
    """Batch statistics after a step, with the ones under frozen paths put back to their old values."""
    return keep_frozen(new_stats, old_stats, freeze_mask(old_stats, patterns))


# --- the plan: what config.finetune means for one model ----------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """Trees of Python bools the train step closes over, and the optimizer's LR groups."""

    groups: dict  # multi_lr_optimizer's groups; {} = the plain optimizer
    frozen: Any = None  # like params: True = not trained; None when nothing is frozen
    frozen_stats: Any = None  # like batch_stats: True = statistics stay as loaded; None = none
    running_bn: frozenset[str] = frozenset()  # BN module paths that normalise with running stats

    def frozen_count(self, params: Any) -> int:
        if self.frozen is None:
            return 0
        return int(sum(np.size(p) for p, f in zip(jax.tree.leaves(params),
                                                   jax.tree.leaves(self.frozen), strict=True) if f))


def regexes(field: str, value: Any) -> tuple[str, ...]:
    """A tuple of compiled-checked regexes (a lone string counts as one)."""
    patterns = (value,) if isinstance(value, str) else tuple(value)
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{field} takes regexes (strings), got {p!r}; e.g. \"('^stem_', '^layer1_')\"")
        try:
            re.compile(p)
        except re.error as error:
            raise ValueError(f"{field} pattern {p!r} is not a valid regex ({error})") from None
    return patterns


def _check_matches(field: str, patterns: Sequence[str], names: Sequence[str]) -> None:
    for p in patterns:
        if not any(re.search(p, n) for n in names):
            examples = ", ".join(names[:3] + names[-2:])
            raise ValueError(f"{field} pattern {p!r} matches no parameter of this model; "
                             f"paths look like {examples}")


def lr_groups(cfg: ml_collections.ConfigDict) -> dict:
    """multi_lr_optimizer's groups: `freeze` first (it wins), then `lr_groups` in order."""
    groups = {}
    if cfg.freeze:
        groups["freeze"] = {"patterns": regexes("finetune.freeze", cfg.freeze), "lr_scale": 0.0}
    for i, entry in enumerate(cfg.lr_groups):
        if (not isinstance(entry, list | tuple) or len(entry) != 2
                or not isinstance(entry[1], int | float) or entry[1] < 0):
            raise ValueError(f"finetune.lr_groups entries are (regex, lr_scale >= 0) pairs, got "
                             f"{entry!r}; e.g. \"(('^fc/', 10.0), ('^layer4_', 1.0))\"")
        groups[f"lr_group{i}"] = {"patterns": regexes("finetune.lr_groups", entry[0]),
                                  "lr_scale": float(entry[1])}
    return groups


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """The checks that need no model: choices, head sizes, dropout."""
    if cfg.freeze_batch_stats not in BATCH_STATS_MODES:
        raise ValueError(f"finetune.freeze_batch_stats must be one of {', '.join(BATCH_STATS_MODES)}, "
                         f"got {cfg.freeze_batch_stats!r}")
    if cfg.frozen_bn not in FROZEN_BN_MODES:
        raise ValueError(f"finetune.frozen_bn must be one of {', '.join(FROZEN_BN_MODES)}, "
                         f"got {cfg.frozen_bn!r}")
    if cfg.first_conv not in FIRST_CONV_MODES:
        raise ValueError(f"finetune.first_conv must be repeat, mean, new or '' (a mismatch), "
                         f"got {cfg.first_conv!r}")
    if not all(isinstance(w, int) and w >= 1 for w in cfg.head):
        raise ValueError(f"finetune.head lists hidden widths (ints >= 1), got {cfg.head!r}; e.g. '(512,)'")
    if not 0.0 <= cfg.head_dropout < 1.0:
        raise ValueError(f"finetune.head_dropout must lie in [0, 1), got {cfg.head_dropout}")
    layers.activation(cfg.head_act)


def make_plan(cfg: ml_collections.ConfigDict, model: nn.Module,
              input_shape: tuple[int, int, int]) -> Plan:
    """Validates `cfg` against `model`'s parameter paths (traced, not computed) and builds the Plan.

    Every pattern must match something, and freezing must leave something to train.
    """
    check_config(cfg)
    reinit = regexes("finetune.reinit", cfg.reinit)
    groups = lr_groups(cfg)
    if not groups and not reinit and cfg.freeze_batch_stats != "all":
        return Plan({})  # nothing to trace: the common, non-fine-tuning run
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(
        {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)}, dummy, train=False))
    params, stats = variables["params"], variables.get("batch_stats", {})
    names = leaf_names(params)
    for name, spec in groups.items():
        field = "finetune.freeze" if name == "freeze" else "finetune.lr_groups"
        _check_matches(field, spec["patterns"], names)
    _check_matches("finetune.reinit", reinit, names + leaf_names(stats))
    frozen = None
    if groups:
        frozen = jax.tree.map(lambda label: label == FROZEN, param_labels(params, groups))
        flags = jax.tree.leaves(frozen)
        if all(flags):
            raise ValueError("finetune.freeze (with lr_groups at lr_scale 0) freezes every parameter, "
                             "so nothing would train; leave the head out, e.g. \"('^(?!fc/)',)\"")
        frozen = frozen if any(flags) else None
    frozen_stats = _stats_mask(cfg.freeze_batch_stats, frozen, params, stats)
    running = frozenset()
    if cfg.frozen_bn == "running" and frozen_stats is not None:
        running = frozenset(n.rpartition("/")[0] for n, kept in
                            zip(leaf_names(stats), jax.tree.leaves(frozen_stats), strict=True) if kept)
    return Plan(groups, frozen, frozen_stats, running)


def _stats_mask(mode: str, frozen: Any, params: Any, stats: Any) -> Any:
    """Which batch statistics stay: all, none, or those of layers whose parameters are frozen."""
    if mode == "none" or not jax.tree.leaves(stats) or (mode == "frozen" and frozen is None):
        return None
    if mode == "all":
        return jax.tree.map(lambda _: True, stats)
    frozen_modules = {n.rpartition("/")[0] for n, f in zip(leaf_names(params), jax.tree.leaves(frozen),
                                                          strict=True) if f}
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: path_name(path).rpartition("/")[0] in frozen_modules, stats)
    return mask if any(jax.tree.leaves(mask)) else None


def running_stats_bn(modules: frozenset[str]) -> contextlib.AbstractContextManager:
    """A context in which the BatchNorm layers at `modules` ("layer1_0/bn1", ...) normalise with
    their running statistics even under train=True, as a Keras BN layer with trainable=False or
    torchvision's FrozenBatchNorm2d does; every other layer is untouched.

    Wrap `model.apply` in it. flax's BatchNorm fixes `use_running_average` when the model builds
    it, so the interceptor flips that one field on the bound layer for the call and lets flax's own
    code normalise (same numerics as eval mode, no statistics update).
    """
    if not modules:
        return contextlib.nullcontext()

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, nn.BatchNorm)
                or "/".join(module.path) not in modules):
            return next_fun(*args, **kwargs)
        train_mode = module.use_running_average
        object.__setattr__(module, "use_running_average", True)  # bound copy, local to this apply
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "use_running_average", train_mode)

    return nn.intercept_methods(intercept)


# --- learning-rate groups ----------------------------------------------------------------------


def param_labels(params: Any, groups: Mapping[str, Mapping[str, Any]]) -> Any:
    """Each leaf's group: the first group (in dict order) with a matching pattern, else 'default'."""
    def label(path, _):
        name = path_name(path)
        for group, spec in groups.items():
            if matches(name, spec["patterns"]):
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
    together and gradient accumulation wraps them, as in optim.make_optimizer; both sit beside the
    frozen group, so accumulation keeps no gradient buffer for frozen parameters either.
    """
    optim.check_optimizer(cfg)
    if DEFAULT_GROUP in groups or FROZEN in groups:
        raise ValueError(f"group names {DEFAULT_GROUP!r} and {FROZEN!r} are reserved; rename it.")
    for name, spec in groups.items():
        if "patterns" not in spec or float(spec.get("lr_scale", 1.0)) < 0:
            raise ValueError(f"lr group {name!r} needs 'patterns' (regexes) and lr_scale >= 0, "
                             f"got {dict(spec)}.")
    transforms, schedule = {}, None
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
    # The trained groups see a tree with the frozen leaves masked out (optax.MaskedNode).
    trained = optax.multi_transform(transforms, lambda params: param_labels(params, groups))
    if cfg.grad_clip_norm > 0:  # frozen gradients are zero: the norm over trained ones is the same
        trained = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), trained)
    if cfg.accumulate_steps > 1:
        trained = optax.MultiSteps(trained, every_k_schedule=cfg.accumulate_steps
                                   ).gradient_transformation()

    def frozen_or_trained(params):
        return jax.tree.map(lambda label: FROZEN if label == FROZEN else "trained",
                            param_labels(params, groups))

    tx = optax.multi_transform({FROZEN: optax.set_to_zero(), "trained": trained}, frozen_or_trained)
    return tx, schedule


def make_optimizer(cfg: Any, plan: Plan, *, steps_per_epoch: int,
                   num_epochs: float) -> tuple[optax.GradientTransformation, Any]:
    """The run's optimizer: optim.make_optimizer, or one LR per group when the plan has groups."""
    if not plan.groups:
        return optim.make_optimizer(cfg, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs)
    return multi_lr_optimizer(cfg, plan.groups, steps_per_epoch=steps_per_epoch,
                              num_epochs=num_epochs)
