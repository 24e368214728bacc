"""Batch norm: flax's `nn.BatchNorm` with a faster training pass (same variables, same results)."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
from jax import lax

from cnnjax import cpu_kernels
from cnnjax.cpu_rewrites import cpu_rewrites_enabled

Array = jax.Array

# Where cnnjax turns YNNPACK's fusions off (cnnjax.xla_options: small models on CPU), XLA:CPU's own
# reductions are slow: it rewrites a sum over an axis longer than 32 into a tree of `reduce-window`
# passes, and a batch norm in training mode sums over (N, H, W) four times per step (the mean and
# mean square forward, the sums of g and g * x_hat backward). Summing blocks of BLOCK_ROWS rows
# inside the fusion that produces the values and adding the block sums with one product by a ones
# vector ran 4x to 7x faster (four sums at resnet20's shapes, batch 128, 2-core CPU: 7.4 -> 1.9 ms
# at 32x32x16, 4.6 -> 0.6 ms at 16x16x32). XLA leaves a reduction over at most 32 elements inline
# and does not merge a reduction into a dot, so the form survives its passes. The backward pass is
# the textbook one (two sums); autodiff of the forward formula left XLA about seven reductions.
# With YNNPACK's fusions on, its own reductions are fast and the blocked sums made mobilenet_v2 1.5x
# slower, so the form applies only inside `blocked_sums()`, which `xla_options.traced_for` opens
# around the steps it compiles without those fusions. Everywhere else (GPUs, TPUs, larger models)
# BatchNorm runs flax's own code.
BLOCK_ROWS = 32
_BLOCKED = contextvars.ContextVar("cnnjax_blocked_sums", default=False)


@contextlib.contextmanager
def blocked_sums(enabled: bool = True) -> Iterator[None]:
    """Within this context, training-mode batch norms are traced in the form above."""
    token = _BLOCKED.set(enabled)
    try:
        yield
    finally:
        _BLOCKED.reset(token)


def _blocked_sums(*arrays: Array) -> list[Array]:
    """Per-channel sums of same-shape [..., C] arrays, BLOCK_ROWS rows at a time (see above)."""
    channels = arrays[0].shape[-1]
    rows = math.prod(arrays[0].shape[:-1])
    block = math.gcd(rows, BLOCK_ROWS)
    partial = jnp.concatenate(
        [a.reshape(rows // block, block, channels).sum(axis=1) for a in arrays], axis=-1)
    totals = jnp.ones((rows // block,), partial.dtype) @ partial
    return jnp.split(totals, len(arrays))


def _plain_sums(*arrays: Array) -> list[Array]:
    return [a.sum(axis=tuple(range(a.ndim - 1))) for a in arrays]


def _sums(*arrays: Array) -> list[Array]:
    return lax.platform_dependent(*arrays, cpu=_blocked_sums, default=_plain_sums)


def _normalize(x: Array, scale: Array, bias: Array, epsilon: float
               ) -> tuple[Array, Array, Array, Array]:
    """(output, mean, variance, 1 / std) with flax's fast variance: E[x^2] - E[x]^2, clipped at 0."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    rows = x.size // x.shape[-1]
    total, squares = _sums(xf, xf * xf)
    mean = total / rows
    var = jnp.maximum(0.0, squares / rows - mean * mean)
    inv = lax.rsqrt(var + epsilon)
    return (xf - mean) * (inv * scale) + bias, mean, var, inv


def _train_fwd(x: Array, scale: Array, bias: Array, epsilon: float):
    y, mean, var, inv = _normalize(x, scale, bias, epsilon)
    return (y, mean, var), (x, mean, inv, scale)


