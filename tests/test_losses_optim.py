"""Losses against hand-computed values; optimisers, schedules, masks, clipping, accumulation and EMA."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax.train import losses, optim


def _loss_cfg(name, label_smoothing=0.0):
    cfg = losses.loss_config()
    cfg.name = name
    cfg.label_smoothing = label_smoothing
    return cfg


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- losses


def test_cross_entropy_with_label_smoothing_matches_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=6)
    logp = _log_softmax(logits.astype(np.float64))
    plain = -logp[np.arange(6), labels]
    np.testing.assert_allclose(
        losses.per_example_loss(_loss_cfg("cross_entropy"), logits, labels, 5), plain, rtol=1e-5
    )
    smooth = 0.9 * plain - 0.1 * logp.mean(-1)  # (1 - a) * onehot + a / C
    got = losses.compute_loss(_loss_cfg("cross_entropy", 0.1), logits, labels, 5)
    np.testing.assert_allclose(got, smooth.mean(), rtol=1e-5)


def test_hinge_matches_cs231n_example():
    # The worked example of the CS231n linear-classification notes: losses 2.9, 0 and 12.9.
    scores = jnp.array([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])
    got = losses.per_example_loss(_loss_cfg("hinge"), scores, jnp.array([0, 1, 2]), 3)
    np.testing.assert_allclose(got, [2.9, 0.0, 12.9], rtol=1e-5, atol=1e-6)


def test_hinge_with_soft_targets_is_the_expected_hinge():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(4, 7)).astype(np.float32)
    scores[0, 3] = scores[0, 5]  # a tie, where sorting must not double count
    targets = rng.dirichlet(np.ones(7), size=4).astype(np.float32)
    pairwise = np.maximum(0.0, scores[:, None, :] - scores[:, :, None] + 1.0).sum(-1) - 1.0
    got = losses.per_example_loss(_loss_cfg("hinge"), scores, None, 7, targets=targets)
    np.testing.assert_allclose(got, (targets * pairwise).sum(-1), rtol=1e-5, atol=1e-5)
    labels = rng.integers(0, 7, size=4)
    onehot = np.eye(7, dtype=np.float32)[labels]
    np.testing.assert_allclose(
        losses.per_example_loss(_loss_cfg("hinge"), scores, None, 7, targets=onehot),
        losses.per_example_loss(_loss_cfg("hinge"), scores, labels, 7),
        rtol=1e-5,
        atol=1e-5,
    )


def test_mse_on_one_hot_and_fp32_output_from_bf16_logits():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], jnp.bfloat16)
    got = losses.per_example_loss(_loss_cfg("mse"), logits, jnp.array([0, 2]), 3)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, [(1 + 0 + 1) / 3, (0.25 + 0.25 + 0.25) / 3], rtol=1e-6)


def test_soft_targets_mix_ce_and_hinge_linearly_and_mse_regresses_them():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 4)).astype(np.float32)
    a, b = np.array([0, 1, 2]), np.array([3, 3, 0])
    targets = 0.7 * np.eye(4)[a] + 0.3 * np.eye(4)[b]
    for name in ("cross_entropy", "hinge"):
        cfg = _loss_cfg(name)
        mixed = losses.per_example_loss(cfg, logits, a, 4, targets=targets)
        expected = 0.7 * losses.per_example_loss(cfg, logits, a, 4)
        expected += 0.3 * losses.per_example_loss(cfg, logits, b, 4)
        np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-6, err_msg=name)
    mse = losses.per_example_loss(_loss_cfg("mse"), logits, a, 4, targets=targets)
    np.testing.assert_allclose(mse, ((logits - targets) ** 2).mean(-1), rtol=1e-5)


def test_bad_loss_configs_raise():
    logits, labels = jnp.zeros((2, 3)), jnp.array([0, 1])
    with pytest.raises(ValueError, match="cross_entropy, hinge, mse"):
        losses.compute_loss(_loss_cfg("focal"), logits, labels, 3)
    with pytest.raises(ValueError, match="hinge"):
        losses.compute_loss(_loss_cfg("hinge", 0.1), logits, labels, 3)
    with pytest.raises(ValueError, match="num_classes"):
        losses.compute_loss(_loss_cfg("cross_entropy"), logits, labels, 4)


# ----------------------------------------------------------------------------- optimisers


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(2, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(x.mean((1, 2)))


def _tiny_params():
    # eval_shape: the real flax parameter tree without compiling the model.
    shapes = jax.eval_shape(_Tiny().init, jax.random.key(0), jnp.ones((1, 4, 4, 1)))["params"]
    return jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)


def _opt_cfg(**kw):
    cfg = optim.optimizer_config()
    cfg.update(kw)
    return cfg


def test_decay_mask_selects_kernels_only():
    mask = optim.decay_mask(_tiny_params())
    assert mask == {
        "Conv_0": {"kernel": True, "bias": False},
        "BatchNorm_0": {"scale": False, "bias": False},
        "Dense_0": {"kernel": True, "bias": False},
    }


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_decays_kernels_not_biases(name):
    # Zero gradients isolate weight decay: kernels must move, biases and BN parameters must not.
    params = _tiny_params()
    cfg = _opt_cfg(name=name, learning_rate=0.1, weight_decay=0.1, trust_coefficient=1.0)
    tx, _ = optim.make_optimizer(cfg, steps_per_epoch=10, num_epochs=1)

    @jax.jit
    def first_update(p):
        return tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0]

    updates = first_update(params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved == optim.decay_mask(params)
    if name == "sgd":  # coupled L2: update = -lr * wd * w on the first step
        np.testing.assert_allclose(
            updates["Dense_0"]["kernel"], -0.01 * params["Dense_0"]["kernel"], rtol=1e-5
        )


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_descends_a_quadratic(name):
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([1.0, -1.0])}
    tx, _ = optim.make_optimizer(
        _opt_cfg(name=name, learning_rate=0.05), steps_per_epoch=5, num_epochs=1
    )

    def f(p):
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

    @jax.jit
    def two_steps(p):
        state = tx.init(p)
        for _ in range(2):
            updates, state = tx.update(jax.grad(f)(p), state, p)
            p = optax.apply_updates(p, updates)
        return p

    start = f(params)
    params = two_steps(params)
    assert f(params) < start


def _lrs(cfg, steps, steps_per_epoch=10, num_epochs=10):
    schedule = optim.make_schedule(cfg, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs)
    return np.asarray(jax.vmap(schedule)(jnp.array(steps)))


def test_step_and_multistep_schedules():
    step = _opt_cfg(schedule="step", decay_epochs=(3,), learning_rate=1.0)
    np.testing.assert_allclose(_lrs(step, [0, 29, 30, 59, 60]), [1, 1, 0.1, 0.1, 0.01], rtol=1e-6)
    multi = _opt_cfg(schedule="multistep", decay_epochs=(2, 7), learning_rate=1.0)
    np.testing.assert_allclose(_lrs(multi, [19, 20, 69, 70]), [1, 0.1, 0.1, 0.01], rtol=1e-6)


def test_cosine_with_linear_warmup():
    cfg = _opt_cfg(schedule="cosine", warmup_epochs=2, learning_rate=1.0, end_learning_rate=0.1)
    got = _lrs(cfg, [0, 10, 20, 60, 100])  # warmup 20 steps, cosine over the remaining 80
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.55, 0.1], rtol=1e-5, atol=1e-6)


def test_onecycle_and_exponential():
    cyc = _opt_cfg(schedule="onecycle", learning_rate=1.0, onecycle_pct_start=0.25)
    np.testing.assert_allclose(_lrs(cyc, [0, 25, 100]), [1 / 25, 1.0, 1 / 25 / 1e4], rtol=1e-4)
    exp = _opt_cfg(
        schedule="exponential",
        learning_rate=1.0,
        decay_rate=0.5,
        decay_epochs=(2,),
        warmup_epochs=1,
    )
    exp.end_learning_rate = 0.2
    np.testing.assert_allclose(
        _lrs(exp, [5, 10, 20, 30, 99]), [0.5, 1, 0.5**0.5, 0.5, 0.2], rtol=1e-5
    )


def test_accumulation_equals_one_step_on_the_mean_gradient():
    cfg = _opt_cfg(name="sgd", momentum=0.0, learning_rate=1.0, schedule="step", decay_epochs=(1,))
    cfg.accumulate_steps = 2
    tx, schedule = optim.make_optimizer(cfg, steps_per_epoch=4, num_epochs=2)
    params = {"w": jnp.array([1.0, 2.0])}
    state = tx.init(params)
    for g in ([1.0, 0.0], [3.0, 2.0]):
        updates, state = tx.update({"w": jnp.array(g)}, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["w"], [1.0 - 2.0, 2.0 - 1.0])
    # 4 batches per epoch = 2 updates per epoch: the LR decays at train step 4, update 2.
    np.testing.assert_allclose(
        jax.vmap(schedule)(jnp.array([0, 3, 4]) // 2), [1.0, 1.0, 0.1], rtol=1e-6
    )


def test_gradient_clipping_bounds_the_update():
    tx, _ = optim.make_optimizer(
        _opt_cfg(momentum=0.0, learning_rate=1.0, grad_clip_norm=2.0),
        steps_per_epoch=1,
        num_epochs=1,
    )
    params = {"w": jnp.zeros(2)}
    updates, _ = tx.update({"w": jnp.array([30.0, 40.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-1.2, -1.6], rtol=1e-6)


def test_ema_update():
    ema = optim.ema_update({"w": jnp.array([0.0, 10.0])}, {"w": jnp.array([1.0, 0.0])}, 0.9)
    np.testing.assert_allclose(ema["w"], [0.1, 9.0], rtol=1e-6)


def test_bad_optimizer_configs_raise():
    with pytest.raises(ValueError, match="sgd, sgd_nesterov, adagrad"):
        optim.make_optimizer(_opt_cfg(name="adadelta"), steps_per_epoch=1, num_epochs=1)
    with pytest.raises(ValueError, match="constant, step, multistep"):
        optim.make_schedule(_opt_cfg(schedule="poly"), steps_per_epoch=1, num_epochs=1)
    with pytest.raises(ValueError, match="decay_epochs"):
        optim.make_schedule(_opt_cfg(schedule="multistep"), steps_per_epoch=1, num_epochs=1)
    with pytest.raises(ValueError, match="warmup_epochs=0"):
        optim.make_schedule(
            _opt_cfg(schedule="onecycle", warmup_epochs=1.0), steps_per_epoch=1, num_epochs=2
        )
    with pytest.raises(ValueError, match="accumulate_steps"):
        optim.make_optimizer(_opt_cfg(accumulate_steps=0), steps_per_epoch=1, num_epochs=1)
