"""Test-session settings shared by every test file."""

import os

# The suite compiles many small programs once each: LLVM's expensive passes cost more than they save.
# Appended (not set) so files that simulate devices keep their own flags; jax reads XLA_FLAGS lazily.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
