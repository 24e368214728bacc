"""CPU benchmark: one model's whole train step, cnnjax against torch, timed in turn in one process.

`python -m cnnjax.bench MODEL --compare-torch` times cnnjax's step, then torch's: on a VM whose speed
drifts by 25% within minutes (the 2-core development machine), the two halves can land in different
phases. Here both steps are built once and timed in alternating blocks (cnnjax, torch, cnnjax,
torch, ...), each block one unmeasured step (the other library's threads settle: torch's OpenMP
threads spin for a while after their last task) then `--steps` timed ones; medians of `--rounds`
blocks. cnnjax's step is the engine's (SGD with momentum, synthetic device-resident batch, as in
cnnjax.bench); torch's is the same model from cnnjax/bench_torch.py in channels_last, SGD momentum
0.9, lr 0.1, cross-entropy, `torch.compile`d (or eager with `--torch-mode eager`), on one thread
per core.

    python benchmarks/cpu_step_vs_torch.py resnet20 --batch-size 128 --rounds 10 [--out FILE.json] [--json]

Needs torch (a benchmark-only dependency); --out saves the numbers with the date, device and
versions and never overwrites an existing file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import jax
import results_file  # benchmarks/results_file.py, beside this script

from cnnjax import bench, distributed, models


def _cnnjax_step(name: str, batch: int, size: int) -> Callable[[], None]:
    mesh = distributed.make_mesh()
    parts = bench.build(name, batch_size=batch, image_size=size, precision="fp32", mesh=mesh)
    spec = parts["spec"]
    data = bench.synthetic_batch(batch, size, spec.in_channels, spec.num_classes, mesh)
    compiled = parts["train"].lower(parts["state"], data).compile()
    state = [parts["state"]]

    def step() -> None:
        state[0], metrics = compiled(state[0], data)
        jax.block_until_ready(metrics)

    return step


def _torch_step(torch, name: str, batch: int, size: int, mode: str) -> Callable[[], None]:
    from cnnjax.bench_torch import build_torch_model  # imports torch: only once it is needed

    spec = models.get_spec(name)
    model, _ = build_torch_model(name, num_classes=spec.num_classes, in_channels=spec.in_channels)
    model = model.to(memory_format=torch.channels_last).train()
    net = torch.compile(model) if mode == "compile" else model
    x = torch.randn(batch, spec.in_channels, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def alternating_ms(steps: dict[str, Callable[[], None]], rounds: int, per_block: int
                   ) -> dict[str, list[float]]:
    """ms per step of each of `steps`, one block of `per_block` steps each in turn, `rounds` times;
    every block starts with one unmeasured step."""
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            step()
            start = time.perf_counter()
            for _ in range(per_block):
                step()
            times[key].append((time.perf_counter() - start) / per_block * 1000)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model with a torch twin in cnnjax/bench_torch.py, e.g. resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's own")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block")
    parser.add_argument("--torch-mode", choices=("compile", "eager"), default="compile")
    parser.add_argument("--out", help="save the numbers as JSON here")
    parser.add_argument("--json", action="store_true",
                        help="also print the numbers as one JSON line (what benchmarks/run.py reads)")
    args = parser.parse_args(argv)
    results_file.refuse_existing(args.out)
    try:
        import torch
    except ImportError:
        raise SystemExit("torch is not importable; `pip install torch` to compare against it.") \
            from None
    if jax.default_backend() != "cpu":
        raise SystemExit(f"this compares CPU steps; JAX runs on {jax.default_backend()} here "
                         "(set JAX_PLATFORMS=cpu).")
    torch.set_num_threads(os.cpu_count() or 1)
    size = args.image_size or models.get_spec(args.model).input_size
    try:
        torch_step = _torch_step(torch, args.model, args.batch_size, size, args.torch_mode)
    except ValueError as e:  # no torch twin of this model
        raise SystemExit(str(e)) from None
    steps = {"cnnjax": _cnnjax_step(args.model, args.batch_size, size), "torch": torch_step}
    for step in steps.values():  # compiles (XLA, torch.compile) and warms up
        for _ in range(3):
            step()
    times = alternating_ms(steps, args.rounds, args.steps)
    ours, theirs = statistics.median(times["cnnjax"]), statistics.median(times["torch"])
    print(f"{args.model} @ {size}px, batch {args.batch_size}, {args.rounds} alternating rounds: "
          f"cnnjax {ours:.1f} ms, torch {args.torch_mode} {theirs:.1f} ms per train step; "
          f"cnnjax / torch throughput {theirs / ours:.3f}x")
    numbers = dict(model=args.model, batch_size=args.batch_size, image_size=size,
                   rounds=args.rounds, torch_mode=args.torch_mode, cnnjax_ms=times["cnnjax"],
                   torch_ms=times["torch"], cnnjax_median_ms=ours, torch_median_ms=theirs,
                   throughput_ratio=theirs / ours)
    if args.out:
        results_file.save_new(args.out, torch=torch.__version__, torch_threads=torch.get_num_threads(),
                              args=vars(args), **numbers)
    if args.json:
        print(json.dumps(numbers))


if __name__ == "__main__":
    main()
