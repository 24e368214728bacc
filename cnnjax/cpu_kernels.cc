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
// (NHWC, no copy); padding is handled by each tap's range of valid output pixels. Where C_out is
// no multiple of 8 (DenseNet-BC's growth of 12) the rest after the whole vectors is one vector,
// partly filled (LoadPart / StorePart): 48 -> 12 at 32 and 16 px, batch 64, 1.6x-2.0x as fast as
// XLA's weight gradient, at 8 px 1.05x-1.6x (benchmarks/RESULTS.md). Fewer than 8 filters, and
// other counts on at most 8 input channels, take the expanded rows below (a scalar loop for
// LeNet-5's 6 filters here was 5x slower than XLA).
//
// Work is split into (group of images, block of taps) chunks handed out through an atomic counter
// to XLA's intra-op thread pool and the calling thread; each worker sums into its own buffer, added
// at the end. Built with -march=native on the machine that runs it; `v8` and `vw` are GCC/Clang's
// vector extension, which the compiler maps to AVX or AVX-512 registers, or to pairs of narrower
// registers elsewhere.
//
// CnnjaxConvForward, CnnjaxConvInputGradient: the forward pass and input gradient of the same
// convolutions, as one gather loop over a list of taps (after the weight gradient below;
// cnnjax/cpu_conv.py says when they run).
//
// CnnjaxNormActForward, CnnjaxNormActBackward: a training-mode batch norm, plus a residual, then
// ReLU, and its gradient (after those; cnnjax/batchnorm.py says when they run).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
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
constexpr int kRegisters = 32;
constexpr int kAccumulators = 24;
#else
typedef v8 vw;
constexpr int kRegisters = 16;
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

// Loads (the rest zero) and stores the first n < lanes floats of a vw at p: masked with AVX-512,
// else through memcpy. A gather tile's last vector of output channels, where their count is no
// multiple of the lanes (DenseNet-BC's growth of 12, EfficientNet-B3's 40-channel stem), so
// writes its own pixel's channels and not the next pixel's.
inline vw LoadPart(const float* p, int64_t n) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  return reinterpret_cast<const vw&>(v);
#else
  vw v{};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
#endif
}

inline void StorePart(float* p, vw v, int64_t n) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), reinterpret_cast<__m512&>(v));
#else
  std::memcpy(p, &v, n * sizeof(float));
#endif
}

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
// Part: one vector of vw, of which only the co - o0 < L channels left (LoadPart, StorePart).
template <typename Vec, int CB, int V, bool Part = false>
void Block(const Conv& s, const float* x, const float* g, const Range& r, int64_t c0, int64_t o0,
           float* out) {
  constexpr int L = sizeof(Vec) / sizeof(float);
  static_assert(!Part || (V == 1 && std::is_same_v<Vec, vw>), "a part is one vector of vw");
  const int64_t part = s.co - o0;
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
        if constexpr (Part) {
          gv[0] = LoadPart(gp, part);
        } else {
          for (int v = 0; v < V; ++v) gv[v] = Load<Vec>(gp + L * v);
        }
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
      if constexpr (Part)
        StorePart(o, LoadPart(o, part) + acc[c][v], part);
      else
        Store(o, Load<Vec>(o) + acc[c][v]);
    }
}

// The widest channel block a block of V vectors may take.
template <int V>
constexpr int MaxChannels() {
  return kAccumulators / V < kMaxChannelBlock ? kAccumulators / V : kMaxChannelBlock;
}

// fn(std::integral_constant<int, k>{}) for a runtime k in [Lo, Hi] (clamped to it): the loops
// below take their block and tile sizes as template arguments, so that each size compiles to
// fully unrolled code with its accumulators in registers; this picks the instance for a count
// known only at run time. It tries Hi first, the size of every full block or tile.
template <int Lo, int Hi, typename Fn>
void WithConstant(int64_t k, const Fn& fn) {
  if constexpr (Hi > Lo) {
    if (k < Hi) return WithConstant<Lo, Hi - 1>(k, fn);
  }
  fn(std::integral_constant<int, Hi>{});
}

// fn(c0, cb) for [0, count) (channels, a row's pixels) in near-equal blocks [c0, c0 + cb) of at
// most `most`.
template <typename Fn>
void EqualBlocks(int64_t count, int64_t most, const Fn& fn) {
  const int64_t blocks = (count + most - 1) / most;
  for (int64_t b = 0, c0 = 0; b < blocks; ++b) {
    const int64_t cb = (count - c0) / (blocks - b);
    fn(c0, cb);
    c0 += cb;
  }
}

// Input channels [0, ci) in near-equal blocks of at most MaxChannels<V>(), each against output
// channels [o0, o0 + V * lanes of Vec) (Part: [o0, co)).
template <typename Vec, int V, bool Part = false>
void Channels(const Conv& s, const float* x, const float* g, const Range& r, int64_t o0,
              float* out) {
  EqualBlocks(s.ci, MaxChannels<V>(), [&](int64_t c0, int64_t cb) {
    WithConstant<1, MaxChannels<V>()>(cb, [&](auto c) {
      Block<Vec, decltype(c)::value, V, Part>(s, x, g, r, c0, o0, out);
    });
  });
}

