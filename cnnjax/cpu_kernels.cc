// cnnjax's CPU kernels, called from XLA through the FFI (cnnjax/cpu_kernels.py builds and loads
// this file; README "CPU forms" says when they run).
//
// CnnjaxConvWeightGradient: dL/dw of an NHWC convolution (groups 1, no dilation), float32.
//
//   dw[i, j, c, o] = sum over n, oh, ow of x[n, oh*sh + i - pt, ow*sw + j - pl, c] * g[n, oh, ow, o]
//
// XLA:CPU computes this as a convolution over x copied to CHWN, in Eigen's generic kernel: 5 to 13
// ms per layer of a CIFAR ResNet at batch 128 on a 2-core x86 machine, against 3.4 to 3.9 ms for
// oneDNN's backward-weights kernel in PyTorch (benchmarks/RESULTS.md). jaxlib's oneDNN custom call
// runs forward kernels only, so cnnjax computes it here: for each kernel tap, a GEMM over the tap's
// valid output pixels, [C_in x pixels] x [pixels x C_out], with a block of input channels x output
// channels held in vector registers while the pixels stream past: with AVX-512, up to 12 input
// channels x 32 output channels (or 16 x 16) in 24 of its 32 registers; with AVX, 6 x 16 (or 12 x
// 8) in 12 of 16. Output channels left over after the widest vectors go 8 at a time. The AVX-512
// blocks ran resnet20's layers 1.5x to 1.8x faster than the AVX ones on the development machine
// (2.0 to 2.5 against 3.3 to 3.8 ms at batch 128, benchmarks/RESULTS.md). Reads stay in place
// (NHWC, no copy); padding is handled by each tap's range of valid output pixels. C_out must be a
// multiple of 8 (cnnjax/cpu_conv.py keeps XLA's kernel for the rest: with LeNet-5's 6 filters a
// scalar loop here was 5x slower than XLA).
//
// Work is split into (group of images, block of taps) chunks handed out through an atomic counter
// to XLA's intra-op thread pool and the calling thread; each worker sums into its own buffer, added
// at the end. Built with -march=native on the machine that runs it; `v8` and `vw` are GCC/Clang's
// vector extension, which the compiler maps to AVX or AVX-512 registers, or to pairs of narrower
// registers elsewhere.
//
// CnnjaxNormActForward, CnnjaxNormActBackward: a training-mode batch norm, plus a residual, then
// ReLU, and its gradient (after the weight gradient below; cnnjax/batchnorm.py says when they run).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The widest vector the build targets: AVX-512's 16 floats and 32 registers where -march=native
// has them, else AVX's 8 floats and 16 registers. kAccumulators is how many vector accumulators a
// block may hold, leaving registers for the loaded output gradient and the broadcast input.
typedef float v8 __attribute__((vector_size(32)));
#if defined(__AVX512F__)
typedef float vw __attribute__((vector_size(64)));
constexpr int kAccumulators = 24;
#else
typedef v8 vw;
constexpr int kAccumulators = 12;
#endif
constexpr int kMaxChannelBlock = 16;

template <typename Vec>
inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename Vec>
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

struct Conv {
  int64_t n, h, w, ci;  // x
  int64_t ho, wo, co;   // g
  int64_t kh, kw, sh, sw, pt, pl;
};

// The pixels one tap covers: images [n0, n1), output rows [oh0, oh1), columns [ow0, ow1).
struct Range {
  int64_t n0, n1, oh0, oh1, ow0, ow1, i, j;
};

// out[c0 + c, o0 + L*v + k] += sum over the range's pixels of x[pixel + tap, c0 + c] *
// g[pixel, o0 + L*v + k] for c < CB, v < V, where Vec holds L floats: CB * V vector accumulators.
template <typename Vec, int CB, int V>
void Block(const Conv& s, const float* x, const float* g, const Range& r, int64_t c0, int64_t o0,
           float* out) {
  constexpr int L = sizeof(Vec) / sizeof(float);
  Vec acc[CB][V];
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < V; ++v) acc[c][v] = Vec{};
  const int64_t x_step = s.sw * s.ci;
  for (int64_t n = r.n0; n < r.n1; ++n) {
    for (int64_t oh = r.oh0; oh < r.oh1; ++oh) {
      const int64_t ih = oh * s.sh + r.i - s.pt;
      const float* xp = x + ((n * s.h + ih) * s.w + (r.ow0 * s.sw + r.j - s.pl)) * s.ci + c0;
      const float* gp = g + ((n * s.ho + oh) * s.wo + r.ow0) * s.co + o0;
      for (int64_t ow = r.ow0; ow < r.ow1; ++ow, xp += x_step, gp += s.co) {
        Vec gv[V];
        for (int v = 0; v < V; ++v) gv[v] = Load<Vec>(gp + L * v);
        for (int c = 0; c < CB; ++c) {
          const float xc = xp[c];
          for (int v = 0; v < V; ++v) acc[c][v] += xc * gv[v];
        }
      }
    }
  }
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < V; ++v) {
      float* o = out + (c0 + c) * s.co + o0 + L * v;
      Store(o, Load<Vec>(o) + acc[c][v]);
    }
}

