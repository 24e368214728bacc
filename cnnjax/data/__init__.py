"""The data layer's public face: `data_config`, `build_pipeline`, `Pipeline` and `DataError`."""

from __future__ import annotations

import ml_collections
from jax.sharding import Mesh

from cnnjax.data import sources
from cnnjax.data.config import DataError, augment_from_config, data_config, mean_std_from_config
from cnnjax.data.pipeline import Pipeline, fits_on_device

__all__ = ["DataError", "Pipeline", "build_pipeline", "data_config", "load_dataset"]

# The mean/std of big record sources come from this many evenly spaced training images.
RECORD_STATS_EXAMPLES = 10_000


def load_dataset(
    data_cfg: ml_collections.ConfigDict, *, image_size: int, channels: int
) -> sources.Dataset:
    """The dataset named by `data_cfg.name`: a local source or any TFDS image-classification dataset."""
    name = data_cfg.name
    if name in sources.LOCAL_SOURCES:
        return sources.load_local(name, data_cfg.path, data_cfg.val_fraction, image_size, channels)
    from cnnjax.data import tfds_source

    return tfds_source.load(name, data_cfg, image_size=image_size)


def _check_sizes(
    image_size: int, channels: int, global_batch_size: int, mesh: Mesh, min_image_size: int
) -> None:
    if channels not in (1, 3):
        raise DataError(
            f"channels={channels} unsupported; models take 1 (grayscale) or 3 (RGB) channels."
        )
    if image_size < min_image_size:
        raise DataError(
            f"image_size {image_size} is smaller than the model's minimum {min_image_size}; "
            f"set the input size to at least {min_image_size}."
        )
    if global_batch_size <= 0 or global_batch_size % mesh.size:
        raise DataError(
            f"global batch size {global_batch_size} is not a positive multiple of the {mesh.size} devices; "
            f"use a multiple of {mesh.size}."
        )
    if "data" not in mesh.axis_names:
        raise DataError(
            f"mesh axes {mesh.axis_names} lack 'data'; build the mesh with a 'data' axis."
        )


def _resident(mode: str, dataset: sources.Dataset, mesh: Mesh) -> bool:
    """Device-resident when forced, or on "auto" when every split has a fixed image size and fits."""
    if mode == "never":
        return False
    shapes = [getattr(s, "image_shape", None) for s in dataset.splits.values()]
    fixed = all(shape is not None for shape in shapes)
    if mode == "always":
        if not fixed:
            raise DataError(
                f"{dataset.name!r} has images of varying size; set device_resident='auto' or 'never'."
            )
        return True
    if not fixed:
        return False
    nbytes = sum(
        len(s) * int(s.image_shape[0] * s.image_shape[1] * s.image_shape[2])
        for s in dataset.splits.values()
    )
    return fits_on_device(nbytes, mesh)


def build_pipeline(
    data_cfg: ml_collections.ConfigDict,
    *,
    image_size: int,
    channels: int,
    global_batch_size: int,
    mesh: Mesh,
    seed: int,
    min_image_size: int = 1,
) -> Pipeline:
    """Loads the dataset named in `data_cfg` and returns batches shaped for a model of the given input size."""
    _check_sizes(image_size, channels, global_batch_size, mesh, min_image_size)
    aug = augment_from_config(data_cfg.get("augment"))
    if data_cfg.normalize not in ("standardize", "minmax"):
        raise DataError(f"normalize={data_cfg.normalize!r} unknown; use 'standardize' or 'minmax'.")
    if data_cfg.device_resident not in ("auto", "always", "never"):
        raise DataError(
            f"device_resident={data_cfg.device_resident!r} unknown; use 'auto', 'always' or 'never'."
        )
    dataset = load_dataset(data_cfg, image_size=image_size, channels=channels)
    if len(dataset.splits["train"]) < global_batch_size:
        raise DataError(
            f"global batch size {global_batch_size} exceeds the {len(dataset.splits['train'])} training "
            f"examples of {dataset.name!r}; lower batch_size."
        )
    resident = _resident(data_cfg.device_resident, dataset, mesh)
    if resident:  # read record sources into memory once, before measuring statistics on them
        dataset = sources.Dataset(
            dataset.name,
            dataset.num_classes,
            {s: d.materialize() for s, d in dataset.splits.items()},
        )
        sources.check_labels(dataset.splits, dataset.num_classes, dataset.name)
    if data_cfg.normalize == "minmax":
        mean, std = (0.0,) * channels, (1.0,) * channels
    else:
        given = mean_std_from_config(data_cfg, channels)
        limit = (
            None
            if isinstance(dataset.splits["train"], sources.ArraySplit)
            else RECORD_STATS_EXAMPLES
        )
        mean, std = given or _measure(dataset, image_size, channels, limit)
    return Pipeline(
        dataset,
        image_size=image_size,
        channels=channels,
        global_batch_size=global_batch_size,
        mesh=mesh,
        seed=seed,
        aug=aug,
        mean=mean,
        std=std,
        resident=resident,
        workers=int(data_cfg.workers),
        prefetch=int(data_cfg.prefetch),
    )


def _measure(dataset: sources.Dataset, image_size: int, channels: int, limit: int | None):
    from cnnjax.data import preprocess

    return preprocess.measure_mean_std(dataset.splits["train"], image_size, channels, limit)
