"""Batch preprocessing inside jit: uint8 -> float, resize, channel conversion, augmentation, normalisation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.data import transforms
from cnnjax.data.config import Augment

Array = jax.Array
STATS_CHUNK = 512


def to_model_input(raw: Array, image_size: int, channels: int) -> Array:
    """uint8 [B, h, w, c] -> float32 [B, S, S, channels] in [0, 1], bilinear (antialiased when shrinking)."""
    x = raw.astype(jnp.float32) / 255.0
    b, h, w, c = x.shape
    if (h, w) != (image_size, image_size):
        x = jnp.clip(
            jax.image.resize(x, (b, image_size, image_size, c), "linear", antialias=True), 0.0, 1.0
        )
    if c == 1 and channels == 3:
        x = jnp.broadcast_to(x, (*x.shape[:3], 3))
    elif c == 3 and channels == 1:
        x = transforms.to_grayscale(x)
    return x


def normalize(x: Array, mean: tuple[float, ...], std: tuple[float, ...]) -> Array:
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def example_keys(seed: int, step: Array, batch_size: int) -> Array:
    """One key per example, a pure function of (seed, step, position in the global batch)."""
    step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(batch_size))


def train_batch(
    raw: Array,
    labels: Array,
    step: Array,
    mix: dict | None,
    *,
    seed: int,
    aug: Augment,
    image_size: int,
    channels: int,
    mean: tuple,
    std: tuple,
    num_classes: int,
) -> dict[str, Array]:
    """The training batch of `step` from its raw uint8 images: augmented, normalised, maybe mixed.

    `mix` holds the per-batch mixup/cutmix draws (transforms.mix_params), or None when mixing is off.
    """
    x = to_model_input(raw, image_size, channels)
    keys = example_keys(seed, step, x.shape[0])

    def one(key, image):
        u = transforms.draws(key)
        image = normalize(transforms.augment_image(u, image, aug), mean, std)
        # Cutout after normalisation fills with 0, i.e. the mean pixel, as in the paper.
        return (
            transforms.cutout(u[transforms.SLOTS["cutout"]], image, aug.cutout)
            if aug.cutout
            else image
        )

    x = jax.vmap(one)(keys, x)
    batch = {"image": x, "label": labels.astype(jnp.int32)}
    if mix is not None:
        batch["image"], batch["target"] = transforms.mix_batch(x, labels, num_classes, mix)
    return batch


def eval_batch(
    raw: Array,
    labels: Array,
    mask: Array,
    *,
    image_size: int,
    channels: int,
    mean: tuple,
    std: tuple,
) -> dict[str, Array]:
    """An evaluation batch: resized and normalised, never augmented."""
    x = normalize(to_model_input(raw, image_size, channels), mean, std)
    return {"image": x, "label": labels.astype(jnp.int32), "mask": mask.astype(jnp.float32)}


@functools.partial(jax.jit, static_argnames=("image_size", "channels"))
def _chunk_moments(
    raw: Array, weight: Array, *, image_size: int, channels: int
) -> tuple[Array, Array]:
    x = to_model_input(raw, image_size, channels)
    w = weight[:, None, None, None]
    return jnp.sum(x * w, axis=(0, 1, 2)), jnp.sum(x * x * w, axis=(0, 1, 2))


def measure_mean_std(split, image_size: int, channels: int, max_examples: int | None = None):
    """Per-channel mean and std of the split after resize and channel conversion, on the [0, 1] scale.

    Uses every example, or `max_examples` evenly spaced ones (for record sources too slow to read fully).
    """
    n = len(split)
    indices = (
        np.arange(n)
        if not max_examples or n <= max_examples
        else np.linspace(0, n - 1, max_examples).astype(np.int64)
    )
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, len(indices), STATS_CHUNK):
        chunk = indices[start : start + STATS_CHUNK]
        weight = np.zeros(STATS_CHUNK, np.float32)
        weight[: len(chunk)] = 1.0
        padded = np.resize(chunk, STATS_CHUNK)  # repeats entries; their weight is 0
        raw, _ = split.read(padded)
        s, sq = _chunk_moments(raw, weight, image_size=image_size, channels=channels)
        total += np.asarray(s, np.float64)
        total_sq += np.asarray(sq, np.float64)
    count = len(indices) * image_size * image_size
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    # A constant channel is left unscaled rather than divided by 0.
    std = np.where(std < 1e-6, 1.0, std)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
