"""Which torchvision/timm state-dict key every cnnjax parameter and batch statistic corresponds to."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn

Path = tuple[str, ...]
FORMATS = ("torchvision", "timm")

# Registry name -> family; every family has one naming function per checkpoint format below.
FAMILIES: dict[str, str] = {
    "alexnet": "alexnet",
    **{f"vgg{depth}{bn}": "vgg" for depth in (11, 13, 16, 19) for bn in ("", "_bn")},
    "googlenet": "googlenet",
    **{f"resnet{depth}": "resnet" for depth in (18, 34, 50, 101, 152)},
    **{f"densenet{depth}": "densenet" for depth in (121, 169, 201)},
    "mobilenet_v2": "mobilenet_v2",
    **{f"efficientnet_b{i}": "efficientnet" for i in range(8)},
}

# Dense layers that torch feeds with a flattened NCHW map: path -> side of that (square) map.
FLATTENED_INPUTS: dict[str, dict[Path, int]] = {
    "alexnet": {("fc1",): 6},
    "vgg": {("fc1",): 7},
    "googlenet": {("aux1", "fc1"): 4, ("aux2", "fc1"): 4},
}

# cnnjax leaf name -> torch's: (module has a BN scale, leaf name) decides; batch_stats are BN's.
_PARAM_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STATS_LEAF = {"mean": "running_mean", "var": "running_var"}


def family_of(model_name: str) -> str:
    """The conversion family of registry entry `model_name`, or a ValueError listing the supported ones."""
    try:
        return FAMILIES[model_name]
    except KeyError:
        raise ValueError(f"no torchvision/timm weight conversion for model {model_name!r}; "
                         f"supported: {', '.join(FAMILIES)}.") from None


def _bad(family: str, path: Path) -> ValueError:
    return ValueError(f"{family}: no torch name for cnnjax module {'/'.join(path)!r}; was the model "
                      "changed after the converter was written?")


# --- torchvision -------------------------------------------------------------------------------


def _alexnet(path: Path, modules: set[Path], model: nn.Module) -> str:
    # torchvision's features: conv0 relu1 pool2 conv3 relu4 pool5 conv6 relu7 conv8 relu9 conv10 ...
    convs = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10}
    fcs = {"fc1": 1, "fc2": 4, "fc3": 6}  # classifier: dropout fc relu dropout fc relu fc
    if path[0] in convs:
        return f"features.{convs[path[0]]}"
    if path[0] in fcs:
        return f"classifier.{fcs[path[0]]}"
    raise _bad("alexnet", path)


def _vgg_feature_index(modules: set[Path]) -> dict[str, int]:
    """conv{b}_{i} / bn{b}_{i} -> index in torchvision's `features` Sequential.

    Each conv is followed by (BN,) ReLU, each block by a max pool, so the index is a running count.
    """
    convs = sorted(tuple(int(n) for n in m[0][4:].split("_")) for m in modules
                    if re.fullmatch(r"conv\d+_\d+", m[0]))
    with_bn = any(m[0].startswith("bn") for m in modules)
    index, block, out = 0, 1, {}
    for b, i in convs:
        index += b - block  # one max pool per finished block
        block = b
        out[f"conv{b}_{i}"] = index
        out[f"bn{b}_{i}"] = index + 1
        index += 3 if with_bn else 2
    return out


def _vgg(path: Path, modules: set[Path], model: nn.Module) -> str:
    fcs = {"fc1": 0, "fc2": 3, "fc3": 6}  # classifier: fc relu dropout fc relu dropout fc
    if path[0] in fcs:
        return f"classifier.{fcs[path[0]]}"
    index = _vgg_feature_index(modules).get(path[0])
    if index is None:
        raise _bad("vgg", path)
    return f"features.{index}"


def _googlenet(path: Path, modules: set[Path], model: nn.Module) -> str:
    # Names were kept from torchvision; only its Sequential indices (branch2.0) became branch2_0.
    return ".".join(re.sub(r"^(branch\d)_(\d)$", r"\1.\2", p) for p in path)


def _resnet(path: Path, modules: set[Path], model: nn.Module) -> str:
    top = {"stem_conv": "conv1", "stem_bn": "bn1", "fc": "fc"}
    if path[0] in top:
        return top[path[0]]
    block = re.fullmatch(r"layer(\d+)_(\d+)", path[0])
    if block is None or len(path) != 2:
        raise _bad("resnet", path)
    sub = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(path[1], path[1])
    return f"layer{block[1]}.{block[2]}.{sub}"


def _densenet(path: Path, modules: set[Path], model: nn.Module) -> str:
    top = {"stem_conv": "features.conv0", "stem_bn": "features.norm0",
           "final_bn": "features.norm5", "fc": "classifier"}
    if path[0] in top:
        return top[path[0]]
    layer = re.fullmatch(r"block(\d+)_layer(\d+)", path[0])
    if layer and len(path) == 2:
        sub = {"bn1": "norm1", "bn2": "norm2"}.get(path[1], path[1])
        return f"features.denseblock{layer[1]}.denselayer{layer[2]}.{sub}"
    transition = re.fullmatch(r"transition(\d+)", path[0])
    if transition and len(path) == 2:
        return f"features.transition{transition[1]}.{'norm' if path[1] == 'bn' else path[1]}"
    raise _bad("densenet", path)


def _count(modules: set[Path], pattern: str) -> int:
    return len({m[0] for m in modules if re.fullmatch(pattern, m[0])})


# Conv2dNormActivation is Sequential(conv, bn, act); a bare projection is conv, bn side by side.
_MBV2_EXPAND = {"expand_conv": "conv.0.0", "expand_bn": "conv.0.1", "dw_conv": "conv.1.0",
                "dw_bn": "conv.1.1", "project_conv": "conv.2", "project_bn": "conv.3"}
_MBV2_NO_EXPAND = {"dw_conv": "conv.0.0", "dw_bn": "conv.0.1", "project_conv": "conv.1",
                   "project_bn": "conv.2"}


def _mobilenet_v2(path: Path, modules: set[Path], model: nn.Module) -> str:
    head = _count(modules, r"block\d+") + 1
    top = {"stem_conv": "features.0.0", "stem_bn": "features.0.1", "head_conv": f"features.{head}.0",
           "head_bn": f"features.{head}.1", "classifier": "classifier.1"}
    if path[0] in top:
        return top[path[0]]
    block = re.fullmatch(r"block(\d+)", path[0])
    table = _MBV2_EXPAND if (path[0], "expand_conv") in modules else _MBV2_NO_EXPAND
    if block is None or len(path) != 2 or path[1] not in table:
        raise _bad("mobilenet_v2", path)
    return f"features.{block[1]}.{table[path[1]]}"


_EFFNET_EXPAND = {"expand_conv": "block.0.0", "expand_bn": "block.0.1", "dw_conv": "block.1.0",
                  "dw_bn": "block.1.1", "se": "block.2", "project_conv": "block.3.0",
                  "project_bn": "block.3.1"}
_EFFNET_NO_EXPAND = {"dw_conv": "block.0.0", "dw_bn": "block.0.1", "se": "block.1",
                     "project_conv": "block.2.0", "project_bn": "block.2.1"}


def _efficientnet(path: Path, modules: set[Path], model: nn.Module) -> str:
    head = len({m[0].split("_")[0] for m in modules if re.fullmatch(r"stage\d+_\d+", m[0])}) + 1
    top = {"stem_conv": "features.0.0", "stem_bn": "features.0.1", "head_conv": f"features.{head}.0",
           "head_bn": f"features.{head}.1", "classifier": "classifier.1"}
    if path[0] in top:
        return top[path[0]]
    block = re.fullmatch(r"stage(\d+)_(\d+)", path[0])
    table = _EFFNET_EXPAND if (path[0], "expand_conv") in modules else _EFFNET_NO_EXPAND
    if block is None or len(path) < 2 or path[1] not in table:
        raise _bad("efficientnet", path)
    return ".".join([f"features.{block[1]}.{block[2]}", table[path[1]], *path[2:]])


# --- timm (only where its names differ from torchvision's) -------------------------------------

_TIMM_DS = {"dw_conv": "conv_dw", "dw_bn": "bn1", "project_conv": "conv_pw", "project_bn": "bn2"}
_TIMM_IR = {"expand_conv": "conv_pw", "expand_bn": "bn1", "dw_conv": "conv_dw", "dw_bn": "bn2",
            "project_conv": "conv_pwl", "project_bn": "bn3"}
_TIMM_SE = {"fc1": "conv_reduce", "fc2": "conv_expand"}
_TIMM_TOP = {"stem_conv": "conv_stem", "stem_bn": "bn1", "head_conv": "conv_head",
             "head_bn": "bn2", "classifier": "classifier"}


def _timm_block(prefix: str, path: Path, modules: set[Path], family: str) -> str:
    table = _TIMM_IR if (path[0], "expand_conv") in modules else _TIMM_DS
    if path[1] == "se" and len(path) == 3 and path[2] in _TIMM_SE:
        return f"{prefix}.se.{_TIMM_SE[path[2]]}"
    if len(path) != 2 or path[1] not in table:
        raise _bad(family, path)
    return f"{prefix}.{table[path[1]]}"


def _timm_mobilenet_v2(path: Path, modules: set[Path], model: nn.Module) -> str:
    if path[0] in _TIMM_TOP:
        return _TIMM_TOP[path[0]]
    block = re.fullmatch(r"block(\d+)", path[0])
    if block is None:
        raise _bad("mobilenet_v2", path)
    # cnnjax numbers blocks 1..17 over the whole net; timm numbers them per stage.
    index = int(block[1]) - 1
    starts = [sum(s[2] for s in model.stages[:i]) for i in range(len(model.stages))]
    stage = max(i for i, start in enumerate(starts) if start <= index)
    return _timm_block(f"blocks.{stage}.{index - starts[stage]}", path, modules, "mobilenet_v2")


def _timm_efficientnet(path: Path, modules: set[Path], model: nn.Module) -> str:
    if path[0] in _TIMM_TOP:
        return _TIMM_TOP[path[0]]
    block = re.fullmatch(r"stage(\d+)_(\d+)", path[0])
    if block is None:
        raise _bad("efficientnet", path)
    return _timm_block(f"blocks.{int(block[1]) - 1}.{block[2]}", path, modules, "efficientnet")


NamingFn = Callable[[Path, set[Path], nn.Module], str]
NAMING: dict[str, dict[str, NamingFn]] = {
    "torchvision": {"alexnet": _alexnet, "vgg": _vgg, "googlenet": _googlenet,
                    "resnet": _resnet, "densenet": _densenet,
                    "mobilenet_v2": _mobilenet_v2, "efficientnet": _efficientnet},
    # timm's ResNet and DenseNet keep torchvision's names; its VGG head is a conv MLP (unsupported).
    "timm": {"resnet": _resnet, "densenet": _densenet,
             "mobilenet_v2": _timm_mobilenet_v2, "efficientnet": _timm_efficientnet},
}


def torch_key_map(model_name: str, model: nn.Module, variables: dict[str, Any],
                  fmt: str = "torchvision") -> dict[tuple[str, Path], str]:
    """(collection, flax leaf path) -> torch state-dict key, for every leaf of `variables`.

    `variables` may hold arrays or jax.ShapeDtypeStructs; only its tree structure is read.
    """
    family = family_of(model_name)
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    naming = NAMING[fmt].get(family)
    if naming is None:
        raise ValueError(f"no {fmt} naming for {model_name}; convert a torchvision checkpoint "
                         f"({', '.join(f for f in FORMATS if family in NAMING[f])} supported).")
    leaves = list(_leaf_paths(variables))
    modules = {path[:-1] for _, path in leaves}
    prefixes = {module: naming(module, modules, model) for module in sorted(modules)}
    out = {}
    for collection, path in leaves:
        names = _STATS_LEAF if collection == "batch_stats" else _PARAM_LEAF
        if path[-1] not in names:
            raise _bad(family, path)
        out[(collection, path)] = f"{prefixes[path[:-1]]}.{names[path[-1]]}"
    return out


def _leaf_paths(variables: dict[str, Any]) -> Iterable[tuple[str, Path]]:
    for collection in ("params", "batch_stats"):
        yield from ((collection, path) for path in _walk(variables.get(collection, {}), ()))


def _walk(tree: Any, prefix: Path) -> Iterable[Path]:
    if not hasattr(tree, "items"):
        yield prefix
        return
    for name, child in tree.items():
        yield from _walk(child, (*prefix, name))
