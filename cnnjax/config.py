"""Run configs: the shared defaults, loading experiments/*.py, typed command-line overrides, smoke mode."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
from typing import Any

import ml_collections

from cnnjax.data import data_config
from cnnjax.finetune import finetune_config
from cnnjax.train.losses import loss_config
from cnnjax.train.optim import optimizer_config

DEFAULT_CONFIG = "experiments/lenet5_digits.py"

# Keys the user may add on the command line (constructor overrides are open-ended).
_OPEN_GROUPS = ("model.kwargs",)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the field and the fix."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment; an experiment overrides only what differs."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict()
    config.model.name = "lenet5"
    config.model.kwargs = (
        ml_collections.ConfigDict()
    )  # constructor overrides: act, width_multiplier...
    config.model.image_size = 0  # 0: the registry's input_size
    config.model.in_channels = 0  # 0: the registry's in_channels
    config.data = data_config()
    config.batch_size = 128  # global, over all devices and processes
    config.num_epochs = 10
    config.num_train_steps = -1  # -1: num_epochs * steps_per_epoch; > 0 stops there (smoke runs)
    config.seed = 0
    config.precision = "auto"  # auto: bf16 compute on gpu/tpu, fp32 on cpu
    config.loss = loss_config()
    config.optimizer = optimizer_config()
    config.log_every_steps = 50
    config.eval_every_epochs = 1
    config.checkpoint_every_steps = 0  # 0: only at evaluations and at the end
    config.keep_checkpoints = 3
    config.best_metric = "accuracy"  # on validation; "loss"/"*error" count lower as better
    config.init_from = ""  # a checkpoints/ directory whose params and batch stats start the run
    config.finetune = finetune_config()  # freezing, LR groups, new heads; how init_from loads
    config.workdir_root = "runs"
    return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks `config` to a few seconds offline on a CPU, same code path.

    The model takes the registry's `small` overrides at its `small_input` size, the data becomes the
    embedded digits (nothing to download), and training stops after a few steps.
    """
    from cnnjax.models import get_spec  # the model table imports every model file; only here

    spec = get_spec(config.model.name)
    if spec.small:
        config.model.kwargs.update(spec.small)
        config.model.image_size = spec.small_input
    config.data.name = "digits"
    config.data.path = ""
    config.data.tfds_dir = ""
    config.data.manual_dir = ""
    config.data.mean = ()
    config.data.std = ()
    config.batch_size = 32
    config.num_train_steps = 3
    config.log_every_steps = 1
    config.optimizer.accumulate_steps = 1
    return config


def load_config(
    spec: str, overrides: list[tuple[str, str]] = ()
) -> tuple[ml_collections.ConfigDict, str]:
    """Loads "path/NAME.py[:ARG]" and applies `overrides`; returns (config, run name NAME[_ARG])."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(
            f"config file {path!r} not found; pass --config experiments/NAME.py[:ARG]"
        )
    name = os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(f"cnnjax_experiment_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    # A config may import a shared base from its own folder (experiments/_cifar10.py).
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # any error in user code: report it in one line
        raise ConfigError(
            f"config file {path!r} failed to load: {type(error).__name__}: {error}"
        ) from None
    finally:
        sys.path.pop(0)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path!r} defines no get_config(arg); add one")
    try:
        config = module.get_config(arg or None)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(
            f"{path}: get_config({arg!r}) failed: {type(error).__name__}: {error}"
        ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    for field, value in overrides:
        set_field(config, field, value)
    return config, f"{name}_{arg}" if arg else name


def set_field(config: ml_collections.ConfigDict, field: str, text: str) -> None:
    """Sets dotted `field` from command-line `text`, parsed and checked against the default's type."""
    *parents, key = field.split(".")
    node, path = config, []
    for part in parents:
        path.append(part)
        if part not in node:
            raise ConfigError(_unknown(".".join(path), part, node))
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(
                f"config field {'.'.join(path)!r} is not a group; cannot set {field!r}"
            )
    if key not in node:
        if ".".join(parents) not in _OPEN_GROUPS:
            raise ConfigError(_unknown(field, key, node))
        node[key] = _literal(text)
        return
    default = node[key]
    if isinstance(default, ml_collections.ConfigDict):
        raise ConfigError(
            f"config field {field!r} is a group; set one of its fields, e.g. "
            f"--config.{field}.{next(iter(default.keys()), 'NAME')}=VALUE"
        )
    node[key] = parse_value(field, text, default)


def parse_value(field: str, text: str, default: Any) -> Any:
    """`text` converted to the type of `default`, or a ConfigError naming `field`."""

    def fail(kind: str) -> ConfigError:
        return ConfigError(f"config field {field!r} expects {kind}, got {text!r}")

    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0"):
            raise fail("a bool (true/false)")
        return lowered in ("true", "1")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise fail("an int") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise fail("a float") from None
    if isinstance(default, str):
        return text
    if isinstance(default, tuple | list):
        value = _literal(text if text.strip() else "()")
        value = value if isinstance(value, tuple | list) else (value,)
        if default and not all(isinstance(v, type(default[0]) | int) for v in value):
            raise fail(f"a tuple of {type(default[0]).__name__}, e.g. '(1, 2)'")
        return tuple(type(default[0])(v) for v in value) if default else tuple(value)
    return _literal(text)  # None or another type: take the Python literal


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as relu is a string


def _unknown(field: str, key: str, node: ml_collections.ConfigDict) -> str:
    close = difflib.get_close_matches(key, list(node.keys()), n=1)
    hint = (
        f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(node.keys()))}"
    )
    return f"unknown config field {field!r}{hint}"


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as indented JSON (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