// The widest channel block a block of V vectors may take.
template <int V>
constexpr int MaxChannels() {
  return kAccumulators / V < kMaxChannelBlock ? kAccumulators / V : kMaxChannelBlock;
}

// Block<Vec, cb, V> for a runtime cb in [CB, MaxChannels<V>()].
template <typename Vec, int V, int CB = 1>
void BlockOf(int64_t cb, const Conv& s, const float* x, const float* g, const Range& r, int64_t c0,
             int64_t o0, float* out) {
  if constexpr (CB < MaxChannels<V>()) {
    if (cb > CB) return BlockOf<Vec, V, CB + 1>(cb, s, x, g, r, c0, o0, out);
  }
  Block<Vec, CB, V>(s, x, g, r, c0, o0, out);
}

// fn(c0, cb) for channels [0, ci) in near-equal blocks [c0, c0 + cb) of at most `most`.
template <typename Fn>
void ChannelBlocks(int64_t ci, int64_t most, const Fn& fn) {
  const int64_t blocks = (ci + most - 1) / most;
  for (int64_t b = 0, c0 = 0; b < blocks; ++b) {
    const int64_t cb = (ci - c0) / (blocks - b);
    fn(c0, cb);
    c0 += cb;
  }
}

// Input channels [0, ci) in near-equal blocks of at most MaxChannels<V>(), each against output
// channels [o0, o0 + V * lanes of Vec).
template <typename Vec, int V>
void Channels(const Conv& s, const float* x, const float* g, const Range& r, int64_t o0,
              float* out) {
  ChannelBlocks(s.ci, MaxChannels<V>(), [&](int64_t c0, int64_t cb) {
    BlockOf<Vec, V>(cb, s, x, g, r, c0, o0, out);
  });
}

