"""cnnjax's BatchNorm: flax's variables, values, gradients and running averages, with its textbook
backward pass; blocked sums on CPU inside steps compiled without YNNPACK's fusions; batch norm,
residual add and ReLU as one native op there (`layers.norm_act`); an opt-out."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import export

from cnnjax import batchnorm, cpu_kernels, layers, xla_options

CASES = [  # (input shape, dtype, module arguments)
    ((8, 6, 6, 16), jnp.float32, {}),  # 288 rows: blocks of 32
    ((3, 5, 7, 4), jnp.float32, {}),  # 105 rows: no block divides, one product sums them all
    ((4, 5, 5, 12), jnp.bfloat16, {"dtype": jnp.bfloat16}),
    ((6, 10), jnp.float32, {}),  # after a dense layer
    ((8, 4, 4, 6), jnp.float32, {"use_scale": False}),
    ((8, 4, 4, 6), jnp.float32, {"use_bias": False, "momentum": 0.5, "epsilon": 1e-3}),
]


def _apply(module, variables, x, weights):
    def loss(params, x):
        y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights), (y, updates)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)


@pytest.mark.parametrize("shape,dtype,kwargs", CASES)
def test_batch_norm_form_matches_flax_values_gradients_and_running_averages(shape, dtype, kwargs):
    x = (3 * jax.random.normal(jax.random.key(0), shape) + 1).astype(dtype)
    ours = batchnorm.BatchNorm(use_running_average=False, **kwargs)
    theirs = nn.BatchNorm(use_running_average=False, **kwargs)
    variables = theirs.init(jax.random.key(1), x)
    chex.assert_trees_all_equal(ours.init(jax.random.key(1), x), variables)
    # Away from the initial values, so a swapped scale and bias or a missed statistic shows.
    variables = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(2), v.shape),
                             variables)
    weights = jax.random.normal(jax.random.key(3), shape)
    with batchnorm.blocked_sums():
        (_, (y, updates)), grads = _apply(ours, variables, x, weights)
    (_, (y_ref, updates_ref)), grads_ref = _apply(theirs, variables, x, weights)
    assert y.dtype == y_ref.dtype
    tolerance = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    chex.assert_trees_all_close((y, updates, grads), (y_ref, updates_ref, grads_ref),
                                atol=tolerance, rtol=tolerance)


def test_other_uses_are_flax_own():
    # Also inside the form's context: these configurations fall back to flax's code.
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5))
    variables = nn.BatchNorm(use_running_average=True).init(jax.random.key(1), x)
    variables = jax.tree.map(lambda v: v + 0.5, variables)
    for kwargs, call in [({"use_running_average": True}, {}),
                         ({"use_running_average": False}, {"mask": x > 0}),
                         ({"use_running_average": False, "use_fast_variance": False}, {}),
                         ({"use_running_average": None}, {"use_running_average": True})]:
        ours, theirs = batchnorm.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
        with batchnorm.blocked_sums():
            out = ours.apply(variables, x, mutable=["batch_stats"], **call)
        chex.assert_trees_all_close(out, theirs.apply(variables, x, mutable=["batch_stats"], **call),
                                    atol=1e-6, rtol=1e-6)


def test_models_build_it_and_it_is_a_flax_batch_norm():
    module = layers.batch_norm(train=True)
    assert isinstance(module, batchnorm.BatchNorm) and isinstance(module, nn.BatchNorm)


def _gradient_hlo(shape):
    """The CPU gradient program of one batch norm, compiled as cnnjax compiles a small model's step."""
    x, weights = jnp.ones(shape), jnp.ones(shape)
    module = batchnorm.BatchNorm(use_running_average=False)
    variables = module.init(jax.random.key(0), x)
    loss = lambda params, x: jnp.sum(jnp.sin(  # noqa: E731
        module.apply({**variables, "params": params}, x, mutable=["batch_stats"])[0]) * weights)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=xla_options.CPU_OPTIONS)
    return grad.lower(variables["params"], x).compile().as_text()


def test_blocked_sums_avoid_the_reduce_window_tree_and_opt_out_restores_it(monkeypatch):
    # Without YNNPACK's fusions, XLA:CPU splits a sum over an axis longer than 32 (here the batch)
    # into reduce-window passes.
    shape = (64, 8, 8, 4)
    assert "reduce-window" in _gradient_hlo(shape)
    with batchnorm.blocked_sums():
        assert "reduce-window" not in _gradient_hlo(shape)
        monkeypatch.setenv("CNNJAX_CPU_REWRITES", "off")
        assert "reduce-window" in _gradient_hlo(shape)


def test_steps_without_ynn_fusions_trace_blocked_sums(monkeypatch):
    def seen():
        return batchnorm._BLOCKED.get()

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_options.traced_for(seen, xla_options.CPU_OPTIONS)()
    assert not xla_options.traced_for(seen, {})()
    assert not seen()  # the context closes with the trace
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=false")
    assert xla_options.traced_for(seen, {})()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=eltwise")
    assert not xla_options.traced_for(seen, {})()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerators_sum_with_xla_reductions(platform):
    x, scale, bias = jnp.ones((4, 8, 8, 3)), jnp.ones(3), jnp.zeros(3)
    fn = jax.jit(jax.grad(lambda x: jnp.sum(batchnorm.batch_norm_train(x, scale, bias, 1e-5)[0] ** 2)))
    with batchnorm.blocked_sums():
        assert "dot_general" in export.export(fn, platforms=["cpu"])(x).mlir_module()
        assert "dot_general" not in export.export(fn, platforms=[platform])(x).mlir_module()


