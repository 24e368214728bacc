"""Turns on JAX's persistent compilation cache, so a second launch of the same config skips XLA compilation."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

# Environment variable that overrides the default directory; set it to "off" to disable the cache.
CACHE_ENV = "CNNJAX_COMPILATION_CACHE"
# XLA cannot serialise a CPU program that calls oneDNN's convolution (cnnjax/onednn.py): writing it
# fails with this error, and the program is compiled again at the next launch. JAX warns at every
# such compile; README says it once ("Compilation cache"), and CNNJAX_CPU_ONEDNN=off caches them.
UNSERIALISABLE = r"Error writing persistent compilation cache entry .*MemoryError: std::bad_alloc"
# Programs that compile faster than this are not worth a disk read. A launch's state init, input
# preprocessing, eval step and the CPU kernels' self-check compile in 0.05-0.6 s each: cached too, a
# second `python launch.py` took 9.7-10.0 s against 10.6-11.5 s with 0.5 here, and the first launch
# took no longer (2-core CPU, 2026-12-07; the cache stays under 1 MB for it).
MIN_COMPILE_SECONDS = 0.05


def default_cache_dir() -> Path:
    """$CNNJAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/cnnjax/jax, else ~/.cache/cnnjax/jax."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnjax" / "jax"


def enable_compilation_cache(
    path: str | os.PathLike | None = None, *, min_compile_seconds: float = MIN_COMPILE_SECONDS
) -> Path | None:
    """Points JAX's persistent compilation cache at `path` (default: `default_cache_dir()`).

    Returns the directory in use, or None when the cache is turned off ($CNNJAX_COMPILATION_CACHE=off
    or path="off"). Safe to call after something has already compiled: the cache is re-initialised
    so the new directory takes effect for the next compilation.
    """
    requested = os.environ.get(CACHE_ENV, "") if path is None else str(path)
    if requested.lower() == "off":
        return None
    directory = Path(path).expanduser() if path is not None else default_cache_dir()
    if min_compile_seconds < 0:
        raise ValueError(
            f"min_compile_seconds={min_compile_seconds} must be >= 0 (0 caches every program)"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cannot create the compilation cache directory {directory} ({err.strerror}); pass a "
            f"writable path or set {CACHE_ENV}=off"
        ) from None
    warnings.filterwarnings("ignore", message=UNSERIALISABLE)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    # JAX decides once, at its first compilation, whether a cache exists; make it decide again.
    compilation_cache.reset_cache()
    return directory
