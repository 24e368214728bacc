"""cnnjax's own CPU kernels (cnnjax/cpu_kernels.cc), built on first use and called through XLA's FFI.

The weight gradient of a convolution, where XLA:CPU's generic kernel is 2x to 3x slower than
oneDNN's backward-weights kernel in PyTorch, and jaxlib's oneDNN call (cnnjax/onednn.py) runs
forward kernels only; the forward pass and input gradient of convolutions from 16 channels up, and
of RGB and narrow layers (`conv`, `input_gradient`: the "gather kernel", about as fast as jaxlib's
oneDNN calls alone and faster inside train steps on two cores, cnnjax/cpu_conv.py says when it
runs); and a training-mode batch norm with the residual add and ReLU after it, forward and backward
(`norm_act`, which cnnjax/batchnorm.py explains). The C++ file is compiled once per machine with
the system's C++ compiler (`$CXX`, else `c++`) and `-O3 -march=native`, into a cache keyed by the
source, the compiler, jaxlib and the CPU ($CNNJAX_NATIVE_CACHE, else
$XDG_CACHE_HOME/cnnjax/native, else ~/.cache/cnnjax/native), and registered as XLA FFI targets.
Where there is no compiler, the build fails or a kernel disagrees with XLA on a small check,
`available()` says False (with one warning saying why) and cnnjax keeps XLA's ops.
`CNNJAX_CPU_NATIVE=off` turns the kernels off; so does `CNNJAX_CPU_REWRITES=off`, with every CPU
form.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from cnnjax.cpu_rewrites import reference_conv, run_apart_on_cpu, single_cpu_process

Array = jax.Array
ENV = "CNNJAX_CPU_NATIVE"
CACHE_ENV = "CNNJAX_NATIVE_CACHE"
SOURCE = Path(__file__).with_name("cpu_kernels.cc")
WEIGHT_GRADIENT = "cnnjax_conv_weight_gradient"
CONV = "cnnjax_conv"
INPUT_GRADIENT = "cnnjax_conv_input_gradient"
NORM_ACT = "cnnjax_norm_act"
NORM_ACT_BACKWARD = "cnnjax_norm_act_backward"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
# Under jax.vmap (multiseed's K members) each call runs once per member: the kernels take one
# NHWC batch, and each member has its own weights.
VMAP_METHOD = "sequential"


def enabled() -> bool:
    """False when CNNJAX_CPU_NATIVE=off (read at trace time, like CNNJAX_CPU_REWRITES)."""
    return os.environ.get(ENV, "on").lower() not in ("off", "0", "false")


def usable() -> bool:
    """Whether traced code may call the kernels now: `enabled()`, and only then `available()` (so
    CNNJAX_CPU_NATIVE=off never builds or checks the library)."""
    return enabled() and available()


def cache_dir() -> Path:
    """$CNNJAX_NATIVE_CACHE, else $XDG_CACHE_HOME/cnnjax/native, else ~/.cache/cnnjax/native."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnjax" / "native"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform's
    processor string. A cache shared across machines then holds one build per kind of CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build(compiler: str | None = None) -> Path:
    """The compiled library, built now unless the cache has it. Raises RuntimeError naming the
    problem when there is no compiler or the build fails."""
    command = shlex.split(compiler or os.environ.get("CXX") or "c++")
    if shutil.which(command[0]) is None:
        raise RuntimeError(f"no C++ compiler {command[0]!r} on PATH (set CXX or install g++)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([
        SOURCE.read_text(), " ".join(command + list(FLAGS)), jaxlib.__version__, _cpu_identity(),
        subprocess.run([*command, "--version"], capture_output=True, text=True).stdout,
    ]).encode()).hexdigest()[:16]
    path = cache_dir() / f"libcnnjax_cpu_{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed into place: concurrent builds (pytest-xdist workers)
    # never see a half-written library.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        result = subprocess.run([*command, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(built)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{command[0]} failed to build {SOURCE.name}: {last}")
        os.replace(built, path)
    return path


@functools.cache
def _register() -> int:
    import ctypes

    library = ctypes.cdll.LoadLibrary(str(build()))
    for name, symbol in ((WEIGHT_GRADIENT, library.CnnjaxConvWeightGradient),
                         (CONV, library.CnnjaxConvForward),
                         (INPUT_GRADIENT, library.CnnjaxConvInputGradient),
                         (NORM_ACT, library.CnnjaxNormActForward),
                         (NORM_ACT_BACKWARD, library.CnnjaxNormActBackward)):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    return int(library.CnnjaxVectorFloats())


