"""Converting torch state dicts to cnnjax variables and back: tensor layouts, key checks, file reading."""

from __future__ import annotations

import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.models import create_model, get_spec
from cnnjax.pretrained.names import FAMILIES, FLATTENED_INPUTS, family_of, torch_key_map

StateDict = dict[str, np.ndarray]

# Keys a torch checkpoint may carry that cnnjax has no use for.
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")
# torchvision's hosted DenseNet files predate a rename ("norm.1" -> "norm1"); torchvision remaps them
# on load with this pattern, and so do we.
_LEGACY_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


# --- layouts -----------------------------------------------------------------------------------


def _to_flax(value: np.ndarray, flatten_side: int | None) -> np.ndarray:
    """torch layout -> flax layout for one tensor (conv OIHW -> HWIO, linear [out, in] -> [in, out])."""
    if value.ndim == 4:
        # Depthwise/grouped too: torch [O, I/g, kh, kw] -> flax [kh, kw, I/g, O].
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2 and flatten_side:
        # torch flattened a [C, H, W] map, cnnjax flattens [H, W, C]: reorder the input rows.
        out, features = value.shape
        channels = features // (flatten_side * flatten_side)
        value = value.reshape(out, channels, flatten_side, flatten_side).transpose(0, 2, 3, 1)
        return value.reshape(out, features).T
    return value.T if value.ndim == 2 else value


def _to_torch(value: np.ndarray, flatten_side: int | None) -> np.ndarray:
    """The inverse of `_to_flax`."""
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2 and flatten_side:
        features, out = value.shape
        channels = features // (flatten_side * flatten_side)
        value = value.T.reshape(out, flatten_side, flatten_side, channels).transpose(0, 3, 1, 2)
        return value.reshape(out, features)
    return value.T if value.ndim == 2 else value


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))


# --- conversion --------------------------------------------------------------------------------


def abstract_variables(model: nn.Module, model_name: str) -> dict[str, Any]:
    """Shapes of `model`'s params and batch_stats, traced (not computed) at the registry's small input."""
    spec = get_spec(model_name)
    x = jax.ShapeDtypeStruct((1, spec.small_input, spec.small_input, spec.in_channels), jnp.float32)
    key = jax.random.PRNGKey(0)
    shapes = jax.eval_shape(lambda v: model.init({"params": key, "dropout": key}, v, train=False), x)
    return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}


def clean_state_dict(state_dict: dict[str, Any]) -> StateDict:
    """Numpy copies of the tensors with wrappers stripped: 'module.' (DataParallel), legacy DenseNet keys."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        key = _LEGACY_DENSENET.sub(r"\1\2", key)
        out[key] = value if isinstance(value, np.ndarray) else np.asarray(value)
    return out


def detect_format(state_dict: StateDict) -> str:
    """'timm' for timm's MobileNet/EfficientNet names (conv_stem...), else 'torchvision'."""
    return "timm" if "conv_stem.weight" in state_dict else "torchvision"


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _ignorable(key: str, used_prefixes: set[str]) -> bool:
    if _IGNORED.search(key):
        return True
    # torchvision drops GoogLeNet's auxiliary heads when the model is built without them.
    return re.match(r"aux[12]\.", key) is not None and not any(p.startswith("aux") for p in used_prefixes)


def from_torch(state_dict: dict[str, Any], model_name: str, model: nn.Module,
               target: dict[str, Any] | None = None, *, fmt: str = "auto",
               strict: bool = True) -> dict[str, Any]:
    """cnnjax variables {params, batch_stats} (numpy fp32) from a torchvision/timm state dict.

    `target` holds the expected shapes (default: traced from `model`). Raises a one-line ValueError
    at the first key that is missing or whose shape does not fit, and (strict) at the first key
    the model has no place for.
    """
    state_dict = clean_state_dict(state_dict)
    fmt = detect_format(state_dict) if fmt == "auto" else fmt
    target = abstract_variables(model, model_name) if target is None else target
    keys = torch_key_map(model_name, model, target, fmt)
    flatten = FLATTENED_INPUTS.get(family_of(model_name), {})
    out: dict[str, Any] = {"params": {}, "batch_stats": {}}
    # Checked in the checkpoint's own order, so "first" means first in the file; missing keys first.
    position = {key: i for i, key in enumerate(state_dict)}
    for (collection, path), key in sorted(keys.items(), key=lambda item: position.get(item[1], -1)):
        expected = tuple(_lookup(target[collection], path).shape)
        if key not in state_dict:
            raise ValueError(f"{model_name}: checkpoint has no {key!r} (cnnjax "
                             f"{collection}/{'/'.join(path)}, shape {expected}); is it a "
                             f"{fmt} {model_name} checkpoint?")
        value = state_dict[key]
        if value.ndim != len(expected) or _to_flax_shape(value.shape) != expected:
            raise ValueError(f"{model_name}: {key!r} has shape {tuple(value.shape)}, the model "
                             f"needs {_torch_shape(expected)} (torch layout) for "
                             f"{collection}/{'/'.join(path)}; check the model name, num_classes "
                             "and constructor overrides.")
        _set(out[collection], path, _to_flax(value, flatten.get(path[:-1])).astype(np.float32))
    if strict:
        used = set(keys.values())
        prefixes = {k.split(".")[0] for k in used}
        extra = [k for k in state_dict if k not in used and not _ignorable(k, prefixes)]
        if extra:
            raise ValueError(f"{model_name}: checkpoint key {extra[0]!r} (and {len(extra) - 1} more) "
                             "has no place in the model; pass strict=False to ignore them.")
    return out


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _to_flax_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    return tuple(reversed(shape))


