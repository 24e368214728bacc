"""Reader for MNIST-format IDX files (gzip-compressed or raw), as published for MNIST, Fashion-MNIST, KMNIST."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np

from cnnjax.data.config import DataError

# The third magic byte names the element type (big-endian), the fourth the number of dimensions.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
TEST_PREFIXES = ("t10k", "test")


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one IDX file; DataError on a wrong magic number or a truncated body."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(
                f"{path.name}: corrupt gzip stream ({err}); download the file again."
            ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(
            f"{path.name}: wrong magic number {raw[:4].hex() or 'empty'} (expected 0000 + type + ndim); "
            "is it an IDX file? Download the dataset's idx files again."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path.name}: truncated header; download the file again.")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header < expected:
        raise DataError(
            f"{path.name}: truncated body, {len(raw) - header} of {expected} bytes for shape {shape}; "
            "download the file again."
        )
    return (
        np.frombuffer(raw, dtype, count=int(np.prod(shape)), offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def find_idx(folder: Path, prefixes: tuple[str, ...], kind: str, rank: int) -> Path:
    """The file for e.g. train images: train-images-idx3-ubyte[.gz] or train-images.idx3-ubyte[.gz]."""
    pattern = re.compile(rf"(^|[-_])({'|'.join(prefixes)})-{kind}[.-]idx{rank}-ubyte(\.gz)?$")
    matches = sorted(p for p in folder.iterdir() if pattern.search(p.name))
    if not matches:
        raise DataError(
            f"no {prefixes[0]}-{kind}-idx{rank}-ubyte[.gz] in {folder}; point config.data.path at the folder "
            "holding the IDX files."
        )
    return matches[0]


def read_idx_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W], labels [N]) for prefix "train" or "t10k" (also spelled "test")."""
    prefixes = (prefix,) if prefix == "train" else TEST_PREFIXES
    image_path = find_idx(folder, prefixes, "images", 3)
    label_path = find_idx(folder, prefixes, "labels", 1)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(
            f"{image_path.name}/{label_path.name}: expected [N, H, W] images and [N] labels."
        )
    if len(images) != len(labels):
        raise DataError(
            f"{image_path.name} holds {len(images)} images but {label_path.name} {len(labels)} labels; "
            "use the matching pair of files."
        )
    if images.dtype != np.uint8:
        raise DataError(
            f"{image_path.name}: pixels of type {images.dtype}; the idx source reads uint8 images."
        )
    return images, labels.astype(np.int64)