def vector_floats() -> int:
    """Floats per vector register in the build (16 with AVX-512, else 8)."""
    return _register()


def weight_gradient(x: Array, g: Array, kernel: Sequence[int], strides: Sequence[int],
                    padding: Sequence[tuple[int, int]]) -> Array:
    """dL/dw [kh, kw, C_in, C_out] of an NHWC convolution (one group, no dilation) of float32 x with
    explicit non-negative `padding`, from its output gradient g: in vector blocks of output
    channels (the last partly filled where C_out is no multiple of 8) where C_out is at least 8
    and either a multiple of 8 or C_in is more than 8, else over expanded rows of x
    (cnnjax/cpu_kernels.cc; cnnjax/cpu_conv.py sends it those layers of at most NARROW_CHANNELS
    input channels). CPU only; `available()` first."""
    _register()
    (kh, kw), (sh, sw), ((pt, _), (pl, _)) = kernel, strides, padding
    call = jax.ffi.ffi_call(WEIGHT_GRADIENT,
                            jax.ShapeDtypeStruct((kh, kw, x.shape[3], g.shape[3]), jnp.float32),
                            vmap_method=VMAP_METHOD)
    return call(x, g, sh=np.int64(sh), sw=np.int64(sw), pt=np.int64(pt), pl=np.int64(pl))


# Which layers `conv` and `input_gradient` take (benchmarks/RESULTS.md, 2-core CPU, against jaxlib's
# oneDNN call, each alone): with the weights packed per block of output channels (cpu_kernels.cc,
# PackBlocks) the loops run layers of WIDE_MIN_CHANNELS input channels or more to multiples of
# the vector width of outputs at oneDNN's speed, 3x3 and 5x5, stride 1 and 2, 4x4 to 224x224
# pixels (benchmarks/cpu-gather-vs-onednn-2026-12-07-bands.json, nineteen layers): forward
# 0.90x-1.17x its speed, input gradients 0.96x-1.67x (stride 2 1.2x-1.7x). Inside a train step
# the kernel gains more (cnnjax/cpu_conv.py: oneDNN's calls lose to their thread pool on two
# cores). An input gradient to one vector of x's channels from a wide output gradient (16 <- 128:
# 0.72x-0.88x) keeps oneDNN's call unless g has at most ONE_VECTOR_MAX_OUTPUTS vectors (16 <- 48:
# 0.80x-1.10x) or GATHER_CHANNELS (kernel rows then read in triples).
# Channel counts that are no multiple of the vector width write a tile's last vector only up to
# the last channel (masked stores, cpu_kernels.cc: StorePart), its packed weights padded with
# zeros; per layer against oneDNN, two to four runs each (the last in
# benchmarks/cpu-gather-vs-onednn-2026-12-08-partial.json): DenseNet-BC's 3x3 48 -> 12 growth
# layer at 32, 16 and 8 px, batch 64, forward 0.77x-1.29x, its input gradient (from 12 channels of
# g, WIDE_GRADIENT_MIN_CHANNELS) 0.93x-1.46x; its RGB stem 3 -> 24 1.03x-1.26x; EfficientNet-B3's
# stride-2 stem 3 -> 40 at 300 px 1.00x-1.19x, B6's 3 -> 56 at 528 px 0.74x-0.90x (62 MB of
# pixels that are no whole cache lines: not streamed); ablation_inception's 5x5 4 -> 8 forward
# 0.99x-1.14x, back 0.82x-0.92x, 8 -> 24 1.20x-1.41x, back 0.99x-1.01x; GoogLeNet's 5x5 24 <- 64
# input gradient 1.04x-1.13x (0.50x-0.91x in the dot tiles it took before); 12 <- 16 1.11x-1.37x.
# The input gradient keeps dot tiles only for x channels of at most half a vector (12 <- 16 ran
# in them at 0.64x).
# An RGB first layer (3 channels) takes the kernel at any size, though with 27 multiply-adds per
# output a 3x3 one is bound by its stores: where the output is larger than the cache (32 MB) they
# stream past it (cpu_kernels.cc, StreamStore), without which 3 -> 64 at 224 px, batch 8 or 16,
# ran at 0.41x-0.48x oneDNN's speed. Per layer, three runs (the last in
# benchmarks/cpu-gather-vs-onednn-2026-12-07-rgb.json): 3 -> 16 at 32 px, batch 128, 1.4x-1.7x;
# MobileNet's 3x3 stride-2 stem to 32 at 224 px, batch 32, 0.98x-1.28x; the 7x7 stride-2 stem of
# ResNets, DenseNets and GoogLeNet (147 multiply-adds per output) 0.89x-0.98x; 3 -> 64 3x3 at
# 224 px 0.86x-1.02x, at 32 px 0.57x-0.89x: at most about a millisecond against steps of
# seconds (vgg16@224 and mobilenet_v2@224 unchanged in whole steps), for a program that then
# holds no oneDNN call. At most NARROW_CHANNELS input channels (LeNet-5's C3: 6) take it to at
# most two vectors of outputs, at most NARROW_MAX_OUTPUT_BYTES out (oneDNN's kernel was faster at
# 4 and 6 channels to 64).
# Programs whose every convolution the kernels take hold no oneDNN call and enter the persistent
# compilation cache: every registered model's train step (lowered at 32 or 64 px, batch 2).
GATHER_CHANNELS = (16, 32, 64)
WIDE_MIN_CHANNELS = 16
WIDE_GRADIENT_MIN_CHANNELS = 12
NARROW_MAX_OUTPUT_BYTES = 32 << 20
NARROW_CHANNELS = 8
ONE_VECTOR_MAX_OUTPUTS = 3


