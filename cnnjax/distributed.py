"""Multi-process start-up (jax.distributed) and the ("data",) device mesh every run trains on."""

from __future__ import annotations

import os

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Environment variables that jax.distributed's cluster auto-detection understands (SLURM, Open MPI,
# Cloud TPU pods, Kubernetes jobsets); without one of these, a run is a single process.
_CLUSTER_ENV = (
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "JOBSET_NAME",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Joins a multi-process run when flags or a cluster environment ask for one; else does nothing.

    Must run before anything touches a JAX device. With explicit flags all three are required.
    """
    given = [bool(coordinator_address), num_processes > 0, process_id >= 0]
    if any(given) and not all(given):
        raise ValueError(
            "multi-process flags are incomplete: pass all of --coordinator_address HOST:PORT, "
            "--num_processes N and --process_id I (or none, to auto-detect or run one process)"
        )
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id {process_id} must be in [0, {num_processes})")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif any(name in os.environ for name in _CLUSTER_ENV):
        jax.distributed.initialize()


def make_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, axis "data" (pure data parallelism)."""
    # Auto axes: XLA's partitioner inserts the cross-device reductions (e.g. batch-norm moments over
    # the global batch) that the model code does not spell out.
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: split along its first axis over the "data" devices."""
    return NamedSharding(mesh, PartitionSpec("data"))


def is_primary() -> bool:
    """Whether this process writes the run directory's files (process 0 of a multi-process run)."""
    return jax.process_index() == 0