// The optional last operand of a handler (an addend or a residual of `count` floats): *data is
// nullptr where there is none; false where there is one of another size.
bool OptionalOperand(const ffi::RemainingArgs& rest, int64_t count, const float** data) {
  *data = nullptr;
  if (rest.size() != 1) return true;
  auto a = rest.get<ffi::Buffer<ffi::F32>>(0);
  if (!a.has_value() || static_cast<int64_t>(a->element_count()) != count) return false;
  *data = a->typed_data();
  return true;
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
  if ((s.co - o0) % 8 == 0) {
    for (; o0 < s.co; o0 += 8) Channels<v8, 1>(s, x, g, r, o0, out);
  } else {
    Channels<vw, 1, true>(s, x, g, r, o0, out);  // the rest in one vector, partly filled
  }
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
  EqualBlocks(s.ci, kRowChannels, [&](int64_t c0, int64_t cb) {
    WithConstant<1, kRowChannels>(cb, [&](auto c) {
      RowBlock<decltype(c)::value>(s, x, g, n0, n1, i, oh0, oh1, c0, out);
    });
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

// --- weight gradient of layers of few filters or few input channels ------------------------------
//
// LeNet-5's C1 (1 -> 6 channels, 5x5) has 6 filters: too few for a vector of output channels, so
// the blocks above cannot take it, and XLA's convolution ran it at 0.45-0.52 ms of the 3 ms step
// plus 0.3 ms of copies of x and g to CHWN (batch 128, benchmarks/RESULTS.md). Here a row of g,
// [wo, co] in place, is one array of wo * co floats, and each tap (i, j) and input channel c has
// an "expanded" row of x beside it: E[ow * co + o] = x[oh * sh + i - pt, ow * sw + j - pl, c], each
// input value repeated co times, zero outside the image. dw[i, j, c, o] is then the sum over rows
// of E * g, lanes k * L + l folded into o = (k * L + l) % co at the end. A block of up to
// kRegisters - 4 taps keeps one vector accumulator each while the rows stream past: per row and
// vector of positions, one load of g for T multiply-adds (each with its load of E). At stride 1
// the taps of one kernel row share an expanded row, shifted by j * co floats.

// The expanded rows of one image and input channel: rows r = ih + pt for ih in [-pt, R - pt),
// each `stride` floats; tap (i, j) of output row oh reads row oh * sh + i at j * jstep.
struct Expanded {
  int64_t len, vectors, rows, stride, jstep;
};

// For taps [0, T) at offsets off[t] into the expanded rows: accv[t * vectors + k] += sum over
// output rows oh of E(oh, t)[k * L, k * L + L) * g[oh][k * L, k * L + L). g rows are `len` floats
// apart; the last vector of a row, where len is not a multiple of L, reads `tail` (ho rows of L
// floats, zero beyond len).
template <int T>
void ExpandedTaps(const Expanded& x, const float* ext, const int64_t* off, const float* g,
                  const float* tail, int64_t ho, int64_t sh, vw* accv) {
  constexpr int L = sizeof(vw) / sizeof(float);
  for (int64_t k = 0; k < x.vectors; ++k) {
    const bool partial = (k + 1) * L > x.len;
    const float* gk = partial ? tail : g + k * L;
    const int64_t g_step = partial ? L : x.len;
    vw acc[T];
    for (int t = 0; t < T; ++t) acc[t] = vw{};
    for (int64_t oh = 0; oh < ho; ++oh) {
      const vw gv = Load<vw>(gk + oh * g_step);
      const float* e = ext + oh * sh * x.stride + k * L;
#pragma GCC unroll 28
      for (int t = 0; t < T; ++t) acc[t] += Load<vw>(e + off[t]) * gv;
    }
    for (int t = 0; t < T; ++t) accv[t * x.vectors + k] += acc[t];
  }
}

constexpr int kExpandedTaps = kRegisters - 4;

void ExpandedWeightGradient(ffi::ThreadPool& pool, const Conv& s, const float* x, const float* g,
                            float* out) {
  constexpr int64_t L = sizeof(vw) / sizeof(float);
  Expanded e;
  e.len = s.wo * s.co;
  e.vectors = CeilDiv(e.len, L);
  e.rows = (s.ho - 1) * s.sh + s.kh;
  const bool shift = s.sw == 1;  // a kernel row's taps share one expanded row
  e.jstep = shift ? s.co : e.vectors * L;
  e.stride = shift ? e.vectors * L + (s.kw - 1) * s.co : s.kw * e.vectors * L;
  const int64_t taps = s.kh * s.kw, items = s.n * s.ci;
  std::vector<int64_t> off(taps);
  for (int64_t t = 0; t < taps; ++t) off[t] = t / s.kw * e.stride + t % s.kw * e.jstep;
  const int64_t threads = Threads(pool, items);
  // Zero once: only the image's own pixels are written (rows and columns of padding, and the
  // floats past a row's pixels, stay zero), plus L floats of slack after the last row.
  std::vector<std::vector<float>> ext(threads, std::vector<float>(e.rows * e.stride + L, 0.f));
  std::vector<std::vector<float>> tails(threads, std::vector<float>(s.ho * L, 0.f));
  std::vector<std::vector<vw>> accv(threads, std::vector<vw>(s.ci * taps * e.vectors, vw{}));
  const int workers = ParallelFor(pool, threads, items, [&](int worker, int64_t item) {
    const int64_t n = item / s.ci, c = item % s.ci;
    float* rows = ext[worker].data();
    for (int64_t r = 0; r < e.rows; ++r) {
      const int64_t ih = r - s.pt;
      if (ih < 0 || ih >= s.h) continue;
      const float* xr = x + (n * s.h + ih) * s.w * s.ci + c;
      // Pixel q of a shared row is input column q - pl; of tap j's own segment, q * sw + j - pl.
      // Each pixel's co copies are one vector store of L (co < L is typical; else the copies go
      // L at a time), the next pixel's store overwriting the excess, and the excess of the last
      // one zeroed again.
      const int64_t segments = shift ? 1 : s.kw, pixels = shift ? s.wo + s.kw - 1 : s.wo;
      for (int64_t j = 0; j < segments; ++j) {
        float* segment = rows + r * e.stride + j * e.jstep;
        int64_t end = -1;
        for (int64_t q = 0; q < pixels; ++q) {
          const int64_t iw = shift ? q - s.pl : q * s.sw + j - s.pl;
          if (iw < 0 || iw >= s.w) continue;
          const vw v = vw{} + xr[iw * s.ci];
          for (int64_t o = 0; o < s.co; o += L) Store(segment + q * s.co + o, v);
          end = (q + 1) * s.co;
        }
        if (end >= 0) Store(segment + end, vw{});
      }
    }
    const float* gn = g + n * s.ho * e.len;
    float* tail = tails[worker].data();
    if (e.len % L != 0)
      for (int64_t oh = 0; oh < s.ho; ++oh)
        std::memcpy(tail + oh * L, gn + oh * e.len + (e.vectors - 1) * L,
                    (e.len % L) * sizeof(float));
    vw* acc = accv[worker].data() + c * taps * e.vectors;
    for (int64_t t0 = 0; t0 < taps; t0 += kExpandedTaps)
      WithConstant<1, kExpandedTaps>(taps - t0, [&](auto t) {
        ExpandedTaps<decltype(t)::value>(e, rows, off.data() + t0, gn, tail, s.ho, s.sh,
                                         acc + t0 * e.vectors);
      });
  });
  std::fill(out, out + taps * s.ci * s.co, 0.f);
  for (int w = 0; w < workers; ++w)
    for (int64_t c = 0; c < s.ci; ++c)
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t k = 0; k < e.vectors; ++k) {
          const vw v = accv[w][(c * taps + t) * e.vectors + k];
          for (int64_t l = 0; l < L && k * L + l < e.len; ++l)
            out[(t * s.ci + c) * s.co + (k * L + l) % s.co] += v[l];
        }
}

ffi::Error WeightGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                          int64_t pl) {
  auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || xd[0] != gd[0] || xd[3] != wd[2] ||
      gd[3] != wd[3] || sh < 1 || sw < 1 || pt < 0 || pl < 0)
    return ffi::Error::InvalidArgument(
        "cnnjax conv weight gradient: expects x [N,H,W,Ci], g [N,Ho,Wo,Co], dw [kh,kw,Ci,Co], "
        "strides >= 1, pads >= 0");
  const Conv s{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], wd[0], wd[1], sh, sw, pt, pl};
  if (s.co < 8 || (s.co % 8 != 0 && s.ci <= 8)) {
    ExpandedWeightGradient(pool, s, x.typed_data(), g.typed_data(), dw->typed_data());
    return ffi::Error::Success();
  }
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

// --- forward convolution and input gradient ------------------------------------------------------
//
// CnnjaxConvForward: y = conv(x, w) (+ addend), NHWC x HWIO, explicit non-negative padding, any
// stride. CnnjaxConvInputGradient: dL/dx of that convolution from g = dL/dy (+ addend).
//
// Both are one loop, `GatherTile`: a tile of P output pixels of one row x V vectors of output
// channels held in vector registers, summed over a list of taps, each tap an input pixel offset
// and a [C_in, C_out] weight matrix, over the input channels. The forward pass's taps for output
// row oh are the kernel rows i whose input row oh * sh + i - pt lies in the image, times every
// kernel column; its pixels are read sw apart. The input gradient's taps for input row ih are the
// kernel taps (i, j) with oh * sh + i - pt = ih for an output row oh of g, one column phase
// b < sw of the row at a time (the input columns b, b + sw, ...: the kernel columns j with
// (b + pl - j) % sw == 0), against the kernel's transpose [kh, kw, C_out, C_in]; a strided layer's
// input gradient so does no work on the zeros a dilated output gradient would hold. Rows beyond
// the image are skipped taps; columns beyond it read zeros from a per-worker copy of the rows
// with zero columns either side (a tile reads P neighbouring pixels at every tap).
//
// Why cnnjax's own: jaxlib's oneDNN calls run the same JIT kernel as PyTorch's at the same speed
// on one core, but on two they lose 5% (64 channels) to 50% (16 channels) in a train step
// (benchmarks/RESULTS.md): XLA's oneDNN thread pool splits each call into exactly as many tasks
// as it has threads and blocks the caller, so one pool thread waking late stretches the call.
// Here (as in the weight gradient) the calling thread starts on the chunks at once and the pool's
// threads take what is left from an atomic counter. Where a kernel row is 3 wide at stride 1 (in
// the gather's terms: three taps on neighbouring input pixels), `GatherTriples` reads each input
// once for the three taps. resnet20's layers at batch 128 on two cores (2026-12-07,
// benchmarks/RESULTS.md): forward and input gradient 2.4 to 2.7 ms at 16 channels against
// oneDNN's 3.5 to 4.4 and PyTorch's 2.4 to 2.6; the stride-2 input gradient 1.3 to 1.6 against
// 2.7 to 4.1 and 1.7 to 2.2. With 16, 32 or 64 input channels the loops are compiled for that
// count (3, an RGB first layer, too, in triples and at stride 2); any other count takes a generic
// loop. The tiles read their weights packed per block of two vectors of output channels
// (PackBlocks, once per call), and a chunk runs each block over a group of rows before the next
// (GatherRows); rows of at most kAccumulators / 4 pixels take tiles of four vectors. So the generic
// loop runs wide layers at oneDNN's speed too (3x3 and 5x5, 48 to 512 channels, 4x4 to 224x224
// pixels: forward 0.90x-1.17x, input gradient 0.96x-1.67x, benchmarks/RESULTS.md;
// cnnjax/cpu_kernels.py's conv_fits says what cnnjax/cpu_conv.py sends it). Output channels
// that are no multiple of the vector write a tile's last vector only up to the last channel
// (StorePart, the weights padded with zeros); at most half a vector of them from whole vectors of
// input channels (an input gradient to 8 channels or fewer) take the dot tiles below instead.