def conv_fits(c_in: int, c_out: int, outputs: int) -> bool:
    """Whether `conv` runs a layer of c_in -> c_out channels writing `outputs` floats in its own
    loops (above), any kernel size and any count of output channels: at least WIDE_MIN_CHANNELS
    in, or 3 (RGB), or at most NARROW_CHANNELS in to at most two vectors with at most
    NARROW_MAX_OUTPUT_BYTES out. `available()` first."""
    return c_in >= WIDE_MIN_CHANNELS or c_in == 3 or _small_input_fits(c_in, c_out, outputs)


def _small_input_fits(c_in: int, c_out: int, outputs: int) -> bool:
    """3 (RGB) or at most NARROW_CHANNELS input channels (then to at most two vectors) with at most
    NARROW_MAX_OUTPUT_BYTES out."""
    small = 4 * outputs <= NARROW_MAX_OUTPUT_BYTES
    return small and (c_in == 3 or (c_in <= NARROW_CHANNELS and c_out <= 2 * vector_floats()))


def input_gradient_fits(c_in: int, c_out: int, size: int) -> bool:
    """Whether `input_gradient` runs the input gradient of a layer of c_in -> c_out channels whose
    input holds `size` floats in its own loops (above; the gather then reads g's c_out channels and
    writes x's c_in, any count of them): at least WIDE_GRADIENT_MIN_CHANNELS of g to more than one
    vector of x (or to at most one, from at most ONE_VECTOR_MAX_OUTPUTS vectors of g); or
    GATHER_CHANNELS of g, or few (`conv_fits`'s small-input rule, swapped); or at most
    NARROW_CHANNELS of x (LeNet-5's C3: 6) from a multiple of the vector width of g.
    `available()` first."""
    lanes = vector_floats()
    wide = (c_out >= WIDE_GRADIENT_MIN_CHANNELS
            and (c_in > lanes or c_out <= ONE_VECTOR_MAX_OUTPUTS * lanes))
    gather = c_out in GATHER_CHANNELS or _small_input_fits(c_out, c_in, size)
    dot = c_in <= NARROW_CHANNELS and c_out % lanes == 0
    return wide or gather or dot


def _pads_and_strides(strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> dict:
    (sh, sw), ((pt, _), (pl, _)) = strides, padding
    return dict(sh=np.int64(sh), sw=np.int64(sw), pt=np.int64(pt), pl=np.int64(pl))


def conv_output_shape(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int],
                      padding: Sequence[tuple[int, int]]) -> tuple[int, int, int, int]:
    """The output shape of an NHWC convolution of x_shape with w_shape [kh, kw, C_in, C_out] at
    `strides`, explicit `padding`."""
    rows, cols = ((size + low + high - k) // s + 1 for size, k, s, (low, high)
                  in zip(x_shape[1:3], w_shape[:2], strides, padding, strict=True))
    return (x_shape[0], rows, cols, w_shape[3])


def conv(x: Array, w: Array, strides: Sequence[int], padding: Sequence[tuple[int, int]],
         addend: Array | None = None) -> Array:
    """The NHWC convolution of float32 x with w [kh, kw, C_in, C_out] (one group, no dilation),
    explicit non-negative `padding`, plus `addend` (the output's shape) where given, added as each
    output is written. CPU only; `available()` first."""
    _register()
    shape = conv_output_shape(x.shape, w.shape, strides, padding)
    call = jax.ffi.ffi_call(CONV, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method=VMAP_METHOD)
    return call(x, w, *([] if addend is None else [addend]), **_pads_and_strides(strides, padding))


