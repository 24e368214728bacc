"""CPU benchmark: resnet20's convolutions, one layer at a time, cnnjax's kernels against torch's.

For each 3x3 layer shape of a CIFAR ResNet at batch B (16, 32 and 64 channels, and the stride-2
layer that opens stage 2; `--layers lenet5`: LeNet-5's C1 and C3; `--layers narrow`: layers of 1
to 12 input channels, which the gather kernel's generic loop and dot tiles take or leave), in one
process:

- forward: the call cnnjax's train step makes, `cpu_kernels.conv` (the gather kernel) where the
  layer's channels fit it, else `onednn.conv` (jaxlib's `__onednn$convolution` call), against
  torch's `conv2d`;
- input gradient: likewise `cpu_kernels.input_gradient` (one call at any stride; dot tiles for at
  most 8 input channels), else
  `onednn.input_gradient` (stride 1) or `onednn.strided_input_gradient` (one stride-1 call per
  input phase), against torch's `convolution_backward` for the input;
- weight gradient: `cpu_kernels.weight_gradient` (cnnjax/cpu_kernels.cc) against torch's
  `convolution_backward` for the weight;

torch in channels_last (NHWC, the layout cnnjax uses), on one thread per core (`os.cpu_count()`),
or on `--threads N` cores (the process pinned to the first N, torch on N threads). Timed in turn
(each call of the six, five times, then the next; six rounds) after one warm-up; medians of the
rounds, in milliseconds.

    python benchmarks/cpu_conv_layers.py --batch-size 128 [--layers lenet5|narrow] \
        [--kernels onednn] [--out FILE.json]

`--kernels onednn` times oneDNN's calls for the forward pass and the input gradient instead, where
the gather kernel would take them (what cnnjax ran before it).

`--side cnnjax` or `--side torch` times one library's three calls alone, in a process without the
other: torch's OpenMP threads spin for a while after each call and slow whatever runs next on these
two cores, so in one process the calls that follow torch's pay for it. Run the two sides one after
the other, twice (`--side cnnjax; --side torch; --side cnnjax; --side torch`), to compare them
apart.

Needs torch (`pip install torch`, a benchmark-only dependency); --out saves the numbers with the
date, device and versions and never overwrites an existing file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import results_file  # benchmarks/results_file.py, beside this script

from cnnjax import cpu_kernels, onednn


def _alternating_ms(calls: dict[str, Callable[[], Any]], rounds: int = 6,
                    per_round: int = 5) -> dict[str, float]:
    """Median ms per call of each of `calls`, timed in turn (a, b, c, a, b, c, ...) so that this
    VM's drifting speed and the order of measurement hit all of them alike. (A pause before each
    block, against torch's OpenMP threads spinning after their last task, made every call about 3x
    slower here: the VM's cores slow down when idle.)"""
    for call in calls.values():
        jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(per_round):
                jax.block_until_ready(call())
            times[name].append((time.perf_counter() - start) / per_round * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def layer(batch: int, size: int, cin: int, cout: int, stride: int, torch,
          side: str = "both", kernels: str = "cnnjax", kernel: int = 3) -> dict[str, float]:
    """One layer's six calls: a 3x3 kernel with padding 1 (SAME), a 5x5 one without (VALID, as
    LeNet-5's)."""
    rng = np.random.default_rng(0)
    pad = 1 if kernel == 3 else 0
    pads = ((pad, pad), (pad, pad))
    x = rng.standard_normal((batch, size, size, cin), np.float32)
    w = rng.standard_normal((kernel, kernel, cin, cout), np.float32)
    out = (size + 2 * pad - kernel) // stride + 1
    g = rng.standard_normal((batch, out, out, cout), np.float32)
    strides = (stride, stride)
    gather = kernels == "cnnjax"
    if gather and cpu_kernels.conv_fits(cin, cout, g.size):
        forward = jax.jit(lambda x, w: cpu_kernels.conv(x, w, strides, pads))
    else:
        forward = jax.jit(lambda x, w: onednn.conv(x, w, strides, pads))
    if gather and cpu_kernels.input_gradient_fits(cin, cout, x.size):
        input_grad = jax.jit(lambda g, w: cpu_kernels.input_gradient(g, w, x.shape, strides, pads))
    elif stride == 1:
        input_grad = jax.jit(lambda g, w: onednn.input_gradient(g, w, pads))
    else:
        input_grad = jax.jit(lambda g, w: onednn.strided_input_gradient(
            g, w, x.shape, strides, pads))
    weight_grad = jax.jit(lambda x, g: cpu_kernels.weight_gradient(x, g, (kernel, kernel),
                                                                   strides, pads))

    def nchw(a):  # an NHWC array as torch's NCHW tensor in channels_last memory
        return torch.from_numpy(a).permute(0, 3, 1, 2)

    tx, tg = nchw(x), nchw(g)
    tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            tg, tx, tw, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, mask)

    x, w, g = (jax.device_put(a) for a in (x, w, g))  # on the device once, not per call
    calls = {
        "cnnjax_forward_ms": lambda: forward(x, w),
        "torch_forward_ms": lambda: torch.nn.functional.conv2d(tx, tw, None, stride, pad),
        "cnnjax_input_gradient_ms": lambda: input_grad(g, w),
        "torch_input_gradient_ms": backward([True, False, False]),
        "cnnjax_weight_gradient_ms": lambda: weight_grad(x, g),
        "torch_weight_gradient_ms": backward([False, True, False]),
    }
    if side != "both":
        calls = {name: call for name, call in calls.items() if name.startswith(side)}
    with torch.no_grad():
        return _alternating_ms(calls)


