"""CPU benchmark: compile time of a train state's jitted init at XLA's default (LLVM -O2) and at -O1.

A state init is almost all threefry bit generation, one rolled loop per parameter tensor; the
engine compiles it with `xla_options.init_options` (-O1 on CPU). For each model this lowers the
init once, compiles it at both levels, runs each once, and checks that the parameters, batch
statistics and optimizer state agree bit for bit.

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
from cnnjax.train import state as train_state

SMALL_INPUT = {"lenet5": 32, "resnet20": 32, "resnet32": 32, "resnet56": 32, "densenet_bc100": 32}


def measure(name: str, image_size: int) -> dict:
    spec = models.get_spec(name)
    size = SMALL_INPUT.get(name, image_size)
    init = train_state.init_fn(models.create_model(name), optax.sgd(0.1, momentum=0.9),
                               (size, size, spec.in_channels), False)
    mesh = distributed.make_mesh()
    lowered = jax.jit(init, out_shardings=distributed.replicated(mesh)).lower(jax.random.PRNGKey(0))
    row, leaves = {"model": name, "image_size": size}, []
    for label, options in (("default", {}), ("init_options", xla_options.INIT_CPU_OPTIONS)):
        start = time.perf_counter()
        compiled = lowered.compile(options)
        compiled_at = time.perf_counter()
        out = jax.block_until_ready(compiled(jax.random.PRNGKey(0)))
        row[f"{label}_compile_s"] = round(compiled_at - start, 3)
        row[f"{label}_run_s"] = round(time.perf_counter() - compiled_at, 3)
        leaves.append([np.asarray(x) for x in jax.tree.leaves(out)])
    row["identical"] = all(np.array_equal(a, b) for a, b in zip(*leaves, strict=True))
    row["speedup"] = round(row["default_compile_s"] / row["init_options_compile_s"], 2)
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
        print(f"{name}@{r['image_size']}: compile {r['default_compile_s']:.2f} s at -O2, "
              f"{r['init_options_compile_s']:.2f} s at -O1 ({r['speedup']:.2f}x); run "
              f"{r['default_run_s']:.2f} / {r['init_options_run_s']:.2f} s; identical {r['identical']}",
              flush=True)
    if args.out:
        results_file.save_new(args.out, options=xla_options.INIT_CPU_OPTIONS, rows=rows)
    else:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
