"""Throughput benchmark of one model's train and eval steps: compile time, images/s, step time, MFU, memory.

    python -m cnnjax.bench resnet20 --batch-size 128 --steps 20 --compare-torch

Synthetic data lives on the device so the input pipeline is not what is measured (`--data` times the
real pipeline end to end). The train step is the engine's own (`cnnjax.train.step.compile_steps`) with
SGD + momentum, so a number here is what a training run gets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import distributed, models, profile, trace_ops, xla_options
from cnnjax.train import losses, optim
from cnnjax.train import state as train_state
from cnnjax.train import step as train_step_lib

PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
WARMUP_STEPS = 2
# The peak matmul: big enough to saturate an H100 (about 1 TFLOP a call), small enough for 2 CPU cores.
PEAK_MATMUL_SIZE = {"gpu": 8192, "tpu": 8192, "cpu": 2048}


def peak_flops(repeats: int = 5) -> tuple[float, str]:
    """FLOP/s of one large square matmul on device 0 (bf16 on accelerators, fp32 on CPU), best of repeats."""
    platform = jax.devices()[0].platform
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    n = PEAK_MATMUL_SIZE.get(platform, 4096)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - start)
    # The peak is a ceiling, so the fastest repeat is the best estimate of it.
    return 2 * n**3 / min(times), f"{jnp.dtype(dtype).name} {n}x{n} matmul"


def time_loop(run_once: Callable[[], Any], steps: int, repeats: int) -> list[float]:
    """Seconds per step of `repeats` rounds of `steps` calls, each round waited for on the device."""
    per_step = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(steps):
            out = run_once()
        jax.block_until_ready(out)
        per_step.append((time.perf_counter() - start) / steps)
    return per_step


def synthetic_batch(batch_size: int, image_size: int, channels: int, num_classes: int, mesh) -> dict:
    """A fixed random batch already split over the mesh's "data" devices."""
    rng = np.random.default_rng(0)
    host = {
        "image": rng.standard_normal((batch_size, image_size, image_size, channels), np.float32),
        "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
        "mask": np.ones(batch_size, bool),
    }
    return jax.device_put(host, distributed.batch_sharded(mesh))


def build(name: str, *, batch_size: int, image_size: int, precision: str, mesh) -> dict:
    """Model, SGD optimiser, train state and the engine's jitted train/eval steps for one benchmark."""
    spec = models.get_spec(name)
    model = models.create_model(name, dtype=PRECISIONS[precision])
    opt_cfg = optim.optimizer_config()  # SGD, momentum 0.9, lr 0.1, constant
    tx, schedule = optim.make_optimizer(opt_cfg, steps_per_epoch=100, num_epochs=1)
    input_shape = (image_size, image_size, spec.in_channels)
    start = time.perf_counter()  # a jitted init: for deep nets its compile is a cost of its own
    state = train_state.create_train_state(model, tx, seed=0, input_shape=input_shape, mesh=mesh)
    init_seconds = time.perf_counter() - start
    options = xla_options.step_options(mesh, train_state.count_params(state.params))
    train, evaluate = train_step_lib.compile_steps(
        mesh, compiler_options=options, model=model, tx=tx, schedule=schedule,
        loss_cfg=losses.loss_config(), num_classes=spec.num_classes)
    return dict(spec=spec, model=model, state=state, train=train, evaluate=evaluate,
                input_shape=input_shape, compiler_options=options, init_seconds=init_seconds)


def compile_seconds(fn, *args) -> tuple[float, float, Any]:
    """(trace+lower seconds, XLA compile seconds, compiled executable) of a jitted function."""
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at, compiled


