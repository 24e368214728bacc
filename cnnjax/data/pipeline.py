"""The Pipeline: train/eval batches as sharded global arrays, from device-resident data or a grain host loader."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cnnjax.data import preprocess, transforms
from cnnjax.data.config import Augment, DataError
from cnnjax.data.sources import Dataset

CPU_RESIDENT_BYTES = 2 << 30
EVAL_SPLITS = ("validation", "test")


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the training examples in `epoch`: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def local_rows(sharding: NamedSharding, batch_size: int) -> np.ndarray:
    """The rows of a global batch that this process's devices hold, in the order
    `jax.make_array_from_process_local_data` expects them."""
    slices = {
        idx[0].indices(batch_size)[:2]
        for idx in sharding.addressable_devices_indices_map((batch_size,)).values()
    }
    return np.concatenate([np.arange(lo, hi) for lo, hi in sorted(slices)])


def fits_on_device(nbytes: int, mesh: Mesh) -> bool:
    """Whether a dataset of `nbytes` fits comfortably: < 1/4 of device memory, or < 2 GiB without stats (CPU)."""
    # A local device: another process's devices have no readable memory stats.
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    stats = local[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return nbytes < (limit // 4 if limit else CPU_RESIDENT_BYTES)


@dataclasses.dataclass(frozen=True)
class TrainOrder:
    """Maps a step to the global example indices of its batch (picklable, for grain workers)."""

    seed: int
    num_train: int
    batch_size: int

    def __call__(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.num_train // self.batch_size)
        b = self.batch_size
        return _cached_permutation(self.seed, epoch, self.num_train)[within * b : (within + 1) * b]


@dataclasses.dataclass(frozen=True)
class EvalOrder:
    """Maps an eval batch number to (indices, mask); padding rows read example 0 and have mask 0."""

    num_examples: int
    batch_size: int

    def __call__(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        positions = batch * self.batch_size + np.arange(self.batch_size)
        real = positions < self.num_examples
        return np.where(real, positions, 0).astype(np.int32), real.astype(np.float32)


class Pipeline:
    """Train and eval batches for one dataset; see cnnjax/data/__init__.py for the contract."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        image_size: int,
        channels: int,
        global_batch_size: int,
        mesh: Mesh,
        seed: int,
        aug: Augment,
        mean: tuple,
        std: tuple,
        resident: bool,
        workers: int = 0,
        prefetch: int = 2,
    ):
        self.name = dataset.name
        self.num_classes = dataset.num_classes
        self.num_train = len(dataset.splits["train"])
        self.global_batch_size = global_batch_size
        self.steps_per_epoch = self.num_train // global_batch_size
        self.image_shape = (image_size, image_size, channels)
        self.mean, self.std = mean, std
        self.resident = resident
        self._splits = dataset.splits
        self._aug = aug
        self._seed, self._workers, self._prefetch = seed, workers, prefetch
        # Inputs live on an Auto-typed copy of the mesh so the jitted code needs no sharding annotations;
        # outputs carry the caller's mesh (Explicit or Auto) as the contract promises.
        auto_mesh = Mesh(
            mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names)
        )
        self._batch_sharding = NamedSharding(auto_mesh, P("data"))
        self.sharding = NamedSharding(mesh, P("data"))
        self.eval_batch_size = -(-global_batch_size // mesh.size) * mesh.size
        self._train_rows = local_rows(self._batch_sharding, global_batch_size)
        self._eval_rows = local_rows(self._batch_sharding, self.eval_batch_size)
        common = dict(image_size=image_size, channels=channels, mean=tuple(mean), std=tuple(std))
        train = dict(seed=seed, aug=aug, num_classes=self.num_classes, **common)
        self._train_order = TrainOrder(seed, self.num_train, global_batch_size)
        self._device_data = {}
        if resident:
            replicated = NamedSharding(auto_mesh, P())
            for split, data in dataset.splits.items():
                data = data.materialize()
                # Every process passes the whole array, so this also works across hosts.
                self._device_data[split] = tuple(
                    jax.make_array_from_process_local_data(replicated, a, a.shape)
                    for a in (data.images, data.labels)
                )
        # Both paths run the very same compiled preprocessing; the device path only adds a gather in
        # front (kept separate: fused into the augmentations, XLA re-gathers per access and runs slower).
        self._jit_train = compiled("train", self.sharding, **train)
        self._jit_eval = compiled("eval", self.sharding, **common)
        self._jit_gather = compiled("gather", self._batch_sharding)

    # --- what a step or an eval batch reads ------------------------------------------------------

    def train_indices(self, step: int) -> np.ndarray:
        """Global example indices of the training batch at `step`."""
        return self._train_order(step)

    def eval_order(self, split: str) -> EvalOrder:
        return EvalOrder(self.num_examples(split), self.eval_batch_size)

    def num_examples(self, split: str) -> int:
        if split not in self._splits:
            raise DataError(f"unknown split {split!r}; use 'train', 'validation' or 'test'.")
        return len(self._splits[split])

    # --- batches ---------------------------------------------------------------------------------

    def train_batches(self, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
        """Batches for steps start_step, start_step + 1, ... forever; step s depends only on (seed, s)."""
        if self.resident:
            images, labels = self._device_data["train"]
            for step in itertools.count(start_step):
                idx = self._to_global(self.train_indices(step)[self._train_rows])
                raw, raw_labels = self._jit_gather(images, labels, idx)
                yield self._jit_train(raw, raw_labels, jnp.int32(step), self._mix(step))
            return
        loader = self._host_loader("train", start_step)
        for step, (raw, labels) in zip(itertools.count(start_step), loader, strict=False):
            yield self._jit_train(
                self._to_global(raw), self._to_global(labels), jnp.int32(step), self._mix(step)
            )

    def eval_batches(self, split: str) -> Iterator[dict[str, jax.Array]]:
        """Every example of `split` once, in order, the last batch padded and masked."""
        if split not in EVAL_SPLITS:
            raise DataError(f"eval split {split!r} unknown; use 'validation' or 'test'.")
        n = self.num_examples(split)
        if n == 0:
            raise DataError(
                f"the {split} split of {self.name!r} is empty; add {split} data or evaluate another split."
            )
        rows = self._eval_rows
        num_batches = -(-n // self.eval_batch_size)
        if self.resident:
            images, labels = self._device_data[split]
            order = self.eval_order(split)
            for b in range(num_batches):
                idx, mask = order(b)
                raw, raw_labels = self._jit_gather(images, labels, self._to_global(idx[rows]))
                yield self._jit_eval(raw, raw_labels, self._to_global(mask[rows]))
            return
        for raw, labels, mask in self._host_loader(split, 0, num_batches):
            yield self._jit_eval(
                self._to_global(raw), self._to_global(labels), self._to_global(mask)
            )

    # --- helpers ---------------------------------------------------------------------------------

    def _mix(self, step: int) -> dict | None:
        if not self._aug.mixes:
            return None
        return transforms.mix_params(self._seed, step, self.global_batch_size, self._aug)

    def _to_global(self, local: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self._batch_sharding, local)

    def _host_loader(self, split: str, start: int, stop: int | None = None):
        from cnnjax.data import host  # grain is slow to import; only the host path needs it

        if split == "train":
            reader = host.BatchReader(self._splits[split], self._train_order, self._train_rows)
        else:
            reader = host.BatchReader(self._splits[split], self.eval_order(split), self._eval_rows)
        return host.load(reader, start, stop, workers=self._workers, prefetch=self._prefetch)


def _gather(images, labels, idx):
    return images[idx], labels[idx]


_KINDS = {"train": preprocess.train_batch, "eval": preprocess.eval_batch, "gather": _gather}


@functools.lru_cache(maxsize=64)
def compiled(kind: str, out_sharding: NamedSharding, **static):
    """One jitted function per configuration, shared by pipelines built alike (no recompiles)."""
    return jax.jit(functools.partial(_KINDS[kind], **static), out_shardings=out_sharding)


@functools.lru_cache(maxsize=4)
def _cached_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return epoch_permutation(seed, epoch, n)
