"""The receptive-field study's report: stacked 3x3 units against one 5x5 or 7x7, counted and measured.

Called by `run_sweep` for `experiments/ablation_receptive_field.py` (sweep.study). Each pair has
the same receptive field; the reference is the single large kernel, the candidate the stack of
3x3 convolutions. The tables, plots and reading are `cnnjax.studies.bottleneck`'s pair machinery.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import ml_collections

from cnnjax.models.ablation import RECEPTIVE_FIELD_UNITS, StackedConv
from cnnjax.studies.bottleneck import Pair, Unit, block_parts, study_sections


def unit(name: str, channels: int = 128, size: int = 32) -> Unit:
    """A ReceptiveFieldNet unit (`name` in RECEPTIVE_FIELD_UNITS) at `channels` in and out."""
    kernels = RECEPTIVE_FIELD_UNITS[name]
    return Unit(f"{' + '.join(f'{k}x{k}' for k in kernels)}, {channels} ch",
                StackedConv(channels, kernels=kernels, **block_parts()), (size, size, channels),
                tuple((k, channels, channels) for k in kernels), kernels)


@functools.lru_cache(maxsize=8)
def receptive_field_pairs(channels: int = 128) -> tuple[Pair, ...]:
    """Two 3x3 against one 5x5 and three 3x3 against one 7x7, at `channels` channels (cached, so
    the arithmetic of the same pairs is computed once)."""
    return (
        Pair("two 3x3 vs one 5x5", "5x5", "3x3x2", (unit("5x5", channels), unit("3x3x2", channels))),
        Pair("three 3x3 vs one 7x7", "7x7", "3x3x3", (unit("7x7", channels), unit("3x3x3", channels))),
    )


def report(workdir: str, config: ml_collections.ConfigDict, summary: Mapping,
           results: Sequence[tuple[Mapping, list[dict]]]) -> str:
    """The sweep.study hook: this study's markdown for report.md."""
    return study_sections("Receptive field", "receptive_field", receptive_field_pairs(), workdir,
                          config, summary, results)
