"""One training epoch of a CIFAR-size net through the device-resident input path, against PyTorch.

    python -m cnnjax.bench_epoch resnet20 --batch-size 512 --precision bf16 --compare-torch
    python -m cnnjax.bench_epoch resnet18 --num-train 4096 --epochs 1 --json   # a quick look

The issue's CIFAR target: an epoch of 50,000 32x32 images, augmentation included, faster than the
compiled PyTorch equivalent with its data on the GPU. cnnjax's side is the real pipeline
(`cnnjax.data.Pipeline` with the training set resident on the device: a per-epoch permutation,
the gather, 4-pixel-padded random crops and horizontal flips, normalisation) feeding the engine's
jitted train step. The data are random uint8 images, so no download is needed and the numbers
measure only the input path and the step. PyTorch's side (`bench_torch.run_torch_epoch`) keeps the
same uint8 set on its device and augments each batch there. Both run `steps_per_epoch` =
num_train // batch steps per epoch, after one warm-up step (the compiles), and report the median
epoch time of `--epochs` epochs, measured with the device synchronised at the end of each epoch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from cnnjax import bench, distributed, models
from cnnjax.data import Pipeline, data_config, sources
from cnnjax.data.config import augment_from_config

# CIFAR-10's channel statistics on 0..1 pixels; the synthetic images need some fixed normalisation.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def synthetic_pipeline(*, num_train: int, image_size: int, channels: int, num_classes: int,
                       batch_size: int, mesh, seed: int = 0) -> Pipeline:
    """The device-resident training pipeline over `num_train` random uint8 images, with CIFAR's
    augmentation (random crop with 4-pixel padding, and horizontal flips for RGB)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_train, image_size, image_size, channels), dtype=np.uint8)
    labels = rng.integers(0, num_classes, num_train).astype(np.int32)
    dataset = sources.Dataset("synthetic", num_classes,
                              {"train": sources.array_split(images, labels, "synthetic train")})
    cfg = data_config()
    cfg.augment.random_crop_padding = 4
    cfg.augment.hflip = channels == 3
    mean, std = (CIFAR_MEAN, CIFAR_STD) if channels == 3 else ((0.5,), (0.25,))
    return Pipeline(dataset, image_size=image_size, channels=channels, global_batch_size=batch_size,
                    mesh=mesh, seed=seed, aug=augment_from_config(cfg.augment), mean=mean, std=std,
                    resident=True)


def run_epoch_benchmark(name: str, *, batch_size: int = 512, num_train: int = 50_000,
                        image_size: int = 32, precision: str = "fp32",
                        epochs: int = 2) -> dict[str, Any]:
    """Epoch seconds of cnnjax's device-resident path (flat JSON-ready dict)."""
    if precision not in bench.PRECISIONS:
        raise ValueError(f"--precision {precision!r} unknown; use one of {', '.join(bench.PRECISIONS)}")
    if epochs < 1 or batch_size < 1 or num_train < batch_size:
        raise ValueError(f"need --epochs >= 1 and --num-train ({num_train}) >= --batch-size "
                         f"({batch_size}) >= 1")
    mesh = distributed.make_mesh()
    if batch_size % mesh.size:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the {mesh.size} devices")
    spec = models.get_spec(name)
    parts = bench.build(name, batch_size=batch_size, image_size=image_size, precision=precision,
                        mesh=mesh)
    pipeline = synthetic_pipeline(num_train=num_train, image_size=image_size,
                                  channels=spec.in_channels, num_classes=spec.num_classes,
                                  batch_size=batch_size, mesh=mesh)
    batches, train, state = pipeline.train_batches(0), parts["train"], parts["state"]
    start = time.perf_counter()
    state, metrics = train(state, next(batches))  # compiles the gather, augmentation and step
    jax.block_until_ready(metrics["loss"])
    warmup = time.perf_counter() - start
    steps = pipeline.steps_per_epoch
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = train(state, next(batches))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    device = jax.devices()[0]
    seconds = statistics.median(times)
    return {"model": name, "batch_size": batch_size, "image_size": image_size,
            "precision": precision, "device": f"{device.platform}:{device.device_kind}",
            "num_devices": mesh.size, "num_train": num_train, "steps_per_epoch": steps,
            "warmup_seconds": warmup, "epoch_seconds": seconds, "epoch_seconds_all": times,
            "images_per_second": steps * batch_size / seconds,
            "loss_is_finite": bool(np.isfinite(float(metrics["loss"])))}


def compare_torch(result: dict[str, Any], mode: str = "compile") -> dict[str, Any]:
    """PyTorch's epoch over the same number of steps, and the speed-up torch time / cnnjax time."""
    from cnnjax import bench_torch

    spec = models.get_spec(result["model"])
    torch_result = bench_torch.run_torch_epoch(
        result["model"], num_train=result["num_train"], batch_size=result["batch_size"],
        image_size=result["image_size"], in_channels=spec.in_channels,
        num_classes=spec.num_classes, precision=result["precision"],
        epochs=len(result["epoch_seconds_all"]), mode=mode)
    out = {f"torch_{k}": v for k, v in torch_result.items()}
    out["speedup_vs_torch"] = torch_result["epoch_seconds"] / result["epoch_seconds"]
    return out


def format_report(r: dict[str, Any]) -> str:
    lines = [f"{r['model']} @ {r['image_size']}px, batch {r['batch_size']}, {r['precision']}, "
             f"{r['device']} x{r['num_devices']}: one epoch = {r['steps_per_epoch']} steps over "
             f"{r['num_train']:,} resident images, crop + flip augmentation",
             f"  cnnjax: {r['epoch_seconds']:.2f} s per epoch ({r['images_per_second']:,.0f} "
             f"images/s; warm-up step {r['warmup_seconds']:.1f} s)"]
    if "torch_epoch_seconds" in r:
        lines += [f"  torch {r['torch_mode']} ({r['torch_source']}): {r['torch_epoch_seconds']:.2f} s "
                  f"per epoch (warm-up {r['torch_warmup_seconds']:.1f} s)",
                  f"  speed-up of cnnjax over torch: {r['speedup_vs_torch']:.2f}x"]
    elif "torch_skipped" in r:
        lines.append(f"  torch: skipped ({r['torch_skipped']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnjax.bench_epoch",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("model", help="registry name, e.g. resnet20")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-train", type=int, default=50_000, help="images per epoch")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=list(bench.PRECISIONS))
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs; the median is reported")
    parser.add_argument("--compare-torch", action="store_true")
    parser.add_argument("--torch-mode", default="compile", choices=["compile", "eager"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    def measure() -> dict[str, Any]:
        result = run_epoch_benchmark(args.model, batch_size=args.batch_size,
                                     num_train=args.num_train, image_size=args.image_size,
                                     precision=args.precision, epochs=args.epochs)
        if not args.compare_torch:
            return result
        return bench.with_torch(result, lambda: compare_torch(result, args.torch_mode))

    return bench.emit(measure, args.json, format_report)


if __name__ == "__main__":
    sys.exit(main())
