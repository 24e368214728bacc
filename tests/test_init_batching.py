"""Batched threefry draws in jitted inits (cnnjax/train/init_batching.py): the same bits as
jax.random, model inits bit for bit, few hash loops, and the cases it leaves alone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import random as jax_random

from cnnjax import distributed, models
from cnnjax.train import init_batching
from cnnjax.train import state as train_state

RANDOM = set(init_batching.DEFERRED)


def _primitives(fn, *args):
    """Primitive names at the top level of fn's jaxpr (nested jits included)."""
    names = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.append(eqn.primitive.name)
            if eqn.primitive.name in init_batching.INLINED:
                walk(eqn.params["jaxpr"].jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def _assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_threefry_matches_jax():
    rng = np.random.default_rng(0)
    k1, k2, x1, x2 = (jnp.asarray(rng.integers(0, 2**32, 1000, dtype=np.uint32)) for _ in range(4))
    ours = jax.jit(init_batching.threefry2x32)(k1, k2, x1, x2)
    theirs = tuple(jax.jit(lambda *a: jax_random.threefry2x32_p.bind(*a))(k1, k2, x1, x2))
    _assert_bitwise_equal(ours, theirs)


def _draws(key):
    """Every deferred primitive in the forms flax and users produce them: scalar and batched keys,
    sizes below, at and across ROW_SIZE and empty, vector fold-in messages, draws inside a scan."""
    a, b, c = jax.random.split(key, 3)
    keys = jax.random.split(b, (2, 2))
    row = init_batching.ROW_SIZE
    return {
        "normal": jax.random.normal(jax.random.fold_in(a, 7), (3, 5, 7)),
        "truncated": jax.random.truncated_normal(jax.random.fold_in(a, 2**31 + 5), -2, 2, (row,)),
        "uniform": jax.random.uniform(c, (2 * row + 3,)),
        "one": jax.random.bits(c, ()),
        "empty": jax.random.normal(c, (0, 3)),
        "batched_keys": jax.vmap(jax.vmap(lambda k: jax.random.normal(k, (4, 3))))(keys),
        "vector_fold_in": jax.vmap(jax.random.fold_in)(keys[0], jnp.arange(2, dtype=jnp.uint32)),
        "broadcast_fold_in": jax.vmap(jax.random.fold_in, (0, None))(keys[1], 9),
        "chained": jax.random.normal(jax.random.fold_in(jax.random.fold_in(c, 1), 2), (9,)),
        "scanned": jax.lax.scan(lambda k, _: (jax.random.fold_in(k, 1), jax.random.normal(k, (2,))),
                                a, None, length=3)[1],
        "bits16": jax.random.bits(a, (5,), jnp.uint16),
    }


def test_draws_are_bit_identical_to_jax_random():
    key = jax.random.key(42)
    _assert_bitwise_equal(jax.jit(init_batching.batch_random(_draws))(key), jax.jit(_draws)(key))
    names = _primitives(init_batching.batch_random(_draws), key)
    # The scan's own draws and the 16-bit draw are left to jax; all the rest are batched.
    assert names.count("random_bits") == 1 and "random_fold_in" not in names


def _scans(fn, key):
    return _primitives(init_batching.batch_random(fn), key).count("scan")


def test_groups_bigger_than_the_cap_are_split(monkeypatch):
    key = jax.random.key(3)
    uncapped = _scans(_draws, key)
    monkeypatch.setattr(init_batching, "MAX_ELEMENTS", 1000)
    assert _scans(_draws, key) > uncapped
    _assert_bitwise_equal(jax.jit(init_batching.batch_random(_draws))(key), jax.jit(_draws)(key))


def _init(name, size, channels, vmapped=False):
    init = train_state.init_fn(models.create_model(name), optax.sgd(0.1, momentum=0.9),
                               (size, size, channels), False)
    return jax.vmap(init) if vmapped else init


@pytest.mark.parametrize("name,size,channels,vmapped", [
    ("lenet5", 32, 1, False),
    ("resnet20", 32, 3, False),
    ("lenet5", 32, 1, True),  # a multi-seed group's init: keys with a leading member axis
])
def test_model_inits_are_bit_identical(name, size, channels, vmapped):
    init = _init(name, size, channels, vmapped)
    keys = (jnp.stack([jax.random.PRNGKey(s) for s in (0, 1, 5)]) if vmapped
            else jax.random.PRNGKey(0))
    _assert_bitwise_equal(jax.jit(init_batching.batch_random(init))(keys), jax.jit(init)(keys))


def test_a_model_init_hashes_in_a_few_loops():
    init = _init("resnet20", 32, 3)
    key = jax.random.PRNGKey(0)
    plain = [n for n in _primitives(init, key) if n in RANDOM]
    batched = _primitives(init_batching.batch_random(init), key)
    assert len(plain) > 70  # 19 weights drawn, ~60 keys folded
    assert not RANDOM & set(batched)
    assert 1 <= batched.count("scan") <= 4  # one per wave of keys known at the same point (3 now)


def test_other_prng_implementations_and_side_effects_are_left_alone(capsys):
    def draw(key):
        return jax.random.normal(jax.random.fold_in(key, 3), (17,))

    rbg = jax.random.key(0, impl="rbg")
    _assert_bitwise_equal(jax.jit(init_batching.batch_random(draw))(rbg), jax.jit(draw)(rbg))
    assert "random_bits" in _primitives(init_batching.batch_random(draw), rbg)

    def printing(key):
        jax.debug.print("drawn")
        return draw(key)

    key = jax.random.key(0)
    _assert_bitwise_equal(jax.jit(init_batching.batch_random(printing))(key), jax.jit(draw)(key))
    assert "drawn" in capsys.readouterr().out


class _Dense(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3)(x)


def test_jit_init_batches_on_cpu_unless_turned_off(monkeypatch):
    monkeypatch.delenv(init_batching.ENV, raising=False)
    calls = []
    real = init_batching.batch_random
    monkeypatch.setattr(init_batching, "batch_random", lambda fn: calls.append(fn) or real(fn))
    init = train_state.init_fn(_Dense(), optax.sgd(0.1), (2, 2, 1), False)
    mesh = distributed.make_mesh()
    state = train_state.jit_init(init, distributed.replicated(mesh))(jax.random.PRNGKey(0))
    assert calls == [init]
    _assert_bitwise_equal(state, jax.jit(init)(jax.random.PRNGKey(0)))
    monkeypatch.setenv(init_batching.ENV, "off")
    train_state.jit_init(init)(jax.random.PRNGKey(0))
    assert len(calls) == 1
