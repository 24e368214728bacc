"""Test-session settings shared by every test file."""

import os

import pytest

# The suite compiles many small programs once each: LLVM's expensive passes cost more than they save.
# Appended (not set) so files that simulate devices keep their own flags; jax reads XLA_FLAGS lazily.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# At -O0, XLA's own fused loops run unoptimised while YNNPACK's kernels come prebuilt, so the suite
# keeps XLA's default fusions; tests/test_xla_options.py checks cnnjax's CPU options themselves.
os.environ.setdefault("CNNJAX_XLA_OPTIONS", "off")

# The CPU forms of the convolution and batch norm (cnnjax/cpu_conv.py, cnnjax/batchnorm.py) add tracing
# and compile time to every model that uses them. tests/test_cpu_conv.py and tests/test_batchnorm.py
# check them against XLA's convolution and flax's batch norm, layer by layer and on whole models, and
# the modules below train with them as users do; the rest of the suite tests the models and the
# training code on XLA's convolution and flax's formula, which keeps the suite inside its time
# budget. `CNNJAX_CPU_REWRITES=on pytest` runs the whole suite with them.
CPU_FORMS_MODULES = {"test_cpu_conv", "test_onednn", "test_cpu_kernels", "test_cpu_densenet",
                     "test_batchnorm", "test_train_step", "test_train_sharded", "test_launch",
                     "test_bench"}


@pytest.fixture(autouse=True, scope="module")
def _cpu_forms_only_where_tested(request):
    # Module scope, so that module fixtures (a study's smoke sweep) see the same setting.
    with pytest.MonkeyPatch.context() as patch:
        name = request.module.__name__.rsplit(".", 1)[-1]
        if name not in CPU_FORMS_MODULES and "CNNJAX_CPU_REWRITES" not in os.environ:
            patch.setenv("CNNJAX_CPU_REWRITES", "off")
        yield
