"""K members trained in one vmapped program equal K single runs of the engine's own train step."""

import functools
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from cnnjax import distributed
from cnnjax.config import load_config
from cnnjax.data import build_pipeline
from cnnjax.train import loop
from cnnjax.train.multiseed import Members, default_chunk, train_many
from cnnjax.train.state import create_train_state

SEEDS = (0, 1, 2)
STEPS = 5  # batch 256 of 1,237 digits: 4 steps an epoch, so step 4 starts a new permutation


def _config(seed=0):
    config, _ = load_config("experiments/lenet5_digits.py:smoke")
    config.seed = seed
    config.batch_size = 256
    config.num_train_steps = STEPS
    config.optimizer.learning_rate = 2e-3
    # Cheap to compile, yet every random draw of the pipeline is exercised: per-example keys
    # (crop), host-side per-batch draws (mixup).
    config.data.augment.rotation = 0.0
    config.data.augment.translate = 0.0
    config.data.augment.random_crop_padding = 2
    config.data.augment.mixup_alpha = 0.2
    return config


@functools.cache
def _engine():
    """The single-run pieces: one compiled train/eval step, shared by every seed's run."""
    return loop.RunSetup(_config())


@functools.cache
def _single_run(seed):
    """What train_and_evaluate does for `seed`: its pipeline's batches through the engine's step."""
    config = _config(seed)
    run = _engine()
    state = create_train_state(run.model, run.tx, seed=seed, input_shape=run.input_shape,
                               mesh=run.mesh)
    pipeline = build_pipeline(config.data, image_size=run.input_shape[0],
                              channels=run.input_shape[2], global_batch_size=config.batch_size,
                              mesh=run.mesh, seed=seed)
    batches, losses = pipeline.train_batches(0), []
    for _ in range(STEPS):
        state, metrics = run.train_fn(state, next(batches))
        losses.append(float(metrics["loss"]))
    return state, np.array(losses), run


@functools.cache
def _single_eval(seed):
    state, _, run = _single_run(seed)
    return loop.evaluate(run.eval_fn, state, run.pipeline.eval_batches("test"), run.num_classes)


def _member(tree, i):
    return jax.tree.map(lambda x: np.asarray(x)[i], tree)


@functools.cache
def _vmapped():
    # chunk=K: the plain vmap (train_many's CPU default, chunk=1, is what the rate test runs).
    members = Members(_config(), SEEDS, None, chunk=len(SEEDS))
    assert members.chunk == len(SEEDS)
    states, history = members.train(members.initial_states(), STEPS)
    return members, states, np.stack([h["loss"] for h in history], axis=1)  # [K, steps]


@pytest.mark.parametrize("i", range(len(SEEDS)))
def test_each_member_equals_its_single_run(i):
    members, states, losses = _vmapped()
    state, single_losses, _ = _single_run(SEEDS[i])
    np.testing.assert_allclose(losses[i], single_losses, rtol=1e-5, atol=1e-6)
    # A vmapped GEMM sums in another order than the single one (LeNet's C5 is a GEMM on CPU):
    # weights of about 0.07 then differ by up to 1e-5 after five steps.
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=2e-5),
                 _member(states.params, i), jax.device_get(state.params))
    assert int(states.step[i]) == STEPS


def test_members_differ_and_evaluate_like_the_engine():
    members, states, losses = _vmapped()
    assert len({round(float(x), 6) for x in losses[:, 0]}) == len(SEEDS)  # distinct inits
    ours, engine = members.evaluate(states, "test")[0], _single_eval(SEEDS[0])
    assert ours["accuracy"] == engine["accuracy"]
    np.testing.assert_allclose(ours["loss"], engine["loss"], rtol=1e-5)
    assert np.sum(ours["confusion_matrix"]) == members.run.pipeline.num_examples("test")


def test_learning_rate_variants_equal_single_runs(tmp_path):
    # The rate comes from the optimizer state, so a member at 2e-3 must equal the engine's run
    # built with 2e-3 in its optimizer, and a member at 5e-3 must not.
    rates = (5e-3, 2e-3)
    results = train_many(_config(), [0, 0], tmp_path, learning_rates=rates)
    assert [r["learning_rate"] for r in results] == list(rates)
    assert (tmp_path / "seed0_lr0.002" / "results.json").exists()
    assert (tmp_path / "multiseed.json").exists()
    engine = _single_eval(0)
    assert results[1]["test"]["accuracy"] == engine["accuracy"]
    np.testing.assert_allclose(results[1]["test"]["loss"], engine["loss"], rtol=1e-4)
    assert abs(results[0]["test"]["loss"] - engine["loss"]) > 1e-3


def _mesh_of(platform, size):
    """What default_chunk reads of a mesh: its devices' platform and its size."""
    return SimpleNamespace(devices=np.array([SimpleNamespace(platform=platform)] * size), size=size)


def test_default_chunk_is_one_on_a_single_cpu_device_else_every_member():
    mesh = distributed.make_mesh()  # a real Mesh: one CPU device here, unless XLA_FLAGS say more
    assert default_chunk(4, mesh) == (1 if mesh.size == 1 else 4)
    assert default_chunk(4, _mesh_of("cpu", 1)) == 1  # members one by one: no grouped convolutions
    assert default_chunk(4, _mesh_of("cpu", 2)) == 4  # members spread over the devices
    assert default_chunk(4, _mesh_of("gpu", 1)) == 4


@pytest.mark.parametrize("seeds, rates, match", [
    ([], None, "at least one seed"),
    ([0, 1], [1e-3], "one learning rate per seed"),
    ([0, 0], None, "repeat"),
])
def test_bad_members_raise(seeds, rates, match):
    with pytest.raises(ValueError, match=match):
        train_many(_config(), seeds, learning_rates=rates)


def test_nonlinear_schedule_rejects_rate_variants():
    config = _config()
    config.optimizer.end_learning_rate = 1e-5
    with pytest.raises(ValueError, match="end_learning_rate"):
        train_many(config, [0, 0], learning_rates=[1e-3, 2e-3])
