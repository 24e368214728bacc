"""Test-session settings shared by every test file."""

import os

# The suite compiles many small programs once each: LLVM's expensive passes cost more than they save.
# Appended (not set) so files that simulate devices keep their own flags; jax reads XLA_FLAGS lazily.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# At -O0, XLA's own fused loops run unoptimised while YNNPACK's kernels come prebuilt, so the suite
# keeps XLA's default fusions; tests/test_xla_options.py checks cnnjax's CPU options themselves.
os.environ.setdefault("CNNJAX_XLA_OPTIONS", "off")