def to_torch(variables: dict[str, Any], model_name: str, model: nn.Module, *,
             fmt: str = "torchvision", batches_tracked: bool = True) -> StateDict:
    """The inverse of `from_torch`: a torch-layout state dict (numpy) with torchvision/timm keys.

    batches_tracked adds each BN's `num_batches_tracked` (int64 0), as torch's state_dict() has it.
    """
    keys = torch_key_map(model_name, model, variables, fmt)
    flatten = FLATTENED_INPUTS.get(family_of(model_name), {})
    out: StateDict = {}
    # Within a module, torch's order: weight, bias, then the BN buffers.
    prefixes = list(dict.fromkeys(key.rpartition(".")[0] for key in keys.values()))
    rank = {p: i for i, p in enumerate(prefixes)}
    leaf = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}
    ordered = sorted(keys.items(), key=lambda item: (rank[item[1].rpartition(".")[0]],
                                                     leaf[item[1].rpartition(".")[2]]))
    for (collection, path), key in ordered:
        value = np.asarray(_lookup(variables[collection], path))
        out[key] = np.ascontiguousarray(_to_torch(value, flatten.get(path[:-1])))
        if batches_tracked and collection == "batch_stats" and path[-1] == "var":
            out[key.removesuffix("running_var") + "num_batches_tracked"] = np.zeros((), np.int64)
    return out


# --- files and model options -------------------------------------------------------------------


def load_state_dict(path: str) -> StateDict:
    """A state dict from a .safetensors file (no torch needed) or a .pth/.pt/.bin file (needs torch)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file {path!r} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file  # only needed for this format

        return clean_state_dict(load_file(path))
    try:
        import torch  # optional: only .pth files need it
    except ImportError:
        raise ValueError(f"reading {path!r} needs torch (pip install torch); or save the state dict "
                         "as .safetensors, which needs only the safetensors package.") from None
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # training scripts often nest the weights
        if isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    return clean_state_dict({k: v.float().numpy() if v.is_floating_point() else v.numpy()
                             for k, v in loaded.items()})


def checkpoint_model_kwargs(model_name: str, state_dict: StateDict, fmt: str = "auto") -> dict:
    """Constructor overrides a checkpoint needs beyond the registry defaults, e.g. for GoogLeNet.

    torchvision's GoogLeNet has a 3x3 "5x5" branch and maybe aux heads; timm's EfficientNet-B5..B7
    use torch's BN epsilon 1e-5 where torchvision's use TF's 1e-3 (cnnjax's B5-B7 default).
    """
    fmt = detect_format(state_dict) if fmt == "auto" else fmt
    family = FAMILIES.get(model_name)
    if family == "googlenet":
        return {"branch5x5_kernel": 3, "aux_logits": "aux1.fc2.weight" in state_dict}
    if family == "efficientnet" and fmt == "timm" and model_name[-1] in "567":
        return {"bn_epsilon": 1e-5, "bn_momentum": 0.9}
    return {}


def convert_file(path: str, model_name: str, *, num_classes: int | None = None,
                 fmt: str = "auto", **overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(variables, model kwargs) for checkpoint `path`; num_classes defaults to the checkpoint's."""
    state_dict = load_state_dict(path)
    kwargs = {**checkpoint_model_kwargs(model_name, state_dict, fmt), **overrides}
    if num_classes is None:
        num_classes = _checkpoint_classes(model_name, state_dict)
    model = create_model(model_name, num_classes=num_classes, **kwargs)
    return from_torch(state_dict, model_name, model, fmt=fmt), {"num_classes": num_classes, **kwargs}


# The last linear layer's weight, per family, torchvision's name first, then timm's. A fixed list
# across families would misread AlexNet/VGG, whose classifier.1/classifier.0 is the first hidden layer.
CLASSIFIER_KEYS = {
    "alexnet": ("classifier.6.weight",),
    "vgg": ("classifier.6.weight",),
    "googlenet": ("fc.weight",),
    "resnet": ("fc.weight",),
    "densenet": ("classifier.weight",),
    "mobilenet_v2": ("classifier.1.weight", "classifier.weight"),
    "efficientnet": ("classifier.1.weight", "classifier.weight"),
}


def _checkpoint_classes(model_name: str, state_dict: StateDict) -> int:
    for key in CLASSIFIER_KEYS[family_of(model_name)]:
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return get_spec(model_name).num_classes