// The input pixels, taps and output pixels of one output row (or column phase of one).
struct Tap {
  int64_t offset;   // floats from the row's input base to the first pixel this tap reads
  const float* w;   // [ci, co] weights of the tap ([co, ci] for dot tiles, below)
};

struct RowJob {
  const float* in;  // input base: a tap reads from in + offset - in_shift
  float* out;       // the row's first output pixel
  const float* add; // the addend at out's positions, or null
  const Tap* taps;
  int64_t ntaps, ci, co, in_step, out_step, pixels;
  int64_t o_begin, o_end;  // the output channels to write (GatherRows sets them)
  // Gather tiles: the taps' weights are packed per block of two vectors of output channels
  // (PackBlocks), `w_block` floats from one block to the next, [ci, 2 * lanes] per tap.
  int64_t w_block;
  int64_t in_shift;  // floats before `in` of the first row the offsets count from (PaddedRows)
  bool stream;       // gather tiles store past the cache (StreamStore)
  bool dot;          // dot tiles (below), whose taps' weights are [co, ci] as the kernel holds them
};

// Where tap t's first input pixel lies.
inline const float* TapInput(const RowJob& r, int64_t t) {
  return r.in + (r.taps[t].offset - r.in_shift);
}

// Tap t's weights for output channels from o0 (a multiple of two vectors), in the packed layout:
// each input channel's 2 * lanes weights follow the last's.
inline const float* TapWeights(const RowJob& r, int64_t t, int64_t o0) {
  constexpr int L = sizeof(vw) / sizeof(float);
  return r.taps[t].w + o0 / (2 * L) * r.w_block;
}
// Floats from a tap's weights for o0 to those of vector v of output channels o0 + v * lanes: the
// next block's panel from v = 2.
inline int64_t VectorOffset(const RowJob& r, int v) {
  constexpr int L = sizeof(vw) / sizeof(float);
  return v / 2 * r.w_block + v % 2 * L;
}

// Stores v at p (a whole, aligned cache line of vectors) without reading the line first and past
// the cache: for outputs larger than the cache (kStreamBytes), which an ordinary store reads in
// before it writes. The caller's thread ends its streamed stores with StreamFence.
inline void StreamStore(float* p, vw v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, reinterpret_cast<__m512&>(v));
#elif defined(__AVX__)
  _mm256_stream_ps(p, reinterpret_cast<__m256&>(v));
#else
  Store(p, v);
#endif
}

inline void StreamFence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

constexpr int64_t kStreamBytes = 32 << 20;

// Whether a kernel writing `floats` floats at `out`, pixels of `channels` floats, streams its
// stores: more than kStreamBytes, every pixel at a 64-byte boundary (every vector store then one
// whole cache line).
bool Streams(const float* out, int64_t floats, int64_t channels) {
  return floats * static_cast<int64_t>(sizeof(float)) > kStreamBytes &&
         reinterpret_cast<uintptr_t>(out) % 64 == 0 && sizeof(vw) % 64 == 0 &&
         channels * sizeof(float) % 64 == 0;
}

// Writes a tile's sums acc to output pixels [p0, p0 + P) x channels [o0, o0 + V * lanes), plus
// the addend where there is one; a last vector past o_end (a channel count that is no multiple of
// the lanes) only up to it.
template <int P, int V>
inline void StoreTile(const RowJob& r, const vw (&acc)[P][V], int64_t p0, int64_t o0) {
  constexpr int L = sizeof(vw) / sizeof(float);
  const int64_t last = r.o_end - o0 - (V - 1) * L;  // floats of the last vector to write
  if (last < L) {
    for (int p = 0; p < P; ++p) {
      const int64_t at = (p0 + p) * r.out_step + o0;
      for (int v = 0; v < V - 1; ++v)
        Store(r.out + at + L * v, acc[p][v] + (r.add ? Load<vw>(r.add + at + L * v) : vw{}));
      const int64_t end = at + L * (V - 1);
      StorePart(r.out + end, acc[p][V - 1] + (r.add ? LoadPart(r.add + end, last) : vw{}), last);
    }
    return;
  }
  for (int p = 0; p < P; ++p) {
    const int64_t at = (p0 + p) * r.out_step + o0;
    for (int v = 0; v < V; ++v) {
      vw value = acc[p][v];
      if (r.add) value += Load<vw>(r.add + at + L * v);
      if (r.stream)
        StreamStore(r.out + at + L * v, value);
      else
        Store(r.out + at + L * v, value);
    }
  }
}

// tile(p0, p, o0) over a row in near-equal tiles of p <= PM pixels, for each block of V vectors of
// output channels.
template <int V, int PM, typename Tile>
inline void RowTiles(const RowJob& r, const Tile& tile) {
  constexpr int L = sizeof(vw) / sizeof(float);
  for (int64_t o0 = r.o_begin; o0 < r.o_end; o0 += V * L)
    EqualBlocks(r.pixels, PM, [&](int64_t p0, int64_t p) { tile(p0, p, o0); });
}

// Output pixels [p0, p0 + P) x channels [o0, o0 + V * lanes) of a row, summed over its taps. CI
// and S fix the input channels and the input pixel step (CI * S) where they are not 0, so the P
// input reads of a channel are one pointer plus constant offsets.
template <int P, int V, int CI, int S>
void GatherTile(const RowJob& r, int64_t p0, int64_t o0) {
  constexpr int L = sizeof(vw) / sizeof(float);
  const int64_t ci = CI ? CI : r.ci;
  const int64_t step = CI ? CI * S : r.in_step;
  vw acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) acc[p][v] = vw{};
  for (int64_t t = 0; t < r.ntaps; ++t) {
    const float* xr = TapInput(r, t) + p0 * step;
    const float* wr = TapWeights(r, t, o0);
    constexpr int64_t wstep = 2 * L;
    int64_t vo[V];
    for (int v = 0; v < V; ++v) vo[v] = VectorOffset(r, v);
    for (int64_t c = 0; c < ci; ++c) {
      vw wv[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) wv[v] = Load<vw>(wr + c * wstep + vo[v]);
#pragma GCC unroll 32
      for (int p = 0; p < P; ++p) {
        const float xv = xr[p * step + c];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[p][v] += xv * wv[v];
      }
    }
  }
  StoreTile<P, V>(r, acc, p0, o0);
}

// Where the taps come in triples of neighbouring input pixels (a 3-wide kernel row at stride 1),
// each input read serves three outputs: per input channel, 3 * V weight vectors and P + 2 input
// reads for 3 * P * V multiply-adds, where GatherTile reads P inputs for P * V. With one vector of
// output channels (16 with AVX-512) GatherTile reads as many inputs as it multiplies.
constexpr int kTriple = 3;

// Pixels per triple tile: the registers left after 3 * V weight vectors and the input read.
template <int V>
constexpr int TriplePixels() { return (kRegisters - 1 - kTriple * V) / V; }