int64_t CeilDiv(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// The outputs o in [0, out) whose input o * stride + tap - pad lies in [0, size), as [lo, hi).
void ValidRange(int64_t size, int64_t out, int64_t stride, int64_t tap, int64_t pad, int64_t* lo,
                int64_t* hi) {
  *lo = std::max<int64_t>(0, CeilDiv(pad - tap, stride));
  *hi = std::max(*lo, std::min<int64_t>(out, CeilDiv(size + pad - tap, stride)));
}

// Adds tap t's gradient over images [n0, n1) to acc ([kh, kw, ci, co]).
void Chunk(const Conv& s, const float* x, const float* g, int64_t n0, int64_t n1, int64_t t,
           float* acc) {
  Range r{n0, n1, 0, 0, 0, 0, t / s.kw, t % s.kw};
  ValidRange(s.h, s.ho, s.sh, r.i, s.pt, &r.oh0, &r.oh1);
  ValidRange(s.w, s.wo, s.sw, r.j, s.pl, &r.ow0, &r.ow1);
  if (r.oh0 == r.oh1 || r.ow0 == r.ow1) return;
  float* out = acc + t * s.ci * s.co;
  constexpr int64_t L = sizeof(vw) / sizeof(float);
  int64_t o0 = 0;
  for (; o0 + 2 * L <= s.co; o0 += 2 * L) Channels<vw, 2>(s, x, g, r, o0, out);
  for (; o0 + L <= s.co; o0 += L) Channels<vw, 1>(s, x, g, r, o0, out);
  for (; o0 + 8 <= s.co; o0 += 8) Channels<v8, 1>(s, x, g, r, o0, out);
}

// With as many output channels as one vector holds (16 with AVX-512: CIFAR ResNets' first stage),
// a Block holds one accumulator per input channel and loads a scalar of x for every one of them:
// as many loads as multiply-adds, which leaves the FMA units waiting (1.25x the time of oneDNN's
// kernel in PyTorch on resnet20's 16-channel layers). At stride 1 a kernel row's kw taps meet the
// same input pixel against kw neighbouring output-gradient pixels, so RowBlock holds CB input
// channels x kw taps of accumulators and, per input pixel, loads kw vectors of g and CB scalars of
// x for CB * kw multiply-adds. Taps whose output pixel lies outside the row read a zero vector.
constexpr int kRowTaps = 3;  // the kernel widths RowBlock takes
constexpr int kRowChannels = kAccumulators / kRowTaps;

// out[(j * ci + c0 + c) * co + k] += sum over images [n0, n1), output rows [oh0, oh1) and input
// columns iw of x[n, oh * sh + i - pt, iw, c0 + c] * g[n, oh, iw + pl - j, k], for c < CB and
// j < kRowTaps: kernel row i, stride 1 along the width, co == lanes of vw.
template <int CB>
void RowBlock(const Conv& s, const float* x, const float* g, int64_t n0, int64_t n1, int64_t i,
              int64_t oh0, int64_t oh1, int64_t c0, float* out) {
  constexpr int L = sizeof(vw) / sizeof(float);
  alignas(64) static const float kZero[L] = {};
  vw acc[CB][kRowTaps];
  for (int c = 0; c < CB; ++c)
    for (int j = 0; j < kRowTaps; ++j) acc[c][j] = vw{};
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      const float* xr = x + ((n * s.h + oh * s.sh + i - s.pt) * s.w) * s.ci + c0;
      const float* gr = g + (n * s.ho + oh) * s.wo * L;
      for (int64_t iw = 0; iw < s.w; ++iw) {
        vw gv[kRowTaps];
        for (int j = 0; j < kRowTaps; ++j) {
          const int64_t ow = iw + s.pl - j;
          gv[j] = Load<vw>(ow >= 0 && ow < s.wo ? gr + ow * L : kZero);
        }
        const float* xp = xr + iw * s.ci;
        for (int c = 0; c < CB; ++c) {
          const float xc = xp[c];
          for (int j = 0; j < kRowTaps; ++j) acc[c][j] += xc * gv[j];
        }
      }
    }
  }
  for (int c = 0; c < CB; ++c)
    for (int j = 0; j < kRowTaps; ++j) {
      float* o = out + (j * s.ci + c0 + c) * L;
      Store(o, Load<vw>(o) + acc[c][j]);
    }
}

// RowBlock<cb> for a runtime cb in [CB, kRowChannels].
template <int CB = 1>
void RowBlockOf(int64_t cb, const Conv& s, const float* x, const float* g, int64_t n0, int64_t n1,
                int64_t i, int64_t oh0, int64_t oh1, int64_t c0, float* out) {
  if constexpr (CB < kRowChannels) {
    if (cb > CB) return RowBlockOf<CB + 1>(cb, s, x, g, n0, n1, i, oh0, oh1, c0, out);
  }
  RowBlock<CB>(s, x, g, n0, n1, i, oh0, oh1, c0, out);
}

// Whether RowChunk takes this layer's kernel rows: stride 1 along the width, kRowTaps taps wide,
// one vector of output channels.
bool RowTaps(const Conv& s) {
  return s.sw == 1 && s.kw == kRowTaps && s.co == static_cast<int64_t>(sizeof(vw) / sizeof(float));
}

// Adds kernel row i's gradient (taps i * kw to i * kw + kw - 1) over images [n0, n1) to acc.
void RowChunk(const Conv& s, const float* x, const float* g, int64_t n0, int64_t n1, int64_t i,
              float* acc) {
  int64_t oh0, oh1;
  ValidRange(s.h, s.ho, s.sh, i, s.pt, &oh0, &oh1);
  if (oh0 == oh1) return;
  float* out = acc + i * s.kw * s.ci * s.co;
  ChannelBlocks(s.ci, kRowChannels, [&](int64_t c0, int64_t cb) {
    RowBlockOf(cb, s, x, g, n0, n1, i, oh0, oh1, c0, out);
  });
}

