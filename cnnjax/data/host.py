"""The host loader: grain reads this process's rows of each batch from the source, with workers and prefetch."""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

LOOKAHEAD = 10**12  # "forever" for the train stream; grain wants a finite length


@dataclasses.dataclass(frozen=True)
class BatchReader:
    """Maps a step (train) or batch number (eval) to this process's raw rows; picklable for grain workers.

    `order` is a TrainOrder (returns indices) or an EvalOrder (returns indices and mask).
    """

    split_data: object
    order: object
    rows: np.ndarray

    def __call__(self, number: int):
        picked = self.order(number)
        if isinstance(picked, tuple):
            idx, mask = picked
            images, labels = self.split_data.read(idx[self.rows])
            return images, labels, mask[self.rows]
        return self.split_data.read(picked[self.rows])


def load(reader: BatchReader, start: int, stop: int | None, *, workers: int, prefetch: int):
    """An iterator over reader(start), reader(start + 1), ... read by grain threads (and worker processes)."""
    stop = start + LOOKAHEAD if stop is None else stop
    ds = grain.MapDataset.range(start, stop).map(reader)
    options = grain.ReadOptions(num_threads=max(1, prefetch), prefetch_buffer_size=max(1, prefetch))
    it_ds = ds.to_iter_dataset(options)
    if workers > 0:
        from absl import flags

        # grain's worker processes read absl flags; their defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
        )
    return iter(it_ds)