template <int P, int V, int CI>
void GatherTriples(const RowJob& r, int64_t p0, int64_t o0) {
  constexpr int L = sizeof(vw) / sizeof(float);
  static_assert(V <= 2, "one block's panel: vectors L * v apart");
  vw acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) acc[p][v] = vw{};
  for (int64_t t = 0; t < r.ntaps; t += kTriple) {
    const float* xr = TapInput(r, t) + p0 * CI;
    const float* wr[kTriple];
    for (int d = 0; d < kTriple; ++d) wr[d] = TapWeights(r, t + d, o0);
    constexpr int64_t wstep = 2 * L;
    for (int64_t c = 0; c < CI; ++c) {
      vw wv[kTriple][V];
#pragma GCC unroll 3
      for (int d = 0; d < kTriple; ++d)
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) wv[d][v] = Load<vw>(wr[d] + c * wstep + L * v);
#pragma GCC unroll 40
      for (int q = 0; q < P + kTriple - 1; ++q) {
        const float xv = xr[q * CI + c];
#pragma GCC unroll 3
        for (int d = 0; d < kTriple; ++d) {
          const int p = q - d;
          if (p < 0 || p >= P) continue;
#pragma GCC unroll 8
          for (int v = 0; v < V; ++v) acc[p][v] += xv * wv[d][v];
        }
      }
    }
  }
  StoreTile<P, V>(r, acc, p0, o0);
}

template <int V, int CI>
void GatherTriplesRow(const RowJob& r) {
  constexpr int PM = TriplePixels<V>();
  RowTiles<V, PM>(r, [&](int64_t p0, int64_t p, int64_t o0) {
    WithConstant<1, PM>(p, [&](auto n) { GatherTriples<decltype(n)::value, V, CI>(r, p0, o0); });
  });
}

// Whether every tap is in a triple of neighbouring input pixels, in order.
bool Triples(const RowJob& r) {
  if (r.in_step != r.ci || r.ntaps % kTriple != 0) return false;
  for (int64_t t = 0; t < r.ntaps; t += kTriple)
    for (int d = 1; d < kTriple; ++d)
      if (r.taps[t + d].offset != r.taps[t].offset + d * r.ci) return false;
  return true;
}

// The whole row: near-equal tiles of at most kAccumulators / V pixels, for each block of V
// vectors of output channels.
template <int V, int CI, int S>
void GatherRowOf(const RowJob& r) {
  constexpr int PM = kAccumulators / V;
  RowTiles<V, PM>(r, [&](int64_t p0, int64_t p, int64_t o0) {
    WithConstant<1, PM>(p, [&](auto n) { GatherTile<decltype(n)::value, V, CI, S>(r, p0, o0); });
  });
}

// The input channel counts GatherRowV has loops of its own for (the others take the generic one).
inline bool OwnLoops(int64_t ci) { return ci == 3 || ci == 16 || ci == 32 || ci == 64; }

template <int V>
void GatherRowV(const RowJob& r) {
  if (Triples(r)) {
    if (r.ci == 3) return GatherTriplesRow<V, 3>(r);  // an RGB first layer
    if (r.ci == 16) return GatherTriplesRow<V, 16>(r);
    if (r.ci == 32) return GatherTriplesRow<V, 32>(r);
    if (r.ci == 64) return GatherTriplesRow<V, 64>(r);
  }
  if (r.in_step == r.ci) {
    if (r.ci == 16) return GatherRowOf<V, 16, 1>(r);
    if (r.ci == 32) return GatherRowOf<V, 32, 1>(r);
    if (r.ci == 64) return GatherRowOf<V, 64, 1>(r);
  } else if (r.in_step == 2 * r.ci) {
    if (r.ci == 3) return GatherRowOf<V, 3, 2>(r);  // an RGB stem at stride 2
    if (r.ci == 16) return GatherRowOf<V, 16, 2>(r);
    if (r.ci == 32) return GatherRowOf<V, 32, 2>(r);
    if (r.ci == 64) return GatherRowOf<V, 64, 2>(r);
  }
  GatherRowOf<V, 0, 1>(r);
}

// --- dot tiles: at most half a vector's lanes of output channels ---
//
// LeNet-5's C3 (6 -> 16 channels) has an input gradient of 6 channels from an output gradient of
// 16: too few outputs for a vector of output channels (the gather above would fill 6 of its 16
// lanes), and oneDNN's kernel ran it at 0.77 ms of the 4 ms step (batch 128,
// benchmarks/RESULTS.md). Here the vectors run along the input channels instead: a tile of P
// pixels x O output channels holds one vector of partial sums each, every tap adds its input
// vector times the output channel's weight vector (the tap's weights as [co, ci], each output
// channel's row contiguous), and the lanes are summed once, when the tile is stored. ci is a
// multiple of the lanes. With more than half a vector of outputs the gather wins (12 <- 16:
// 0.64x oneDNN's speed in dot tiles, 1.11x-1.37x in the gather; benchmarks/RESULTS.md).

// The sum of a vector's lanes, halving through narrower vectors (portable vector extensions only).
inline float LaneSum(vw v) {
  typedef float v4 __attribute__((vector_size(16)));
#if defined(__AVX512F__)
  v8 lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const v8 s = lo + hi;
#else
  const v8 s = v;
#endif
  v4 a, b;
  std::memcpy(&a, &s, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&s) + sizeof(a), sizeof(b));
  a += b;
  return (a[0] + a[2]) + (a[1] + a[3]);
}

// Output channels per dot tile, at most: 8 with AVX-512's 32 registers, 7 with AVX's 16 (a tile
// needs its O weight vectors, an input vector and at least O sums).
constexpr int kDotOutputs = std::min(8, (kRegisters - 1) / 2);

// v, kept in a register. GCC otherwise folds the load of a dot tile's weight vector into each of
// the P multiply-adds that use it (P loads instead of one), which left C3's input gradient bound by
// its loads: 0.45 against 0.37 ms with this.
inline vw InRegister(vw v) {
#if defined(__x86_64__)
  asm("" : "+v"(v));
#endif
  return v;
}

// Pixels per dot tile of O output channels: P * O sums, O weight vectors and one input vector in
// registers, at most 8 pixels.
template <int O>
constexpr int DotPixels() { return std::min(8, (kRegisters - 1 - O) / O); }
static_assert(DotPixels<kDotOutputs>() >= 1, "a dot tile holds at least one pixel");

