"""Weight import: round trips per family, torchvision key names, layouts, errors, files, CLI, torch parity."""

import jax
import numpy as np
import pytest

from cnnjax.models import create_model, get_spec
from cnnjax.pretrained import __main__ as cli
from cnnjax.pretrained import (
    abstract_variables,
    from_torch,
    load_state_dict,
    restore_variables,
    save_variables,
    to_torch,
)

# One small model per family (and per block type), with the overrides the torchvision layout needs.
FAMILY_CASES = {
    "alexnet": {},
    "vgg11": {},
    "vgg16_bn": {},
    "googlenet": dict(branch5x5_kernel=3, aux_logits=True),
    "resnet18": {},
    "resnet50": {},
    "densenet121": {},
    "mobilenet_v2": {},
    "efficientnet_b0": {},
}


def _small(name: str, **kwargs):
    return create_model(name, **{**get_spec(name).small, **kwargs})


def _random(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def _identical(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("name", list(FAMILY_CASES))
def test_round_trip_every_family(name):
    model = _small(name, **FAMILY_CASES[name])
    variables = _random(abstract_variables(model, name))
    state_dict = to_torch(variables, name, model)
    assert all(v.ndim != 4 or k.endswith(".weight") for k, v in state_dict.items())
    assert _identical(from_torch(state_dict, name, model), variables)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_round_trip_timm_names(name):
    model = _small(name)
    variables = _random(abstract_variables(model, name))
    state_dict = to_torch(variables, name, model, fmt="timm")
    expected = {"conv_stem.weight", "bn1.running_var", "blocks.0.0.conv_dw.weight",
                "blocks.0.0.conv_pw.weight", "blocks.1.0.conv_pwl.weight", "blocks.1.0.bn3.weight",
                "blocks.6.0.conv_pwl.weight", "conv_head.weight", "bn2.weight", "classifier.weight"}
    if name == "efficientnet_b0":
        expected |= {"blocks.0.0.se.conv_reduce.weight", "blocks.5.0.se.conv_expand.bias"}
    assert expected <= set(state_dict)
    assert _identical(from_torch(state_dict, name, model), variables)  # format detected from keys


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n in ("weight", "bias", "running_mean", "running_var",
                                      "num_batches_tracked")]


def _torchvision_resnet18_keys() -> list[str]:
    keys = ["conv1.weight", *_bn("bn1"), "fc.weight", "fc.bias"]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys += [f"{p}.conv1.weight", *_bn(f"{p}.bn1"), f"{p}.conv2.weight", *_bn(f"{p}.bn2")]
        if layer > 1:
            keys += [f"layer{layer}.0.downsample.0.weight", *_bn(f"layer{layer}.0.downsample.1")]
    return keys


def _torchvision_mobilenet_v2_keys() -> list[str]:
    keys = ["features.0.0.weight", *_bn("features.0.1"), "features.1.conv.0.0.weight",
            *_bn("features.1.conv.0.1"), "features.1.conv.1.weight", *_bn("features.1.conv.2")]
    for i in range(2, 18):
        p = f"features.{i}.conv"
        keys += [f"{p}.0.0.weight", *_bn(f"{p}.0.1"), f"{p}.1.0.weight", *_bn(f"{p}.1.1"),
                 f"{p}.2.weight", *_bn(f"{p}.3")]
    return keys + ["features.18.0.weight", *_bn("features.18.1"), "classifier.1.weight",
                   "classifier.1.bias"]


@pytest.mark.parametrize("name, keys, shapes, count", [
    ("resnet18", _torchvision_resnet18_keys(),
     {"conv1.weight": (64, 3, 7, 7), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
      "layer4.1.conv2.weight": (512, 512, 3, 3), "fc.weight": (1000, 512)}, 11_689_512),
    ("mobilenet_v2", _torchvision_mobilenet_v2_keys(),
     {"features.1.conv.0.0.weight": (32, 1, 3, 3), "features.2.conv.1.0.weight": (96, 1, 3, 3),
      "features.17.conv.2.weight": (320, 960, 1, 1), "features.18.0.weight": (1280, 320, 1, 1),
      "classifier.1.weight": (1000, 1280)}, 3_504_872),
])
def test_full_size_keys_match_torchvision(name, keys, shapes, count):
    model = create_model(name)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract_variables(model, name))
    state_dict = to_torch(zeros, name, model)
    assert sorted(state_dict) == sorted(keys)
    assert {k: state_dict[k].shape for k in shapes} == shapes
    params = sum(v.size for k, v in state_dict.items() if not k.endswith(("running_mean",
                 "running_var", "num_batches_tracked")))
    assert params == count  # torchvision's parameter count