// Runs fn(worker, chunk) for every chunk in [0, chunks) on the calling thread and threads - 1 tasks
// of XLA's intra-op pool, which take chunks from an atomic counter. `worker` numbers the threads
// that took any chunk, from 0 (an index into per-thread buffers); the return value is their count.
// A task that starts after every chunk is taken touches only the counters, which its shared_ptr
// keeps alive; fn is called only while the caller waits.
template <typename Fn>
int ParallelFor(ffi::ThreadPool& pool, int64_t threads, int64_t chunks, const Fn& fn) {
  struct State {
    const Fn* fn;
    int64_t chunks;
    std::atomic<int64_t> next{0};
    std::atomic<int> running{0}, workers{0};

    void Run() {
      running.fetch_add(1);
      int64_t c = next.fetch_add(1);
      if (c < chunks) {
        const int worker = workers.fetch_add(1);
        for (; c < chunks; c = next.fetch_add(1)) (*fn)(worker, c);
      }
      running.fetch_sub(1);
    }
  };
  auto state = std::make_shared<State>();
  state->fn = &fn;
  state->chunks = chunks;
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([state] { state->Run(); });
  state->Run();
  // Every chunk is taken; wait for the workers still finishing theirs.
  while (state->running.load() != 0) std::this_thread::yield();
  return state->workers.load();
}

// The threads a kernel uses: the pool's and the calling thread, at most one per chunk.
int64_t Threads(ffi::ThreadPool& pool, int64_t chunks) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), chunks));
}

ffi::Error WeightGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                          int64_t pl) {
  auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || xd[0] != gd[0] || xd[3] != wd[2] ||
      gd[3] != wd[3] || wd[3] % 8 != 0 || sh < 1 || sw < 1 || pt < 0 || pl < 0)
    return ffi::Error::InvalidArgument(
        "cnnjax conv weight gradient: expects x [N,H,W,Ci], g [N,Ho,Wo,Co], dw [kh,kw,Ci,Co] with "
        "Co a multiple of 8, strides >= 1, pads >= 0");
  const Conv s{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], wd[0], wd[1], sh, sw, pt, pl};
  const int64_t size = s.kh * s.kw * s.ci * s.co, taps = s.kh * s.kw;
  const int64_t threads = Threads(pool, s.n * taps);
  // Images per chunk: about 1024 output pixels, so a block's accumulators see a long run of pixels
  // (small maps: several images), while leaving 8 chunks per thread to balance the load. A chunk
  // takes as many taps of its images as that leaves: read for the first tap, its pixels stay in
  // cache for the others (resnet20's train step 3% to 4% faster than with a tap per chunk).
  int64_t group = std::max<int64_t>(1, 1024 / std::max<int64_t>(1, s.ho * s.wo));
  while (group > 1 && CeilDiv(s.n, group) * taps < 8 * threads) group /= 2;
  int64_t tap_block =
      std::min(taps, std::max<int64_t>(1, CeilDiv(s.n, group) * taps / (8 * threads)));
  const bool rows = RowTaps(s);
  if (rows) tap_block = CeilDiv(tap_block, s.kw) * s.kw;  // whole kernel rows
  const int64_t tap_blocks = CeilDiv(taps, tap_block);
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  std::vector<std::vector<float>> acc(threads, std::vector<float>(size, 0.f));  // one per worker
  const int workers = ParallelFor(pool, threads, CeilDiv(s.n, group) * tap_blocks,
                                  [&](int worker, int64_t c) {
    const int64_t n0 = c / tap_blocks * group, t0 = c % tap_blocks * tap_block;
    const int64_t n1 = std::min(s.n, n0 + group), t1 = std::min(taps, t0 + tap_block);
    if (rows) {
      for (int64_t i = t0 / s.kw; i < t1 / s.kw; ++i) RowChunk(s, xp, gp, n0, n1, i, acc[worker].data());
    } else {
      for (int64_t t = t0; t < t1; ++t) Chunk(s, xp, gp, n0, n1, t, acc[worker].data());
    }
  });
  float* out = dw->typed_data();
  std::fill(out, out + size, 0.f);
  for (int k = 0; k < workers; ++k)
    for (int64_t e = 0; e < size; ++e) out[e] += acc[k][e];
  return ffi::Error::Success();
}

