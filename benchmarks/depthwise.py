"""Depthwise convolutions: XLA's grouped convolution against cnnjax's tap-sum form, and PyTorch.

For each depthwise layer shape of MobileNetV2 and EfficientNet-B0 (at 224x224 input, spatial sizes
scaled by --image-size / 224), times the forward pass and the gradient with respect to input and
weight (a forward pass plus the backward pass) of:
- `xla`: `lax.conv_general_dilated` with feature_group_count = channels;
- `taps`: `cpu_conv.depthwise_conv`, weight gradient summed over the whole batch at once;
- `taps_per_image`: the same with the weight gradient taken image by image (what CPUs get);
- `torch` (with --compare-torch, when torch is importable): `nn.Conv2d(groups=C)`, channels_last,
  bf16 autocast for --precision bf16, eager mode.

    python benchmarks/depthwise.py                       # this device's defaults
    python benchmarks/depthwise.py --batch-size 256 --image-size 224 --precision bf16 --compare-torch

prints a table (ms per call, median of --repeats rounds of --steps calls, synchronised with the
device) and, with --out FILE, saves the rows as JSON; FILE must not exist yet.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cnnjax import bench, cpu_conv

# (model, spatial size at 224 input, channels, kernel, stride)
LAYERS = [("mobilenet_v2", 112, 32, 3, 1), ("mobilenet_v2", 112, 96, 3, 2),
          ("mobilenet_v2", 56, 144, 3, 1), ("mobilenet_v2", 28, 192, 3, 1),
          ("mobilenet_v2", 14, 384, 3, 1), ("mobilenet_v2", 14, 576, 3, 2),
          ("mobilenet_v2", 7, 960, 3, 1), ("efficientnet_b0", 56, 144, 5, 2),
          ("efficientnet_b0", 28, 240, 5, 1), ("efficientnet_b0", 14, 672, 5, 1),
          ("efficientnet_b0", 7, 1152, 5, 1)]


def _forms(kernel: int, stride: int) -> dict[str, Any]:
    pad = (kernel - 1) // 2
    padding = ((pad, pad), (pad, pad))

    def xla(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])

    def taps(x, w):
        return cpu_conv.depthwise_conv(x, w, stride, padding, image_by_image=False)

    def taps_per_image(x, w):
        return cpu_conv.depthwise_conv(x, w, stride, padding, image_by_image=True)

    return {"xla": xla, "taps": taps, "taps_per_image": taps_per_image}


def _ms(fn, args: tuple, steps: int, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    return 1e3 * statistics.median(bench.time_loop(lambda: fn(*args), steps, repeats))


def _torch_ms(size: int, channels: int, kernel: int, stride: int, batch: int, precision: str,
              steps: int, repeats: int) -> dict[str, float]:
    import torch  # only here: torch is never a dependency of cnnjax

    from cnnjax.bench_torch import _time

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    conv = torch.nn.Conv2d(channels, channels, kernel, stride, (kernel - 1) // 2, groups=channels,
                           bias=False).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, channels, size, size, device=device).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def forward():
        with torch.no_grad(), autocast:
            conv(x)

    def gradient():
        with autocast:
            y = conv(x)
        torch.autograd.grad(y.float().sum(), (x, conv.weight))

    out = {}
    for name, fn in (("forward_ms", forward), ("gradient_ms", gradient)):
        fn()
        out[name] = 1e3 * statistics.median(_time(fn, device, steps, repeats))
    return out


def run(batch: int, image_size: int, precision: str, steps: int, repeats: int,
        compare_torch: bool) -> list[dict[str, Any]]:
    if image_size < 32 or image_size % 32:
        raise ValueError(f"--image-size {image_size}: use a multiple of 32 (224 is the models' own)")
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    rows = []
    for model, size224, channels, kernel, stride in LAYERS:
        size = size224 * image_size // 224
        x = jax.random.normal(jax.random.key(0), (batch, size, size, channels), dtype)
        w = (0.1 * jax.random.normal(jax.random.key(1), (kernel, kernel, 1, channels))).astype(dtype)
        row = {"model": model, "input": [batch, size, size, channels], "kernel": kernel,
               "stride": stride}
        for name, fn in _forms(kernel, stride).items():
            forward = jax.jit(fn)
            gradient = jax.jit(jax.grad(lambda x, w, fn=fn: jnp.sum(fn(x, w).astype(jnp.float32)),
                                        (0, 1)))
            row[name] = {"forward_ms": _ms(forward, (x, w), steps, repeats),
                         "gradient_ms": _ms(gradient, (x, w), steps, repeats)}
        if compare_torch:
            try:
                row["torch"] = _torch_ms(size, channels, kernel, stride, batch, precision, steps,
                                         repeats)
            except ImportError as err:
                row["torch"] = {"skipped": f"torch not importable ({err})"}
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    n, h, _, c = row["input"]
    cells = [f"{row['model']:<16}{h:>4}x{h}x{c:<5} k{row['kernel']} s{row['stride']}"]
    for name in ("xla", "taps", "taps_per_image", "torch"):
        times = row.get(name)
        if times and "forward_ms" in times:
            cells.append(f"{name} {times['forward_ms']:8.2f} / {times['gradient_ms']:8.2f}")
    return "  ".join(cells)


def main(argv: list[str] | None = None) -> int:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16 if on_cpu else 256)
    parser.add_argument("--image-size", type=int, default=64 if on_cpu else 224,
                        help="input size the layer shapes are scaled to (224: the models' own)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32" if on_cpu else "bf16")
    parser.add_argument("--steps", type=int, default=3 if on_cpu else 20)
    parser.add_argument("--repeats", type=int, default=3 if on_cpu else 5)
    parser.add_argument("--compare-torch", action="store_true")
    parser.add_argument("--out", help="save the rows as JSON here (the file must not exist yet)")
    args = parser.parse_args(argv)
    if args.out and os.path.exists(args.out):
        print(f"error: --out {args.out} exists; give a new file name, earlier results are kept",
              file=sys.stderr)
        return 2
    print(f"{jax.devices()[0].device_kind}, {args.precision}, batch {args.batch_size}, input "
          f"{args.image_size}; ms per call, forward / forward+backward ({time.strftime('%Y-%m-%d %H:%M')})",
          file=sys.stderr)

    def measure() -> dict[str, Any]:
        rows = run(args.batch_size, args.image_size, args.precision, args.steps, args.repeats,
                   args.compare_torch)
        result = {"device": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d %H:%M"),
                  "jax": jax.__version__, "command": " ".join(["python", *sys.argv]),
                  **vars(args), "rows": rows}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return result

    return bench.emit(measure, as_json=False, report=lambda r: f"{len(r['rows'])} layers timed"
                      + (f", saved to {args.out}" if args.out else ""))


if __name__ == "__main__":
    sys.exit(main())
