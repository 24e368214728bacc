"""Per-layer statistics and gradient norms show the textbook effects of init, activation and skips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import diagnostics
from cnnjax.models.ablation import PlainNet

X = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
Y = jnp.arange(8) % 10


def _net(**kwargs):
    model = PlainNet(**kwargs)
    return model, model.init(jax.random.key(0), X[:1])


def _hidden(stats):
    return [s for s in stats if s["name"].startswith("layer")]


def test_zero_init_units_are_identical_and_only_the_head_bias_learns():
    model, variables = _net(depth=4, width=4, act="tanh", kernel_init="zeros", norm=False)
    stats = diagnostics.layer_statistics(model, variables, X)
    assert [s["name"] for s in stats] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert all(s["unit_spread"] == 0 and s["std"] == 0 for s in stats)
    grads = diagnostics.parameter_gradients(model, variables, X, Y)
    flat = {jax.tree_util.keystr(p): np.abs(g).max() for p, g in
            jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert flat.pop("['head']['bias']") > 0.01
    assert len(flat) == 11 and all(v == 0 for v in flat.values())  # 5 convs x (kernel, bias) + head kernel


def test_zero_init_sigmoid_units_stay_symmetric():
    # sigmoid(0) = 0.5, so the head kernel does learn, but every hidden unit gets the same row of it.
    model, variables = _net(depth=2, width=4, act="sigmoid", kernel_init="zeros", norm=False)
    assert all(s["unit_spread"] == 0 for s in diagnostics.layer_statistics(model, variables, X))
    head = np.asarray(diagnostics.parameter_gradients(model, variables, X, Y)["head"]["kernel"])
    assert np.abs(head).max() > 1e-3
    np.testing.assert_array_equal(head, np.broadcast_to(head[:1], head.shape))


def test_small_init_makes_deep_activations_vanish():
    small = diagnostics.layer_statistics(*_net(depth=8, act="tanh", kernel_init="small_normal",
                                               norm=False), X)
    stds = [s["std"] for s in small[:-1]]  # stem .. layer8
    assert np.all(np.diff(stds) < 0), stds
    assert stds[-1] / stds[0] < 1e-6  # measured 3.0e-8: about x0.12 per layer
    xavier = diagnostics.layer_statistics(*_net(depth=8, act="tanh", kernel_init="xavier_normal",
                                                norm=False), X)
    assert xavier[-2]["std"] > 0.1  # the same net with Xavier init keeps its signal


def test_sigmoid_saturates_under_large_init_relu_does_not():
    sat = {}
    for act in ("sigmoid", "tanh", "relu"):
        model, variables = _net(depth=6, act=act, kernel_init="large_normal", norm=False)
        sat[act] = _hidden(diagnostics.layer_statistics(model, variables, X))
    mean = {a: np.mean([s["fraction_saturated"] for s in v]) for a, v in sat.items()}
    assert mean["sigmoid"] > 0.4 and mean["tanh"] > 0.7 and mean["relu"] == 0
    # relu's flat side is its zeros: about half the units, not the saturated majority of tanh
    assert 0.3 < np.mean([s["fraction_zero"] for s in sat["relu"]]) < 0.7


def test_residual_net_has_larger_early_gradients_than_plain_at_depth_20(tmp_path):
    kwargs = dict(depth=20, width=8, act="relu", kernel_init="xavier_normal", norm=False)
    norms = {}
    for residual in (False, True):
        model, variables = _net(residual=residual, **kwargs)
        norms[residual] = diagnostics.gradient_norms(model, variables, X, Y)
    assert list(norms[False]) == ["stem", *(f"layer{i}" for i in range(1, 21)), "head"]
    # measured: stem 1.3e-4 plain vs 1.3 residual (Xavier halves the ReLU signal per plain layer)
    for layer in ("stem", "layer1", "layer2"):
        assert norms[True][layer] > 100 * norms[False][layer]
    path = diagnostics.plot_gradient_norms({"plain": norms[False], "residual": norms[True]},
                                           tmp_path / "grads.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_layer_stats_writes_png(tmp_path):
    stats = [{"name": f"layer{i}", "mean": 0.1 * i, "std": 10.0**-i, "fraction_saturated": 0.0,
              "fraction_zero": 0.5} for i in range(4)]
    path = diagnostics.plot_layer_stats({"he": stats, "small": stats}, tmp_path / "sub" / "s.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    assert diagnostics.plot_layer_stats(stats, tmp_path / "one.png").exists()


def test_saturation_rules_and_bad_labels():
    a = jnp.array([0.005, 0.5, 0.995, -0.995])
    assert diagnostics.saturated(a, "sigmoid").tolist() == [True, False, True, True]
    assert diagnostics.saturated(a, "tanh").tolist() == [False, False, True, True]
    assert not diagnostics.saturated(a, "relu").any()
    model, variables = _net(depth=2, width=2)
    with pytest.raises(ValueError, match="integer class ids"):
        diagnostics.parameter_gradients(model, variables, X, jax.nn.one_hot(Y, 10))