def test_flatten_order_matches_torch_nchw():
    # torch: fc(flatten(x_nchw)); cnnjax: fc(flatten(x_nhwc)); same logits after conversion.
    model = _small("alexnet")
    variables = _random(abstract_variables(model, "alexnet"))
    state_dict = to_torch(variables, "alexnet", model)
    feature = np.random.default_rng(1).standard_normal((2, 32, 6, 6)).astype(np.float32)  # NCHW
    torch_out = feature.reshape(2, -1) @ state_dict["classifier.1.weight"].T
    kernel = from_torch(state_dict, "alexnet", model)["params"]["fc1"]["kernel"]
    flax_out = feature.transpose(0, 2, 3, 1).reshape(2, -1) @ kernel
    np.testing.assert_allclose(flax_out, torch_out, rtol=1e-5, atol=1e-5)


def test_legacy_densenet_and_dataparallel_keys():
    model = _small("densenet121")
    variables = _random(abstract_variables(model, "densenet121"))
    state_dict = to_torch(variables, "densenet121", model)
    legacy = {"module." + k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
              for k, v in state_dict.items()}
    assert "module.features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert _identical(from_torch(legacy, "densenet121", model), variables)


def test_googlenet_aux_heads_dropped_when_model_has_none():
    with_aux = _small("googlenet", branch5x5_kernel=3, aux_logits=True)
    variables = _random(abstract_variables(with_aux, "googlenet"))
    state_dict = to_torch(variables, "googlenet", with_aux)
    plain = _small("googlenet", branch5x5_kernel=3)
    converted = from_torch(state_dict, "googlenet", plain)
    assert "aux1" not in converted["params"]
    assert np.array_equal(converted["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])


def test_mismatches_name_the_first_bad_key():
    model = _small("resnet18")
    state_dict = to_torch(_random(abstract_variables(model, "resnet18")), "resnet18", model)
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(1000, 64\), the model needs "
                                         r"\(10, 64\)"):
        from_torch(state_dict, "resnet18", _small("resnet18", num_classes=10))
    with pytest.raises(ValueError, match=r"checkpoint has no 'layer1\.1\.bn1\.bias'"):
        from_torch(state_dict, "resnet18", _small("resnet18", stage_sizes=(2, 1, 1, 1)))
    extra = {**state_dict, "head.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(ValueError, match="checkpoint key 'head.weight'"):
        from_torch(extra, "resnet18", model)
    from_torch(extra, "resnet18", model, strict=False)
    with pytest.raises(ValueError, match="no torchvision/timm weight conversion for model 'lenet5'"):
        from_torch(state_dict, "lenet5", model)


def test_cli_writes_a_checkpoint_that_init_from_restores(tmp_path, capsys):
    from safetensors.numpy import save_file

    model = _small("resnet18")
    variables = _random(abstract_variables(model, "resnet18"))
    variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])
    save_file(to_torch(variables, "resnet18", model), str(tmp_path / "r18.safetensors"))
    out = tmp_path / "converted"
    assert cli.main(["convert", "resnet18", str(tmp_path / "r18.safetensors"), str(out),
                     "--set", "stage_sizes=(1, 1, 1, 1)", "--set", "width=8"]) == 0
    assert "--config.init_from=" in capsys.readouterr().out
    abstract = abstract_variables(model, "resnet18")
    assert _identical(jax.device_get(restore_variables(str(out), abstract)), variables)
    with pytest.raises(ValueError, match="not empty"):
        save_variables(str(out), variables)


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "mobilenet_v2", "resnet18"])
def test_num_classes_is_read_from_the_last_layer(tmp_path, name):
    # AlexNet's and VGG's first hidden layer is classifier.1/.0: the class count is classifier.6's.
    from safetensors.numpy import save_file

    from cnnjax.pretrained import convert_file

    model = _small(name, num_classes=7)
    path = str(tmp_path / "m.safetensors")
    save_file(to_torch(_random(abstract_variables(model, name)), name, model), path)
    variables, kwargs = convert_file(path, name, **get_spec(name).small)
    assert kwargs["num_classes"] == 7
    size = 64 if name == "alexnet" else 32
    shapes = jax.eval_shape(lambda v: create_model(name, **kwargs).apply(v, np.zeros((1, size, size, 3))),
                            variables)
    assert shapes.shape == (1, 7)


def test_restore_variables_reads_a_run_checkpoint(tmp_path):
    # A cnnjax run saves the whole TrainState; init_from must read just its params and batch_stats.
    import optax
    import orbax.checkpoint as ocp

    from cnnjax.train.state import TrainState

    model = _small("resnet18")
    variables = _random(abstract_variables(model, "resnet18"))
    state = TrainState(step=np.int32(7), params=variables["params"],
                       batch_stats=variables["batch_stats"],
                       opt_state=optax.sgd(0.1, momentum=0.9).init(variables["params"]),
                       rng=np.zeros(2, np.uint32))
    with ocp.CheckpointManager(str(tmp_path / "run")) as manager:
        manager.save(7, args=ocp.args.StandardSave(state))
    restored = restore_variables(str(tmp_path / "run"), abstract_variables(model, "resnet18"))
    assert _identical(jax.device_get(restored), variables)


