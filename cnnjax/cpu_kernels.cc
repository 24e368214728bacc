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

#include <algorithm>
#include <atomic>
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

// Input channels [0, ci) in near-equal blocks of at most MaxChannels<V>(), each against output
// channels [o0, o0 + V * lanes of Vec).
template <typename Vec, int V>
void Channels(const Conv& s, const float* x, const float* g, const Range& r, int64_t o0,
              float* out) {
  const int64_t blocks = (s.ci + MaxChannels<V>() - 1) / MaxChannels<V>();
  for (int64_t b = 0, c0 = 0; b < blocks; ++b) {
    const int64_t cb = (s.ci - c0) / (blocks - b);
    BlockOf<Vec, V>(cb, s, x, g, r, c0, o0, out);
    c0 += cb;
  }
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

// Shared by the calling thread and the pool's tasks; a task that starts after the work is gone
// touches nothing but the counters, which the shared_ptr keeps alive.
struct Work {
  Conv s;
  const float* x;
  const float* g;
  int64_t group, tap_block, chunks;
  std::vector<std::vector<float>> acc;  // one buffer per worker
  std::atomic<int64_t> next{0};
  std::atomic<int> running{0}, workers{0};

  void Run() {
    running.fetch_add(1);
    int64_t c = next.fetch_add(1);
    if (c < chunks) {
      float* a = acc[workers.fetch_add(1)].data();
      const int64_t taps = s.kh * s.kw, blocks = CeilDiv(taps, tap_block);
      for (; c < chunks; c = next.fetch_add(1)) {
        const int64_t n0 = c / blocks * group, t0 = c % blocks * tap_block;
        for (int64_t t = t0; t < std::min(taps, t0 + tap_block); ++t)
          Chunk(s, x, g, n0, std::min(s.n, n0 + group), t, a);
      }
    }
    running.fetch_sub(1);
  }
};

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
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), s.n * taps));
  // Images per chunk: about 1024 output pixels, so a block's accumulators see a long run of pixels
  // (small maps: several images), while leaving 8 chunks per thread to balance the load. A chunk
  // takes as many taps of its images as that leaves: read for the first tap, its pixels stay in
  // cache for the others (resnet20's train step 3% to 4% faster than with a tap per chunk).
  int64_t group = std::max<int64_t>(1, 1024 / std::max<int64_t>(1, s.ho * s.wo));
  while (group > 1 && CeilDiv(s.n, group) * taps < 8 * threads) group /= 2;
  const int64_t tap_block = std::max<int64_t>(1, CeilDiv(s.n, group) * taps / (8 * threads));
  auto work = std::make_shared<Work>();
  work->s = s;
  work->x = x.typed_data();
  work->g = g.typed_data();
  work->group = group;
  work->tap_block = std::min(taps, tap_block);
  work->chunks = CeilDiv(s.n, group) * CeilDiv(taps, work->tap_block);
  work->acc.assign(threads, std::vector<float>(size, 0.f));
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  // Every chunk is taken; wait for the workers still adding theirs.
  while (work->running.load() != 0) std::this_thread::yield();
  float* out = dw->typed_data();
  std::fill(out, out + size, 0.f);
  for (int k = 0; k < work->workers.load(); ++k)
    for (int64_t e = 0; e < size; ++e) out[e] += work->acc[k][e];
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
