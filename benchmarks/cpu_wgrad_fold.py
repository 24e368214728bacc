"""CPU experiment: does a batch-folded weight gradient beat XLA:CPU's own? (not used by cnnjax)

XLA:CPU computes a convolution's weight gradient as a convolution over the input transposed from
NHWC to CHWN. In a ResNet that transpose fuses the recomputation of the whole batch-norm and residual
chain that produced the input, and reads it with a stride of one image (64 KiB at 32x32x16 fp32),
so it is the largest cost of resnet20's train step on CPU (benchmarks/RESULTS.md).

Here every convolution gets a custom VJP whose weight gradient folds the batch into the height
axis: the padded input becomes one image of N * Hp rows, the output gradient is laid on the same
rows with zeros where a window would straddle two images, and the weight gradient is that of a
VALID convolution over the folded image. The transpose XLA then needs moves only the channel
axis. The input gradient is unchanged.

    python benchmarks/cpu_wgrad_fold.py resnet20 --batch-size 128 --image-size 32

prints the train step time with XLA's weight gradient and with the folded one, alternating
(base, fold, base, fold) so that load drifts hit both.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import jax
import jax.numpy as jnp
from jax import lax

from cnnjax import bench, distributed

_XLA_CONV = lax.conv_general_dilated
_DN = ("NHWC", "HWIO", "NHWC")
options: dict = {}  # the engine's XLA compiler options for the model (cnnjax.xla_options)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def folded_conv(x, w, stride, pads):
    return _XLA_CONV(x, w, (stride, stride), pads, dimension_numbers=_DN)


def _fwd(x, w, stride, pads):
    return folded_conv(x, w, stride, pads), (x, w)


def _bwd(stride, pads, residuals, dy):
    x, w = residuals
    dx = jax.vjp(lambda x: _XLA_CONV(x, w, (stride, stride), pads, dimension_numbers=_DN), x)[1](dy)[0]
    n, kh = x.shape[0], w.shape[0]
    hp = x.shape[1] + pads[0][0] + pads[0][1]
    extra = -hp % stride  # each image's rows start on a stride boundary of the folded image
    xp = jnp.pad(x, ((0, 0), (pads[0][0], pads[0][1] + extra), pads[1], (0, 0)))
    hp += extra
    folded = xp.reshape(1, n * hp, xp.shape[2], xp.shape[3])
    rows_per_image, rows = hp // stride, (n * hp - kh) // stride + 1
    dy_folded = jnp.pad(dy, ((0, 0), (0, rows_per_image - dy.shape[1]), (0, 0), (0, 0)))
    dy_folded = dy_folded.reshape(1, n * rows_per_image, dy.shape[2], dy.shape[3])[:, :rows]
    conv = functools.partial(_XLA_CONV, folded, window_strides=(stride, stride), padding="VALID",
                             dimension_numbers=_DN)
    dw = jax.vjp(conv, w)[1](dy_folded)[0]
    return dx, dw


folded_conv.defvjp(_fwd, _bwd)


def _conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
          dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
          preferred_element_type=None):
    """lax.conv_general_dilated, folded where it can be (square stride, explicit padding, no
    dilation or groups, a kernel larger than 1x1)."""
    plain = (lhs.ndim == 4 and window_strides[0] == window_strides[1]
             and not isinstance(padding, str) and feature_group_count == batch_group_count == 1
             and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and rhs.shape[0] * rhs.shape[1] > 1)
    if plain:
        return folded_conv(lhs, rhs, window_strides[0], tuple(tuple(p) for p in padding))
    return _XLA_CONV(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count, precision,
                     preferred_element_type)


def check_gradients() -> float:
    """Largest relative difference between the folded and XLA's gradients over a few shapes."""
    worst = 0.0
    for size, kernel, stride, pad in ((12, 3, 1, 1), (12, 3, 2, 1), (11, 3, 2, 1), (9, 5, 1, 0),
                                      (13, 7, 2, 3)):
        x = jax.random.normal(jax.random.PRNGKey(size), (3, size, size, 4))
        w = jax.random.normal(jax.random.PRNGKey(kernel), (kernel, kernel, 4, 5))
        pads = ((pad, pad), (pad, pad))

        def loss(conv, x, w, stride=stride, pads=pads):
            return (conv(x, w, stride, pads) ** 2).sum()

        def xla(x, w, stride, pads):
            return _XLA_CONV(x, w, (stride, stride), pads, dimension_numbers=_DN)

        for a, b in zip(jax.grad(functools.partial(loss, xla), (0, 1))(x, w),
                        jax.grad(functools.partial(loss, folded_conv), (0, 1))(x, w), strict=True):
            worst = max(worst, float(jnp.abs(a - b).max() / jnp.abs(a).max()))
    return worst


def step_seconds(model: str, batch_size: int, image_size: int, steps: int, repeats: int) -> float:
    mesh = distributed.make_mesh()
    parts = bench.build(model, batch_size=batch_size, image_size=image_size, precision="fp32",
                        mesh=mesh)
    spec = parts["spec"]
    batch = bench.synthetic_batch(batch_size, image_size, spec.in_channels, spec.num_classes, mesh)
    train = parts["train"].lower(parts["state"], batch).compile()
    global options
    options = parts["compiler_options"]
    holder = {"state": parts["state"]}

    def once():
        holder["state"], metrics = train(holder["state"], batch)
        return metrics["loss"]

    for _ in range(bench.WARMUP_STEPS):
        jax.block_until_ready(once())
    return statistics.median(bench.time_loop(once, steps, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"folded gradients vs XLA's: max relative difference {check_gradients():.1e}")
    for _ in range(args.rounds):
        for variant in ("xla", "folded"):
            # flax's Conv looks lax.conv_general_dilated up at call time, so this swaps every conv.
            lax.conv_general_dilated = _conv if variant == "folded" else _XLA_CONV
            jax.clear_caches()
            seconds = step_seconds(args.model, args.batch_size, args.image_size, args.steps,
                                   args.repeats)
            print(f"{args.model} batch {args.batch_size} @{args.image_size}px, {variant} weight "
                  f"gradient: step {1e3 * seconds:.1f} ms, {args.batch_size / seconds:,.1f} images/s "
                  f"(XLA options {options or 'default'})", flush=True)
    lax.conv_general_dilated = _XLA_CONV


if __name__ == "__main__":
    main()
