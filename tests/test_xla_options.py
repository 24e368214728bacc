"""cnnjax's per-platform XLA compiler options: on CPU the engine's steps compile without YNNPACK
fusions (measured faster for the nets people train on a CPU), and the user can opt out."""

import jax

from cnnjax import bench, distributed, xla_options

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
