"""CPU benchmark: compile time of a train state's jitted init, as jax.jit makes it and as cnnjax does.

A state init is almost all threefry bit generation, one rolled loop per parameter tensor. The
engine (`state.jit_init`) batches the draws (`init_batching`: one hash loop per wave of keys) and
compiles at `xla_options.init_options` (-O1 on CPU). For each model this traces and compiles three
ways: "batched" (batched at -O1, what jit_init does; first, so it meets jax's cold caches and the
later traces are a little quicker), "init_options" (plain jit at -O1) and "default" (plain jit at
XLA's LLVM -O2); runs each once; and checks that the parameters, batch statistics and optimizer
state agree bit for bit.

    python benchmarks/init_compile.py lenet5 resnet20 densenet121 [--image-size 64] [--out F.json]

Models run at their CIFAR/MNIST size where they have one (lenet5, resnet20, ...), else at
--image-size. --out saves the numbers with the date, device and versions and never overwrites.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import optax
import results_file  # benchmarks/results_file.py, beside this script

from cnnjax import distributed, models, xla_options
from cnnjax.train import init_batching
from cnnjax.train import state as train_state

VARIANT_OPTIONS = xla_options.INIT_CPU_OPTIONS
SMALL_INPUT = {"lenet5": 32, "resnet20": 32, "resnet32": 32, "resnet56": 32, "densenet_bc100": 32}


def measure(name: str, image_size: int) -> dict:
    spec = models.get_spec(name)
    size = SMALL_INPUT.get(name, image_size)

    def fresh_init():  # a new function each time, so no variant reuses another's trace
        return train_state.init_fn(models.create_model(name), optax.sgd(0.1, momentum=0.9),
                                   (size, size, spec.in_channels), False)

    replicated = distributed.replicated(distributed.make_mesh())
    row, leaves = {"model": name, "image_size": size}, []
    for label, fn, options in (("batched", init_batching.batch_random(fresh_init()), VARIANT_OPTIONS),
                               ("init_options", fresh_init(), VARIANT_OPTIONS),
                               ("default", fresh_init(), {})):
        start = time.perf_counter()
        lowered = jax.jit(fn, out_shardings=replicated).lower(jax.random.PRNGKey(0))
        traced_at = time.perf_counter()
        compiled = lowered.compile(options)
        compiled_at = time.perf_counter()
        out = jax.block_until_ready(compiled(jax.random.PRNGKey(0)))
        row[f"{label}_trace_s"] = round(traced_at - start, 3)
        row[f"{label}_compile_s"] = round(compiled_at - traced_at, 3)
        row[f"{label}_run_s"] = round(time.perf_counter() - compiled_at, 3)
        leaves.append([np.asarray(x) for x in jax.tree.leaves(out)])
    row["identical"] = all(np.array_equal(a, b) for other in leaves[1:]
                           for a, b in zip(leaves[0], other, strict=True))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="registry names, e.g. lenet5 resnet20")
    parser.add_argument("--image-size", type=int, default=64, help="for models without a small size")
    parser.add_argument("--out", help="save the numbers as JSON here")
    args = parser.parse_args()
    results_file.refuse_existing(args.out)
    if jax.default_backend() != "cpu":
        raise SystemExit("init_compile.py measures the CPU init options; run it on a CPU backend")
    unknown = [m for m in args.models if m not in models.list_models()]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; see cnnjax.models.list_models()")
    rows = []
    for name in args.models:
        rows.append(measure(name, args.image_size))
        r = rows[-1]
        print(f"{name}@{r['image_size']}: " + "; ".join(
            f"{label} trace {r[label + '_trace_s']:.2f} + compile {r[label + '_compile_s']:.2f} s"
            f" (run {r[label + '_run_s']:.2f})" for label in ("batched", "init_options", "default"))
            + f"; identical {r['identical']}", flush=True)
    if args.out:
        results_file.save_new(args.out, options=xla_options.INIT_CPU_OPTIONS, rows=rows)
    else:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
