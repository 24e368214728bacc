"""Jitted inits with their threefry hashes batched: one loop per wave of keys, not one per tensor.

A state init draws one random tensor per parameter, each from its own key (flax folds the
parameter's path into the root key). Every draw is a threefry hash that XLA:CPU lowers to a rolled
loop and compiles on its own, tens of ms each even at -O1: densenet201's 201 draws and 604 key
derivations (fold-ins) made its init compile take 15-20 s. Yet the draws are independent of one another,
and threefry is elementwise in its counters, so all the hashes whose keys are known at the same
point can be computed by one loop over the concatenated counters.

`batch_random(fn)` traces `fn` to a jaxpr, inlines the nested `jit`s that contain random draws,
and evaluates it again, deferring `random_bits`, `random_fold_in` and `random_split`: whenever no
other equation is ready, all the deferred ones that are go into one `lax.scan` over rows of
`ROW_SIZE` counters (each row belongs to one key, so the row's hash takes the key as a scalar and
XLA compiles one row kernel). The values are bit for bit those of `jax.random` (jax's
partitionable threefry: counters are the element's flat index; the tests compare whole model
inits), and anything else (another PRNG implementation, 8/16/64-bit draws, a function with side
effects) is evaluated as it was. Measured on the 2-core CPU (2026-12-07, README "XLA options on
CPU"): init compile at -O1 densenet201 19.5 -> 8.9 s, resnet152 8.5 -> 4.4 s, resnet50@64 2.8 ->
1.4 s, with 0.2-0.4 s more trace.

On GPUs threefry is one fused kernel per draw, so cnnjax batches on CPU only (state.jit_init);
CNNJAX_INIT_BATCHING=off turns it off.
"""

from __future__ import annotations

import collections
import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.extend import core as jcore

DEFERRED = ("random_bits", "random_fold_in", "random_split")
INLINED = ("jit", "pjit", "closed_call", "core_call")
ROW_SIZE = 8192  # counters hashed per loop iteration: 32 KB a lane array, in L1/L2
MAX_ELEMENTS = 1 << 25  # counters per loop; a wave with more is split (bounds temporary memory)
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
ENV = "CNNJAX_INIT_BATCHING"


def enabled() -> bool:
    """False where CNNJAX_INIT_BATCHING is off, 0 or false."""
    return os.environ.get(ENV, "on").lower() not in ("off", "0", "false")


