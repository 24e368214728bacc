"""The `--out FILE` of the CPU benchmark scripts (cpu_norm_act.py, cpu_conv_layers.py,
cpu_step_vs_torch.py, init_compile.py): a results file is never overwritten, and it records the
date, the device and JAX's versions beside the script's numbers."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jax
import jaxlib


def refuse_existing(path: str | None) -> None:
    """Exits with a one-line error before any work when `path` exists (earlier results are kept)."""
    if path and Path(path).exists():
        raise SystemExit(f"{path} exists; pass a new --out path (earlier results are kept).")


def save_new(path: str, **fields: Any) -> None:
    """Writes {date, device, jax, jaxlib, **fields} as JSON to `path`, which must not exist."""
    record = {"date": datetime.date.today().isoformat(), "device": str(jax.devices()[0]),
              "jax": jax.__version__, "jaxlib": jaxlib.__version__, **fields}
    with open(path, "x") as f:
        json.dump(record, f, indent=1)
