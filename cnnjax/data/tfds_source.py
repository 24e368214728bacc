"""TFDS datasets read through `tfds.data_source` (ArrayRecord, no TensorFlow), and the one-time prepare step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from cnnjax.data.config import DataError
from cnnjax.data.sources import ArraySplit, Dataset, stratified_partition

MANUAL_DATASETS = ("imagenet2012", "imagenet2012_subset", "imagenet2012_real")


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to `size` (bilinear) and centre-crops a size x size square, on the host."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    resized = resized[top : top + size, left : left + size]
    return resized[..., None] if resized.ndim == 2 else resized


@dataclasses.dataclass
class RecordSplit:
    """One split of a TFDS data source, read on demand; `indices` select (and order) its records.

    Images of varying size are resized (shorter side) and centre-cropped to `fit_size` as they are read.
    """

    source: object
    indices: np.ndarray
    image_key: str
    label_key: str
    fixed_shape: tuple | None
    fit_size: int
    _labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def image_shape(self) -> tuple | None:
        return self.fixed_shape

    def _image(self, record) -> np.ndarray:
        image = np.asarray(record[self.image_key], np.uint8)
        image = image[..., None] if image.ndim == 2 else image
        return image if self.fixed_shape else fit_image(image, self.fit_size)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        records = [self.source[int(i)] for i in self.indices[indices]]
        if not records:
            shape = self.fixed_shape or (self.fit_size, self.fit_size, 3)
            return np.zeros((0, *shape), np.uint8), np.zeros((0,), np.int32)
        images = np.stack([self._image(r) for r in records])
        labels = np.asarray([r[self.label_key] for r in records], np.int32)
        return images, labels

    @property
    def labels(self) -> np.ndarray:
        # Reads (and decodes) every record once; only needed to stratify a validation split.
        if self._labels is None:
            self._labels = np.asarray(
                [self.source[int(i)][self.label_key] for i in self.indices], np.int32
            )
        return self._labels

    def subset(self, indices: np.ndarray) -> RecordSplit:
        labels = None if self._labels is None else self._labels[indices]
        return dataclasses.replace(self, indices=self.indices[indices], _labels=labels)

    def materialize(self) -> ArraySplit:
        """All images in host memory, for the device-resident path."""
        images, labels = self.read(np.arange(len(self)))
        return ArraySplit(images, labels)


def prepare_command(name: str, data_dir: str) -> str:
    extra = (
        " --manual-dir DIR_WITH_THE_ILSVRC2012_TARS"
        if name.split("/")[0] in MANUAL_DATASETS
        else ""
    )
    where = f" --data-dir {data_dir}" if data_dir else ""
    return f"python -m cnnjax.data prepare {name}{where}{extra}"


def _builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        from cnnjax.data.sources import resolve_name

        resolve_name(name, tfds.list_builders(with_community_datasets=False))
        raise DataError(
            f"TFDS has no config or version {name!r}; check the name after the '/' or ':'."
        ) from None


def load(name: str, data_cfg, *, image_size: int) -> Dataset:
    """A TFDS image-classification dataset as RecordSplits; validation from its own split or from train."""
    import tensorflow_datasets as tfds

    data_dir = data_cfg.tfds_dir or None
    builder = _builder(name, data_dir)
    keys = builder.info.supervised_keys
    if not keys or len(keys) != 2:
        raise DataError(
            f"TFDS dataset {name!r} has no (image, label) supervised keys; pick an image-classification dataset."
        )
    image_key, label_key = keys
    features = builder.info.features
    num_classes = getattr(features[label_key], "num_classes", None)
    if not num_classes:
        raise DataError(
            f"TFDS dataset {name!r}: {label_key!r} is not a class label; pick an image-classification dataset."
        )
    shape = tuple(features[image_key].shape)
    fixed = shape if None not in shape and len(shape) == 3 else None
    # Without metadata (an unprepared dataset, or under tfds.testing.mock_data) splits are unknown.
    known = set(builder.info.splits) or {"train", "test"}
    wanted = [s for s in ("train", "validation", "test") if s in known]
    if "train" not in wanted:
        raise DataError(f"TFDS dataset {name!r} has no train split; pick a dataset with one.")
    try:
        found = tfds.data_source(name, split=wanted, data_dir=data_dir, download=False)
    except (NotImplementedError, ValueError, FileNotFoundError, AssertionError) as err:
        where = builder.data_dir
        raise DataError(
            f"TFDS dataset {name!r} is not prepared as ArrayRecord under {where}; on a machine with internet, "
            f'pip install "cnnjax[prepare]", run '
            f"`{prepare_command(name, data_cfg.tfds_dir)}` and copy the data dir here (set config.data.tfds_dir)."
        ) from err
    sources = dict(zip(wanted, found, strict=True))

    def split(s):
        return RecordSplit(
            sources[s], np.arange(len(sources[s])), image_key, label_key, fixed, image_size
        )

    splits = {s: split(s) for s in sources}
    # e.g. imagenet2012: its test labels are not public, so its validation set serves as the test.
    if "test" not in splits:
        splits["test"] = splits.pop("validation")
    if "validation" not in splits:
        if not 0 < data_cfg.val_fraction < 1:
            raise DataError(
                f"val_fraction {data_cfg.val_fraction} must be in (0, 1); set config.data.val_fraction."
            )
        kept, held = stratified_partition(splits["train"].labels, data_cfg.val_fraction)
        splits["validation"] = splits["train"].subset(held)
        splits["train"] = splits["train"].subset(kept)
    return Dataset(name, num_classes, {s: splits[s] for s in ("train", "validation", "test")})


def prepare(name: str, data_dir: str = "", manual_dir: str = "") -> Path:
    """Downloads and converts a TFDS dataset to ArrayRecord; the only code path that needs TensorFlow."""
    try:
        import tensorflow  # noqa: F401  (TFDS's generators need it)
    except ImportError:
        raise DataError(
            f'preparing {name!r} needs TensorFlow; run `pip install "cnnjax[prepare]"` (only for this step).'
        ) from None
    import tensorflow_datasets as tfds

    builder = _builder(name, data_dir or None)
    if name.split("/")[0] in MANUAL_DATASETS and not manual_dir:
        raise DataError(
            f"{name} must be downloaded by hand; pass --manual-dir with the ILSVRC2012 tar files."
        )
    config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    builder.download_and_prepare(file_format="array_record", download_config=config)
    return Path(str(builder.data_dir))
