"""The data section of a run config: its defaults and the checks that turn bad values into DataError."""

from __future__ import annotations

import dataclasses

import ml_collections


class DataError(ValueError):
    """A problem with the data or its configuration; the message names the problem and the fix."""


def data_config() -> ml_collections.ConfigDict:
    """Defaults for `config.data`; experiments override single fields."""
    cfg = ml_collections.ConfigDict()
    cfg.name = "digits"
    cfg.path = ""
    cfg.val_fraction = 0.1
    cfg.normalize = "standardize"  # or "minmax"
    cfg.mean = ()  # per-channel, [0, 1] pixel scale; empty: measured on the train split
    cfg.std = ()
    cfg.device_resident = "auto"  # "always" | "never"
    cfg.workers = 0
    cfg.prefetch = 2
    cfg.tfds_dir = ""
    cfg.manual_dir = ""
    aug = ml_collections.ConfigDict()
    aug.random_crop_padding = 0
    aug.random_resized_crop = False
    aug.rrc_scale = (0.08, 1.0)
    aug.hflip = False
    aug.vflip = False
    aug.rotation = 0.0
    aug.translate = 0.0
    aug.grayscale = 0.0
    aug.cutout = 0
    aug.mixup_alpha = 0.0
    aug.cutmix_alpha = 0.0
    cfg.augment = aug
    return cfg


@dataclasses.dataclass(frozen=True)
class Augment:
    """The train-time augmentations as a hashable value, so jit can specialise on it."""

    random_crop_padding: int = 0
    random_resized_crop: bool = False
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = False
    vflip: bool = False
    rotation: float = 0.0
    translate: float = 0.0
    grayscale: float = 0.0
    cutout: int = 0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def augment_from_config(aug_cfg) -> Augment:
    """Validates `config.data.augment` and freezes it."""
    known = {f.name for f in dataclasses.fields(Augment)}
    given = dict(aug_cfg.items()) if aug_cfg is not None else {}
    unknown = sorted(set(given) - known)
    if unknown:
        raise DataError(
            f"unknown augmentation {unknown[0]!r}; choose from {', '.join(sorted(known))}."
        )
    aug = Augment(**{k: (tuple(v) if k == "rrc_scale" else v) for k, v in given.items()})
    lo, hi = aug.rrc_scale
    checks = [
        (aug.random_crop_padding >= 0, "random_crop_padding must be >= 0"),
        (0 < lo <= hi <= 1, f"rrc_scale {aug.rrc_scale} must satisfy 0 < low <= high <= 1"),
        (aug.rotation >= 0, "rotation is a maximum angle in degrees and must be >= 0"),
        (0 <= aug.translate < 1, "translate is a fraction of the image size in [0, 1)"),
        (0 <= aug.grayscale <= 1, "grayscale is a probability in [0, 1]"),
        (aug.cutout >= 0, "cutout is a square side in pixels and must be >= 0"),
        (aug.mixup_alpha >= 0 and aug.cutmix_alpha >= 0, "mixup_alpha/cutmix_alpha must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise DataError(f"config.data.augment: {message}; fix the value in your config.")
    return aug


def mean_std_from_config(cfg, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The given per-channel mean/std (broadcast from one value), or None when they should be measured."""
    mean, std = tuple(cfg.mean or ()), tuple(cfg.std or ())
    if not mean and not std:
        return None
    if not mean or not std:
        raise DataError(
            "config.data.mean and config.data.std must be given together; set both or neither."
        )
    mean = mean * channels if len(mean) == 1 else mean
    std = std * channels if len(std) == 1 else std
    if len(mean) != channels or len(std) != channels:
        raise DataError(
            f"config.data.mean/std need 1 or {channels} values (one per channel); got {len(mean)}/{len(std)}."
        )
    if max(mean) > 1 or max(std) > 1:
        raise DataError(
            "config.data.mean/std are on the [0, 1] pixel scale; divide 0-255 values by 255."
        )
    if min(std) <= 0:
        raise DataError("config.data.std must be positive; fix the values in your config.")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
