"""cnnjax: the classic CNN family in JAX/Flax."""

from cnnjax import host_memory

# Before JAX starts its CPU backend's threads (cnnjax/host_memory.py says why).
RETAINS_FREED_MEMORY = host_memory.retain_freed_memory()