// --- batch norm, residual add and ReLU in training mode ------------------------------------------
//
// x [rows, C] is an NHWC activation with its batch and spatial axes merged. Each kernel makes two
// passes over the rows: per-channel sums, then one elementwise pass whose per-channel factors
// come from them. The passes walk the flat array in tiles of whole rows (at most kTileFloats
// floats, or one row where a row is longer), against the factors repeated across a tile, so the
// inner loops are long vector loops whatever C is (16 channels fill one AVX-512 register; a loop
// per row of 16 would be mostly overhead). Sums are taken per tile lane in float over kSumTiles
// tiles, then per channel in double.

constexpr int64_t kTileFloats = 256;
constexpr int64_t kSumTiles = 16;

struct Rows {
  int64_t rows, c, tile;    // tile: floats per tile, a multiple of c
  int64_t chunk_rows, chunks;
};

// Tiles of whole rows, and chunks of whole tiles: at least kSumTiles tiles each, and 4 chunks per
// thread where there are tiles enough.
Rows Split(int64_t rows, int64_t c, int64_t threads) {
  Rows r{rows, c, c * std::max<int64_t>(1, kTileFloats / c), 0, 0};
  const int64_t tile_rows = r.tile / c;
  const int64_t tiles = CeilDiv(rows, tile_rows);
  const int64_t tiles_per_chunk = std::max<int64_t>(kSumTiles, CeilDiv(tiles, 4 * threads));
  r.chunk_rows = tiles_per_chunk * tile_rows;
  r.chunks = CeilDiv(rows, r.chunk_rows);
  return r;
}

// v[j % c] for j < tile: a per-channel vector repeated across a tile.
std::vector<float> Tiled(const std::vector<float>& v, int64_t tile) {
  std::vector<float> out(tile);
  for (int64_t j = 0; j < tile; ++j) out[j] = v[j % v.size()];
  return out;
}

// Per-channel {sum of a, sum of a * (b - offset)} over all rows, where the caller's `values(i,
// len, a)` writes a[0, len) for the flat indices [i, i + len) (e.g. a masked gradient, which it
// may also store): a tile at a time, so both loops stay plain vector loops. Returns 2 * c doubles.
template <typename Values>
std::vector<double> Sums(ffi::ThreadPool& pool, const Rows& r, const float* b,
                         const std::vector<float>& offset, const Values& values) {
  const int64_t threads = Threads(pool, r.chunks);
  const std::vector<float> off = Tiled(offset, r.tile);
  std::vector<std::vector<double>> partial(threads, std::vector<double>(2 * r.c, 0.0));
  const int workers = ParallelFor(pool, threads, r.chunks, [&](int worker, int64_t chunk) {
    std::vector<float> s0(r.tile), s1(r.tile), tile(r.tile);
    const int64_t begin = chunk * r.chunk_rows * r.c;
    const int64_t end = std::min(r.rows, (chunk + 1) * r.chunk_rows) * r.c;
    double* p = partial[worker].data();
    for (int64_t block = begin; block < end; block += kSumTiles * r.tile) {
      std::fill(s0.begin(), s0.end(), 0.f);
      std::fill(s1.begin(), s1.end(), 0.f);
      for (int64_t t = block; t < std::min(end, block + kSumTiles * r.tile); t += r.tile) {
        const int64_t len = std::min(r.tile, end - t);
        values(t, len, tile.data());
        const float *__restrict__ a = tile.data(), *__restrict__ bt = b + t,
                    *__restrict__ o = off.data();
        float *__restrict__ a0 = s0.data(), *__restrict__ a1 = s1.data();
        for (int64_t j = 0; j < len; ++j) {
          a0[j] += a[j];
          a1[j] += a[j] * (bt[j] - o[j]);
        }
      }
      for (int64_t j = 0; j < r.tile; ++j) {
        p[j % r.c] += s0[j];
        p[r.c + j % r.c] += s1[j];
      }
    }
  });
  std::vector<double> total(2 * r.c, 0.0);
  for (int w = 0; w < workers; ++w)
    for (int64_t k = 0; k < 2 * r.c; ++k) total[k] += partial[w][k];
  return total;
}

// fn(i, len) for every tile [i, i + len) of the flat array (the factors' lane j is index - i), the
// chunks split over the pool.
template <typename Fn>
void Elementwise(ffi::ThreadPool& pool, const Rows& r, const Fn& fn) {
  ParallelFor(pool, Threads(pool, r.chunks), r.chunks, [&](int, int64_t chunk) {
    const int64_t begin = chunk * r.chunk_rows * r.c;
    const int64_t end = std::min(r.rows, (chunk + 1) * r.chunk_rows) * r.c;
    for (int64_t t = begin; t < end; t += r.tile) fn(t, std::min(r.tile, end - t));
  });
}

