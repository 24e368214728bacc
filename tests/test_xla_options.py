"""cnnjax's per-platform XLA compiler options: on CPU the engine's steps compile without YNNPACK
fusions (measured faster for the nets people train on a CPU), state inits at LLVM -O1 (same values,
faster compile), and the user can opt out."""

import jax
import numpy as np
import optax
import pytest

from cnnjax import bench, distributed, models, xla_options
from cnnjax.train import state as train_state

YNN = "xla_cpu_experimental_ynn_fusion_type"


def _train_hlo():
    mesh = distributed.make_mesh()
    parts = bench.build("lenet5", batch_size=128, image_size=32, precision="fp32", mesh=mesh)
    batch = bench.synthetic_batch(128, 32, 1, 10, mesh)
    return parts["train"].lower(parts["state"], batch).compile().as_text()


def test_cpu_train_step_compiles_without_ynn_fusions(monkeypatch):
    assert jax.devices()[0].platform == "cpu"
    monkeypatch.delenv("CNNJAX_XLA_OPTIONS", raising=False)  # conftest turns them off for the suite
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    mesh = distributed.make_mesh()
    assert xla_options.step_options(mesh, 61_706) == {YNN: ""}  # LeNet-5's parameters
    assert xla_options.step_options(mesh, 11_000_000) == {}  # resnet18: XLA's default is as fast
    assert "__ynn_fusion" not in _train_hlo()  # the fusion kind in its backend config
    monkeypatch.setenv("CNNJAX_XLA_OPTIONS", "off")  # XLA's default: LeNet's convs become YNN fusions
    assert xla_options.step_options(mesh, 61_706) == {}
    assert "__ynn_fusion" in _train_hlo()


def test_user_flags_win_and_unknown_options_are_skipped(monkeypatch):
    monkeypatch.delenv("CNNJAX_XLA_OPTIONS", raising=False)
    mesh = distributed.make_mesh()
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 --{YNN}=default")
    assert xla_options.step_options(mesh, 1000) == {}
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(xla_options, "CPU_OPTIONS", {YNN: "", "xla_cpu_no_such_option": "1"})
    assert xla_options.step_options(mesh, 1000) == {YNN: ""}  # a renamed option is dropped, not fatal


def test_user_flag_reads_one_option_from_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 --{YNN}= --other=1")
    assert xla_options.user_flag(YNN) == ""  # set, to nothing: the fusions off
    assert xla_options.user_flag("xla_force_host_platform_device_count") == "8"
    assert xla_options.user_flag("xla_cpu_no_such_option") is None
    monkeypatch.setenv("XLA_FLAGS", f"--{YNN}=default")
    assert xla_options.user_flag(YNN) == "default"
    monkeypatch.delenv("XLA_FLAGS")
    assert xla_options.user_flag(YNN) is None


def test_state_init_compiles_at_o1_on_cpu_only(monkeypatch):
    monkeypatch.delenv("CNNJAX_XLA_OPTIONS", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # conftest's -O0 would win over ours
    assert xla_options.init_options("cpu") == {"xla_backend_optimization_level": 1}
    assert xla_options.init_options("gpu") == {} and xla_options.init_options("tpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    assert xla_options.init_options("cpu") == {}  # the user's level wins
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("CNNJAX_XLA_OPTIONS", "off")
    assert xla_options.init_options("cpu") == {}


def test_create_train_state_compiles_with_the_init_options(monkeypatch):
    monkeypatch.setattr(xla_options, "init_options", lambda platform: {"xla_cpu_no_such_option": 1})
    model = models.create_model("lenet5")
    with pytest.raises(Exception, match="xla_cpu_no_such_option"):
        train_state.create_train_state(model, optax.sgd(0.1), seed=0, input_shape=(32, 32, 1),
                                       mesh=distributed.make_mesh())


def test_init_at_o1_gives_the_parameters_of_o2():
    # He-normal convolutions: at -O0 some of their values move by one ulp, at -O1 none may.
    name = "ablation_receptive_field"
    init = train_state.init_fn(models.create_model(name), optax.sgd(0.1, momentum=0.9),
                               (32, 32, models.get_spec(name).in_channels), False)
    lowered = jax.jit(init).lower(jax.random.PRNGKey(3))
    o1, o2 = (jax.tree.leaves(lowered.compile({"xla_backend_optimization_level": level})(
        jax.random.PRNGKey(3))) for level in (1, 2))
    assert len(o1) == len(o2) > 10
    for a, b in zip(o1, o2, strict=True):
        np.testing.assert_array_equal(a, b)
