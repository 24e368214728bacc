"""DenseNet's stored gradient on CPU (cnnjax/models/densenet.py `_concat`): the same gradients, bounded fusions."""

import re

import chex
import jax
import jax.numpy as jnp

from cnnjax.models import densenet

# One block of 8 layers: the gradient is stored after layers 4 and 8.
MODEL = densenet.DenseNet(block_config=(8,), growth_rate=4, bn_size=2, stem="cifar", num_classes=3)


def _loss_and_grad(model):
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    variables = MODEL.init(jax.random.key(0), x)

    def loss(params):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(logits))

    return jax.jit(jax.grad(loss)), variables["params"]


def _conditionals_and_widest_fusion(hlo: str) -> tuple[int, int]:
    """Number of conds, and the most parameters any fused computation takes."""
    fused = [c for c in re.split(r"\n(?=%?\S+ \(|ENTRY)", hlo) if c.lstrip("%").startswith("fused")]
    return hlo.count(" conditional("), max(c.count(" parameter(") for c in fused)


def _compiled_gradient(monkeypatch, every: int):
    monkeypatch.setattr(densenet, "GRADIENT_KEPT_EVERY", every)
    grad, params = _loss_and_grad(MODEL)  # a new function each time, so a new trace
    compiled = grad.lower(params).compile()
    return compiled(params), _conditionals_and_widest_fusion(compiled.as_text())


def test_a_block_stores_its_gradient_every_fourth_layer_same_gradients_bounded_fusions(monkeypatch):
    stored, (conds, widest) = _compiled_gradient(monkeypatch, 4)
    # No layer storing its gradient; every other CPU form unchanged.
    plain, (plain_conds, plain_widest) = _compiled_gradient(monkeypatch, 1000)
    chex.assert_trees_all_close(stored, plain, rtol=1e-6, atol=1e-7)
    # Layers 4 and 8 add one cond each; without them XLA fuses the whole block's gradient sums,
    # whose widest loop reads every layer's batch-norm terms (118 parameters against 68).
    assert conds - plain_conds == 2
    assert widest < 0.75 * plain_widest, (widest, plain_widest)


def test_stored_gradient_only_on_cpu_and_only_with_the_rewrites(monkeypatch):
    x, y = jnp.ones((1, 2, 2, 3)), jnp.ones((1, 2, 2, 2))

    def grad_module(platform: str) -> str:
        f = jax.jit(jax.grad(lambda x, y: jnp.sum(densenet._concat(x, y, True) ** 2), (0, 1)))
        return jax.export.export(f, platforms=[platform])(x, y).mlir_module()

    # The cond's condition, y0 == y0, is the only comparison in the gradient.
    assert "stablehlo.compare" in grad_module("cpu")
    assert "stablehlo.compare" not in grad_module("cuda")
    monkeypatch.setenv("CNNJAX_CPU_REWRITES", "off")
    assert "stablehlo.compare" not in grad_module("cpu")


def test_stored_gradient_values_and_a_nan_output():
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 5))
    y = jax.random.normal(jax.random.key(1), (2, 3, 3, 4))
    weights = jax.random.normal(jax.random.key(2), (2, 3, 3, 9))

    def loss(x, y, keep):
        return jnp.sum(weights * jnp.sin(densenet._concat(x, y, keep)))

    chex.assert_trees_all_equal(jax.grad(loss, (0, 1))(x, y, True), jax.grad(loss, (0, 1))(x, y, False))
    # A NaN first output (where the loss is NaN anyway) makes the gradient NaN through the cond's
    # other branch.
    nan_grads = jax.grad(loss, (0, 1))(x, y.at[0, 0, 0, 0].set(jnp.nan), True)
    assert jnp.isnan(nan_grads[0]).all()
