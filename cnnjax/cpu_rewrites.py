"""The CNNJAX_CPU_REWRITES switch for cnnjax's CPU forms (cnnjax/layers.py, cnnjax/batchnorm.py)."""

from __future__ import annotations

import os


def cpu_rewrites_enabled() -> bool:
    """False when CNNJAX_CPU_REWRITES=off (read at trace time, so it applies to the next compile)."""
    return os.environ.get("CNNJAX_CPU_REWRITES", "on").lower() not in ("off", "0", "false")
