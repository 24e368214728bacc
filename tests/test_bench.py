"""The benchmark harness returns its keys, the compile cache switches JAX's config, torch parts skip cleanly."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from cnnjax import bench, bench_epoch, compile_cache, profile, trace_ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import run as bench_suite  # noqa: E402  (benchmarks/run.py is a script, not a package)

TINY = ["--batch-size", "8", "--steps", "1", "--repeats", "1"]
KEYS = {
    "model", "batch_size", "image_size", "precision", "device", "params", "trace_seconds",
    "compile_seconds", "eval_compile_seconds", "train_images_per_second", "train_step_seconds",
    "eval_images_per_second", "eval_step_seconds", "forward_flops_per_image", "peak_flops", "mfu",
    "peak_memory_bytes", "train_step_static_bytes", "xla_compiler_options", "op_profile", "init_seconds",
}


@pytest.fixture(scope="module")
def lenet_json():
    """One tiny end-to-end run of the CLI (one train and one eval compile for the whole module)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = bench.main(["lenet5", "--json", "--profile", *TINY])
    assert code == 0
    return json.loads(out.getvalue())


def test_cli_prints_every_key(lenet_json):
    missing = KEYS - set(lenet_json)
    assert not missing, missing
    assert lenet_json["model"] == "lenet5" and lenet_json["params"] == 61_706
    assert lenet_json["image_size"] == 32 and lenet_json["batch_size"] == 8
    assert lenet_json["train_images_per_second"] > 0 and 0 < lenet_json["mfu"]
    assert 0 < lenet_json["init_seconds"] < 60
    # forward FLOPs are the profiler's: 2 x 416,520 MACs of LeNet-5
    assert lenet_json["forward_flops_per_image"] == 2 * 416_520


def test_profile_attributes_the_step_to_ops(lenet_json):
    profile = lenet_json["op_profile"]
    assert profile["wall_ms_per_step"] > 0
    assert profile["categories"]["convolution"] > 0  # LeNet's convolutions are ops of the step
    assert all(not kind.startswith("$") and "::" not in kind for kind in profile["ops"])
    # the slowest instructions name their layer, e.g. "transpose(jvp(LeNet5))/c3/conv_general_dilated"
    sources = [row[3] for row in profile["top_instructions"]]
    assert any(source.split("/")[1:2] in (["c1"], ["c3"], ["c5"]) for source in sources), sources
    report = bench.format_report(lenet_json)
    assert "op profile:" in report and "slowest instructions" in report
    assert f"state init {lenet_json['init_seconds']:.2f} s" in report


def test_parse_trace_groups_op_kinds_per_step():
    events = [{"ph": "X", "name": "transpose_copy_fusion.3", "dur": 4000},
              {"ph": "X", "name": "transpose_copy_fusion.12", "dur": 2000},
              {"ph": "X", "name": "convolution.1", "dur": 1000},
              {"ph": "X", "name": "wrapped_reduce-window.7", "dur": 500},
              {"ph": "X", "name": "ffi_call.12", "dur": 300},  # cnnjax's weight gradient
              {"ph": "X", "name": "ffi_call.3__onednn$convolution", "dur": 100},
              {"ph": "X", "name": "compare_convert_fusion.2", "dur": 200},
              {"ph": "X", "name": "$api.py:2479 block_until_ready", "dur": 9000},
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},
              {"ph": "M", "name": "thread_name"}]
    profile = trace_ops.parse_trace(events, steps=2)
    assert profile["ops"]["transpose_copy_fusion"] == (3.0, 1.0)  # ms and calls per step
    assert profile["ops"]["__onednn$convolution"] == (0.05, 0.5)  # oneDNN's calls, one kind
    assert profile["categories"] == pytest.approx({"transpose": 3.0, "convolution": 0.7,
                                                   "reduction": 0.25, "other fusions and ops": 0.1})
    assert profile["top_instructions"][0] == ["transpose_copy_fusion.3", 2.0, 0.5]
    assert len(profile["top_instructions"]) == 7
    # With the module's custom-call targets, a native batch norm is its own kind and category.
    hlo = """  %ffi_call.12 = f32[3,3,16,16]{3,2,1,0} custom-call(%a, %b), custom_call_target="cnnjax_conv_weight_gradient", api_version=API_VERSION_TYPED_FFI
  %ffi_call.7 = (f32[8,16]{1,0}, f32[16]{0}, f32[16]{0}) custom-call(%c, %d, %e), custom_call_target="cnnjax_norm_act", backend_config={relu = true}"""
    targets = trace_ops.custom_call_targets(hlo)
    assert targets == {"ffi_call.12": "cnnjax_conv_weight_gradient", "ffi_call.7": "cnnjax_norm_act"}
    events.append({"ph": "X", "name": "ffi_call.7", "dur": 800})
    profile = trace_ops.parse_trace(events, steps=2, targets=targets)
    assert profile["ops"]["cnnjax_norm_act"] == (0.4, 0.5)
    assert profile["categories"]["batch norm + ReLU (native)"] == pytest.approx(0.4)
    assert profile["categories"]["convolution"] == pytest.approx(0.7)


