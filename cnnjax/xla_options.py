"""XLA compiler options for cnnjax's jitted train and eval steps and state inits, chosen per
platform by measurement.

On CPU, jaxlib 0.10 routes convolutions and the elementwise work around them into YNNPACK fusions.
For small networks, the ones people train on a CPU, XLA's own kernels are faster: without the
fusions lenet5 (62k parameters) trains 1.38x faster and resnet20 (0.27M) 1.11x faster (medians of
three interleaved runs each). For larger networks one run each went both ways: mobilenet_v2 1.11x,
efficientnet_b0 0.93x, resnet18 0.97x, densenet121 0.98x, googlenet 0.88x, vgg16 0.81x
(benchmarks/RESULTS.md, 2-core CPU, 2026-11-22).
So the fusions go off on CPU for models under SMALL_MODEL_PARAMS parameters only. The options go
to `jax.jit(compiler_options=...)`: they apply to cnnjax's own steps, whatever the process
imported first, and they never touch XLA_FLAGS. Without the fusions XLA:CPU's own reductions are
slow, so such steps trace their batch norms with blocked sums (`traced_for`, cnnjax/batchnorm.py).

The jitted init of a train state (`init_options`) compiles at LLVM -O1 on CPU: that program is
almost all threefry bit generation, one rolled loop per parameter tensor, and LLVM's -O2 spends about
0.2 s on each (0.07 s at -O1) for a program that runs once. Measured on the 2-core CPU (2026-12-07,
`python benchmarks/init_compile.py ...`, benchmarks/init-compile-2026-12-07.json), init compiles
1.2x-3.3x faster (lenet5 1.49 -> 0.46 s, resnet20 2.81 -> 1.08 s, googlenet@64 8.95 -> 4.83 s,
densenet121@64 9.13 -> 7.89 s) with bit-identical parameters (-O0 would change about 4% of them by
one ulp) and the same run time.

Opt out with CNNJAX_XLA_OPTIONS=off, or set the same flag in XLA_FLAGS yourself (yours wins).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cnnjax import batchnorm

YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {YNN_FUSIONS: ""}  # "" = no YNNPACK fusions
SMALL_MODEL_PARAMS = 1_000_000  # measured boundary: see the module docstring
INIT_CPU_OPTIONS = {"xla_backend_optimization_level": 1}  # see the module docstring


def user_flag(name: str) -> str | None:
    """The value XLA_FLAGS gives option `name` ("" for `--name=`), or None where it does not set it."""
    match = re.search(rf"--{name}=(\S*)", os.environ.get("XLA_FLAGS", ""))
    return match.group(1) if match else None


@functools.cache
def _known(name: str, value: Any) -> bool:
    """Whether this jaxlib accepts the option (a renamed or retired one is skipped, not fatal)."""
    try:
        jax.jit(jnp.negative, compiler_options={name: value}).lower(jnp.zeros(1)).compile()
    except Exception:  # jaxlib raises JaxRuntimeError "No such compile option"
        return False
    return True


def _opted_out() -> bool:
    return os.environ.get("CNNJAX_XLA_OPTIONS", "").lower() in ("off", "0", "false")


def _usable(options: dict[str, Any]) -> dict[str, Any]:
    """`options` less those XLA_FLAGS sets (the user's win) and those this jaxlib does not know."""
    return {name: value for name, value in options.items()
            if user_flag(name) is None and _known(name, value)}


def step_options(mesh: Mesh, num_params: int) -> dict[str, str]:
    """The compiler options for the steps of a model with `num_params` parameters on `mesh`:
    CPU_OPTIONS for a small model on CPU, else none."""
    if _opted_out() or mesh.devices.flat[0].platform != "cpu" or num_params >= SMALL_MODEL_PARAMS:
        return {}
    return _usable(CPU_OPTIONS)


def init_options(platform: str) -> dict[str, int]:
    """The compiler options for a jitted state init on `platform`: INIT_CPU_OPTIONS on CPU, else
    none (on GPU and TPU unmeasured, so XLA's default)."""
    if _opted_out() or platform != "cpu":
        return {}
    return _usable(INIT_CPU_OPTIONS)


def traced_for(fn: Callable[..., Any], options: dict[str, str]) -> Callable[..., Any]:
    """fn, traced inside `batchnorm.blocked_sums()` when `options` or XLA_FLAGS turn YNNPACK's
    fusions off: XLA's own reductions are then slow on CPU (cnnjax/batchnorm.py)."""
    if options.get(YNN_FUSIONS) != "" and user_flag(YNN_FUSIONS) != "":
        return fn

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with batchnorm.blocked_sums():
            return fn(*args, **kwargs)

    return traced