template <int P, int O>
void DotTile(const RowJob& r, int64_t p0, int64_t o0) {
  constexpr int L = sizeof(vw) / sizeof(float);
  vw acc[P][O];
  for (int p = 0; p < P; ++p)
    for (int o = 0; o < O; ++o) acc[p][o] = vw{};
  for (int64_t t = 0; t < r.ntaps; ++t) {
    const float* xr = TapInput(r, t) + p0 * r.in_step;
    const float* wr = r.taps[t].w + o0 * r.ci;
    for (int64_t k = 0; k < r.ci; k += L) {
      vw wv[O];
#pragma GCC unroll 8
      for (int o = 0; o < O; ++o) wv[o] = InRegister(Load<vw>(wr + o * r.ci + k));
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
        const vw xv = Load<vw>(xr + p * r.in_step + k);
#pragma GCC unroll 8
        for (int o = 0; o < O; ++o) acc[p][o] += xv * wv[o];
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    const int64_t at = (p0 + p) * r.out_step + o0;
    for (int o = 0; o < O; ++o)
      r.out[at + o] = LaneSum(acc[p][o]) + (r.add ? r.add[at + o] : 0.f);
  }
}

// Output channels [o0, o0 + O) of a row, in near-equal tiles of at most DotPixels<O>() pixels.
template <int O>
void DotRowOf(const RowJob& r, int64_t o0) {
  constexpr int PM = DotPixels<O>();
  EqualBlocks(r.pixels, PM, [&](int64_t p0, int64_t p) {
    WithConstant<1, PM>(p, [&](auto n) { DotTile<decltype(n)::value, O>(r, p0, o0); });
  });
}

// A row of any output channel count, kDotOutputs at a time.
void DotRow(const RowJob& r) {
  for (int64_t o0 = 0; o0 < r.co; o0 += kDotOutputs)
    WithConstant<1, kDotOutputs>(r.co - o0, [&](auto o) { DotRowOf<decltype(o)::value>(r, o0); });
}

// Output channels [o_begin, o_end) of one row; zeros (or the addend) where no tap reaches it.
// Gather tiles: four vectors at a time where the range is a multiple of four, two where it is more
// than one (its last vector partial where co is no multiple of the lanes), else one. Or dot tiles
// (the whole row).
void GatherRow(const RowJob& r) {
  constexpr int L = sizeof(vw) / sizeof(float);
  if (r.ntaps == 0) {
    for (int64_t p = 0; p < r.pixels; ++p)
      for (int64_t o = r.o_begin; o < r.o_end; ++o)
        r.out[p * r.out_step + o] = r.add ? r.add[p * r.out_step + o] : 0.f;
    return;
  }
  if (r.dot) return DotRow(r);
  if ((r.o_end - r.o_begin) % (4 * L) == 0) return GatherRowOf<4, 0, 1>(r);
  if (r.o_end - r.o_begin > L) return GatherRowV<2>(r);
  GatherRowV<1>(r);
}

// A chunk's rows, in groups whose input rows take about kGroupBytes: within a group, for gather
// tiles, one block of output channels (two vectors; four where rows are short) runs over every
// row before the next, so that the block's packed weights ([ci, 2 * lanes] per tap: 590 KB for
// 3x3 taps of 512 channels) stay in cache across the rows, while the group's input stays there
// across the blocks. Row by row, every row streamed all the layer's weights (9.4 MB at 512 ->
// 512); against that, groups ran 3x3 512 -> 512 at 7x7 and 4x4 pixels, batch 32, and 256 -> 256
// at 14x14, 2% to 15% faster (input gradients the most), 512 -> 512 at 28x28 within 4% either
// way (benchmarks/RESULTS.md).
constexpr int64_t kGroupBytes = 512 << 10;

void GatherRows(std::vector<RowJob>& rows) {
  constexpr int64_t L = sizeof(vw) / sizeof(float);
  if (rows.empty()) return;
  const int64_t co = rows[0].co;
  // Four vectors a tile for short rows of the generic loop (the input channel counts with loops of
  // their own keep those): 3x3 512 -> 512 at 4x4, batch 32 and 128, 0.79x-0.83x -> 0.93x-0.97x
  // oneDNN's speed forward (benchmarks/RESULTS.md).
  const bool wide =
      co % (4 * L) == 0 && rows[0].pixels <= kAccumulators / 4 && !OwnLoops(rows[0].ci);
  const int64_t block = rows[0].dot ? co : wide ? 4 * L : 2 * L;
  const int64_t row_bytes = rows[0].pixels * rows[0].in_step * static_cast<int64_t>(sizeof(float));
  const int64_t group = std::max<int64_t>(1, kGroupBytes / std::max<int64_t>(1, row_bytes) - 2);
  const int64_t count = rows.size();
  for (int64_t g0 = 0; g0 < count; g0 += group)
    for (int64_t o0 = 0; o0 < co; o0 += block)
      for (int64_t i = g0; i < std::min(count, g0 + group); ++i) {
        rows[i].o_begin = o0;
        rows[i].o_end = std::min(co, o0 + block);
        GatherRow(rows[i]);
      }
}

// Per-worker copies of a band of image rows with `left` and `right` zero columns: at most
// `capacity` of the image's rows [0, rows), `width` pixels of `c` channels each. The zero columns
// are written once; a chunk copies in the rows it reads, so that they are read back from cache.
struct PaddedRows {
  int64_t rows, width, c, left, right;
  std::vector<std::vector<float>> buffers;

  PaddedRows(int64_t threads, int64_t rows, int64_t width, int64_t c, int64_t left, int64_t right,
             int64_t capacity)
      : rows(rows), width(width), c(c), left(left), right(right),
        buffers(left || right ? threads : 0,
                std::vector<float>(std::min(rows, capacity) * Stride(width, left, right, c))) {}

  static int64_t Stride(int64_t width, int64_t left, int64_t right, int64_t c) {
    return (left + width + right) * c;
  }
  int64_t stride() const { return Stride(width, left, right, c); }

  // Rows [r0, r1) of image `image` of src ([.., rows, width, c]) into worker's buffer. Returns the
  // base (pixel 0 of row r0, the first zero column at -left) and in *shift the floats from row 0
  // to row r0 (the rows' offsets count from row 0).
  const float* Fill(int worker, const float* src, int64_t image, int64_t r0, int64_t r1,
                    int64_t* shift) {
    if (left == 0 && right == 0) {  // nothing to pad: the image where it lies
      *shift = 0;
      return src + image * rows * width * c;
    }
    float* b = buffers[worker].data();
    for (int64_t r = r0; r < r1; ++r)
      std::memcpy(b + (r - r0) * stride() + left * c, src + ((image * rows + r) * width) * c,
                  width * c * sizeof(float));
    *shift = r0 * stride();
    return b + left * c;
  }
};

// Chunks of (image, band of output rows): one image each where there are images enough for 4
// chunks a thread, else bands of rows; and bands of at most `most` rows (BandRows): PaddedRows'
// copy of a whole image larger than the cache was written out to memory and read back (64 -> 64
// at 224x224, batch 8, 0.92x-0.93x -> 0.98x oneDNN's speed forward, 0.87x-0.88x -> 0.93x-0.97x
// back; 128 -> 128 at 112x112 0.91x-0.96x -> 0.96x-0.97x and 0.89x-0.92x -> 0.95x-0.98x;
// benchmarks/RESULTS.md).
struct Bands {
  int64_t n, rows, bands, band;
  Bands(int64_t n, int64_t rows, int64_t threads, int64_t most) : n(n), rows(rows) {
    bands = std::max(std::min<int64_t>(rows, CeilDiv(4 * threads, n)), CeilDiv(rows, most));
    band = CeilDiv(rows, bands);
    bands = CeilDiv(rows, band);
  }
  int64_t chunks() const { return n * bands; }
  void Of(int64_t chunk, int64_t* image, int64_t* r0, int64_t* r1) const {
    *image = chunk / bands;
    *r0 = chunk % bands * band;
    *r1 = std::min(rows, *r0 + band);
  }
};

// The most output rows a band may hold where each needs `per_row` input rows and `extra` more
// for the band, input rows being `row_floats` long: the band's input within kBandBytes.
constexpr int64_t kBandBytes = 256 << 10;

int64_t BandRows(int64_t row_floats, double per_row, int64_t extra) {
  const int64_t fit = kBandBytes / (std::max<int64_t>(1, row_floats) * sizeof(float));
  return std::max<int64_t>(1, static_cast<int64_t>((fit - extra) / per_row));
}

#if defined(__GNUC__) && !defined(__clang__)
typedef int32_t vwi __attribute__((vector_size(sizeof(vw))));

// The permutation of two rows a, b (rows i and i + S of a block, i without bit S) that swaps bit S
// of the row and column indices: lanes j with bit S take b's lane j - S (low half of the pair,
// Hi false) or keep b's lane j (Hi true); the others keep a's lane j or take a's lane j + S.
template <int S, bool Hi, int... J>
constexpr vwi SwapMask(std::integer_sequence<int, J...>) {
  constexpr int L = sizeof(vw) / sizeof(float);
  return vwi{(Hi ? ((J & S) ? L + J : J + S) : ((J & S) ? L + J - S : J))...};
}

template <int S>
inline void SwapStage(vw (&row)[sizeof(vw) / sizeof(float)]) {
  constexpr int L = sizeof(vw) / sizeof(float);
  constexpr vwi lo = SwapMask<S, false>(std::make_integer_sequence<int, L>{});
  constexpr vwi hi = SwapMask<S, true>(std::make_integer_sequence<int, L>{});
  for (int i = 0; i < L; ++i)
    if (!(i & S)) {
      const vw a = row[i], b = row[i + S];
      row[i] = __builtin_shuffle(a, b, lo);
      row[i + S] = __builtin_shuffle(a, b, hi);
    }
}
#endif

// dst[j * dst_step + i] = src[i * src_step + j] for a block of lanes x lanes floats: rows loaded as
// vectors and transposed in registers, log2(lanes) stages of two-row shuffles (GCC; elsewhere a
// plain loop).
inline void TransposeBlock(const float* src, int64_t src_step, float* dst, int64_t dst_step) {
  constexpr int L = sizeof(vw) / sizeof(float);
#if defined(__GNUC__) && !defined(__clang__)
  vw row[L];
  for (int i = 0; i < L; ++i) row[i] = Load<vw>(src + i * src_step);
  SwapStage<1>(row);
  SwapStage<2>(row);
  SwapStage<4>(row);
  if constexpr (L == 16) SwapStage<8>(row);
  for (int i = 0; i < L; ++i) Store(dst + i * dst_step, row[i]);
#else
  for (int i = 0; i < L; ++i)
    for (int j = 0; j < L; ++j) dst[j * dst_step + i] = src[i * src_step + j];
#endif
}

// Weights packed per block of two vectors of output channels, for RowJob::w_block:
// out[b, t, c, l] = the weight of tap t, input channel c and output channel o = b * 2 * lanes + l,
// read from w[t * t_step + c * c_step + o * o_step], where o_step or c_step is 1; a last block of
// fewer than two vectors is padded with zeros (PackedFloats). Each block's weights are then one
// contiguous panel: read in place, a tap's [ci, co] weights put each input channel's vectors
// another co floats on, so that with 256 and more output channels (1 KB and more apart) they fell
// into a few cache sets and were read from further away at every tile (3x3 512 -> 512 at 4x4,
// batch 32, forward 9.0-9.7 -> 6.7 ms, input gradient 11.7 -> 7.7 ms, RESULTS.md).
int64_t PackedFloats(int64_t taps, int64_t ci, int64_t co) {
  constexpr int64_t B = 2 * sizeof(vw) / sizeof(float);
  return CeilDiv(co, B) * B * taps * ci;
}

// Weights of at most this many floats are packed on the calling thread alone: waking a pool thread
// for LeNet-5's C3 (2,400 weights) cost its eval step 5% (benchmarks/RESULTS.md).
constexpr int64_t kPackAloneFloats = 1 << 16;

void PackBlocks(ffi::ThreadPool& pool, const float* w, int64_t taps, int64_t ci, int64_t co,
                int64_t t_step, int64_t c_step, int64_t o_step, float* out) {
  constexpr int64_t B = 2 * sizeof(vw) / sizeof(float), L = B / 2;
  const int64_t blocks = CeilDiv(co, B);
  const bool alone = taps * ci * co <= kPackAloneFloats;
  const auto threads = [&](int64_t chunks) { return alone ? 1 : Threads(pool, chunks); };
  if (o_step == 1) {
    // Each (tap, input channel) row of co floats read once, whole, and cut into the blocks
    // (reading one block's rows instead, each another 1-2 KB on, took longer).
    constexpr int64_t kRowsPerChunk = 64;
    const int64_t rows = taps * ci, chunks = CeilDiv(rows, kRowsPerChunk);
    ParallelFor(pool, threads(chunks), chunks, [&](int, int64_t chunk) {
      const int64_t end = std::min(rows, (chunk + 1) * kRowsPerChunk);
      for (int64_t r = chunk * kRowsPerChunk; r < end; ++r) {
        const int64_t t = r / ci, c = r % ci;
        const float* src = w + t * t_step + c * c_step;
        for (int64_t b = 0; b < blocks; ++b) {
          float* dst = out + ((b * taps + t) * ci + c) * B;
          const int64_t lanes = std::min(B, co - b * B);
          std::memcpy(dst, src + b * B, lanes * sizeof(float));
          std::fill(dst + lanes, dst + B, 0.f);
        }
      }
    });
    return;
  }
  // A transpose (c_step 1): blocks of lanes x lanes in registers, the channels past the last whole
  // block one at a time.
  const int64_t chunks = blocks * taps, whole = ci / L * L;
  ParallelFor(pool, threads(chunks), chunks, [&](int, int64_t chunk) {
    const int64_t b = chunk / taps, t = chunk % taps, lanes = std::min(B, co - b * B);
    const int64_t full = lanes / L * L;  // output channels in whole vectors
    const float* src = w + t * t_step + b * B * o_step;
    float* dst = out + chunk * ci * B;
    for (int64_t c0 = 0; c0 < whole; c0 += L)
      for (int64_t l0 = 0; l0 < full; l0 += L)
        TransposeBlock(src + l0 * o_step + c0, o_step, dst + c0 * B + l0, B);
    for (int64_t c = 0; c < ci; ++c) {
      for (int64_t l = c < whole ? full : 0; l < lanes; ++l) dst[c * B + l] = src[l * o_step + c];
      std::fill(dst + c * B + lanes, dst + (c + 1) * B, 0.f);
    }
  });
}

// A buffer of n floats aligned to 64 bytes (a vector load then reads one cache line, as from
// XLA's buffers), not initialised.
struct Aligned {
  std::unique_ptr<float[]> buffer;
  float* data;
  explicit Aligned(int64_t n) : buffer(n ? new float[n + 16] : nullptr), data(buffer.get()) {
    if (data) data += (16 - reinterpret_cast<uintptr_t>(data) / 4 % 16) % 16;
  }
};

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::RemainingArgs rest, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pl) {
  constexpr int64_t L = sizeof(vw) / sizeof(float);
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  const float* add;
  if (!OptionalOperand(rest, y->element_count(), &add))
    return ffi::Error::InvalidArgument("cnnjax conv: the addend must match the output");
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || xd[0] != yd[0] || xd[3] != wd[2] ||
      wd[3] != yd[3] || sh < 1 || sw < 1 || pt < 0 || pl < 0 || rest.size() > 1)
    return ffi::Error::InvalidArgument(
        "cnnjax conv: expects x [N,H,W,Ci], w [kh,kw,Ci,Co], y [N,Ho,Wo,Co], strides >= 1, "
        "pads >= 0, at most an addend");
  const int64_t n = xd[0], h = xd[1], wi = xd[2], ci = xd[3], kh = wd[0], kw = wd[1], co = wd[3];
  const int64_t ho = yd[1], wo = yd[2];
  const int64_t right = std::max<int64_t>(0, (wo - 1) * sw + kw - pl - wi);
  // A band of output rows reads (rows - 1) * sh + kh input rows.
  const int64_t in_row = PaddedRows::Stride(wi, pl, right, ci);
  const Bands bands(n, ho, pool.num_threads(), BandRows(in_row, sh, kh - sh));
  const int64_t threads = Threads(pool, bands.chunks());
  PaddedRows padded(threads, h, wi, ci, pl, right, (bands.band - 1) * sh + kh);
  const float *xs = x.typed_data(), *ws = w.typed_data();
  float* ys = y->typed_data();
  const bool stream = Streams(ys, y->element_count(), co);
  // The weights packed per block of two vectors of output channels (PackBlocks).
  const Aligned pack(PackedFloats(kh * kw, ci, co));
  PackBlocks(pool, ws, kh * kw, ci, co, ci * co, co, 1, pack.data);
  const int64_t tap_floats = ci * 2 * L, w_block = kh * kw * tap_floats;
  // Each output row's taps (the same in every image): kernel rows inside the image, left to right.
  std::vector<std::vector<Tap>> taps(ho);
  for (int64_t oh = 0; oh < ho; ++oh)
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t ih = oh * sh + i - pt;
      if (ih < 0 || ih >= h) continue;
      for (int64_t j = 0; j < kw; ++j)
        taps[oh].push_back(
            {ih * padded.stride() + (j - pl) * ci, pack.data + (i * kw + j) * tap_floats});
    }
  ParallelFor(pool, threads, bands.chunks(), [&](int worker, int64_t chunk) {
    int64_t image, r0, r1;
    bands.Of(chunk, &image, &r0, &r1);
    int64_t shift;
    const float* base = padded.Fill(worker, xs, image, std::max<int64_t>(0, r0 * sh - pt),
                                    std::min(h, (r1 - 1) * sh - pt + kh), &shift);
    std::vector<RowJob> rows;
    for (int64_t oh = r0; oh < r1; ++oh) {
      const int64_t at = ((image * ho + oh) * wo) * co;
      rows.push_back({base, ys + at, add ? add + at : nullptr, taps[oh].data(),
                      static_cast<int64_t>(taps[oh].size()), ci, co, sw * ci, co, wo, 0, 0,
                      w_block, shift, stream, false});
    }
    GatherRows(rows);
    if (stream) StreamFence();
  });
  return ffi::Error::Success();
}