def memory_report(compiled) -> dict[str, Any]:
    """Peak device memory where the runtime reports it, and XLA's static estimate of the train step."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    analysis = compiled.memory_analysis()
    static = None
    if analysis is not None:
        static = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                     + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    return {"peak_memory_bytes": int(peak) if peak is not None else "n/a",
            "train_step_static_bytes": static if static is not None else "n/a"}


def _data_pipeline(dataset: str, path: str, *, image_size: int, channels: int, batch_size: int,
                   mesh):
    from cnnjax.data import build_pipeline, data_config

    cfg = data_config()
    cfg.name, cfg.path = dataset, path
    cfg.augment.random_crop_padding = max(1, image_size // 8)
    cfg.augment.hflip = channels == 3  # flipping digits makes other digits; keep it for RGB
    return build_pipeline(cfg, image_size=image_size, channels=channels,
                          global_batch_size=batch_size, mesh=mesh, seed=0)


def _rates(per_step: list[float], batch_size: int) -> dict[str, float]:
    median = statistics.median(per_step)
    return {"images_per_second": batch_size / median, "step_seconds": median,
            "step_seconds_min": min(per_step), "step_seconds_max": max(per_step)}


def run_benchmark(
    name: str,
    *,
    batch_size: int = 128,
    image_size: int | None = None,
    precision: str = "fp32",
    steps: int = 20,
    repeats: int = 5,
    data: str = "",
    data_path: str = "",
    compile_only: bool = False,
    profile_ops: bool = False,
) -> dict[str, Any]:
    """Every measurement of one model as a flat JSON-ready dict (see README "Benchmarks")."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
    if batch_size < 1 or steps < 1 or repeats < 1:
        raise ValueError("--batch-size, --steps and --repeats must be >= 1")
    mesh = distributed.make_mesh()
    if batch_size % mesh.size:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the {mesh.size} devices")
    spec = models.get_spec(name)
    size = spec.input_size if image_size is None else image_size
    parts = build(name, batch_size=batch_size, image_size=size, precision=precision, mesh=mesh)
    batch = synthetic_batch(batch_size, size, spec.in_channels, spec.num_classes, mesh)
    state = parts["state"]
    device = jax.devices()[0]
    result: dict[str, Any] = {
        "model": name, "batch_size": batch_size, "image_size": size, "precision": precision,
        "device": f"{device.platform}:{device.device_kind}", "num_devices": mesh.size,
        "jax": jax.__version__, "params": train_state.count_params(state.params),
        "xla_compiler_options": parts["compiler_options"],
        "init_seconds": parts["init_seconds"],  # trace, compile and run of the state's init
    }
    lower_s, compile_s, train_compiled = compile_seconds(parts["train"], state, batch)
    result |= {"trace_seconds": lower_s, "compile_seconds": compile_s}
    _, eval_compile_s, eval_compiled = compile_seconds(parts["evaluate"], state, batch)
    result["eval_compile_seconds"] = eval_compile_s
    if compile_only:
        return result | memory_report(train_compiled)
    holder = {"state": state}

    def train_once():
        holder["state"], metrics = train_compiled(holder["state"], batch)
        return metrics["loss"]

    for _ in range(WARMUP_STEPS):
        jax.block_until_ready(train_once())
    train = _rates(time_loop(train_once, steps, repeats), batch_size)
    result |= {f"train_{k}": v for k, v in train.items()}
    evaluate = _rates(time_loop(lambda: eval_compiled(holder["state"], batch), steps, repeats),
                      batch_size)
    result |= {f"eval_{k}": v for k, v in evaluate.items()}
    flops = profile.profile_module(parts["model"], parts["input_shape"])["flops"]
    peak, peak_how = peak_flops()
    result |= {"forward_flops_per_image": flops, "peak_flops": peak, "peak_measured_by": peak_how,
               "mfu": 3 * flops * train["images_per_second"] / peak}
    result |= memory_report(train_compiled)
    if profile_ops:
        result["op_profile"] = trace_ops.op_times(train_once, steps, train_compiled.as_text())
    if data:
        result |= _time_with_pipeline(parts, holder, data, data_path, size, spec.in_channels,
                                      batch_size, steps, repeats, mesh)
    return result


def _time_with_pipeline(parts, holder, dataset, path, size, channels, batch_size, steps, repeats,
                        mesh) -> dict[str, Any]:
    """End-to-end train images/s with the real input pipeline feeding the (jitted) train step."""
    pipeline = _data_pipeline(dataset, path, image_size=size, channels=channels,
                              batch_size=batch_size, mesh=mesh)
    batches = pipeline.train_batches(0)
    train = parts["train"]  # jit, not the AOT executable: pipeline batches carry their own keys

    def once():
        holder["state"], metrics = train(holder["state"], next(batches))
        return metrics["loss"]

    for _ in range(WARMUP_STEPS):
        jax.block_until_ready(once())
    rates = _rates(time_loop(once, steps, repeats), batch_size)
    return {"data": dataset, "data_resident": pipeline.resident,
            **{f"data_train_{k}": v for k, v in rates.items()}}