# --layers: (image size, input channels, output channels, stride, kernel) from --image-size.
LAYERS = {
    "resnet20": lambda s: [(s, 16, 16, 1, 3), (s // 2, 32, 32, 1, 3), (s // 4, 64, 64, 1, 3),
                           (s, 16, 32, 2, 3), (s // 2, 32, 64, 2, 3)],
    "lenet5": lambda s: [(32, 1, 6, 1, 5), (14, 6, 16, 1, 5)],
    "narrow": lambda s: [(28, 1, 32, 1, 3), (28, 1, 32, 1, 5), (28, 2, 32, 1, 3),
                         (32, 4, 64, 1, 3), (14, 4, 16, 1, 5), (14, 6, 16, 1, 5),
                         (14, 8, 16, 1, 5), (14, 12, 16, 1, 5), (32, 8, 32, 1, 3),
                         (16, 8, 64, 1, 3)],
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--layers", choices=tuple(LAYERS), default="resnet20",
                        help="resnet20's 3x3 layers at --image-size; LeNet-5's C1 (1 -> 6, "
                             "5x5 over 32x32) and C3 (6 -> 16 over 14x14); or narrow layers of "
                             "1 to 12 input channels")
    parser.add_argument("--side", choices=("both", "cnnjax", "torch"), default="both",
                        help="time both libraries' calls in turn, or one library's alone")
    parser.add_argument("--kernels", choices=("cnnjax", "onednn"), default="cnnjax",
                        help="cnnjax's forward and input-gradient calls as its train step makes "
                             "them, or oneDNN's in their place")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="pin the process to this many cores (torch on as many threads)")
    parser.add_argument("--out", help="save the numbers as JSON here")
    args = parser.parse_args(argv)
    results_file.refuse_existing(args.out)
    if not 1 <= args.threads <= len(os.sched_getaffinity(0)):
        raise SystemExit(f"--threads {args.threads}: this process may run on "
                         f"{len(os.sched_getaffinity(0))} cores; pass 1 to that many.")
    # Before JAX starts its CPU client, which sizes its thread pool by the cores it may run on.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    try:
        import torch
    except ImportError:
        raise SystemExit("torch is not importable; `pip install torch` to compare against it.") \
            from None
    if not (onednn.available() and cpu_kernels.available()):
        raise SystemExit("oneDNN's call or cnnjax's CPU kernels are not available here; nothing "
                         "to compare.")
    torch.set_num_threads(args.threads)
    results = {}
    for size, cin, cout, stride, kernel in LAYERS[args.layers](args.image_size):
        name = f"{args.batch_size}x{size}x{size}x{cin}->{cout} {kernel}x{kernel} stride {stride}"
        results[name] = t = layer(args.batch_size, size, cin, cout, stride, torch, args.side,
                                  args.kernels, kernel)
        parts = []
        for call in ("forward", "input_gradient", "weight_gradient"):
            times = [f"{side} {t[f'{side}_{call}_ms']:.2f}" for side in ("cnnjax", "torch")
                     if f"{side}_{call}_ms" in t]
            parts.append(f"{call.replace('_', ' ')} {', '.join(times)}")
        print(f"{name} ({args.threads} threads): {'; '.join(parts)} ms")
    if args.out:
        results_file.save_new(args.out, torch=torch.__version__,
                              torch_threads=torch.get_num_threads(), args=vars(args),
                              layers=results)


if __name__ == "__main__":
    main()
