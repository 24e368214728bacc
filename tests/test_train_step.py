"""The train step on one device: the loss falls, batch stats and EMA move, eval returns probabilities."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import distributed
from cnnjax.train import losses, optim
from cnnjax.train.state import count_params, create_train_state
from cnnjax.train.step import compile_steps


class TinyNet(nn.Module):
    """Conv + batch norm + dropout + dense: every piece the step has to handle, compiled in a second."""

    num_classes: int = 4
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), dtype=self.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def _batch(mesh, n=16, seed=0):
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 4, n).astype(np.int32)
    images = rng.normal(size=(n, 8, 8, 1)).astype(np.float32) + labels[:, None, None, None]
    sharding = distributed.batch_sharded(mesh)
    return {"image": jax.device_put(images, sharding), "label": jax.device_put(labels, sharding)}


@functools.cache
def _setup(ema_decay=0.0):
    mesh = distributed.make_mesh()
    model = TinyNet()
    cfg = optim.optimizer_config()
    cfg.name, cfg.learning_rate, cfg.ema_decay = "adam", 0.05, ema_decay
    tx, schedule = optim.make_optimizer(cfg, steps_per_epoch=10, num_epochs=3)
    train, evaluate = compile_steps(
        mesh,
        model=model,
        tx=tx,
        schedule=schedule,
        loss_cfg=losses.loss_config(),
        num_classes=4,
        ema_decay=ema_decay,
    )
    make_state = functools.partial(
        create_train_state,
        model,
        tx,
        seed=0,
        input_shape=(8, 8, 1),
        mesh=mesh,
        use_ema=ema_decay > 0,
    )
    return mesh, train, evaluate, make_state


def test_loss_falls_on_a_fixed_batch():
    mesh, train, _, make_state = _setup()
    state, batch = make_state(), _batch(mesh)
    first = None
    for _ in range(25):
        state, metrics = train(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < 0.5 * first
    assert int(state.step) == 25
    assert set(metrics) == {
        "loss",
        "accuracy",
        "learning_rate",
        "grad_norm",
        "param_norm",
        "update_norm",
    }
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["learning_rate"]) == pytest.approx(0.05)


def test_state_moves_batch_stats_and_ema_and_eval_gives_probabilities():
    mesh, train, evaluate, make_state = _setup(ema_decay=0.9)
    state = make_state()
    assert count_params(state.params) == 8 * 9 + 8 + 2 * 8 + 8 * 4 + 4
    before_stats = jax.tree.map(np.asarray, state.batch_stats)
    before_ema = jax.tree.map(np.asarray, state.ema_params)
    state, _ = train(state, _batch(mesh))
    moved = jax.tree.map(
        lambda a, b: not np.allclose(a, b),
        before_stats,
        jax.tree.map(np.asarray, state.batch_stats),
    )
    assert all(jax.tree.leaves(moved))
    ema, params = jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)
    first_ema = jax.tree.leaves(before_ema)
    for e, p, e0 in zip(ema, params, first_ema, strict=True):  # ema = 0.9 * old + 0.1 * new
        np.testing.assert_allclose(e, 0.9 * e0 + 0.1 * np.asarray(p), rtol=1e-5, atol=1e-6)
    batch = _batch(mesh, seed=1)
    batch["mask"] = jax.device_put(np.ones(16, np.float32), batch["label"].sharding)
    probs, per_example, labels, mask = evaluate(state, batch)
    assert probs.shape == (16, 4) and per_example.shape == (16,)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
    assert probs.dtype == jnp.float32


class AuxNet(nn.Module):
    """Sows auxiliary logits in training the way GoogLeNet's aux heads do."""

    num_classes: int = 4
    aux_scale: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        features = x.mean(axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="fc")(features)
        if train:
            self.sow("intermediates", "aux_logits", self.aux_scale * logits)
        return logits


def test_aux_logits_add_their_weighted_loss():
    from cnnjax.train.step import AUX_LOSS_WEIGHT, train_step

    mesh = distributed.make_mesh()
    batch = _batch(mesh)
    loss_cfg = losses.loss_config()
    cfg = optim.optimizer_config()
    tx, schedule = optim.make_optimizer(cfg, steps_per_epoch=1, num_epochs=1)
    results = {}
    for scale in (0.0, 1.0):
        model = AuxNet(aux_scale=scale)
        state = create_train_state(model, tx, seed=0, input_shape=(8, 8, 1), mesh=mesh)
        _, metrics = train_step(state, batch, model=model, tx=tx, schedule=schedule,
                                loss_cfg=loss_cfg, num_classes=4)
        logits = model.apply({"params": state.params}, batch["image"])
        results[scale] = (float(metrics["loss"]),
                          float(losses.compute_loss(loss_cfg, logits, batch["label"], 4)))
    main = results[1.0][1]
    # aux logits equal to the main ones: loss = (1 + 0.3) x main; all-zero aux logits add 0.3 x log(4).
    np.testing.assert_allclose(results[1.0][0], (1 + AUX_LOSS_WEIGHT) * main, rtol=1e-5)
    np.testing.assert_allclose(results[0.0][0], main + AUX_LOSS_WEIGHT * np.log(4), rtol=1e-5)
