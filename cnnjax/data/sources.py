"""Where images come from: in-memory splits, the built-in sources (digits, idx, npz, folder) and the name lookup."""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnnjax.data.config import DataError

LOCAL_SOURCES = ("digits", "idx", "npz", "folder")
# The validation/test hold-outs never change with the run seed, so runs stay comparable.
SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.15
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """One split held in host memory: uint8 images [N, H, W, C] and int32 labels [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]

    def subset(self, indices: np.ndarray) -> ArraySplit:
        return ArraySplit(self.images[indices], self.labels[indices])

    def materialize(self) -> ArraySplit:
        return self


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A named dataset: its class count and the train/validation/test splits (ArraySplit or RecordSplit)."""

    name: str
    num_classes: int
    splits: dict


def array_split(images: np.ndarray, labels: np.ndarray, what: str) -> ArraySplit:
    """Checks shapes and dtypes and returns images as uint8 NHWC."""
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) != len(labels):
        raise DataError(
            f"{what}: {len(images)} images but {len(labels)} labels; give one label per image."
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{what}: images of shape {images.shape}; expected [N, H, W] or [N, H, W, 1|3]."
        )
    if images.dtype != np.uint8:
        if images.size and (images.min() < 0 or images.max() > 255):
            raise DataError(f"{what}: pixel values outside 0..255; store uint8 images.")
        images = np.rint(images).astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what}: labels of dtype {labels.dtype}; store integer class ids.")
    return ArraySplit(images, labels.astype(np.int32).reshape(-1))


def check_labels(splits: dict, num_classes: int, what: str) -> None:
    """Every label must be a class id in [0, num_classes)."""
    for split, data in splits.items():
        labels = data.labels
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0]
            raise DataError(
                f"{what}: {split} label {bad} outside the class range 0..{num_classes - 1}; "
                "relabel the data so classes are 0..num_classes-1."
            )


def stratified_partition(labels: np.ndarray, fraction: float, seed: int = SPLIT_SEED):
    """Splits indices into (kept, held_out): round(fraction * n) held out, shared among the classes in
    proportion to their sizes (largest remainders get the leftovers), each class's pick random by `seed`."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = fraction * counts
    n_held = np.floor(quota).astype(int)
    leftover = int(round(fraction * len(labels))) - n_held.sum()
    n_held[np.argsort(-(quota - n_held), kind="stable")[: max(leftover, 0)]] += 1
    kept, held = [], []
    for c, k in zip(classes, n_held, strict=True):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        held.append(members[:k])
        kept.append(members[k:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def add_validation(train, test, val_fraction: float, validation=None) -> dict:
    """The dataset's own validation split when given, else a stratified fraction of train."""
    if validation is not None:
        return {"train": train, "validation": validation, "test": test}
    if not 0 < val_fraction < 1:
        raise DataError(
            f"val_fraction {val_fraction} must be in (0, 1); set config.data.val_fraction."
        )
    kept, held = stratified_partition(train.labels, val_fraction)
    return {"train": train.subset(kept), "validation": train.subset(held), "test": test}


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (float images [1797, 8, 8] in 0..16, int labels [1797]).

    Read straight from the CSV that scikit-learn ships (as its `load_digits` reads it), which skips
    importing scikit-learn: about 1 s of the main job's start on the 2-core CPU. Falls back to
    `sklearn.datasets.load_digits` where the file is not at that place.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits as sklearn_digits

        bunch = sklearn_digits()
        return bunch.images, bunch.target
    with gzip.open(csv, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load_digits(val_fraction: float) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, 0..16 scaled to 0..255; 15% test, then val_fraction of the rest."""
    pixels, labels = digits_arrays()
    images = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)
    everything = array_split(images, labels, "digits")
    rest, test = stratified_partition(everything.labels, DIGITS_TEST_FRACTION)
    splits = add_validation(everything.subset(rest), everything.subset(test), val_fraction)
    return Dataset("digits", 10, splits)


def _existing_path(path: str, name: str) -> Path:
    if not path:
        raise DataError(f"data source {name!r} reads local files; set config.data.path to them.")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"config.data.path {str(p)!r} does not exist; point it at your {name} data."
        )
    return p


def num_classes_of(train: ArraySplit, what: str) -> int:
    if len(train) == 0:
        raise DataError(f"{what}: the training split is empty; add training examples.")
    if train.labels.min() < 0:
        raise DataError(
            f"{what}: negative label {train.labels.min()}; classes must be 0..num_classes-1."
        )
    return int(train.labels.max()) + 1


def load_npz(path: str, val_fraction: float) -> Dataset:
    """A NumPy archive with x_train, y_train, x_test, y_test (and optionally x_val, y_val)."""
    p = _existing_path(path, "npz")
    with np.load(p) as archive:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in archive.files]
        if missing:
            raise DataError(
                f"{p.name} lacks {', '.join(missing)}; save x_train, y_train, x_test, y_test."
            )
        train = array_split(archive["x_train"], archive["y_train"], f"{p.name} train")
        test = array_split(archive["x_test"], archive["y_test"], f"{p.name} test")
        val = None
        if "x_val" in archive.files and "y_val" in archive.files:
            val = array_split(archive["x_val"], archive["y_val"], f"{p.name} validation")
    splits = add_validation(train, test, val_fraction, val)
    num_classes = num_classes_of(train, p.name)
    check_labels(splits, num_classes, p.name)
    return Dataset("npz", num_classes, splits)


def load_idx_folder(path: str, val_fraction: float) -> Dataset:
    """A folder of MNIST-format IDX files (train-*/t10k-*, gzip or raw)."""
    from cnnjax.data import idx

    p = _existing_path(path, "idx")
    train = array_split(*idx.read_idx_pair(p, "train"), "idx train")
    test = array_split(*idx.read_idx_pair(p, "t10k"), "idx test")
    splits = add_validation(train, test, val_fraction)
    num_classes = num_classes_of(train, "idx")
    check_labels(splits, num_classes, "idx")
    return Dataset("idx", num_classes, splits)


def resolve_name(name: str, tfds_names: Sequence[str] = ()) -> None:
    """Raises DataError with close matches when `name` is neither a local source nor a TFDS dataset."""
    known = list(LOCAL_SOURCES) + list(tfds_names)
    base = name.split("/")[0].split(":")[0]
    if name in LOCAL_SOURCES or base in tfds_names:
        return
    close = difflib.get_close_matches(base, known, n=4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise DataError(
        f"unknown dataset {name!r}.{hint} Use one of {', '.join(LOCAL_SOURCES)} or a TFDS name "
        "(python -c 'import tensorflow_datasets as tfds; print(tfds.list_builders())')."
    )


def load_local(
    name: str, path: str, val_fraction: float, image_size: int, channels: int
) -> Dataset:
    """Loads one of the local sources fully into host memory."""
    if name == "digits":
        return load_digits(val_fraction)
    if name == "npz":
        return load_npz(path, val_fraction)
    if name == "idx":
        return load_idx_folder(path, val_fraction)
    from cnnjax.data import folder

    return folder.load_folder(_existing_path(path, "folder"), val_fraction, image_size, channels)