def threefry2x32(k1: Array, k2: Array, x1: Array, x2: Array) -> tuple[Array, Array]:
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), as jax computes it, unrolled.

    Written out here because inside a loop body the unrolled form is one small fusion; jax's own
    CPU lowering is itself a loop (and its unrolled one is private)."""

    def rotate_left(x: Array, d: int) -> Array:
        return lax.shift_left(x, np.uint32(d)) | lax.shift_right_logical(x, np.uint32(32 - d))

    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = rotate_left(x2, r) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


# --- which draws can be batched ------------------------------------------------------------------


class _Request:
    """Hashes of `counts` consecutive counters under each of m keys (key i's counters: hi word 0,
    lo words from starts[i] on); `post` makes the primitive's result of the two hash words, or of
    their xor alone where `xor` (32-bit draws: half the memory)."""

    def __init__(self, keys: Array, starts: Array, counts: int, post: Callable[..., Any],
                 xor: bool = False):
        self.keys, self.starts, self.counts, self.post = keys, starts, counts, post  # keys: [m, 2]
        self.xor = xor


def _request(eqn: Any, args: list[Any]) -> _Request | None:
    """The hash request that reproduces `eqn` (a deferred random primitive), or None."""
    key, name = args[0], eqn.primitive.name
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return None
    impl = jax.random.key_impl(key)
    if impl != "threefry2x32":
        return None
    data = jax.random.key_data(key)  # [*key.shape, 2]
    if name == "random_fold_in":  # threefry_2x32(key, [msg >> 32, msg]): one counter, the message
        msgs = args[1]
        if msgs.dtype != jnp.uint32:
            return None
        shape = jnp.broadcast_shapes(key.shape, msgs.shape)
        keys = jnp.broadcast_to(data, (*shape, 2)).reshape(-1, 2)
        starts = jnp.broadcast_to(msgs, shape).reshape(-1)
        return _Request(keys, starts, 1, lambda b1, b2: jax.random.wrap_key_data(
            jnp.stack([b1, b2], axis=-1).reshape(*shape, 2), impl=impl))
    if not jax.config.jax_threefry_partitionable:  # counters are flat indices only in that mode
        return None
    shape = tuple(eqn.params["shape"])
    counts = math.prod(shape)
    if counts >= 2**32:
        return None
    keys, starts = data.reshape(-1, 2), jnp.zeros((math.prod(key.shape),), jnp.uint32)
    if name == "random_bits" and eqn.params["bit_width"] == 32:
        return _Request(keys, starts, counts, lambda bits: bits.reshape(*key.shape, *shape), xor=True)
    if name == "random_split":
        return _Request(keys, starts, counts, lambda b1, b2: jax.random.wrap_key_data(
            jnp.stack([b1, b2], axis=-1).reshape(*key.shape, *shape, 2), impl=impl))
    return None


def _hash(requests: list[_Request]) -> list[Any]:
    """Every request's result from one scan over rows of counters, each row under one key (the
    requests all of one `xor`)."""
    xor = requests[0].xor
    row = min(ROW_SIZE, 1 << (max(r.counts for r in requests) - 1).bit_length())
    rows = [-(-r.counts // row) for r in requests]  # rows per key
    pairs = list(zip(requests, rows, strict=True))
    keys = jnp.concatenate([jnp.repeat(r.keys, n, axis=0) for r, n in pairs])
    offsets = [np.tile(np.arange(n, dtype=np.uint32) * np.uint32(row), r.keys.shape[0])
               for r, n in pairs]
    starts = jnp.concatenate([jnp.repeat(r.starts, n) + o
                              for (r, n), o in zip(pairs, offsets, strict=True)])

    def hash_row(carry: None, xs: tuple[Array, Array]) -> tuple[None, tuple[Array, ...]]:
        key, start = xs
        b1, b2 = threefry2x32(key[0], key[1], jnp.zeros((row,), jnp.uint32),
                              start + lax.iota(jnp.uint32, row))
        return carry, ((b1 ^ b2,) if xor else (b1, b2))

    _, words = lax.scan(hash_row, None, (keys, starts))
    results, first = [], 0
    for r, n in pairs:
        m = r.keys.shape[0]
        part = [b[first:first + m * n].reshape(m, n * row)[:, :r.counts].reshape(-1)
                for b in words]
        results.append(r.post(*part))
        first += m * n
    return results


def _groups_of(requests: list[tuple[int, _Request]]) -> list[list[tuple[int, _Request]]]:
    """`requests` in groups of one `xor` and at most MAX_ELEMENTS counters (a bigger request goes
    alone)."""
    groups = []
    for xor in (False, True):
        group, size = [], 0
        for item in (item for item in requests if item[1].xor == xor):
            n = item[1].keys.shape[0] * item[1].counts
            if group and size + n > MAX_ELEMENTS:
                groups.append(group)
                group, size = [], 0
            group.append(item)
            size += n
        groups += [group] if group else []
    return groups


# --- the jaxpr, flattened and evaluated in waves -------------------------------------------------


class _Literal:
    __slots__ = ("val",)

    def __init__(self, val: Any):
        self.val = val


def _value(ref: Any, values: dict[int, Any]) -> Any:
    """The value a ref stands for: a literal's own, else the one computed for it."""
    return ref.val if isinstance(ref, _Literal) else values[id(ref)]


def _has_deferred(jaxpr: Any, memo: dict[int, bool]) -> bool:
    if id(jaxpr) not in memo:
        memo[id(jaxpr)] = any(
            e.primitive.name in DEFERRED
            or any(_has_deferred(getattr(sub, "jaxpr", sub), memo)
                   for sub in jcore.jaxprs_in_params(e.params))
            for e in jaxpr.eqns)
    return memo[id(jaxpr)]


