"""The image-folder source: one sub-folder per class, PNG/JPEG read with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnjax.data.config import DataError
from cnnjax.data.sources import (
    DIGITS_TEST_FRACTION,
    IMAGE_SUFFIXES,
    ArraySplit,
    Dataset,
    add_validation,
    stratified_partition,
)
from cnnjax.data.tfds_source import fit_image


def class_folders(root: Path) -> list[str]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(
            f"{root} has no class sub-folders; lay images out as {root}/<class>/<image>.png."
        )
    return names


def read_images(root: Path, classes: list[str], image_size: int, channels: int) -> ArraySplit:
    """Every image under root/<class>/, converted to the model's channels; mixed sizes are fitted to image_size."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    images, labels = [], []
    for label, name in enumerate(classes):
        if not (root / name).is_dir():
            continue
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(path) as img:
                array = np.asarray(img.convert(mode), np.uint8)
            images.append(array[..., None] if array.ndim == 2 else array)
            labels.append(label)
    unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise DataError(
            f"{root}: class folder {unknown[0]!r} is not among the training classes; rename or remove it."
        )
    if not images:
        raise DataError(
            f"no {'/'.join(IMAGE_SUFFIXES)} images under {root}/<class>/; add images or fix config.data.path."
        )
    if len({a.shape for a in images}) > 1:  # mixed sizes: shorter side to image_size, centre crop
        images = [fit_image(a, image_size) for a in images]
    return ArraySplit(np.stack(images), np.asarray(labels, np.int32))


def fit_split(split: ArraySplit, size: int) -> ArraySplit:
    fitted = [fit_image(a, size) for a in split.images]
    images = (
        np.stack(fitted) if fitted else np.zeros((0, size, size, split.images.shape[-1]), np.uint8)
    )
    return ArraySplit(images, split.labels)


def load_folder(root: Path, val_fraction: float, image_size: int, channels: int) -> Dataset:
    """root/train/<class>/ (+ root/test/, optional root/validation/ or root/val/), or a single tree.

    A single tree root/<class>/ is split like digits: 15% test, then val_fraction of the rest as validation.
    """
    if (root / "train").is_dir():
        classes = class_folders(root / "train")
        train = read_images(root / "train", classes, image_size, channels)
        test = (
            read_images(root / "test", classes, image_size, channels)
            if (root / "test").is_dir()
            else (ArraySplit(train.images[:0], train.labels[:0]))
        )
        val_dir = next((root / d for d in ("validation", "val") if (root / d).is_dir()), None)
        val = read_images(val_dir, classes, image_size, channels) if val_dir else None
        splits = add_validation(train, test, val_fraction, val)
    else:
        classes = class_folders(root)
        everything = read_images(root, classes, image_size, channels)
        rest, test = stratified_partition(everything.labels, DIGITS_TEST_FRACTION)
        splits = add_validation(everything.subset(rest), everything.subset(test), val_fraction)
    # Each split may be uniform in size yet differ from the others.
    if len({s.image_shape for s in splits.values() if len(s)}) > 1:
        splits = {k: fit_split(s, image_size) for k, s in splits.items()}
    return Dataset("folder", len(classes), splits)
