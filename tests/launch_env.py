"""Environment for tests that run launch.py in a subprocess (imported by those test files)."""

import os
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses share launch.py's persistent compilation cache: the runs compile identical programs.
CACHE_DIR = os.path.join(tempfile.gettempdir(), "cnnjax_test_jax_cache")


def subprocess_env(devices: int | None = None) -> dict[str, str]:
    """os.environ plus the shared cache, CPU only, and (if given) this many simulated devices.

    The session's own XLA_FLAGS (tests/conftest.py's) are kept, without any device count.
    """
    env = {**os.environ, "CNNJAX_COMPILATION_CACHE": CACHE_DIR, "JAX_PLATFORMS": "cpu"}
    if devices is not None:
        kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])
    return env