# --- parity with torch (runs only where torch is installed) -------------------------------------


def _torch_bn(F, sd, p, x, eps=1e-5):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                        sd[f"{p}.bias"], False, 0.0, eps)


def _torch_alexnet(torch, sd, x):
    F = torch.nn.functional
    conv = lambda x, i, **kw: F.relu(F.conv2d(x, sd[f"features.{i}.weight"],  # noqa: E731
                                              sd[f"features.{i}.bias"], **kw))
    x = F.max_pool2d(conv(x, 0, stride=4, padding=2), 3, 2)
    x = F.max_pool2d(conv(x, 3, padding=2), 3, 2)
    x = conv(conv(x, 6, padding=1), 8, padding=1)
    x = torch.flatten(F.adaptive_avg_pool2d(F.max_pool2d(conv(x, 10, padding=1), 3, 2), 6), 1)
    for i in (1, 4):
        x = F.relu(F.linear(x, sd[f"classifier.{i}.weight"], sd[f"classifier.{i}.bias"]))
    return F.linear(x, sd["classifier.6.weight"], sd["classifier.6.bias"])


def _torch_resnet(torch, sd, x, blocks):
    F = torch.nn.functional
    x = F.relu(_torch_bn(F, sd, "bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)))
    x = F.max_pool2d(x, 3, 2, 1)
    for layer, count in enumerate(blocks, start=1):
        for b in range(count):
            p, stride = f"layer{layer}.{b}", 2 if layer > 1 and b == 0 else 1
            y = F.relu(_torch_bn(F, sd, f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"],
                                                             stride=stride, padding=1)))
            y = _torch_bn(F, sd, f"{p}.bn2", F.conv2d(y, sd[f"{p}.conv2.weight"], padding=1))
            if f"{p}.downsample.0.weight" in sd:
                x = _torch_bn(F, sd, f"{p}.downsample.1",
                              F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride))
            x = F.relu(x + y)
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def _torch_mobilenet_v2(torch, sd, x, strides):
    F = torch.nn.functional

    def cba(x, p, stride=1, groups=1, act=True):
        w = sd[f"{p}.0.weight"]
        y = _torch_bn(F, sd, f"{p}.1", F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2,
                                                groups=groups))
        return F.relu6(y) if act else y

    x = cba(x, "features.0", stride=2)
    for i, stride in enumerate(strides, start=1):
        p = f"features.{i}.conv"
        expand = f"{p}.3.weight" in sd
        y = cba(x, f"{p}.0") if expand else x
        y = cba(y, f"{p}.{int(expand)}", stride=stride, groups=y.shape[1])
        last = 2 + int(expand)
        y = _torch_bn(F, sd, f"{p}.{last}", F.conv2d(y, sd[f"{p}.{last - 1}.weight"]))
        x = x + y if stride == 1 and x.shape == y.shape else y
    x = cba(x, f"features.{len(strides) + 1}").mean((2, 3))
    return F.linear(x, sd["classifier.1.weight"], sd["classifier.1.bias"])


@pytest.mark.parametrize("name, size", [("alexnet", 127), ("resnet18", 32), ("mobilenet_v2", 32)])
def test_logits_match_torch(name, size):
    torch = pytest.importorskip("torch")
    model = _small(name)
    variables = _random(abstract_variables(model, name), seed=2)
    variables = jax.tree.map(lambda v: v * 0.3, variables)  # keep 20-layer activations in range
    variables["batch_stats"] = jax.tree.map(lambda v: np.abs(v) + 0.5, variables["batch_stats"])
    sd = {k: torch.from_numpy(np.ascontiguousarray(v))
          for k, v in to_torch(variables, name, model).items()}
    x = np.random.default_rng(3).standard_normal((2, size, size, 3)).astype(np.float32)
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        if name == "alexnet":
            expected = _torch_alexnet(torch, sd, x_nchw)
        elif name == "resnet18":
            expected = _torch_resnet(torch, sd, x_nchw, model.stage_sizes)
        else:
            strides = [s if j == 0 else 1 for _, _, n, s in model.stages for j in range(n)]
            expected = _torch_mobilenet_v2(torch, sd, x_nchw, strides)
    logits = jax.jit(model.apply)(from_torch({k: v.numpy() for k, v in sd.items()}, name, model), x)
    np.testing.assert_allclose(np.asarray(logits), expected.numpy(), rtol=1e-4,
                               atol=1e-4 * float(np.abs(expected.numpy()).max()))


def test_pth_file_loads_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    model = _small("efficientnet_b0")
    variables = _random(abstract_variables(model, "efficientnet_b0"))
    state_dict = to_torch(variables, "efficientnet_b0", model)
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v))
                               for k, v in state_dict.items()}}, tmp_path / "b0.pth")
    loaded = load_state_dict(str(tmp_path / "b0.pth"))
    assert _identical(from_torch(loaded, "efficientnet_b0", model), variables)
