"""CPU benchmark: cnnjax's gather kernel against jaxlib's oneDNN call, one layer at a time.

For each layer `B,S,CIN,COUT,K,STRIDE` (batch, input size, channels in and out, a K x K kernel
with "same" padding, stride), in one process: the forward pass as `cpu_kernels.conv` against
`onednn.conv`, and the input gradient as `cpu_kernels.input_gradient` against
`onednn.input_gradient` (stride 1) or `onednn.strided_input_gradient` (one stride-1 call per input
phase). Each call jitted alone; the four timed in turn, a block of 5 calls each, 7 rounds after
one warm-up; medians in milliseconds. It also prints whether `cpu_kernels.conv_fits` and
`input_gradient_fits` send the layer to the gather kernel inside a train step. An RGB layer (CIN
3) times the forward pass only (a first layer's input gradient is never taken).

    python benchmarks/cpu_gather_vs_onednn.py 32,4,512,512,3,1 32,14,256,256,3,2 [--out FILE.json]

Without layers it times the default set (ResNet and VGG widths). --out saves the numbers with the
date, device and versions and never overwrites an existing file.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import results_file  # benchmarks/results_file.py, beside this script

from cnnjax import cpu_kernels, onednn

DEFAULT_LAYERS = ["32,4,512,512,3,1", "32,7,512,512,3,1", "32,8,256,256,3,1",
                  "32,14,256,256,3,1", "32,16,128,128,3,1", "32,28,256,256,3,2",
                  "8,28,512,512,3,1"]


def _block_ms(fn: Callable[..., Any], args: tuple, calls: int = 5) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls * 1e3


def parse(spec: str) -> tuple[int, ...]:
    """(B, S, CIN, COUT, K, STRIDE) from "B,S,CIN,COUT,K,STRIDE"; exits with a one-line error."""
    try:
        b, s, c_in, c_out, k, stride = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"layer {spec!r}: expected B,S,CIN,COUT,K,STRIDE, "
                         "e.g. 32,4,512,512,3,1") from None
    if min(b, s, c_in, c_out, k, stride) < 1:
        raise SystemExit(f"layer {spec!r}: every field must be positive")
    return b, s, c_in, c_out, k, stride


def measure(spec: str, rounds: int = 7) -> dict[str, Any]:
    """The layer's medians (ms), its routing and the two kernels' largest relative gaps."""
    b, s, c_in, c_out, k, stride = parse(spec)
    pad = (k - 1) // 2
    padding, strides = ((pad, pad), (pad, pad)), (stride, stride)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, s, s, c_in), np.float32)
    w = rng.standard_normal((k, k, c_in, c_out), np.float32) / math.sqrt(k * k * c_in)
    y_shape = cpu_kernels.conv_output_shape(x.shape, w.shape, strides, padding)
    g = rng.standard_normal(y_shape, np.float32)
    if stride == 1:
        def onednn_input_gradient(g, w):
            return onednn.input_gradient(g, w, padding)
    else:
        def onednn_input_gradient(g, w):
            return onednn.strided_input_gradient(g, w, x.shape, strides, padding)
    calls = {
        "forward_gather": (jax.jit(lambda x, w: cpu_kernels.conv(x, w, strides, padding)), (x, w)),
        "forward_onednn": (jax.jit(lambda x, w: onednn.conv(x, w, strides, padding)), (x, w)),
    }
    passes = ("forward",) if c_in == 3 else ("forward", "input_gradient")
    if c_in != 3:
        calls["input_gradient_gather"] = (jax.jit(lambda g, w: cpu_kernels.input_gradient(
            g, w, x.shape, strides, padding)), (g, w))
        calls["input_gradient_onednn"] = (jax.jit(onednn_input_gradient), (g, w))
    outs = {name: np.asarray(fn(*args)) for name, (fn, args) in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            times[name].append(_block_ms(fn, args))
    row: dict[str, Any] = {"layer": spec}
    row.update({name: statistics.median(t) for name, t in times.items()})
    for p in passes:
        ref = outs[f"{p}_onednn"]
        row[f"{p}_max_relative_gap"] = float(
            np.abs(outs[f"{p}_gather"] - ref).max() / np.abs(ref).max())
    row["conv_fits"] = cpu_kernels.conv_fits(c_in, c_out, math.prod(y_shape))
    row["input_gradient_fits"] = cpu_kernels.input_gradient_fits(c_in, c_out, x.size)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layers", nargs="*", default=DEFAULT_LAYERS,
                        help="B,S,CIN,COUT,K,STRIDE per layer")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", help="save the rows as JSON to this new file")
    args = parser.parse_args(argv)
    results_file.refuse_existing(args.out)
    if not (cpu_kernels.available() and onednn.available()):
        raise SystemExit("needs cnnjax's CPU kernels (a C++ compiler) and jaxlib's oneDNN call")
    for spec in args.layers:  # every layer checked before any is timed
        parse(spec)
    rows = []
    for spec in args.layers:
        r = measure(spec, args.rounds)
        rows.append(r)
        back = ("" if "input_gradient_gather" not in r else
                f", input gradient {r['input_gradient_gather']:.2f} / "
                f"{r['input_gradient_onednn']:.2f} ms "
                f"({r['input_gradient_onednn'] / r['input_gradient_gather']:.2f}x)")
        print(f"{spec}: forward {r['forward_gather']:.2f} / {r['forward_onednn']:.2f} ms "
              f"({r['forward_onednn'] / r['forward_gather']:.2f}x){back}; "
              f"train step takes the gather kernel: forward {r['conv_fits']}, "
              f"input gradient {r['input_gradient_fits']}", flush=True)
    if args.out:
        results_file.save_new(args.out, command=" ".join(["cpu_gather_vs_onednn.py", *args.layers]),
                              rows=rows)


if __name__ == "__main__":
    main()
