"""Counts what a model costs before it runs: parameters, batch statistics, MACs, FLOPs and activations.

Everything is measured by tracing the real model under `jax.eval_shape` (no memory, no compile), with a
flax method interceptor that records every convolution and dense layer it calls. MACs are the
multiply-accumulates of convolutions and dense layers, the convention of the published figures
(torchvision, the papers); batch norm, pooling and activations are not counted. FLOPs = 2 x MACs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import models


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One convolution or dense layer, as traced."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


def count_params(tree: Any) -> int:
    """Number of scalar entries in a pytree of arrays (or shape structs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def conv_macs(output_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> int:
    """MACs of one example: each output value costs kh*kw*(C_in/groups) multiply-adds.

    `kernel_shape` is flax's HWIO with I already divided by the group count, so depthwise and
    grouped convolutions need no special case.
    """
    return math.prod(output_shape[1:]) * math.prod(kernel_shape[:-1])


def _layer_cost(module: nn.Module, output: jax.ShapeDtypeStruct) -> LayerCost | None:
    if not isinstance(module, nn.Conv | nn.Dense):
        return None
    params = module.variables.get("params", {})
    kernel = params["kernel"]
    if isinstance(module, nn.Conv):
        macs = conv_macs(output.shape, kernel.shape)
    else:  # dense over the last axis; leading non-batch axes multiply the cost
        macs = math.prod(output.shape[1:-1]) * math.prod(kernel.shape)
    name = "/".join(module.scope.path) if module.scope is not None else type(module).__name__
    return LayerCost(name, type(module).__name__, tuple(output.shape), count_params(params), macs)


def trace_layers(model: nn.Module, variables: Any, input_shape: tuple[int, ...]) -> list[LayerCost]:
    """Every conv and dense layer of one eval-mode forward pass of a single example, in call order."""
    layers: list[LayerCost] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            cost = _layer_cost(context.module, out)
            if cost is not None:
                layers.append(cost)
        return out

    def forward(variables, x):
        with nn.intercept_methods(record):
            return model.apply(variables, x, train=False)

    jax.eval_shape(forward, variables, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return layers


def activation_bytes(model: nn.Module, variables: Any, input_shape: tuple[int, ...]) -> int:
    """Bytes of every module output of a train-mode forward pass for one example (fp32).

    An upper-bound estimate of what the backward pass keeps alive per example; XLA fuses some away.
    """
    total = 0

    def record(next_fun, args, kwargs, context):
        nonlocal total
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            total += sum(4 * math.prod(leaf.shape) for leaf in jax.tree.leaves(out))
        return out

    def forward(variables, x):
        with nn.intercept_methods(record):
            return model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)},
                               mutable=["batch_stats"])

    jax.eval_shape(forward, variables, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return total


def init_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> Any:
    """The model's variables as shape structs: no memory is allocated."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def profile_module(model: nn.Module, input_shape: tuple[int, ...], *, activations: bool = False
                   ) -> dict[str, Any]:
    """Parameters, batch statistics, MACs, FLOPs and the per-layer table of any flax module."""
    variables = init_shapes(model, input_shape)
    layers = trace_layers(model, variables, input_shape)
    macs = sum(layer.macs for layer in layers)
    result = {
        "input_shape": list(input_shape),
        "params": count_params(variables.get("params", {})),
        "batch_stats": count_params(variables.get("batch_stats", {})),
        "macs": macs,
        "flops": 2 * macs,
        "layers": [dataclasses.asdict(layer) for layer in layers],
    }
    if activations:
        result["activation_bytes_per_example"] = activation_bytes(model, variables, input_shape)
    return result


def profile_model(name: str, *, image_size: int | None = None, num_classes: int | None = None,
                  in_channels: int | None = None, activations: bool = False, **overrides: Any
                  ) -> dict[str, Any]:
    """`profile_module` for a registry entry at its default input size unless told otherwise."""
    spec = models.get_spec(name)
    size = spec.input_size if image_size is None else image_size
    channels = spec.in_channels if in_channels is None else in_channels
    model = models.create_model(name, num_classes=num_classes, **overrides)
    return {"model": name, **profile_module(model, (size, size, channels), activations=activations)}


def format_table(result: dict[str, Any]) -> str:
    """The per-layer table and totals as aligned text."""
    rows = [(r["name"], r["kind"], "x".join(map(str, r["output_shape"][1:])), f"{r['params']:,}",
             f"{r['macs']:,}") for r in result["layers"]]
    header = ("layer", "type", "output", "params", "MACs")
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    body = [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    body.append(f"\nparams {result['params']:,}   batch stats {result['batch_stats']:,}   "
                f"MACs {result['macs'] / 1e9:.3f}G   FLOPs {result['flops'] / 1e9:.3f}G")
    return "\n".join(body)


def markdown_table(names: list[str]) -> str:
    """The README's model table: parameters and MACs at each entry's default input size."""
    lines = ["| name | input | params | MACs | introduced |", "|---|---|---:|---:|---|"]
    for name in names:
        spec = models.get_spec(name)
        result = profile_model(name)
        size = f"{spec.input_size}x{spec.input_size}x{spec.in_channels}"
        macs = result["macs"]
        macs_text = f"{macs / 1e9:.3f}G" if macs >= 1e8 else f"{macs / 1e6:.2f}M"
        lines.append(f"| `{name}` | {size} | {result['params']:,} | {macs_text} "
                     f"| {spec.introduced} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnjax.profile", description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", help="registry name, e.g. resnet50 (see --all)")
    parser.add_argument("--all", action="store_true", help="a markdown table of every model")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--in-channels", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.all:
        print(markdown_table(models.list_models()))
        return 0
    if args.name is None:
        parser.error("give a model name or --all")
    try:
        result = profile_model(args.name, image_size=args.image_size, num_classes=args.num_classes,
                               in_channels=args.in_channels)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "layers"} | {"layers": result["layers"]}))
    else:
        print(f"{args.name} at {'x'.join(map(str, result['input_shape']))}")
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