def _norm_act_loss(norm, act, variables, weights):
    """A loss through `layers.norm_act(norm, x, act, residual)`, differentiable in the parameters,
    x and the residual, with the batch statistics as aux output."""
    def loss(params, x, residual):
        def call(module, x, residual):
            return layers.norm_act(module, x, act, residual)

        y, updates = nn.apply(call, norm, mutable=["batch_stats"])(
            {**variables, "params": params}, x, residual)
        return jnp.sum(jnp.sin(y) * weights), (y, updates)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.skipif(not cpu_kernels.available(), reason="cnnjax's CPU kernels did not build here")
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_act_is_one_native_op_with_flax_results(with_residual, monkeypatch):
    shape = (8, 6, 6, 16)
    x = 3 * jax.random.normal(jax.random.key(0), shape) + 1
    residual = jax.random.normal(jax.random.key(4), shape) if with_residual else None
    weights = jax.random.normal(jax.random.key(3), shape)
    theirs = nn.BatchNorm(use_running_average=False)
    variables = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(2), v.shape),
                             theirs.init(jax.random.key(1), x))

    def reference(params, x, residual):  # flax's batch norm, the add and the ReLU as written
        y, updates = theirs.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        y = nn.relu(y if residual is None else y + residual)
        return jnp.sum(jnp.sin(y) * weights), (y, updates)

    expected = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2), has_aux=True))(
        variables["params"], x, residual)
    ours = batchnorm.BatchNorm(use_running_average=False)
    for native in ("on", "off"):
        monkeypatch.setenv("CNNJAX_CPU_NATIVE", native)
        fn = _norm_act_loss(ours, nn.relu, variables, weights)
        with batchnorm.blocked_sums():
            chex.assert_trees_all_close(fn(variables["params"], x, residual), expected,
                                        atol=2e-5, rtol=2e-5)
            hlo = fn.lower(variables["params"], x, residual).compile().as_text()
        # Forward and backward as the two kernels, or none of them with the kernels off.
        for target in (cpu_kernels.NORM_ACT, cpu_kernels.NORM_ACT_BACKWARD):
            assert hlo.count(f'custom_call_target="{target}"') == (native == "on")


def test_norm_act_runs_other_norms_activations_and_residuals_as_written():
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 8))
    full = jax.random.normal(jax.random.key(1), x.shape)
    bn = batchnorm.BatchNorm(use_running_average=False)
    for norm, act, residual in [(nn.LayerNorm(), nn.relu, full), (bn, nn.tanh, full),
                                (bn, nn.relu, full[:1])]:  # a residual that broadcasts
        def call(module, x, residual, act=act):
            return layers.norm_act(module, x, act, residual)

        def written(module, x, residual, act=act):
            return act(module(x) + residual)

        variables = nn.init(call, norm)(jax.random.key(2), x, residual)
        with batchnorm.blocked_sums():
            ours = nn.apply(call, norm, mutable=True)(variables, x, residual)
        chex.assert_trees_all_close(ours, nn.apply(written, norm, mutable=True)(variables, x, residual),
                                    atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerators_never_see_the_native_op(platform):
    x, scale, bias = jnp.ones((4, 8, 8, 3)), jnp.ones(3), jnp.zeros(3)
    fn = jax.jit(jax.grad(lambda x: jnp.sum(batchnorm.norm_act_train(x, scale, bias, x, 1e-5, True)[0])))
    assert "cnnjax_norm_act" not in export.export(fn, platforms=[platform])(x).mlir_module()


def _native_calls(model: nn.Module) -> dict[str, list[str]]:
    """The HLO lines of the native batch-norm calls (forward, backward) in `model`'s compiled
    gradient on a 2x8x8x3 input, in training mode within `blocked_sums()`."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = model.init(jax.random.key(1), x)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.sum(logits)

    with batchnorm.blocked_sums():
        hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
    return {target: [line for line in hlo.splitlines() if f'custom_call_target="{target}"' in line]
            for target in (cpu_kernels.NORM_ACT, cpu_kernels.NORM_ACT_BACKWARD)}


@pytest.mark.skipif(not cpu_kernels.available(), reason="cnnjax's CPU kernels did not build here")
def test_resnet_blocks_call_the_native_op():
    # A one-block CIFAR ResNet: the stem's BN + ReLU, the block's bn1 + ReLU and bn2 + shortcut +
    # ReLU, each one call forward and one backward.
    from cnnjax.models import resnet

    calls = _native_calls(resnet.CifarResNet(stage_sizes=(1,), width=8, num_classes=3))
    assert [len(lines) for lines in calls.values()] == [3, 3]


@pytest.mark.skipif(not cpu_kernels.available(), reason="cnnjax's CPU kernels did not build here")
def test_densenet_norms_take_their_relu_into_the_native_op():
    # Two one-layer blocks: each layer's bn1 and bn2, the transition's and the final BN, each with
    # its ReLU inside one call forward and one backward (a ReLU of its own cost DenseNet-BC-100 a
    # pass over every layer's input: benchmarks/RESULTS.md, session 21).
    from cnnjax.models import densenet

    calls = _native_calls(densenet.DenseNet(block_config=(1, 1), growth_rate=4, stem="cifar",
                                            num_classes=3))
    for lines in calls.values():
        assert len(lines) == 6 and all("relu = true" in line for line in lines), lines
