"""CPU benchmark: batch norm + residual + ReLU as cnnjax's native op against XLA's fusions.

Two parts, both in one process:

- the batch norms of a CIFAR ResNet's three stages (16, 32 and 64 channels at the image size, half
  and a quarter of it; forward with a residual and ReLU, then backward, and backward without the
  residual, where the kernel takes the ReLU's mask from x):
  the native kernels (`cpu_kernels.norm_act`, `norm_act_backward`) against the same formulas as
  XLA compiles them in the engine's small-model CPU steps (blocked sums, no YNNPACK fusions);
- the whole train step, compiled twice (the native op on, and off: `batchnorm._native` patched to
  say no, which leaves the batch-norm form of `blocked_sums()` and XLA's own ReLU and add), timed
  alternately (on, off, on, off, ...) so that this VM's drifting speed hits both.

    python benchmarks/cpu_norm_act.py resnet20 --batch-size 128 --rounds 10 [--out FILE.json]

prints milliseconds (medians) and, with --out, saves them with the date, device and versions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import results_file  # benchmarks/results_file.py, beside this script

from cnnjax import batchnorm, bench, cpu_kernels, distributed, xla_options


def _median_ms(fn, *args, repeats: int = 30) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def layer_times(shape: tuple[int, ...]) -> dict[str, float]:
    """Forward (residual + ReLU) and backward of one batch norm, native against XLA, in ms."""
    rng = np.random.default_rng(0)
    x, r, g = (jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(3))
    c = shape[-1]
    scale, bias, zero = jnp.ones(c), jnp.zeros(c), jnp.zeros(c)
    out, mean, var = cpu_kernels.norm_act(x, scale, bias, r, 1e-5, True)
    inv = jax.lax.rsqrt(var + 1e-5)
    native_fwd = jax.jit(lambda x, r: cpu_kernels.norm_act(x, scale, bias, r, 1e-5, True))
    native_bwd = jax.jit(lambda x, out, g: cpu_kernels.norm_act_backward(
        x, out, g, mean, inv, scale, bias, zero, zero, relu=True, residual=True))
    # Without a residual (a block's first batch norm) the kernel takes the ReLU's mask from x.
    out1, mean1, var1 = cpu_kernels.norm_act(x, scale, bias, None, 1e-5, True)
    inv1 = jax.lax.rsqrt(var1 + 1e-5)
    native_bwd1 = jax.jit(lambda x, out, g: cpu_kernels.norm_act_backward(
        x, out, g, mean1, inv1, scale, bias, zero, zero, relu=True, residual=False))
    with batchnorm.blocked_sums():
        xla_fwd = jax.jit(lambda x, r: batchnorm._norm_act_xla(x, scale, bias, r, 1e-5, True),
                          compiler_options=xla_options.CPU_OPTIONS)

        def backward(x, out, g):
            masked = jnp.where(out > 0, g, 0.0)
            return batchnorm._input_gradient(x, masked, mean, inv, scale, zero, zero) + (masked,)

        def backward1(x, out, g):
            masked = jnp.where(out > 0, g, 0.0)
            return batchnorm._input_gradient(x, masked, mean1, inv1, scale, zero, zero)

        xla_bwd = jax.jit(backward, compiler_options=xla_options.CPU_OPTIONS)
        xla_bwd1 = jax.jit(backward1, compiler_options=xla_options.CPU_OPTIONS)
    return {"native_forward_ms": _median_ms(native_fwd, x, r),
            "xla_forward_ms": _median_ms(xla_fwd, x, r),
            "native_backward_ms": _median_ms(native_bwd, x, out, g),
            "xla_backward_ms": _median_ms(xla_bwd, x, out, g),
            "native_backward_no_residual_ms": _median_ms(native_bwd1, x, out1, g),
            "xla_backward_no_residual_ms": _median_ms(xla_bwd1, x, out1, g)}


def step_times(model: str, batch_size: int, image_size: int, rounds: int) -> dict[str, list[float]]:
    """Train step ms with the native op and without, alternating, `rounds` rounds of 3 steps."""
    mesh = distributed.make_mesh()

    def compiled():
        parts = bench.build(model, batch_size=batch_size, image_size=image_size, precision="fp32",
                            mesh=mesh)
        batch = bench.synthetic_batch(batch_size, image_size, parts["spec"].in_channels,
                                      parts["spec"].num_classes, mesh)
        return parts["train"].lower(parts["state"], batch).compile(), parts["state"], batch

    runs = {"native": compiled()}
    with mock.patch.object(batchnorm, "_native", lambda *args: False):
        runs["xla"] = compiled()
    states = {name: run[1] for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, (step, _, batch) in runs.items():
            state = states[name]
            start = time.perf_counter()
            for _ in range(3):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            states[name] = state
            if round_:
                times[name].append((time.perf_counter() - start) / 3 * 1000)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", help="save the numbers as JSON here")
    args = parser.parse_args(argv)
    results_file.refuse_existing(args.out)
    if not cpu_kernels.available():
        raise SystemExit("cnnjax's CPU kernels are not available here (no C++ compiler, or "
                         "CNNJAX_CPU_NATIVE=off); nothing to compare.")
    shapes = [(args.batch_size, args.image_size // 2**i, args.image_size // 2**i, 16 * 2**i)
              for i in range(3)]
    layers = {"x".join(map(str, s)): layer_times(s) for s in shapes}
    for name, t in layers.items():
        print(f"{name}: forward native {t['native_forward_ms']:.2f} ms, XLA "
              f"{t['xla_forward_ms']:.2f} ms; backward native {t['native_backward_ms']:.2f} ms, "
              f"XLA {t['xla_backward_ms']:.2f} ms; without residual "
              f"{t['native_backward_no_residual_ms']:.2f} ms, XLA "
              f"{t['xla_backward_no_residual_ms']:.2f} ms")
    steps = step_times(args.model, args.batch_size, args.image_size, args.rounds)
    for name, values in steps.items():
        print(f"{args.model} b{args.batch_size} train step, {name}: median "
              f"{statistics.median(values):.1f} ms, min {min(values):.1f} ms")
    if args.out:
        results_file.save_new(args.out, args=vars(args), layers=layers, steps=steps)


if __name__ == "__main__":
    main()
