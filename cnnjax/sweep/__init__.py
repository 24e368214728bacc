"""Sweeps over config fields: `sweep_config` declares one, `run_sweep` runs it and writes the report."""

from cnnjax.sweep.runner import run_sweep
from cnnjax.sweep.space import sweep_config

__all__ = ["run_sweep", "sweep_config"]