def _input_gradient(x: Array, g: Array, mean: Array, inv: Array, scale: Array, g_mean: Array,
                    g_var: Array) -> tuple[Array, Array, Array]:
    """(dL/dx, dL/dscale, dL/dbias) of the normalisation from dL/dy = g and the statistics'
    cotangents, in float32."""
    xf = x.astype(mean.dtype)
    g = g.astype(mean.dtype)
    rows = x.size // x.shape[-1]
    centred = xf - mean
    x_hat = centred * inv
    g_bias, g_scale = _sums(g, g * x_hat)
    # The statistics are outputs too (the running averages take them); their cotangents are zero
    # under a loss, but kept so the function is differentiable as written.
    g_x = ((scale * inv) * (g - (g_bias + x_hat * g_scale) / rows)
           + (g_mean + 2.0 * g_var * centred) / rows)
    return g_x, g_scale, g_bias


def _train_bwd(epsilon: float, residuals: tuple[Array, ...], cotangents: tuple[Array, ...]):
    del epsilon
    x, mean, inv, scale = residuals
    g_y, g_mean, g_var = cotangents
    g_x, g_scale, g_bias = _input_gradient(x, g_y, mean, inv, scale, g_mean, g_var)
    return g_x.astype(x.dtype), g_scale, g_bias


_train = jax.custom_vjp(lambda x, scale, bias, epsilon: _train_fwd(x, scale, bias, epsilon)[0],
                        nondiff_argnums=(3,))
_train.defvjp(_train_fwd, _train_bwd)


# --- batch norm, residual add and ReLU as one op (cnnjax's CPU kernels) -------------------------
#
# XLA:CPU runs a ResNet block's `relu(bn(y) + shortcut)` as loops that broadcast per-channel
# factors over a tensor with channels innermost at about half the speed of memory, and its fusion
# pass recomputes a stage's whole chain of batch norms inside each block's output fusion (every
# block output is also a convolution's input, so it is stored anyway). Two native kernels
# (cnnjax/cpu_kernels.cc) do the whole thing instead: forward, per-channel sums then one pass for
# the output; backward, the ReLU mask taken from the stored output, the two sums (writing the
# residual's gradient on the way), then one pass for dL/dy. Alone they run at about the speed of
# XLA's fusions alone (resnet20's 32x32x16 layers at batch 128: forward 1.48 against 1.61 ms,
# backward 2.04 against 2.38 ms); what they save is the recomputation: resnet20's train step ran
# 1.09x faster (benchmarks/cpu_norm_act.py, benchmarks/RESULTS.md). With their sums in vector
# registers (2026-12-07) they run 1.4x to 2.1x as fast as XLA's (forward 0.71 against 1.25 ms,
# backward 1.16 against 1.69 at 32x32x16), and the step 1.12x. Models reach them through
# `layers.norm_act`, within `blocked_sums()`.


def _norm_act_xla(x: Array, scale: Array, bias: Array, residual: Array | None, epsilon: float,
                  relu: bool) -> tuple[Array, Array, Array]:
    y, mean, var, _ = _normalize(x, scale, bias, epsilon)
    if residual is not None:
        y = y + residual
    return (jnp.maximum(y, 0.0) if relu else y), mean, var


def _norm_act_fwd(x, scale, bias, residual, epsilon, relu, has_residual):
    del has_residual  # the backward pass's to know

    def native(x, scale, bias, *residual):
        return cpu_kernels.norm_act(x, scale, bias, *(residual or (None,)), epsilon, relu)

    def xla(x, scale, bias, *residual):
        return _norm_act_xla(x, scale, bias, *(residual or (None,)), epsilon, relu)

    args = (x, scale, bias) + (() if residual is None else (residual,))
    out, mean, var = lax.platform_dependent(*args, cpu=native, default=xla)
    inv = lax.rsqrt(var + epsilon)
    return (out, mean, var), (x, out, mean, inv, scale, bias)


def _norm_act_bwd(epsilon, relu, has_residual, residuals, cotangents):
    del epsilon
    x, out, mean, inv, scale, bias = residuals
    g, g_mean, g_var = cotangents

    def native(*args):
        return cpu_kernels.norm_act_backward(*args, relu=relu, residual=has_residual)

    def xla(x, out, g, mean, inv, scale, bias, g_mean, g_var):
        del bias  # the native kernel's, for the ReLU's mask
        masked = jnp.where(out > 0, g, 0.0) if relu else g
        grads = _input_gradient(x, masked, mean, inv, scale, g_mean, g_var)
        return grads + ((masked,) if relu and has_residual else ())

    grads = lax.platform_dependent(x, out, g, mean, inv, scale, bias, g_mean, g_var, cpu=native,
                                   default=xla)
    g_residual = (grads[3] if relu else g) if has_residual else None
    return grads[0], grads[1], grads[2], g_residual