int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

ffi::Error ConvInputGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g,
                             ffi::Buffer<ffi::F32> w, ffi::RemainingArgs rest,
                             ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                             int64_t pl) {
  constexpr int64_t L = sizeof(vw) / sizeof(float);
  auto gd = g.dimensions(), wd = w.dimensions(), xd = dx->dimensions();
  const float* add;
  if (!OptionalOperand(rest, dx->element_count(), &add))
    return ffi::Error::InvalidArgument("cnnjax conv input gradient: the addend must match dx");
  if (gd.size() != 4 || wd.size() != 4 || xd.size() != 4 || gd[0] != xd[0] || xd[3] != wd[2] ||
      wd[3] != gd[3] || sh < 1 || sw < 1 || pt < 0 || pl < 0 || rest.size() > 1)
    return ffi::Error::InvalidArgument(
        "cnnjax conv input gradient: expects g [N,Ho,Wo,Co], w [kh,kw,Ci,Co], dx [N,H,W,Ci], "
        "strides >= 1, pads >= 0, at most an addend");
  const int64_t n = xd[0], h = xd[1], wi = xd[2], ci = xd[3], kh = wd[0], kw = wd[1], co = wd[3];
  const int64_t ho = gd[1], wo = gd[2];
  // The gather's weights are the kernel's transpose [kh, kw, co, ci], packed per block of two
  // vectors of ci (PackBlocks). Dot tiles (at most half a vector of x channels, from a multiple of
  // the lanes of g's: LeNet-5's C3) read the kernel as it is: [ci, co] per tap is their [outputs,
  // inputs].
  const float* ws = w.typed_data();
  const bool dot = 2 * ci <= L && co % L == 0, packed = !dot;
  const Aligned wt_buffer(packed ? PackedFloats(kh * kw, co, ci) : 0);
  if (packed) PackBlocks(pool, ws, kh * kw, co, ci, ci * co, 1, co, wt_buffer.data);
  const float* wt = packed ? wt_buffer.data : ws;
  const int64_t tap_floats = packed ? co * 2 * L : co * ci;
  const int64_t w_block = packed ? kh * kw * tap_floats : 0;
  // Input column b + sw * v reads g column v + (b + pl - j) / sw: the zero columns either side.
  int64_t left = 0, right = 0;
  for (int64_t b = 0; b < std::min(sw, wi); ++b) {
    const int64_t last = (wi - 1 - b) / sw;
    for (int64_t j = 0; j < kw; ++j) {
      if (((b + pl - j) % sw + sw) % sw != 0) continue;
      const int64_t d = FloorDiv(b + pl - j, sw);
      left = std::max(left, -d);
      right = std::max(right, last + d - (wo - 1));
    }
  }
  // A band of input rows reads at most (rows + kh - 2) / sh + 1 rows of g.
  const int64_t g_row = PaddedRows::Stride(wo, left, right, co);
  const Bands bands(n, h, pool.num_threads(), BandRows(g_row, 1.0 / sh, (kh - 2 + sh) / sh + 1));
  const int64_t threads = Threads(pool, bands.chunks());
  PaddedRows padded(threads, ho, wo, co, left, right, (bands.band + kh - 2 + sh) / sh + 1);
  const float* gs = g.typed_data();
  float* out = dx->typed_data();
  const bool stream = packed && Streams(out, dx->element_count(), ci);
  // The taps of each input row's column phase b (the same in every image): g's pixels left to
  // right.
  const int64_t phases = std::min(sw, wi);
  std::vector<std::vector<Tap>> taps(h * phases);
  for (int64_t ih = 0; ih < h; ++ih)
    for (int64_t b = 0; b < phases; ++b)
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t a = ih + pt - i;
        if (a < 0 || a % sh != 0 || a / sh >= ho) continue;
        for (int64_t j = kw - 1; j >= 0; --j) {
          const int64_t e = b + pl - j;
          if ((e % sw + sw) % sw != 0) continue;
          taps[ih * phases + b].push_back(
              {(a / sh) * padded.stride() + FloorDiv(e, sw) * co, wt + (i * kw + j) * tap_floats});
        }
      }
  ParallelFor(pool, threads, bands.chunks(), [&](int worker, int64_t chunk) {
    int64_t image, r0, r1;
    bands.Of(chunk, &image, &r0, &r1);
    // Input row ih reads g rows (ih + pt - i) / sh for i < kh.
    int64_t shift;
    const float* base = padded.Fill(
        worker, gs, image, std::max<int64_t>(0, CeilDiv(r0 + pt - (kh - 1), sh)),
        std::min(ho, FloorDiv(r1 - 1 + pt, sh) + 1), &shift);
    std::vector<RowJob> rows;
    for (int64_t ih = r0; ih < r1; ++ih)
      for (int64_t b = 0; b < phases; ++b) {
        const std::vector<Tap>& row = taps[ih * phases + b];
        const int64_t at = ((image * h + ih) * wi + b) * ci;
        rows.push_back({base, out + at, add ? add + at : nullptr, row.data(),
                        static_cast<int64_t>(row.size()), co, ci, co, sw * ci,
                        (wi - 1 - b) / sw + 1, 0, 0, w_block, shift, stream, dot});
      }
    GatherRows(rows);
    if (stream) StreamFence();
  });
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
// tiles, then per channel in double. Where C is 1 to 4 vectors (16 to 64 channels with AVX-512)
// the sums run a row at a time in vector registers instead (`VectorSums`): the tile loop loads and
// stores both sums' tiles for every vector it adds, and ran at a third of the elementwise pass's
// bytes per second (resnet20's 32x32x16 layers at batch 128: forward 1.0 -> 0.6 ms, backward
// 1.6-1.8 -> 1.3-1.4 ms; benchmarks/RESULTS.md).

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