def _flatten(jaxpr: Any, consts: list[Any], args: list[Any], nodes: list, memo: dict) -> list[Any]:
    """Appends (eqn, input refs, output refs) for each equation to `nodes`, inlining every nested
    jit that draws random numbers; returns the refs of jaxpr's outputs. A ref is a fresh object (a
    value to be computed) or a _Literal."""
    env = dict(zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True))

    def read(v: Any) -> Any:
        return _Literal(v.val) if isinstance(v, jcore.Literal) else env[v]

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        inner = eqn.params.get("jaxpr") if eqn.primitive.name in INLINED else None
        if inner is not None and _has_deferred(inner.jaxpr, memo):
            outs = _flatten(inner.jaxpr, [_Literal(c) for c in inner.consts], ins, nodes, memo)
        else:
            outs = [object() for _ in eqn.outvars]
            nodes.append((eqn, ins, outs))
        env.update((v, r) for v, r in zip(eqn.outvars, outs, strict=True)
                   if not isinstance(v, jcore.DropVar))
    return [read(v) for v in jaxpr.outvars]


def _live(nodes: list, outputs: list[Any]) -> list:
    """The nodes some output depends on (an init traces the model's forward pass to discard it)."""
    needed = {id(r) for r in outputs}
    kept = []
    for node in reversed(nodes):
        if any(id(r) in needed for r in node[2]):
            kept.append(node)
            needed.update(id(r) for r in node[1] if not isinstance(r, _Literal))
    return kept[::-1]


def _evaluate(nodes: list, values: dict[int, Any]) -> None:
    """Binds every node once its inputs are known, the deferred random ones in batches."""
    waiting, users = {}, collections.defaultdict(list)
    ready, deferred = collections.deque(), []

    def enqueue(i: int) -> None:
        (deferred if nodes[i][0].primitive.name in DEFERRED else ready).append(i)

    for i, (_, ins, _) in enumerate(nodes):
        missing = {id(r) for r in ins if not isinstance(r, _Literal) and id(r) not in values}
        waiting[i] = len(missing)
        for r in missing:
            users[r].append(i)
        if not missing:
            enqueue(i)

    def get(r: Any) -> Any:
        return _value(r, values)

    def publish(i: int, outs: list[Any]) -> None:
        for r, value in zip(nodes[i][2], outs, strict=True):
            values[id(r)] = value
            for j in users.pop(id(r), ()):
                waiting[j] -= 1
                if waiting[j] == 0:
                    enqueue(j)

    def bind(i: int) -> list[Any]:
        eqn, ins, _ = nodes[i]
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*map(get, ins), **eqn.primitive.get_bind_params(eqn.params))
        return out if eqn.primitive.multiple_results else [out]

    while ready or deferred:
        while ready:
            i = ready.popleft()
            publish(i, bind(i))
        wave, deferred[:] = list(deferred), []
        batchable = []
        for i in wave:
            request = _request(nodes[i][0], [get(r) for r in nodes[i][1]])
            if request is None:
                publish(i, bind(i))
            else:
                batchable.append((i, request))
        for group in _groups_of(batchable):
            for (i, _), out in zip(group, _hash([r for _, r in group]), strict=True):
                publish(i, [out])


def batch_random(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with its threefry draws batched (see the module docstring); same values, same pytree."""

    @functools.wraps(fn)
    def batched(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        if closed.effects:  # reordering equations would reorder their effects
            return fn(*args)
        nodes, inputs = [], [object() for _ in closed.jaxpr.invars]
        outputs = _flatten(closed.jaxpr, [_Literal(c) for c in closed.consts], inputs, nodes, {})
        values = {id(r): x for r, x in zip(inputs, jax.tree.leaves(args), strict=True)}
        _evaluate(_live(nodes, outputs), values)
        flat = [_value(r, values) for r in outputs]
        return jax.tree.unflatten(jax.tree.structure(out_shape), flat)

    return batched