_norm_act = jax.custom_vjp(lambda x, scale, bias, residual, epsilon, relu, has_residual:
                           _norm_act_fwd(x, scale, bias, residual, epsilon, relu, has_residual)[0],
                           nondiff_argnums=(4, 5, 6))
_norm_act.defvjp(_norm_act_fwd, _norm_act_bwd)


def norm_act_train(x: Array, scale: Array, bias: Array, residual: Array | None, epsilon: float,
                   relu: bool) -> tuple[Array, Array, Array]:
    """Training-mode batch norm of float32 x over all but the last axis, plus `residual` (None:
    none), then ReLU if `relu`: (output, batch mean, batch variance), in the native kernels on CPU
    (`cpu_kernels.available()` first) and XLA's ops elsewhere."""
    return _norm_act(x, scale, bias, residual, epsilon, relu, residual is not None)


def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float
                     ) -> tuple[Array, Array, Array]:
    """Training-mode batch norm over all but the last axis in the form above: (fp32 output, batch
    mean, batch variance), with blocked sums on CPU and XLA's elsewhere, and the textbook backward."""
    return _train(x, scale, bias, epsilon)


def _native(x: Array, residual: Array | None, dtype: Any, param_dtype: Any) -> bool:
    """Whether `norm_act_train` takes this batch norm: float32 throughout, the kernels checked."""
    return (x.dtype == jnp.float32
            and (residual is None or (residual.dtype == jnp.float32 and residual.shape == x.shape))
            and dtype in (None, jnp.float32) and param_dtype == jnp.float32
            and cpu_kernels.usable())


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` (same variables, arguments and results) whose training-mode pass over the
    last axis is `batch_norm_train` inside `blocked_sums()`, or `norm_act_train` where the native
    kernels can take it. Everything else is flax's own code: outside that context, with
    CNNJAX_CPU_REWRITES=off, and for running averages, masks, `axis_name`, other feature axes or
    the two-pass variance.

    `residual` and `relu` make the call `relu(bn(x) + residual)` (`layers.norm_act`), one op in the
    native kernels and the same ops as written everywhere else."""

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None, residual: Array | None = None,
                 relu: bool = False) -> Array:
        running = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        axis = self.axis if isinstance(self.axis, int) else tuple(self.axis)
        if (not _BLOCKED.get() or not cpu_rewrites_enabled()
                or running or mask is not None or self.axis_name is not None
                or axis not in (-1, x.ndim - 1, (-1,), (x.ndim - 1,))
                or not self.use_fast_variance or not self.force_float32_reductions):
            return _then(super().__call__(x, use_running_average, mask=mask), residual, relu)

        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = (self.param("scale", self.scale_init, features, self.param_dtype)
                 if self.use_scale else jnp.ones(features, jnp.float32))
        bias = (self.param("bias", self.bias_init, features, self.param_dtype)
                if self.use_bias else jnp.zeros(features, jnp.float32))
        fused = _native(x, residual, self.dtype, self.param_dtype)
        if fused:
            y, mean, var = norm_act_train(x, scale, bias, residual, self.epsilon, relu)
        else:
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        args = [x] + ([scale] if self.use_scale else []) + ([bias] if self.use_bias else [])
        y = jnp.asarray(y, dtypes.canonicalize_dtype(*args, dtype=self.dtype))
        return y if fused else _then(y, residual, relu)


def _then(y: Array, residual: Array | None, relu: bool) -> Array:
    """relu(y + residual), as written: the unfused tail of `BatchNorm(residual=, relu=)`."""
    if residual is not None:
        y = y + residual
    return nn.relu(y) if relu else y
