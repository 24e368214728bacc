"""Throughput of the two input paths: images per second of the host (grain) and device-resident pipelines."""

from __future__ import annotations

import statistics
import time

import jax

from cnnjax.data.config import DataError, data_config

AUGMENT_PRESETS = ("none", "basic", "all")
WARMUP_STEPS = 3


def augment_preset(preset: str, image_size: int) -> dict:
    """'basic': the CIFAR recipe (pad-and-crop, flip); 'all': every augmentation at once."""
    basic = {"random_crop_padding": max(1, image_size // 8), "hflip": True}
    if preset == "none":
        return {}
    if preset == "basic":
        return basic
    return {
        **basic,
        "random_resized_crop": True,
        "rotation": 15.0,
        "translate": 0.1,
        "grayscale": 0.1,
        "cutout": max(1, image_size // 4),
        "mixup_alpha": 0.2,
        "cutmix_alpha": 1.0,
    }


def images_per_second(pipeline, steps: int, rounds: int = 5) -> float:
    """Median rate over `rounds` timed rounds of steps/rounds batches each, after a warm-up (compile).

    Every batch is waited for, so asynchronous dispatch can't flatter the number; the median keeps one
    round disturbed by other work on a shared machine from deciding the result.
    """
    batches = pipeline.train_batches(0)
    for _ in range(WARMUP_STEPS):
        jax.block_until_ready(next(batches))
    per_round = max(1, steps // rounds)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            jax.block_until_ready(next(batches))
        rates.append(per_round * pipeline.global_batch_size / (time.perf_counter() - start))
    return float(statistics.median(rates))


def run_bench(
    name: str,
    *,
    path: str = "",
    batch_size: int = 128,
    image_size: int = 32,
    channels: int = 1,
    steps: int = 50,
    workers: int = 0,
    augment: str = "basic",
    tfds_dir: str = "",
) -> dict[str, float]:
    """images/s per path ("host", "device"); a path that cannot serve the dataset is left out."""
    from cnnjax.data import build_pipeline

    if augment not in AUGMENT_PRESETS:
        raise DataError(f"--augment {augment!r} unknown; use one of {', '.join(AUGMENT_PRESETS)}.")
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    results = {}
    for mode, label in (("never", "host"), ("always", "device")):
        cfg = data_config()
        cfg.name, cfg.path, cfg.tfds_dir, cfg.workers, cfg.device_resident = (
            name,
            path,
            tfds_dir,
            workers,
            mode,
        )
        cfg.augment.update(augment_preset(augment, image_size))
        try:
            pipeline = build_pipeline(
                cfg,
                image_size=image_size,
                channels=channels,
                global_batch_size=batch_size,
                mesh=mesh,
                seed=0,
            )
        except DataError as err:
            if label == "device" and "varying size" in str(err):
                continue
            raise
        results[label] = images_per_second(pipeline, steps)
    return results