def test_op_sources_map_instructions_to_their_jax_operation():
    hlo = """ENTRY %main.4 (x.1: f32[4,4]) -> f32[4,4] {
  %x.1 = f32[4,4]{1,0} parameter(0), metadata={op_name="x"}
  %dot.2 = f32[4,4]{1,0} dot(%x.1, %x.1), metadata={op_name="jit(step)/Net/dense/dot_general" stack_frame_id=3}
  ROOT %tanh_fusion = f32[4,4]{1,0} fusion(%dot.2), kind=kLoop, metadata={op_name="jit(step)/Net/tanh"}
}"""
    assert trace_ops.op_sources(hlo) == {"x.1": "x", "dot.2": "Net/dense/dot_general",
                                         "tanh_fusion": "Net/tanh"}


def test_report_formats_without_torch(lenet_json):
    text = bench.format_report(lenet_json | {"torch_skipped": "torch not importable"})
    assert "lenet5 @ 32px" in text and "images/s" in text and "torch: skipped" in text


def test_bad_arguments_fail_with_a_message(capsys):
    assert bench.main(["lenet5", "--precision", "fp32", "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown model"):
        bench.run_benchmark("lenet6")
    with pytest.raises(ValueError, match="precision"):
        bench.run_benchmark("lenet5", precision="fp8")


def test_time_loop_reports_one_time_per_repeat():
    calls = []
    times = bench.time_loop(lambda: calls.append(1) or jnp.zeros(()), steps=3, repeats=2)
    assert len(times) == 2 and len(calls) == 6 and all(t >= 0 for t in times)


@pytest.fixture
def restore_cache_config():
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_enable_compilation_cache")
    saved = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def test_enable_compilation_cache_sets_config_and_writes(tmp_path, restore_cache_config):
    directory = compile_cache.enable_compilation_cache(tmp_path / "cache", min_compile_seconds=0)
    assert directory == tmp_path / "cache" and directory.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(directory)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    jax.jit(lambda x: x * 3.0 + 1.0)(jnp.arange(7.0)).block_until_ready()
    assert any(directory.iterdir()), "the compiled program was not written to the cache"


def test_default_cache_dir_and_off_switch(tmp_path, monkeypatch, restore_cache_config):
    monkeypatch.delenv(compile_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_cache_dir() == tmp_path / "cnnjax" / "jax"
    assert compile_cache.enable_compilation_cache() == tmp_path / "cnnjax" / "jax"
    # A launch's init, preprocessing and eval programs compile in 0.05-0.6 s: the default caches them.
    assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_SECONDS
    assert compile_cache.MIN_COMPILE_SECONDS <= 0.1
    monkeypatch.setenv(compile_cache.CACHE_ENV, "off")
    before = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir == before
    with pytest.raises(ValueError, match="min_compile_seconds"):
        compile_cache.enable_compilation_cache(tmp_path, min_compile_seconds=-1)


def test_torch_equivalents_match_cnnjax_sizes():
    torch = pytest.importorskip("torch")
    from cnnjax import bench_torch

    for name, channels in (("lenet5", 1), ("resnet20", 3)):
        params = profile.profile_model(name)["params"]  # the cnnjax network's count
        model, _ = bench_torch.build_torch_model(name, num_classes=10, in_channels=channels)
        assert sum(p.numel() for p in model.parameters()) == params, name
        assert model(torch.zeros(2, channels, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="torchvision"):
        bench_torch.build_torch_model("mobilenet_v1", num_classes=10, in_channels=3)


def test_torch_benchmark_keys():
    pytest.importorskip("torch")
    from cnnjax import bench_torch

    result = bench_torch.run_torch_benchmark(
        "lenet5", batch_size=4, image_size=32, in_channels=1, num_classes=10, steps=1, repeats=1,
        modes=("eager",))
    assert result["source"] == "hand-written"
    assert result["eager_train_images_per_second"] > 0 and result["best_train_images_per_second"] > 0


def test_torch_runs_in_this_process_or_its_own(lenet_json):
    pytest.importorskip("torch")
    import cnnjax

    result = {"model": "lenet5", "batch_size": 4, "image_size": 32, "precision": "fp32",
              "train_images_per_second": 100.0}
    same = bench.compare_torch(result, steps=1, repeats=1, modes=("eager",))
    assert same["torch_process"] == "same"
    assert same["torch_under_malloc_setting"] == cnnjax.RETAINS_FREED_MEMORY
    # Its own process runs torch under glibc's defaults, whatever this process set.
    own = bench.compare_torch(result, steps=1, repeats=1, modes=("eager",), process="separate")
    assert own["torch_process"] == "separate" and own["torch_under_malloc_setting"] is False
    assert own["torch_eager_train_images_per_second"] > 0 and own["ratio_vs_torch"] > 0
    assert "own process" in bench.format_report(lenet_json | own)
    # Errors there come back as they would here: no equivalent of the model is a skip.
    skipped = bench.with_torch(result, lambda: bench.compare_torch(
        result | {"model": "mobilenet_v1"}, steps=1, repeats=1, modes=("eager",),
        process="separate"))
    assert "torchvision" in skipped["torch_skipped"]


def test_epoch_benchmark_runs_epochs_of_the_resident_pipeline(capsys):
    assert bench_epoch.main(["lenet5", "--num-train", "70", "--batch-size", "16", "--epochs", "2",
                             "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["steps_per_epoch"] == 4 and r["num_train"] == 70  # 70 // 16 whole batches
    assert len(r["epoch_seconds_all"]) == 2 and r["epoch_seconds"] > 0 and r["loss_is_finite"]
    assert r["images_per_second"] == pytest.approx(64 / r["epoch_seconds"])
    assert "speed-up" not in bench_epoch.format_report(r)
    pipeline = bench_epoch.synthetic_pipeline(num_train=32, image_size=32, channels=3,
                                              num_classes=10, batch_size=8,
                                              mesh=bench.distributed.make_mesh())
    assert pipeline.resident and pipeline._aug.random_crop_padding == 4 and pipeline._aug.hflip


def test_torch_comparison_is_skipped_with_the_reason():
    def missing():
        raise ImportError("No module named 'torch'")

    def no_equivalent():
        raise ValueError("no PyTorch equivalent of 'x' here")

    assert bench.with_torch({"a": 1}, lambda: {"torch_b": 2}) == {"a": 1, "torch_b": 2}
    assert bench.with_torch({"a": 1}, missing)["torch_skipped"] == (
        "torch not importable: No module named 'torch'")
    assert bench.with_torch({"a": 1}, no_equivalent) == {
        "a": 1, "torch_skipped": "no PyTorch equivalent of 'x' here"}


def test_epoch_benchmark_rejects_an_epoch_smaller_than_a_batch(capsys):
    assert bench_epoch.main(["lenet5", "--num-train", "8", "--batch-size", "16"]) == 2
    assert "--num-train (8) >= --batch-size (16)" in capsys.readouterr().err


def test_torch_augmentation_crops_flips_and_normalises():
    torch = pytest.importorskip("torch")
    from cnnjax import bench_torch

    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)
    same = bench_torch._augment(images, mean, std, flip=False, padding=0)
    assert torch.allclose(same, (images.float() / 255 - 0.5) / 0.25)
    out = bench_torch._augment(images, mean, std, flip=True, padding=2)
    raw = out * 0.25 + 0.5  # back to 0..1
    padded = torch.nn.functional.pad(images.float() / 255, (2,) * 4)
    for b in range(6):  # each output is some 8x8 window of the padded image, maybe mirrored
        windows = [padded[b, :, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        assert any(torch.allclose(raw[b], w, atol=1e-5) or torch.allclose(raw[b], w.flip(2), atol=1e-5)
                   for w in windows)
    with pytest.raises(ValueError, match=r"num_train \(4\) >= batch_size \(8\)"):
        bench_torch.run_torch_epoch("lenet5", num_train=4, batch_size=8, image_size=32,
                                    in_channels=1, num_classes=10)


def test_suite_renders_markdown_with_provenance():
    row = {"model": "lenet5", "image_size": 32, "batch_size": 8, "precision": "fp32",
           "compile_seconds": 1.0, "trace_seconds": 0.1, "train_images_per_second": 10.0,
           "eval_images_per_second": 20.0, "train_step_seconds": 0.8, "mfu": 0.01,
           "peak_memory_bytes": "n/a", "train_step_static_bytes": 1000,
           "xla_compiler_options": {"xla_cpu_experimental_ynn_fusion_type": ""}}
    runs = [{"name": "lenet5@32", "command": "python -m cnnjax.bench lenet5", "result": row},
            {"name": "resnet18@32", "result": {**row, "model": "resnet18", "xla_compiler_options": {}}},
            {"name": "vgg16@224", "skipped": "needs GPU session"}]
    compiled = {"batch_size": 32, "trace_seconds": 14.4, "compile_seconds": 69.0,
                "eval_compile_seconds": 6.7, "init_seconds": 35.2}
    compiles = [{"name": "densenet201@224", "command": "c", "result": compiled},
                {"name": "resnet152@224", "error": "timed out"}]
    text = bench_suite.render(runs, sweeps=[], compiles=compiles,
                              meta={"device": "cpu", "date": "d", "versions": "jax x",
                                    "command": "python run.py"})
    assert "| lenet5 | 32 | 8 |" in text and "needs GPU session" in text
    assert "| densenet201@224 | 32 | 14.4 | 69.0 | 6.7 | 35.2 |" in text
    assert "| resnet152@224 |  | failed: timed out | | | |" in text
    assert "python run.py" in text and "jax x" in text
    assert ("(cnnjax/xla_options.py): lenet5: xla_cpu_experimental_ynn_fusion_type=''; "
            "resnet18: XLA's default") in text
    epoch = {"batch_size": 512, "precision": "bf16", "steps_per_epoch": 97, "epoch_seconds": 2.0,
             "torch_epoch_seconds": 3.0, "speedup_vs_torch": 1.5}
    meta = {"device": "gpu", "date": "d", "versions": "v", "command": "c"}
    text = bench_suite.render(runs, [], [], meta,
                              epochs=[{"name": "resnet20@32", "command": "e", "result": epoch},
                                      {"name": "resnet18@32", "skipped": "needs GPU session"}])
    assert "| resnet20@32 | 512 | bf16 | 49,664 | 2.00 | 3.00 | 1.50x |" in text
    assert "| resnet18@32 | | | | needs GPU session | | |" in text
    own = {**row, "torch_eager_train_images_per_second": 8.0,
           "torch_compile_train_images_per_second": 5.0, "ratio_vs_torch": 1.25}
    text = bench_suite.render(runs, [], [], meta,
                              separate=[{"name": "lenet5@32", "command": "s", "result": own},
                                        {"name": "resnet20@32", "error": "boom"}])
    assert "## Against PyTorch as installed" in text
    assert "| lenet5@32 | 8 | 10.0 | 8.0 | 5.0 | 1.25x |" in text
    assert "| resnet20@32 | failed: boom | | | | |" in text and "    s" in text
    turns = {"batch_size": 128, "torch_mode": "compile", "rounds": 20, "cnnjax_median_ms": 170.4,
             "torch_median_ms": 174.9, "throughput_ratio": 174.9 / 170.4}
    text = bench_suite.render(runs, [], [], meta,
                              alternating=[{"name": "resnet20@32", "command": "t", "result": turns},
                                           {"name": "lenet5@32", "error": "no torch"}])
    assert "## Against PyTorch in alternating blocks" in text
    assert "| resnet20@32 | 128 | compile | 20 | 170.4 | 174.9 | 1.03x |" in text
    assert "| lenet5@32 | failed: no torch | | | | | |" in text and "    t" in text


def test_cpu_plan_times_both_torch_modes_in_alternating_blocks():
    plan = bench_suite.PLANS["cpu"]
    assert set(plan["alternating"]) == {"lenet5", "resnet20"}
    cmd = bench_suite.alternating_command("resnet20", 128, plan["alternating_rounds"], "eager")
    assert cmd[1].endswith("benchmarks/cpu_step_vs_torch.py") and Path(cmd[1]).exists()
    assert cmd[2:] == ["resnet20", "--batch-size", "128", "--rounds", "20", "--torch-mode",
                       "eager", "--json"]


def test_cpu_plan_compiles_every_224px_model():
    plan = bench_suite.PLANS["cpu"]
    skipped = {m for m, size in bench_suite.SUITE if plan["batch"].get(m) is None}
    assert skipped == {"resnet50", "efficientnet_b0", "mobilenet_v2", "densenet121", "vgg16",
                       "googlenet"}
    assert skipped < set(plan["compile_only"]) and {"resnet152", "densenet201"} < set(
        plan["compile_only"])


def test_cpu_plan_times_resnet20s_epoch_against_torch():
    plan = bench_suite.PLANS["cpu"]
    assert plan["epoch"] == {"resnet20": 128, "resnet18": None}
    cmd = bench_suite.epoch_command("resnet20", 128, plan, torch=True)
    assert cmd[1:] == ["-m", "cnnjax.bench_epoch", "resnet20", "--batch-size", "128", "--precision",
                       "fp32", "--json", "--compare-torch"]


def test_cpu_step_against_torch_alternates_blocks_and_prints_json(capsys):
    import cpu_step_vs_torch  # benchmarks/cpu_step_vs_torch.py

    calls = []
    times = cpu_step_vs_torch.alternating_ms({"a": lambda: calls.append("a"),
                                              "b": lambda: calls.append("b")}, rounds=2, per_block=3)
    # Each block: one unmeasured step, then 3 timed; blocks in turn.
    assert calls == ["a"] * 4 + ["b"] * 4 + ["a"] * 4 + ["b"] * 4
    assert [len(v) for v in times.values()] == [2, 2]
    pytest.importorskip("torch")
    cpu_step_vs_torch.main(["lenet5", "--batch-size", "4", "--rounds", "1", "--steps", "1",
                            "--torch-mode", "eager", "--json"])
    numbers = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert numbers["model"] == "lenet5" and numbers["torch_mode"] == "eager"
    assert numbers["throughput_ratio"] == pytest.approx(
        numbers["torch_median_ms"] / numbers["cnnjax_median_ms"])


def test_depthwise_benchmark_times_every_form_and_keeps_earlier_results(tmp_path, monkeypatch, capsys):
    import depthwise  # benchmarks/depthwise.py

    monkeypatch.setattr(depthwise, "LAYERS", [("mobilenet_v2", 56, 4, 3, 2)])
    out = tmp_path / "depthwise.json"
    assert depthwise.main(["--batch-size", "2", "--image-size", "32", "--steps", "1",
                           "--repeats", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["input"] == [2, 8, 8, 4] and row["stride"] == 2
    for form in ("xla", "taps", "taps_per_image"):
        assert row[form]["forward_ms"] > 0 and row[form]["gradient_ms"] > 0
    saved = out.read_text()
    assert depthwise.main(["--out", str(out)]) == 2  # an existing file is never overwritten
    assert out.read_text() == saved and "exists" in capsys.readouterr().err
    assert depthwise.main(["--image-size", "100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_gather_against_onednn_benchmark_saves_rows_and_checks_its_layers(tmp_path, capsys):
    import cpu_gather_vs_onednn  # benchmarks/cpu_gather_vs_onednn.py

    from cnnjax import cpu_kernels, onednn

    with pytest.raises(SystemExit, match="expected B,S,CIN,COUT,K,STRIDE"):
        cpu_gather_vs_onednn.parse("2,4,x")
    with pytest.raises(SystemExit, match="every field must be positive"):
        cpu_gather_vs_onednn.parse("2,0,5,16,3,1")
    assert cpu_gather_vs_onednn.parse("2,4,5,17,3,2") == (2, 4, 5, 17, 3, 2)
    if not (cpu_kernels.available() and onednn.available()):
        pytest.skip("needs cnnjax's CPU kernels and jaxlib's oneDNN call")
    out = tmp_path / "layers.json"
    lanes = cpu_kernels.vector_floats()
    layer = f"2,4,{2 * lanes},{lanes + 4},3,2"  # output channels no multiple of the lanes
    cpu_gather_vs_onednn.main([layer, "--rounds", "1", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["layer"] == layer and row["conv_fits"] and row["input_gradient_fits"]
    for name in ("forward", "input_gradient"):  # both kernels ran, and agree
        assert row[f"{name}_gather"] > 0 and row[f"{name}_onednn"] > 0
        assert row[f"{name}_max_relative_gap"] < 1e-4
    assert "train step takes the gather kernel: forward True" in capsys.readouterr().out
    saved = out.read_text()
    with pytest.raises(SystemExit, match="exists"):  # earlier results are never overwritten
        cpu_gather_vs_onednn.main([layer, "--out", str(out)])
    assert out.read_text() == saved
