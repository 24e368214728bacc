"""The building blocks every model shares: the Conv module, im2col, pooling, norms, activations, initialisers."""

from __future__ import annotations

import contextvars
import difflib
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnjax.batchnorm import BatchNorm
from cnnjax.cpu_conv import conv_general_dilated, conv_passing_input
from cnnjax.cpu_rewrites import cpu_rewrites_enabled
from cnnjax.padding import PaddingLike, explicit_padding, pad_pairs, pair

Array = jax.Array
ModuleDef = Any


def _unknown(kind: str, name: str, choices: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(name, choices, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Choose one of: {', '.join(sorted(choices))}.")


# --- convolution --------------------------------------------------------------------------------


# Set by `conv_and_input` while a Conv runs: where `_conv` puts the input passed through the
# convolution (the module's call returns only the convolution's output, as interceptors expect).
_PASSED_INPUT: contextvars.ContextVar[list[Array] | None] = contextvars.ContextVar(
    "cnnjax_passed_input", default=None)


def _conv(lhs: Array, rhs: Array, *args: Any, **kwargs: Any) -> Array:
    """cpu_conv.conv_general_dilated; inside `conv_and_input`, cpu_conv.conv_passing_input, its
    passed-through input kept for the caller."""
    passed = _PASSED_INPUT.get()
    if passed is None:
        return conv_general_dilated(lhs, rhs, *args, **kwargs)
    y, x = conv_passing_input(lhs, rhs, *args, **kwargs)
    passed.append(x)
    return y


# Widest rows `channel_sum` folds an activation into on CPU, in floats.
_CHANNEL_SUM_ROW = 512


def _channel_sum_rows(g: Array) -> Array:
    c = g.shape[-1]
    rows = g.size // c
    k = next((k for k in (32, 16, 8, 4, 2) if rows % k == 0 and k * c <= _CHANNEL_SUM_ROW), 1)
    total = jnp.sum(g.reshape(-1, k * c).astype(jnp.float32), 0)
    return total.reshape(k, c).sum(0).astype(g.dtype)


def channel_sum(g: Array) -> Array:
    """g summed over every axis but the last (a bias's gradient). On CPU as a sum over the rows of
    g folded into rows of k * C floats (k up to 32, rows up to 512 floats), then over the k copies
    of each channel, in fp32: XLA:CPU reduces [N, H, W, C] over three axes 5x to 10x slower than
    over the leading axis of a wide 2D array (LeNet-5's C1 gradient, 128x28x28x6: 0.16 against
    0.03 ms; 128x32x32x16 0.66 against 0.07; benchmarks/RESULTS.md). `CNNJAX_CPU_REWRITES=off`
    keeps the plain sum."""
    def plain(g: Array) -> Array:
        return jnp.sum(g, tuple(range(g.ndim - 1)))

    if g.ndim < 2 or not cpu_rewrites_enabled():
        return plain(g)
    return lax.platform_dependent(g, cpu=_channel_sum_rows, default=plain)


@jax.custom_vjp
def add_bias(y: Array, bias: Array) -> Array:
    """y + bias over y's last axis, its bias gradient a `channel_sum`."""
    return y + bias


def _add_bias_fwd(y: Array, bias: Array) -> tuple[Array, None]:
    return y + bias, None


def _add_bias_bwd(_: None, g: Array) -> tuple[Array, Array]:
    return g, channel_sum(g)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


_NN_CONV_CALL = inspect.unwrap(nn.Conv.__call__)


class Conv(nn.Conv):
    """`nn.Conv` that also accepts padding="FULL", with the CPU forms of cnnjax/cpu_conv.py and its
    bias added by `add_bias` (its gradient a `channel_sum`). Same parameters and names."""

    conv_general_dilated: Any = _conv

    def __post_init__(self) -> None:
        if isinstance(self.padding, str) and self.padding.upper() == "FULL":
            # Resolved once at construction, so `nn.Conv.__call__` only ever sees explicit pairs.
            object.__setattr__(
                self, "padding", explicit_padding("FULL", self.kernel_size, self.kernel_dilation or 1)
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        # nn.Conv's body unwrapped: through flax's method wrapper, interceptors (cnnjax.profile's
        # layer table) would see the one call twice.
        if not (self.use_bias and self.shared_weights and cpu_rewrites_enabled()):
            return _NN_CONV_CALL(self, inputs)
        # nn.Conv's own bias add, less its gradient: the convolution without a bias (the field
        # flipped for this call only), then the same parameter, cast as nn.Conv casts it (kernel
        # and bias share param_dtype, so y's dtype is what nn.Conv promotes both to).
        object.__setattr__(self, "use_bias", False)
        try:
            y = _NN_CONV_CALL(self, inputs)
        finally:
            object.__setattr__(self, "use_bias", True)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        return add_bias(y, bias.astype(y.dtype))


def conv_im2col(x: Array, kernel: Array, strides: int | Sequence[int] = 1,
                padding: PaddingLike = "VALID") -> Array:
    """Convolution as im2col followed by one matrix product (teaching and testing, not speed).

    x: [N, H, W, C_in]; kernel: [kh, kw, C_in, C_out] (HWIO, as flax stores it). Every output
    position's receptive field is unrolled into a row of length kh*kw*C_in; the convolution is then
    the product of that [N*Ho*Wo, kh*kw*C_in] matrix with the kernel reshaped to [kh*kw*C_in, C_out].
    """
    kh, kw, c_in, c_out = kernel.shape
    sh, sw = pair(strides)
    pads = pad_pairs(x.shape[1:3], (kh, kw), (sh, sw), explicit_padding(padding, (kh, kw)))
    x = jnp.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    n, h, w, _ = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    rows = jnp.arange(ho)[:, None] * sh + jnp.arange(kh)[None, :]  # [Ho, kh]
    cols = jnp.arange(wo)[:, None] * sw + jnp.arange(kw)[None, :]  # [Wo, kw]
    patches = x[:, rows[:, None, :, None], cols[None, :, None, :], :]  # [N, Ho, Wo, kh, kw, C]
    matrix = patches.reshape(n * ho * wo, kh * kw * c_in)
    return (matrix @ kernel.reshape(kh * kw * c_in, c_out)).reshape(n, ho, wo, c_out)


# --- pooling -----------------------------------------------------------------------------------


def max_pool(x: Array, window: int, stride: int | None = None, padding: PaddingLike = "VALID") -> Array:
    """Max pooling over a square window; stride defaults to the window (non-overlapping)."""
    stride = window if stride is None else stride
    return nn.max_pool(x, (window, window), (stride, stride), explicit_padding(padding, window))


def avg_pool(x: Array, window: int, stride: int | None = None, padding: PaddingLike = "VALID") -> Array:
    """Average pooling; zero padding is excluded from the average, as in torchvision's count_include_pad=False."""
    stride = window if stride is None else stride
    return nn.avg_pool(x, (window, window), (stride, stride), explicit_padding(padding, window),
                       count_include_pad=False)


def global_avg_pool(x: Array) -> Array:
    """[N, H, W, C] -> [N, C], averaged in fp32 so bf16 feature maps lose no precision."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


# --- normalisation -----------------------------------------------------------------------------


def batch_norm(train: bool, *, dtype: Any = None, momentum: float = 0.9, epsilon: float = 1e-5,
               **kwargs: Any) -> BatchNorm:
    """Batch norm with torch's defaults (momentum 0.1 in torch = 0.9 here, eps 1e-5): cnnjax's
    `BatchNorm`, an `nn.BatchNorm` with a CPU form for small models (cnnjax/batchnorm.py).

    Parameters and running statistics are fp32 whatever the compute dtype: flax computes the batch
    mean and variance in at least fp32 (`force_float32_reductions`), and `param_dtype` is fp32.
    Under `jax.jit` with a batch sharded over the mesh, the mean is taken over the global batch.
    """
    return BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                     dtype=dtype, param_dtype=jnp.float32, **kwargs)


def conv_and_input(conv: nn.Module, x: Array) -> tuple[Array, Array]:
    """(conv(x), x), with `conv` a built module, for a block whose shortcut reads x: use the x this
    returns. With cnnjax's `Conv` the convolution passes x through, so that where its CPU form
    allows (cnnjax/cpu_conv.py, "fused shortcut gradient") x's two gradients, the convolution's and
    the shortcut's, are added in one call; any other module runs as written, x returned as it is."""
    passed: list[Array] = []
    token = _PASSED_INPUT.set(passed)
    try:
        y = conv(x)
    finally:
        _PASSED_INPUT.reset(token)
    # nn.Conv hands the convolution a cast or reshaped input where its dtype or batch dims call for
    # it: the shortcut then reads the caller's x itself.
    if len(passed) != 1 or passed[0].shape != x.shape or passed[0].dtype != x.dtype:
        return y, x
    return y, passed[0]


def norm_act(norm: nn.Module, x: Array, act: Callable[[Array], Array],
             residual: Array | None = None) -> Array:
    """act(norm(x) + residual) (no residual: act(norm(x))), with `norm` a built module.

    With cnnjax's `BatchNorm` and ReLU this is one call, `norm(x, residual=, relu=True)`, which
    runs as one op in the CPU kernels where they apply (cnnjax/batchnorm.py); any other norm or
    activation runs as written."""
    if isinstance(norm, BatchNorm) and act is nn.relu:
        return norm(x, residual=residual, relu=True)
    y = norm(x)
    return act(y if residual is None else y + residual)


class LocalResponseNorm(nn.Module):
    """AlexNet's local response normalisation across channels (Krizhevsky 2012, section 3.3).

    Uses torch's convention: alpha is divided by `size`, so (size=5, alpha=1e-4, beta=0.75, k=2)
    reproduces `torch.nn.LocalResponseNorm` with the paper's constants.
    """

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        sq = jnp.square(x.astype(jnp.float32))
        half = self.size // 2
        padded = jnp.pad(sq, [(0, 0)] * 3 + [(half, self.size - 1 - half)])
        window_sum = lax.reduce_window(padded, 0.0, lax.add, (1, 1, 1, self.size), (1, 1, 1, 1), "VALID")
        denom = (self.k + self.alpha / self.size * window_sum) ** self.beta
        return (x.astype(jnp.float32) / denom).astype(x.dtype)


# --- activations and initialisers --------------------------------------------------------------

# Past this |x| float32's tanh is +-1; clipping there keeps expm1(2x) finite.
_TANH_SATURATES = 9.0


def _tanh_expm1(x: Array) -> Array:
    e = jnp.expm1(2.0 * jnp.clip(x, -_TANH_SATURATES, _TANH_SATURATES))
    return e / (e + 2.0)


@jax.custom_jvp
def tanh(x: Array) -> Array:
    """jnp.tanh; float32 on CPU as expm1(2x) / (expm1(2x) + 2), |x| clipped at 9.

    Why: the expm1 form ran 1.7x as fast as XLA:CPU's tanh and closer to float64's (LeNet-5's C3
    activation, 128x10x10x16 with its bias add, 2-core CPU: 0.17 against 0.29 ms, largest error
    1.5e-7 against 2.3e-7; lenet5's train step 1.04x; benchmarks/RESULTS.md). The derivative is
    1 - tanh(x)^2 from the output, as jnp.tanh's. `CNNJAX_CPU_REWRITES=off` keeps jnp.tanh."""
    if x.dtype != jnp.float32 or not cpu_rewrites_enabled():
        return jnp.tanh(x)
    return lax.platform_dependent(x, cpu=_tanh_expm1, default=jnp.tanh)


@tanh.defjvp
def _tanh_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    y = tanh(x)
    return y, t * (1.0 - y * y)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "leaky_relu": functools.partial(nn.leaky_relu, negative_slope=0.01),
    "elu": nn.elu,
    "sigmoid": nn.sigmoid,
    "tanh": tanh,
    "silu": nn.silu,
    "swish": nn.swish,
    "gelu": nn.gelu,
    "identity": lambda x: x,
}


def activation(name: str | Callable[[Array], Array]) -> Callable[[Array], Array]:
    """Looks an activation up by name; a callable passes through unchanged."""
    if callable(name):
        return name
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise _unknown("activation", name, list(ACTIVATIONS)) from None


_he_fan_out_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

INITIALIZERS: dict[str, Callable[..., Array]] = {
    "xavier_uniform": nn.initializers.xavier_uniform(),
    "xavier_normal": nn.initializers.xavier_normal(),
    "glorot_uniform": nn.initializers.glorot_uniform(),
    "glorot_normal": nn.initializers.glorot_normal(),
    "he_normal": nn.initializers.he_normal(),
    "he_uniform": nn.initializers.he_uniform(),
    "kaiming_normal": nn.initializers.he_normal(),
    "kaiming_uniform": nn.initializers.he_uniform(),
    # torchvision's ResNet/VGG choice: kaiming_normal_(mode="fan_out", nonlinearity="relu").
    "he_normal_fan_out": _he_fan_out_normal,
    "lecun_normal": nn.initializers.lecun_normal(),
    "lecun_uniform": nn.initializers.lecun_uniform(),
    "zeros": nn.initializers.zeros,
    "normal_0.01": nn.initializers.normal(0.01),
    "small_normal": nn.initializers.normal(0.01),
}


def initializer(name: str | Callable[..., Array]) -> Callable[..., Array]:
    """Looks a weight initialiser up by name; a callable passes through unchanged."""
    if callable(name):
        return name
    try:
        return INITIALIZERS[name.lower()]
    except KeyError:
        raise _unknown("initializer", name, list(INITIALIZERS)) from None


# --- shared arithmetic -------------------------------------------------------------------------


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Rounds channels to a multiple of `divisor`, never more than 10% below `value` (MobileNetV2/EfficientNet)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# --- pooling with torch's output-size rules ----------------------------------------------------


def _adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    # torch.nn.AdaptiveAvgPool2d: bin i covers [floor(i*n/out), ceil((i+1)*n/out)); bins may overlap.
    return [((i * size) // out, -(-(i + 1) * size // out)) for i in range(out)]


def _adaptive_matrix(size: int, out: int) -> Array:
    rows = [[1.0 / (end - start) if start <= j < end else 0.0 for j in range(size)]
            for start, end in _adaptive_bins(size, out)]
    return jnp.asarray(rows, jnp.float32)  # [out, size]


def adaptive_avg_pool(x: Array, output_size: int | Sequence[int]) -> Array:
    """Averages [N, H, W, C] down (or up) to output_size with torch's AdaptiveAvgPool2d bins.

    Each output axis is a fixed averaging matrix applied to the input axis, so a 1x1 map pooled to
    7x7 is repeated (as torch does) and a 5 -> 3 pool uses overlapping bins. A map that already has
    the target size is returned unchanged (VGG at 224, AlexNet at 224).
    """
    out_h, out_w = pair(output_size)
    if min(out_h, out_w) < 1:
        raise ValueError(f"adaptive_avg_pool needs an output size >= 1, got {output_size}.")
    _, h, w, _ = x.shape
    if (h, w) == (out_h, out_w):
        return x
    rows, cols = _adaptive_matrix(h, out_h), _adaptive_matrix(w, out_w)
    # HIGHEST: an fp32 matmul on GPU/TPU otherwise rounds through tf32/bf16 and the mean is inexact.
    y = jnp.einsum("oh,nhwc,pw->nopc", rows, x.astype(jnp.float32), cols,
                   precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def max_pool_ceil(x: Array, window: int, stride: int | None = None, padding: int = 0) -> Array:
    """Max pooling with torch's ceil_mode=True output size (GoogLeNet: 112 -> 56, not 55).

    out = ceil((n + 2p - k) / s) + 1, minus one if the last window would start in the right
    padding; the missing right edge is padded with -inf, so it never wins the max.
    """
    stride = window if stride is None else stride
    pads = []
    for size in x.shape[1:3]:
        out = -(-(size + 2 * padding - window) // stride) + 1
        if (out - 1) * stride >= size + padding:
            out -= 1
        pads.append((padding, max(0, (out - 1) * stride + window - size - padding)))
    return nn.max_pool(x, (window, window), (stride, stride), pads)