# Runs the torch benchmark in a fresh process and prints its result (or the error) as JSON.
_TORCH_CHILD = """
import json, sys
try:
    import cnnjax
    from cnnjax import bench_torch
    out = bench_torch.run_torch_benchmark(**json.loads(sys.argv[1]))
    print(json.dumps(out | {"under_malloc_setting": cnnjax.RETAINS_FREED_MEMORY}))
except ImportError as err:
    print(json.dumps({"import_error": str(err)}))
except ValueError as err:
    print(json.dumps({"value_error": str(err)}))
"""
TORCH_PROCESSES = ("same", "separate")


def _torch_in_fresh_process(kwargs: dict[str, Any]) -> dict[str, Any]:
    """run_torch_benchmark(**kwargs) in a new Python process with CNNJAX_CPU_MALLOC=off: torch as
    installed, under glibc's defaults rather than this process's malloc setting
    (cnnjax/host_memory.py). Raises ImportError or ValueError as the call there did."""
    env = dict(os.environ, CNNJAX_CPU_MALLOC="off")
    done = subprocess.run([sys.executable, "-c", _TORCH_CHILD, json.dumps(kwargs)], env=env,
                          capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the torch benchmark process failed: {last}")
    out = json.loads(lines[-1])
    if "import_error" in out:
        raise ImportError(out["import_error"])
    if "value_error" in out:
        raise ValueError(out["value_error"])
    return out


def compare_torch(result: dict[str, Any], *, steps: int, repeats: int,
                  modes: tuple[str, ...] = ("eager", "compile"),
                  process: str = "same") -> dict[str, Any]:
    """Adds the PyTorch equivalent's numbers and the cnnjax/torch train throughput ratio. process
    "same" times torch in this process (under cnnjax's malloc setting, which speeds torch's CPU
    steps too), "separate" in a fresh one with glibc's defaults (torch as installed)."""
    if process not in TORCH_PROCESSES:
        raise ValueError(f"--torch-process {process!r} unknown; use one of "
                         f"{', '.join(TORCH_PROCESSES)}")
    spec = models.get_spec(result["model"])
    kwargs = dict(name=result["model"], batch_size=result["batch_size"],
                  image_size=result["image_size"], in_channels=spec.in_channels,
                  num_classes=spec.num_classes, precision=result["precision"], steps=steps,
                  repeats=repeats, modes=list(modes))  # a list: JSON for the fresh process
    if process == "separate":
        torch_result = _torch_in_fresh_process(kwargs)
    else:
        import cnnjax
        from cnnjax import bench_torch

        torch_result = bench_torch.run_torch_benchmark(**kwargs)
        torch_result["under_malloc_setting"] = cnnjax.RETAINS_FREED_MEMORY
    out = {f"torch_{k}": v for k, v in torch_result.items()} | {"torch_process": process}
    best = torch_result.get("best_train_images_per_second")
    if best and "train_images_per_second" in result:
        out["ratio_vs_torch"] = result["train_images_per_second"] / best
    return out


def with_torch(result: dict[str, Any], compare: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`result` plus `compare()`'s PyTorch numbers, or "torch_skipped" saying why there are none
    (torch not installed, no torch equivalent of the model, or its own process failed)."""
    try:
        return result | compare()
    except ImportError as err:
        return result | {"torch_skipped": f"torch not importable: {err}"}
    except (ValueError, RuntimeError) as err:  # no torch equivalent here; its process failed
        return result | {"torch_skipped": str(err)}


def format_report(r: dict[str, Any]) -> str:
    """The human-readable summary printed without --json."""
    lines = [f"{r['model']} @ {r['image_size']}px, batch {r['batch_size']}, {r['precision']}, "
             f"{r['device']} x{r['num_devices']}, {r['params']:,} params",
             f"  compile: trace {r['trace_seconds']:.2f} s + XLA {r['compile_seconds']:.2f} s "
             f"(eval step {r['eval_compile_seconds']:.2f} s, state init {r['init_seconds']:.2f} s), "
             "XLA options "
             f"{r.get('xla_compiler_options') or 'default'}"]
    if "train_images_per_second" in r:
        lines += [
            f"  train: {r['train_images_per_second']:,.1f} images/s, step "
            f"{r['train_step_seconds'] * 1e3:.2f} ms (min {r['train_step_seconds_min'] * 1e3:.2f}, "
            f"max {r['train_step_seconds_max'] * 1e3:.2f})",
            f"  eval:  {r['eval_images_per_second']:,.1f} images/s, step "
            f"{r['eval_step_seconds'] * 1e3:.2f} ms",
            f"  MFU {100 * r['mfu']:.1f}% (fwd {r['forward_flops_per_image'] / 1e6:.1f} MFLOP/image, "
            f"peak {r['peak_flops'] / 1e12:.3f} TFLOP/s by {r['peak_measured_by']})"]
    lines.append(f"  memory: peak {r['peak_memory_bytes']}, train step (XLA estimate) "
                 f"{r['train_step_static_bytes']} bytes")
    if "data_train_images_per_second" in r:
        lines.append(f"  with pipeline ({r['data']}, resident={r['data_resident']}): "
                     f"{r['data_train_images_per_second']:,.1f} images/s")
    where = ", own process" if r.get("torch_process") == "separate" else ""
    for mode in ("eager", "compile"):
        if f"torch_{mode}_train_images_per_second" in r:
            lines.append(f"  torch {mode} ({r['torch_source']}{where}): "
                         f"train {r[f'torch_{mode}_train_images_per_second']:,.1f} images/s, "
                         f"eval {r[f'torch_{mode}_eval_images_per_second']:,.1f} images/s")
        elif f"torch_{mode}_error" in r:
            lines.append(f"  torch {mode}: failed ({r[f'torch_{mode}_error']})")
    if "op_profile" in r:
        lines += trace_ops.format_op_times(r["op_profile"])
    if "ratio_vs_torch" in r:
        lines.append(f"  cnnjax / best torch train throughput: {r['ratio_vs_torch']:.2f}x")
    elif "torch_skipped" in r:
        lines.append(f"  torch: skipped ({r['torch_skipped']})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cnnjax.bench", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="registry name, e.g. resnet50")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's own")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--data", nargs="?", const="digits", default="",
                        help="also time end to end with the real pipeline (default dataset: digits)")
    parser.add_argument("--data-path", default="", help="folder for --data idx/npz/folder")
    parser.add_argument("--compare-torch", action="store_true",
                        help="time the PyTorch equivalent in the same process")
    parser.add_argument("--torch-modes", default="eager,compile",
                        help="comma list of eager, compile (torch.compile)")
    parser.add_argument("--torch-process", default="same", choices=list(TORCH_PROCESSES),
                        help="same: torch in this process, under cnnjax's CPU malloc setting; "
                             "separate: a fresh process with glibc's defaults (torch as installed)")
    parser.add_argument("--compile-only", action="store_true", help="measure compile time only")
    parser.add_argument("--profile", action="store_true",
                        help="also trace --steps train steps with jax.profiler: time per op kind")
    parser.add_argument("--compile-cache", default="",
                        help="persistent compilation cache dir (default: off, so compile is cold)")
    return parser.parse_args(argv)


def emit(measure: Callable[[], dict[str, Any]], as_json: bool,
         report: Callable[[dict[str, Any]], str]) -> int:
    """A benchmark CLI's ending: print `measure()` as one JSON object or as `report`'s text and
    return 0, or print a bad input's one-line error (a ValueError) and return 2."""
    try:
        result = measure()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result) if as_json else report(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_cache:
        from cnnjax.compile_cache import enable_compilation_cache

        enable_compilation_cache(args.compile_cache)

    def measure() -> dict[str, Any]:
        result = run_benchmark(
            args.model, batch_size=args.batch_size, image_size=args.image_size,
            precision=args.precision, steps=args.steps, repeats=args.repeats, data=args.data,
            data_path=args.data_path, compile_only=args.compile_only, profile_ops=args.profile)
        if not args.compare_torch or args.compile_only:
            return result
        modes = tuple(m for m in args.torch_modes.split(",") if m)
        return with_torch(result, lambda: compare_torch(
            result, steps=args.steps, repeats=args.repeats, modes=modes,
            process=args.torch_process))

    return emit(measure, args.json, format_report)


if __name__ == "__main__":
    sys.exit(main())