def input_gradient(g: Array, w: Array, x_shape: Sequence[int], strides: Sequence[int],
                   padding: Sequence[tuple[int, int]], addend: Array | None = None) -> Array:
    """dL/dx (x_shape) of `conv(x, w, strides, padding)` from its output gradient g, plus `addend`
    (x's shape) where given, in the same loop (`input_gradient_fits` says where it is fast). One
    call at any stride: each input pixel sums only the taps that reach it. CPU only; `available()`
    first."""
    _register()
    call = jax.ffi.ffi_call(INPUT_GRADIENT, jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32),
                            vmap_method=VMAP_METHOD)
    return call(g, w, *([] if addend is None else [addend]), **_pads_and_strides(strides, padding))


def norm_act(x: Array, scale: Array, bias: Array, residual: Array | None, epsilon: float,
             relu: bool) -> tuple[Array, Array, Array]:
    """Training-mode batch norm of float32 x [..., C] over all but the last axis, plus `residual`
    (None: none), then ReLU if `relu`: (output, batch mean, batch variance). CPU only;
    `available()` first."""
    _register()
    stat = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
    call = jax.ffi.ffi_call(NORM_ACT, (jax.ShapeDtypeStruct(x.shape, jnp.float32), stat, stat),
                            vmap_method=VMAP_METHOD)
    return call(x, scale, bias, *([] if residual is None else [residual]),
                eps=np.float32(epsilon), relu=bool(relu))


def norm_act_backward(x: Array, out: Array, g: Array, mean: Array, inv: Array, scale: Array,
                      bias: Array, g_mean: Array, g_var: Array, relu: bool,
                      residual: bool) -> tuple[Array, ...]:
    """The gradient of `norm_act` from dL/dout = g and the statistics' cotangents: (dL/dx,
    dL/dscale, dL/dbias), plus dL/dresidual when `relu` and `residual` (without the ReLU it is g).
    With the ReLU and no residual the mask comes from x, mean, scale * inv and bias (`out` is not
    read: two passes over the activation fewer)."""
    _register()
    stat = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
    full = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    results = (full, stat, stat) + ((full,) if relu and residual else ())
    call = jax.ffi.ffi_call(NORM_ACT_BACKWARD, results, vmap_method=VMAP_METHOD)
    return call(x, out, g, mean, inv, scale, bias, g_mean, g_var, relu=bool(relu))


def _check_norm_act(rng: np.random.Generator) -> None:
    """norm_act with a residual and ReLU, and its gradient, against autodiff of the formula on 12
    channels (a tile that is not a whole number of vectors) and on two vectors of channels (the
    sums in registers) over 30 rows; raises RuntimeError if they differ."""
    for c in (12, 2 * vector_floats()):
        _check_norm_act_on(rng, (2, 5, 3, c))