// Runs sum(chunk, p) for every chunk of r, where p is the worker's 2 * C doubles to add into;
// returns the workers' total.
template <typename Fn>
std::vector<double> ChunkSums(ffi::ThreadPool& pool, const Rows& r, const Fn& sum) {
  const int64_t threads = Threads(pool, r.chunks);
  std::vector<std::vector<double>> partial(threads, std::vector<double>(2 * r.c, 0.0));
  const int workers = ParallelFor(pool, threads, r.chunks, [&](int worker, int64_t chunk) {
    sum(chunk, partial[worker].data());
  });
  std::vector<double> total(2 * r.c, 0.0);
  for (int w = 0; w < workers; ++w)
    for (int64_t k = 0; k < 2 * r.c; ++k) total[k] += partial[w][k];
  return total;
}

// Per-channel {sum of a, sum of a * (b - offset)} over all rows, where the caller's `values(i,
// len, a)` writes a[0, len) for the flat indices [i, i + len) (e.g. a masked gradient, which it
// may also store): a tile at a time, so both loops stay plain vector loops. Returns 2 * c doubles.
template <typename Values>
std::vector<double> Sums(ffi::ThreadPool& pool, const Rows& r, const float* b,
                         const std::vector<float>& offset, const Values& values) {
  const std::vector<float> off = Tiled(offset, r.tile);
  return ChunkSums(pool, r, [&](int64_t chunk, double* p) {
    std::vector<float> s0(r.tile), s1(r.tile), tile(r.tile);
    const int64_t begin = chunk * r.chunk_rows * r.c;
    const int64_t end = std::min(r.rows, (chunk + 1) * r.chunk_rows) * r.c;
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
      for (int64_t j = 0; j < r.tile; j += r.c)
        for (int64_t k = 0; k < r.c; ++k) {
          p[k] += s0[j + k];
          p[r.c + k] += s1[j + k];
        }
    }
  });
}

// Rows [row0, row1) of V vectors each, U rows at a time into U * V vector accumulators per sum
// (independent chains of adds, in registers), added into p's 2 * C doubles every kFlushRows
// rows. `item(i, v, a, b)` sets the vectors a and b at flat index i, vector v of its row; the
// sums are of a and of a * b.
constexpr int64_t kFlushRows = 256;

template <int V, typename Item>
void SumRows(int64_t row0, int64_t row1, const Item& item, double* p) {
  constexpr int L = sizeof(vw) / sizeof(float);
  constexpr int U = V == 1 ? 4 : V == 2 ? 2 : 1;
  constexpr int64_t c = V * L;
  for (int64_t b0 = row0; b0 < row1; b0 += kFlushRows) {
    const int64_t b1 = std::min(row1, b0 + kFlushRows);
    vw s0[U][V], s1[U][V];
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < V; ++v) s0[u][v] = s1[u][v] = vw{};
    const auto add = [&](int64_t row, int u) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        vw a, b;
        item(row * c + v * L, v, a, b);
        s0[u][v] += a;
        s1[u][v] += a * b;
      }
    };
    int64_t row = b0;
    for (; row + U <= b1; row += U)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) add(row + u, u);
    for (; row < b1; ++row) add(row, 0);
    for (int v = 0; v < V; ++v)
      for (int l = 0; l < L; ++l)
        for (int u = 0; u < U; ++u) {
          p[v * L + l] += s0[u][v][l];
          p[c + v * L + l] += s1[u][v][l];
        }
  }
}

