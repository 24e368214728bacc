"""Train-time augmentations in jax.numpy: one image [H, W, C] in [0, 1] plus its uniform draws in, one image out.

Each example draws all its random numbers at once (`NUM_DRAWS` uniforms from its own key) and every
augmentation reads fixed slots: one threefry call instead of one per augmentation keeps jit compiles short,
and switching one augmentation on never changes the draws of another.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.data.config import Augment

Array = jax.Array
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, the weights PIL's convert("L") uses
SLOTS = {
    "crop": slice(0, 2),
    "rrc": slice(2, 6),
    "hflip": 6,
    "vflip": 7,
    "affine": slice(8, 11),
    "grayscale": 11,
    "cutout": slice(12, 14),
}
NUM_DRAWS = 14


def to_grayscale(image: Array) -> Array:
    """Luminance of an RGB image, keeping one channel: [..., 3] -> [..., 1]."""
    return jnp.tensordot(image, jnp.asarray(LUMA, image.dtype), axes=[[-1], [0]])[..., None]


def _randint(u: Array, n: int | Array) -> Array:
    """A uniform integer in [0, n) from a uniform float in [0, 1)."""
    return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def random_crop_with_padding(u: Array, image: Array, padding: int) -> Array:
    """Zero-pads `padding` pixels on every side, then crops the original size at offset u (2 draws)."""
    h, w, c = image.shape
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    dy, dx = _randint(u[0], 2 * padding + 1), _randint(u[1], 2 * padding + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))


def random_resized_crop(
    u: Array, image: Array, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> Array:
    """Crops an area fraction in `scale` with aspect (w/h) in `ratio`, zoomed back to full size (4 draws).

    Unlike torchvision's ten retries, an over-sized box is clipped to the image: one draw, no loops in jit.
    """
    h, w, _ = image.shape
    area = (scale[0] + u[0] * (scale[1] - scale[0])) * h * w
    aspect = jnp.exp(math.log(ratio[0]) + u[1] * (math.log(ratio[1]) - math.log(ratio[0])))
    crop_w = jnp.clip(jnp.sqrt(area * aspect), 1.0, w)
    crop_h = jnp.clip(jnp.sqrt(area / aspect), 1.0, h)
    y0, x0 = u[2] * (h - crop_h), u[3] * (w - crop_w)
    zoom = jnp.stack([h / crop_h, w / crop_w])
    shift = -jnp.stack([y0, x0]) * zoom
    return jax.image.scale_and_translate(
        image, image.shape, (0, 1), zoom, shift, "linear", antialias=True
    )


def random_flip(u: Array, image: Array, axis: int) -> Array:
    """Mirrors along `axis` (1: left-right, 0: up-down) when the draw u < 1/2."""
    return jnp.where(u < 0.5, jnp.flip(image, axis=axis), image)


def random_affine(u: Array, image: Array, max_degrees: float, max_translate: float) -> Array:
    """Rotates by U(-d, d) degrees about the centre and shifts by U(-t, t) of the size (3 draws); zeros fill."""
    h, w, _ = image.shape
    angle = jnp.deg2rad((2 * u[0] - 1) * max_degrees)
    shift_y, shift_x = (2 * u[1] - 1) * max_translate * h, (2 * u[2] - 1) * max_translate * w
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy, xx = jnp.meshgrid(
        jnp.arange(h, dtype=image.dtype), jnp.arange(w, dtype=image.dtype), indexing="ij"
    )
    # Inverse mapping: for every output pixel, where in the input it comes from.
    y, x = yy - cy - shift_y, xx - cx - shift_x
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    src = [cos * y - sin * x + cy, sin * y + cos * x + cx]

    def sample(channel: Array) -> Array:
        return jax.scipy.ndimage.map_coordinates(channel, src, order=1, mode="constant", cval=0.0)

    return jax.vmap(sample, in_axes=2, out_axes=2)(image)


def random_grayscale(u: Array, image: Array, prob: float) -> Array:
    """Replaces an RGB image by its luminance in all three channels when u < prob."""
    if image.shape[-1] != 3:
        return image
    return jnp.where(u < prob, jnp.broadcast_to(to_grayscale(image), image.shape), image)


def cutout(u: Array, image: Array, size: int) -> Array:
    """Zeroes a size x size square centred anywhere (2 draws), clipped at borders (DeVries & Taylor 2017)."""
    h, w, _ = image.shape
    cy, cx = _randint(u[0], h), _randint(u[1], w)
    ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    low = size // 2
    inside = (ys >= cy - low) & (ys < cy - low + size) & (xs >= cx - low) & (xs < cx - low + size)
    return jnp.where(inside[..., None], jnp.zeros_like(image), image)


def draws(key: Array) -> Array:
    """All random numbers one example needs."""
    return jax.random.uniform(key, (NUM_DRAWS,))


def augment_image(u: Array, image: Array, aug: Augment) -> Array:
    """The geometric and colour augmentations `aug` turns on, in a fixed order (cutout is applied later)."""
    if aug.random_resized_crop:
        image = random_resized_crop(u[SLOTS["rrc"]], image, aug.rrc_scale)
    if aug.random_crop_padding:
        image = random_crop_with_padding(u[SLOTS["crop"]], image, aug.random_crop_padding)
    if aug.hflip:
        image = random_flip(u[SLOTS["hflip"]], image, axis=1)
    if aug.vflip:
        image = random_flip(u[SLOTS["vflip"]], image, axis=0)
    if aug.rotation or aug.translate:
        image = random_affine(u[SLOTS["affine"]], image, aug.rotation, aug.translate)
    if aug.grayscale:
        image = random_grayscale(u[SLOTS["grayscale"]], image, aug.grayscale)
    return image


def mix_params(seed: int, step: int, batch_size: int, aug: Augment) -> dict[str, np.ndarray]:
    """The per-batch draws of mixup/cutmix, on the host: a pure function of (seed, step).

    numpy's Beta sampler costs nothing, where jax.random.beta adds seconds to every compile.
    One lambda ~ Beta(alpha, alpha) per batch as in both papers; with both on, each batch picks one at 1/2.
    """
    rng = np.random.default_rng([seed, step, 1])
    use_cutmix = aug.cutmix_alpha > 0 and (aug.mixup_alpha <= 0 or rng.random() < 0.5)
    alpha = aug.cutmix_alpha if use_cutmix else aug.mixup_alpha
    return {
        "lam": np.float32(rng.beta(alpha, alpha)),
        "cutmix": np.bool_(use_cutmix),
        "partner": rng.permutation(batch_size).astype(np.int32),
        "center": rng.random(2).astype(np.float32),
    }


def mix_batch(images: Array, labels: Array, num_classes: int, params: dict[str, Array]):
    """Mixup or CutMix over the batch: image i mixes with image partner[i]; returns (images, soft targets)."""
    b, h, w, _ = images.shape
    partner, lam = params["partner"], params["lam"]
    other = images[partner]
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = jnp.round(cut * h).astype(jnp.int32), jnp.round(cut * w).astype(jnp.int32)
    cy, cx = _randint(params["center"][0], h), _randint(params["center"][1], w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy - ch // 2 + ch, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx - cw // 2 + cw, 0, w)
    ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[None, :, :, None]
    box_lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (
        h * w
    )  # lambda of the clipped box
    mixed = jnp.where(
        params["cutmix"], jnp.where(box, other, images), lam * images + (1 - lam) * other
    )
    lam = jnp.where(params["cutmix"], box_lam, lam)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return mixed, lam * one_hot + (1 - lam) * one_hot[partner]
