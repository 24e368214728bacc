"""Augmentations: shape, value range, flips undo themselves, same draws same output, different draws differ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.data import preprocess, transforms
from cnnjax.data.config import Augment

H, W = 9, 7
IMAGE = jnp.asarray(np.random.default_rng(0).random((H, W, 3)), jnp.float32)
U = jnp.asarray([0.1, 0.9, 0.3, 0.7])
U2 = jnp.asarray([0.8, 0.2, 0.6, 0.4])

GEOMETRIC = {
    "crop": lambda u, x: transforms.random_crop_with_padding(u, x, 2),
    "resized_crop": lambda u, x: transforms.random_resized_crop(u, x, (0.2, 0.6)),
    "affine": lambda u, x: transforms.random_affine(u, x, 30.0, 0.2),
    "cutout": lambda u, x: transforms.cutout(u, x, 3),
}


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_augmentations_keep_shape_and_range_and_depend_only_on_draws(name):
    fn = jax.jit(jax.vmap(GEOMETRIC[name], in_axes=(0, None)))
    out = np.asarray(fn(jnp.stack([U, U, U2]), IMAGE))
    assert out.shape == (3, H, W, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6
    np.testing.assert_array_equal(out[0], out[1])  # same draws, same output
    assert not np.allclose(out[0], out[2])  # other draws, other output
    assert not np.allclose(out[0], IMAGE)


def test_flips_mirror_and_twice_is_identity():
    flip = jax.jit(transforms.random_flip, static_argnums=2)
    np.testing.assert_array_equal(flip(0.2, IMAGE, 1), IMAGE[:, ::-1])
    np.testing.assert_array_equal(flip(0.7, IMAGE, 1), IMAGE)  # draw >= 1/2: untouched
    np.testing.assert_array_equal(flip(0.2, flip(0.2, IMAGE, 1), 1), IMAGE)
    np.testing.assert_array_equal(flip(0.2, flip(0.2, IMAGE, 0), 0), IMAGE)
    np.testing.assert_array_equal(flip(0.2, IMAGE, 0), IMAGE[::-1])


def test_crop_with_padding_shifts_the_image():
    out = jax.jit(GEOMETRIC["crop"])(jnp.asarray([0.0, 0.99]), IMAGE)  # dy = 0, dx = 4
    np.testing.assert_array_equal(out[2:, : W - 2], IMAGE[: H - 2, 2:])
    assert float(jnp.abs(out[:2]).max()) == 0.0  # zero padding came in at the top


def test_full_scale_resized_crop_and_zero_affine_are_identity():
    square = IMAGE[:W]
    crop = jax.jit(lambda u, x: transforms.random_resized_crop(u, x, (1.0, 1.0), (1.0, 1.0)))
    np.testing.assert_allclose(crop(jnp.asarray([0.5, 0.5, 0.0, 0.0]), square), square, atol=1e-5)
    still = jax.jit(GEOMETRIC["affine"])(jnp.asarray([0.5, 0.5, 0.5]), IMAGE)  # angle 0, shift 0
    np.testing.assert_allclose(still, IMAGE, atol=1e-5)


def test_grayscale_replicates_luminance_or_leaves_the_image():
    grayscale = jax.jit(transforms.random_grayscale, static_argnums=2)
    gray = grayscale(0.1, IMAGE, 0.5)
    np.testing.assert_allclose(gray[..., 0], IMAGE @ jnp.asarray(transforms.LUMA), atol=1e-6)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    np.testing.assert_array_equal(grayscale(0.9, IMAGE, 0.5), IMAGE)
    single = IMAGE[..., :1]
    np.testing.assert_array_equal(transforms.random_grayscale(0.1, single, 1.0), single)


def test_cutout_zeroes_a_square_clipped_at_the_border():
    cut = jax.jit(GEOMETRIC["cutout"])
    assert int((cut(jnp.asarray([0.5, 0.5]), jnp.ones((H, W, 1))) == 0).sum()) == 9
    assert int((cut(jnp.asarray([0.0, 0.0]), jnp.ones((H, W, 1))) == 0).sum()) == 4


@pytest.mark.parametrize(
    "aug", [Augment(mixup_alpha=0.4), Augment(cutmix_alpha=1.0)], ids=["mixup", "cutmix"]
)
def test_mixing_gives_soft_targets_that_sum_to_one(aug):
    images = jnp.asarray(np.random.default_rng(1).random((8, H, W, 1)), jnp.float32)
    labels = jnp.arange(8) % 4
    params = transforms.mix_params(0, 3, 8, aug)
    mixed, target = jax.jit(transforms.mix_batch, static_argnums=2)(images, labels, 4, params)
    assert mixed.shape == images.shape and target.shape == (8, 4)
    np.testing.assert_allclose(target.sum(-1), 1.0, atol=1e-6)
    lam = float(target[0, labels[0]]) if labels[0] != labels[params["partner"][0]] else None
    if lam is not None and not aug.cutmix_alpha:
        np.testing.assert_allclose(
            mixed[0], lam * images[0] + (1 - lam) * images[params["partner"][0]], atol=1e-6
        )
    again = transforms.mix_params(0, 3, 8, aug)
    assert all(np.array_equal(params[k], again[k]) for k in params)
    assert not np.array_equal(params["partner"], transforms.mix_params(0, 4, 8, aug)["partner"])


def test_train_batch_same_seed_same_output_other_seed_differs():
    aug = Augment(
        random_crop_padding=1,
        random_resized_crop=True,
        hflip=True,
        vflip=True,
        rotation=20.0,
        translate=0.1,
        grayscale=0.5,
        cutout=2,
    )
    raw = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(6)

    @jax.jit
    def run(seed, step):
        return preprocess.train_batch(
            raw,
            labels,
            step,
            None,
            seed=seed,
            aug=aug,
            image_size=8,
            channels=3,
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            num_classes=6,
        )["image"]

    a, b, c, d = (np.asarray(run(s, t)) for s, t in [(0, 0), (0, 0), (1, 0), (0, 1)])
    assert a.shape == (6, 8, 8, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, d)


def test_to_model_input_resizes_and_converts_channels():
    to_input = jax.jit(preprocess.to_model_input, static_argnums=(1, 2))
    rgb = to_input(np.full((2, 4, 4, 1), 255, np.uint8), 8, 3)
    assert rgb.shape == (2, 8, 8, 3) and float(rgb.min()) == pytest.approx(1.0)
    gray = to_input(np.full((1, 8, 8, 3), 255, np.uint8), 8, 1)
    assert gray.shape == (1, 8, 8, 1) and float(gray.max()) == pytest.approx(1.0, abs=1e-6)