// rows and channels of x [..., C].
bool RowsOf(const ffi::AnyBuffer::Dimensions& d, int64_t count, int64_t* rows, int64_t* c) {
  if (d.size() < 1 || d[d.size() - 1] < 1) return false;
  *c = d[d.size() - 1];
  *rows = count / *c;
  return *rows > 0;
}

// out = act((x - mean) * scale / sqrt(var + eps) + bias [+ residual]), act = ReLU or the identity,
// with the batch mean and variance (E[x^2] - E[x]^2 clipped at 0, flax's fast variance) of x.
ffi::Error NormActForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                          ffi::Buffer<ffi::F32> bias, ffi::RemainingArgs rest,
                          ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> mean,
                          ffi::ResultBuffer<ffi::F32> var, float eps, bool relu) {
  int64_t rows, c;
  const float* residual = nullptr;
  if (rest.size() == 1) {
    auto r = rest.get<ffi::Buffer<ffi::F32>>(0);
    if (!r.has_value() || r->element_count() != x.element_count())
      return ffi::Error::InvalidArgument("cnnjax batch norm: the residual must match x");
    residual = r->typed_data();
  }
  if (!RowsOf(x.dimensions(), x.element_count(), &rows, &c) || scale.element_count() != c ||
      bias.element_count() != c || mean->element_count() != c || var->element_count() != c ||
      rest.size() > 1)
    return ffi::Error::InvalidArgument(
        "cnnjax batch norm: expects x [..., C] with rows, scale and bias [C], at most a residual");
  const Rows r = Split(rows, c, Threads(pool, rows));
  const float* xd = x.typed_data();
  // Sums of x and of x * x: the second with offset 0, the value being x itself.
  const std::vector<double> s =
      Sums(pool, r, xd, std::vector<float>(c, 0.f),
           [xd](int64_t i, int64_t len, float* a) { std::memcpy(a, xd + i, len * sizeof(float)); });
  std::vector<float> m(c), p(c), t(c);
  for (int64_t k = 0; k < c; ++k) {
    const double mk = s[k] / rows;
    const double v = std::max(0.0, s[c + k] / rows - mk * mk);
    mean->typed_data()[k] = m[k] = static_cast<float>(mk);
    var->typed_data()[k] = static_cast<float>(v);
    p[k] = static_cast<float>(scale.typed_data()[k] / std::sqrt(v + eps));
    t[k] = bias.typed_data()[k];
  }
  const std::vector<float> mt = Tiled(m, r.tile), pt = Tiled(p, r.tile), tt = Tiled(t, r.tile);
  float* od = out->typed_data();
  Elementwise(pool, r, [&](int64_t i, int64_t len) {
    const float* __restrict__ xi = xd + i;
    const float* __restrict__ ri = residual ? residual + i : nullptr;
    const float *__restrict__ mi = mt.data(), *__restrict__ pi = pt.data(),
                *__restrict__ ti = tt.data();
    float* __restrict__ o = od + i;
    if (ri && relu) {
      for (int64_t j = 0; j < len; ++j)
        o[j] = std::max(0.f, (xi[j] - mi[j]) * pi[j] + ti[j] + ri[j]);
    } else if (ri) {
      for (int64_t j = 0; j < len; ++j) o[j] = (xi[j] - mi[j]) * pi[j] + ti[j] + ri[j];
    } else if (relu) {
      for (int64_t j = 0; j < len; ++j) o[j] = std::max(0.f, (xi[j] - mi[j]) * pi[j] + ti[j]);
    } else {
      for (int64_t j = 0; j < len; ++j) o[j] = (xi[j] - mi[j]) * pi[j] + ti[j];
    }
  });
  return ffi::Error::Success();
}