// Whether VectorSums takes rows of c channels: 1 to 4 whole vectors.
bool VectorRows(int64_t c) {
  constexpr int L = sizeof(vw) / sizeof(float);
  return c % L == 0 && c / L >= 1 && c / L <= 4;
}

// Sums' results where VectorRows(C), with `item` (SumRows) for `values` and the offset.
template <typename Item>
std::vector<double> VectorSums(ffi::ThreadPool& pool, const Rows& r, const Item& item) {
  constexpr int L = sizeof(vw) / sizeof(float);
  return ChunkSums(pool, r, [&](int64_t chunk, double* p) {
    const int64_t row0 = chunk * r.chunk_rows, row1 = std::min(r.rows, row0 + r.chunk_rows);
    switch (r.c / L) {
      case 1: return SumRows<1>(row0, row1, item, p);
      case 2: return SumRows<2>(row0, row1, item, p);
      case 3: return SumRows<3>(row0, row1, item, p);
      default: return SumRows<4>(row0, row1, item, p);
    }
  });
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
  const float* residual;
  if (!OptionalOperand(rest, x.element_count(), &residual))
    return ffi::Error::InvalidArgument("cnnjax batch norm: the residual must match x");
  if (!RowsOf(x.dimensions(), x.element_count(), &rows, &c) || scale.element_count() != c ||
      bias.element_count() != c || mean->element_count() != c || var->element_count() != c ||
      rest.size() > 1)
    return ffi::Error::InvalidArgument(
        "cnnjax batch norm: expects x [..., C] with rows, scale and bias [C], at most a residual");
  const Rows r = Split(rows, c, Threads(pool, rows));
  const float* xd = x.typed_data();
  // Sums of x and of x * x: the second with offset 0, the value being x itself.
  const std::vector<double> s =
      VectorRows(c)
          ? VectorSums(pool, r, [xd](int64_t i, int, vw& a, vw& b) { a = b = Load<vw>(xd + i); })
          : Sums(pool, r, xd, std::vector<float>(c, 0.f), [xd](int64_t i, int64_t len, float* a) {
              std::memcpy(a, xd + i, len * sizeof(float));
            });
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
// Without a residual the ReLU's mask is taken from x, as (x - mean) * (scale * inv) + bias > 0,
// in both passes, and `out` is not read: two of the seven passes over [rows, C] arrays fewer. It
// can differ from out > 0 only where rounding puts the pre-activation within an ulp of 0 (the
// forward pass's factor is scale / sqrt(var + eps) in double, this one scale * inv in float).
// The ReLU's mask from the centred input x - mean, the factor scale * inv and the bias (a float
// or a vector of them): one expression for both of NormActBackward's passes, so they agree.
template <typename T>
inline auto PreActivationPositive(T centred, T factor, T bias) {
  return centred * factor + bias > 0.f;
}

ffi::Error NormActBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> out,
                           ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> mean,
                           ffi::Buffer<ffi::F32> inv, ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> g_mean,
                           ffi::Buffer<ffi::F32> g_var, ffi::ResultBuffer<ffi::F32> g_x,
                           ffi::ResultBuffer<ffi::F32> g_scale, ffi::ResultBuffer<ffi::F32> g_bias,
                           ffi::RemainingRets rest, bool relu) {
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
      bias.element_count() != c || g_mean.element_count() != c || g_var.element_count() != c ||
      rest.size() > 1)
    return ffi::Error::InvalidArgument(
        "cnnjax batch norm gradient: expects x, out, g [..., C], and mean, inv, scale, bias, "
        "g_mean, g_var [C]");
  const Rows r = Split(rows, c, Threads(pool, rows));
  const float *xd = x.typed_data(), *od = out.typed_data(), *gd = g.typed_data();
  const bool mask_from_x = relu && !g_res;
  const std::vector<float> m(mean.typed_data(), mean.typed_data() + c);
  std::vector<float> f(c);  // the forward pass's factor scale * inv, in float
  for (int64_t k = 0; k < c; ++k) f[k] = scale.typed_data()[k] * inv.typed_data()[k];
  const std::vector<float> bs(bias.typed_data(), bias.typed_data() + c);
  const std::vector<float> mt = Tiled(m, r.tile), ft = Tiled(f, r.tile), bt = Tiled(bs, r.tile);
  // Sums of the masked gradient and of it times x - mean, storing it as dL/dresidual where asked.
  std::vector<double> s;
  if (VectorRows(c)) {
    constexpr int L = sizeof(vw) / sizeof(float);
    vw mv[4] = {}, fv[4] = {}, bv[4] = {};
    for (int64_t v = 0; v < c / L; ++v) {
      mv[v] = Load<vw>(m.data() + v * L);
      fv[v] = Load<vw>(f.data() + v * L);
      bv[v] = Load<vw>(bs.data() + v * L);
    }
    s = VectorSums(pool, r, [=, &mv, &fv, &bv](int64_t i, int v, vw& a, vw& b) {
      a = Load<vw>(gd + i);
      b = Load<vw>(xd + i) - mv[v];
      if (mask_from_x) {
        a = PreActivationPositive(b, fv[v], bv[v]) ? a : vw{};
      } else if (relu) {
        a = Load<vw>(od + i) > 0.f ? a : vw{};
      }
      if (g_res) Store(g_res + i, a);
    });
  } else {
    s = Sums(pool, r, xd, m, [&](int64_t i, int64_t len, float* a) {
      const float *__restrict__ gi = gd + i, *__restrict__ oi = od + i, *__restrict__ xi = xd + i;
      const float *__restrict__ mi = mt.data(), *__restrict__ fi = ft.data(),
                  *__restrict__ bi = bt.data();
      if (mask_from_x) {
        for (int64_t j = 0; j < len; ++j)
          a[j] = PreActivationPositive(xi[j] - mi[j], fi[j], bi[j]) ? gi[j] : 0.f;
      } else if (relu) {
        for (int64_t j = 0; j < len; ++j) a[j] = oi[j] > 0.f ? gi[j] : 0.f;
      } else {
        std::memcpy(a, gi, len * sizeof(float));
      }
      if (g_res) std::memcpy(g_res + i, a, len * sizeof(float));
    });
  }
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
  const std::vector<float> pt = Tiled(p, r.tile), qt = Tiled(q, r.tile), tt = Tiled(t, r.tile);
  float* gx = g_x->typed_data();
  Elementwise(pool, r, [&](int64_t i, int64_t len) {
    const float *__restrict__ xi = xd + i, *__restrict__ gi = (g_res ? g_res : gd) + i;
    const float *__restrict__ mi = mt.data(), *__restrict__ pi = pt.data(),
                *__restrict__ qi = qt.data(), *__restrict__ ti = tt.data(),
                *__restrict__ fi = ft.data(), *__restrict__ bi = bt.data();
    float* __restrict__ o = gx + i;
    if (mask_from_x) {
      for (int64_t j = 0; j < len; ++j) {
        const float centred = xi[j] - mi[j];
        const float masked = PreActivationPositive(centred, fi[j], bi[j]) ? gi[j] : 0.f;
        o[j] = masked * pi[j] + centred * qi[j] + ti[j];
      }
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
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_var
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dL/dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dL/dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dL/dbias
                                  .RemainingRets()               // dL/dresidual, if stored
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxConvForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .RemainingArgs()               // addend, if any
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxConvInputGradient, ConvInputGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .RemainingArgs()               // addend, if any
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));

// The floats in one vector of this build (16 with AVX-512, else 8): the forward convolution's
// output channels and the input gradient's input channels must be a multiple of it.
extern "C" int CnnjaxVectorFloats() { return sizeof(vw) / sizeof(float); }
