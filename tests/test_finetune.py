"""Fine-tuning helpers: frozen parameters stay bit-identical, heads are replaced, LR groups scale."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import finetune
from cnnjax.models import create_model
from cnnjax.train.optim import optimizer_config

BACKBONE = ("^c[135]/",)  # LeNet-5's three convolutions


@pytest.fixture(scope="module")
def lenet():
    model = create_model("lenet5")
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 1))
    y = jnp.arange(8) % 10
    return model, variables["params"], x, y


def _loss(model, x, y):
    def loss(params):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss


def test_freeze_mask_matches_paths(lenet):
    _, params, _, _ = lenet
    mask = finetune.freeze_mask(params, BACKBONE)
    assert mask["c1"]["kernel"] and mask["c5"]["bias"]
    assert not mask["f6"]["kernel"] and not mask["output"]["bias"]


def test_frozen_params_bit_identical_and_lr_groups_scale(lenet):
    model, params, x, y = lenet
    cfg = optimizer_config()
    cfg.name, cfg.learning_rate, cfg.momentum = "sgd", 0.1, 0.0
    groups = {"backbone": {"patterns": BACKBONE, "lr_scale": 0.0},
              "head": {"patterns": ("^output/",), "lr_scale": 10.0}}
    tx, schedule = finetune.multi_lr_optimizer(cfg, groups, steps_per_epoch=10, num_epochs=1)
    assert float(schedule(0)) == pytest.approx(0.1)
    state = tx.init(params)
    loss = jax.jit(jax.value_and_grad(_loss(model, x, y)))
    grads = loss(params)[1]
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["output"]["kernel"], -1.0 * grads["output"]["kernel"],
                               rtol=1e-6)  # head: 10 x 0.1
    np.testing.assert_allclose(updates["f6"]["kernel"], -0.1 * grads["f6"]["kernel"], rtol=1e-6)
    new = params
    for _ in range(3):
        updates, state = tx.update(loss(new)[1], state, new)
        new = optax.apply_updates(new, updates)
    for name in ("c1", "c3", "c5"):
        for leaf in ("kernel", "bias"):
            assert np.array_equal(new[name][leaf], params[name][leaf])
    assert not np.array_equal(new["f6"]["kernel"], params["f6"]["kernel"])


def test_frozen_group_has_no_optimizer_state(lenet):
    _, params, _, _ = lenet
    cfg = optimizer_config()
    cfg.name = "adam"
    groups = {"backbone": {"patterns": BACKBONE, "lr_scale": 0.0}}
    tx, _ = finetune.multi_lr_optimizer(cfg, groups, steps_per_epoch=10, num_epochs=1)
    frozen = sum(p.size for n, p in params.items() if n in ("c1", "c3", "c5") for p in p.values())
    total = sum(p.size for p in jax.tree.leaves(params))
    state_size = sum(np.size(s) for s in jax.tree.leaves(tx.init(params)))
    assert state_size - 2 * (total - frozen) < 10  # adam's mu and nu for the trainable part only


def test_stop_frozen_gradients_zeroes_frozen_grads(lenet):
    model, params, x, y = lenet
    mask = finetune.freeze_mask(params, BACKBONE)
    loss = _loss(model, x, y)
    grads = jax.grad(lambda p: loss(finetune.stop_frozen_gradients(p, mask)))(params)
    assert not np.any(grads["c1"]["kernel"]) and np.any(grads["f6"]["kernel"])


def test_replace_head_keeps_backbone(lenet):
    model, params, _, _ = lenet
    new_model, variables, fresh = finetune.replace_head({"params": params}, model, 3,
                                                        input_shape=(32, 32, 1))
    assert new_model.num_classes == 3
    assert sorted(fresh) == ["params/output/bias", "params/output/kernel"]
    assert variables["params"]["output"]["kernel"].shape == (84, 3)
    assert np.array_equal(variables["params"]["c3"]["kernel"], params["c3"]["kernel"])


def test_keep_frozen_stats():
    old = {"stem_bn": {"mean": jnp.zeros(2)}, "fc_bn": {"mean": jnp.zeros(2)}}
    new = {"stem_bn": {"mean": jnp.ones(2)}, "fc_bn": {"mean": jnp.ones(2)}}
    kept = finetune.keep_frozen_stats(new, old, ("^stem_",))
    assert not np.any(kept["stem_bn"]["mean"]) and np.all(kept["fc_bn"]["mean"] == 1)


def test_adapt_first_conv_grayscale_equals_repeated_rgb():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((5, 5, 3, 4)).astype(np.float32)
    patch = rng.standard_normal((5, 5, 1)).astype(np.float32)
    rgb = np.einsum("hwi,hwio->o", np.repeat(patch, 3, axis=2), kernel)
    gray = np.einsum("hwi,hwio->o", patch, finetune.adapt_first_conv(kernel, 1))
    np.testing.assert_allclose(gray, rgb, rtol=1e-5)
    assert finetune.adapt_first_conv(kernel, 5).shape == (5, 5, 5, 4)
    with pytest.raises(ValueError, match="in_channels"):
        finetune.adapt_first_conv(kernel, 0)