// The gradient of NormActForward from dL/dout = g (and the cotangents of the mean and variance,
// which the running averages take). With m = g where out > 0 (ReLU) or m = g:
//   dL/dbias = sum m, dL/dscale = sum m * x_hat, x_hat = (x - mean) * inv,
//   dL/dx = scale * inv * (m - (dL/dbias + x_hat * dL/dscale) / rows)
//           + (g_mean + 2 g_var (x - mean)) / rows,
// and dL/dresidual = m, stored in pass 1 when `rest` has a buffer for it (ReLU with a residual).
ffi::Error NormActBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> out,
                           ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> mean,
                           ffi::Buffer<ffi::F32> inv, ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> g_mean, ffi::Buffer<ffi::F32> g_var,
                           ffi::ResultBuffer<ffi::F32> g_x, ffi::ResultBuffer<ffi::F32> g_scale,
                           ffi::ResultBuffer<ffi::F32> g_bias, ffi::RemainingRets rest, bool relu) {
  int64_t rows, c;
  float* g_res = nullptr;
  if (rest.size() == 1) {
    auto r = rest.get<ffi::Buffer<ffi::F32>>(0);
    if (!r.has_value() || (*r)->element_count() != x.element_count())
      return ffi::Error::InvalidArgument("cnnjax batch norm gradient: dL/dresidual must match x");
    g_res = (*r)->typed_data();
  }
  if (!RowsOf(x.dimensions(), x.element_count(), &rows, &c) ||
      g.element_count() != x.element_count() || out.element_count() != x.element_count() ||
      mean.element_count() != c || inv.element_count() != c || scale.element_count() != c ||
      g_mean.element_count() != c || g_var.element_count() != c || rest.size() > 1)
    return ffi::Error::InvalidArgument(
        "cnnjax batch norm gradient: expects x, out, g [..., C], and mean, inv, scale, g_mean, "
        "g_var [C]");
  const Rows r = Split(rows, c, Threads(pool, rows));
  const float *xd = x.typed_data(), *od = out.typed_data(), *gd = g.typed_data();
  const std::vector<float> m(mean.typed_data(), mean.typed_data() + c);
  const std::vector<double> s = Sums(pool, r, xd, m, [=](int64_t i, int64_t len, float* a) {
    const float *__restrict__ gi = gd + i, *__restrict__ oi = od + i;
    if (relu) {
      for (int64_t j = 0; j < len; ++j) a[j] = oi[j] > 0.f ? gi[j] : 0.f;
    } else {
      std::memcpy(a, gi, len * sizeof(float));
    }
    if (g_res) std::memcpy(g_res + i, a, len * sizeof(float));
  });
  std::vector<float> p(c), q(c), t(c);
  for (int64_t k = 0; k < c; ++k) {
    const double iv = inv.typed_data()[k], sc = scale.typed_data()[k];
    const double sum_g = s[k], sum_g_xhat = iv * s[c + k];
    g_bias->typed_data()[k] = static_cast<float>(sum_g);
    g_scale->typed_data()[k] = static_cast<float>(sum_g_xhat);
    p[k] = static_cast<float>(sc * iv);
    q[k] = static_cast<float>((2.0 * g_var.typed_data()[k] - sc * iv * iv * sum_g_xhat) / rows);
    t[k] = static_cast<float>((g_mean.typed_data()[k] - sc * iv * sum_g) / rows);
  }
  const std::vector<float> mt = Tiled(m, r.tile), pt = Tiled(p, r.tile), qt = Tiled(q, r.tile),
                           tt = Tiled(t, r.tile);
  float* gx = g_x->typed_data();
  Elementwise(pool, r, [&](int64_t i, int64_t len) {
    const float *__restrict__ xi = xd + i, *__restrict__ gi = (g_res ? g_res : gd) + i,
                *__restrict__ oi = od + i;
    const float *__restrict__ mi = mt.data(), *__restrict__ pi = pt.data(),
                *__restrict__ qi = qt.data(), *__restrict__ ti = tt.data();
    float* __restrict__ o = gx + i;
    if (relu && !g_res) {
      for (int64_t j = 0; j < len; ++j)
        o[j] = (oi[j] > 0.f ? gi[j] : 0.f) * pi[j] + (xi[j] - mi[j]) * qi[j] + ti[j];
    } else {
      for (int64_t j = 0; j < len; ++j) o[j] = gi[j] * pi[j] + (xi[j] - mi[j]) * qi[j] + ti[j];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxConvWeightGradient, WeightGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxNormActForward, NormActForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .RemainingArgs()               // residual, if any
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // var
                                  .Attr<float>("eps")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxNormActBackward, NormActBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g = dL/dout
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv = 1 / sqrt(var + eps)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_var
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dL/dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dL/dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dL/dbias
                                  .RemainingRets()               // dL/dresidual, if stored
                                  .Attr<bool>("relu"));