def _check_norm_act_on(rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    x, r, g = (rng.standard_normal(shape, np.float32) for _ in range(3))
    scale, bias, g_mean, g_var = rng.standard_normal((4, shape[-1]), np.float32)

    def formula(x, scale, bias, r):
        mean = x.mean((0, 1, 2))
        var = jnp.maximum(0.0, (x * x).mean((0, 1, 2)) - mean * mean)
        y = (x - mean) * (scale * jax.lax.rsqrt(var + 1e-5)) + bias + r
        return jnp.maximum(y, 0.0), mean, var

    def both(x, scale, bias, r, g, g_mean, g_var):
        expected, vjp = jax.vjp(formula, x, scale, bias, r)
        out, mean, var = norm_act(x, scale, bias, r, 1e-5, relu=True)
        grads = norm_act_backward(x, out, g, mean, jax.lax.rsqrt(var + 1e-5), scale, bias,
                                  g_mean, g_var, relu=True, residual=True)
        return (out, mean, var, *grads), (*expected, *vjp((g, g_mean, g_var)))

    ours, expected = run_apart_on_cpu(both, x, scale, bias, r, g, g_mean, g_var)
    if not all(np.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(ours, expected, strict=True)):
        raise RuntimeError("its batch norm disagrees with autodiff of the formula")


def _check_conv(rng: np.random.Generator) -> None:
    """conv and input_gradient, each with an addend, against XLA's convolution and its gradient:
    the loops for 16 input channels at strides 1 (kernel rows in triples) and 2, for 3 (an RGB
    layer: forward, and the input gradient's dot tiles), and the generic loop (5 input channels,
    a 3x2 kernel, strides (1, 2); dot tiles for its input gradient; 12 to a vector and 4 more,
    both passes' last vector partial), all with asymmetric padding; raises RuntimeError if they
    differ."""
    lanes = vector_floats()
    cases = [((2, 6, 7, 16), (3, 3, 16, lanes), (1, 1), ((1, 0), (1, 2))),
             ((2, 6, 5, 12), (3, 3, 12, lanes + 4), (1, 1), ((1, 1), (1, 0))),
             ((2, 5, 6, 3), (3, 3, 3, lanes), (1, 1), ((1, 1), (0, 1))),
             ((2, 7, 6, 16), (3, 3, 16, 2 * lanes), (2, 2), ((1, 1), (0, 1))),
             ((2, 5, 7, 5), (3, 2, 5, lanes), (1, 2), ((2, 1), (1, 0)))]
    for x_shape, w_shape, strides, padding in cases:
        def both(x, w, g, a, b, strides=strides, padding=padding):
            y, vjp = jax.vjp(lambda x: reference_conv(x, w, strides, padding), x)
            ours = [conv(x, w, strides, padding, a)]
            expected = [y + a]
            if input_gradient_fits(x.shape[3], w.shape[3], x.size):
                ours.append(input_gradient(g, w, x.shape, strides, padding, b))
                expected.append(vjp(g)[0] + b)
            return ours, expected

        x, w, b = (rng.standard_normal(shape, np.float32) for shape in (x_shape, w_shape, x_shape))
        y_shape = conv_output_shape(x_shape, w_shape, strides, padding)
        g, a = (rng.standard_normal(y_shape, np.float32) for _ in range(2))
        ours, expected = run_apart_on_cpu(both, x, w, g, a, b)
        if not all(np.allclose(o, e, rtol=1e-4, atol=1e-4) for o, e in zip(ours, expected, strict=True)):
            raise RuntimeError("its convolution disagrees with XLA's")


@functools.cache
def available() -> bool:
    """Whether this process can use the kernels: one CPU device in one process (a custom call has
    no SPMD rule, so a sharded program would gather its inputs), the library builds, its weight
    gradient matches XLA's on small cases (strided with asymmetric padding, a non-square kernel, 8,
    24 and 40 output channels: every vector block the build has; 12 from 10, the last vector
    partly filled; 6, in expanded rows with a segment per tap and shared), `conv` and
    `input_gradient` match XLA's convolution and its gradient, and `norm_act` and its gradient
    match autodiff of their formula. Checked once per process (about 0.3 s, plus the build the
    first time on a machine: about 20 s)."""
    try:
        if not single_cpu_process():
            return False
        _register()
        rng = np.random.default_rng(0)
        cases = [((3, 9, 8, 7), (3, 2, 7, 24), (2, 1), ((1, 2), (0, 1))),
                 ((2, 6, 5, 3), (5, 3, 3, 8), (1, 2), ((2, 2), (1, 1))),
                 ((2, 5, 5, 20), (3, 3, 20, 40), (1, 1), ((1, 1), (1, 1))),
                 ((2, 6, 5, 10), (3, 3, 10, 12), (1, 1), ((1, 1), (1, 0))),
                 ((2, 7, 9, 2), (5, 3, 2, 6), (1, 2), ((2, 1), (1, 0))),
                 ((2, 8, 8, 1), (5, 5, 1, 6), (1, 1), ((0, 0), (0, 0)))]
        for x_shape, w_shape, strides, padding in cases:
            conv = functools.partial(reference_conv, strides=strides, padding=padding)

            def both(x, w, g, conv=conv, kernel=w_shape[:2], strides=strides, padding=padding):
                expected = jax.vjp(lambda w: conv(x, w), w)[1](g)[0]
                return weight_gradient(x, g, kernel, strides, padding), expected

            x, w = (rng.standard_normal(shape, np.float32) for shape in (x_shape, w_shape))
            g = rng.standard_normal(jax.eval_shape(conv, x, w).shape, np.float32)
            ours, expected = run_apart_on_cpu(both, x, w, g)
            if not np.allclose(ours, expected, rtol=1e-4, atol=1e-4):
                raise RuntimeError("its weight gradient disagrees with XLA's convolution")
        _check_conv(rng)
        _check_norm_act(rng)
        return True
    except Exception as err:  # no compiler, a failed build, a jaxlib without the FFI it needs
        warnings.warn(f"cnnjax's CPU kernels are off, XLA's kernels run instead: {err} "
                      f"(set {ENV}=off to silence)", stacklevel=2)
        return False
