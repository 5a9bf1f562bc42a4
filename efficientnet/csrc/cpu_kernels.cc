// Depthwise 2-D convolution and training-mode BatchNorm + activation for XLA's CPU backend,
// as XLA FFI custom calls.
//
// XLA:CPU lowers a grouped convolution to a slow generic loop, and its reductions over the
// batch and spatial axes of a channels-minor tensor (the depthwise weight gradient) run far
// below memory bandwidth. These kernels do the same arithmetic in one pass each, vectorised
// along the channel axis (NHWC, float32, C contiguous) and parallel over the batch.
//
// The depthwise kernels take the input unpadded (x, [N, H, W, C]) with the top and left
// padding; taps that fall in the padding are skipped (they would multiply zeros), so one
// kernel serves the TF 'SAME' and the symmetric conventions and nothing is copied to pad.
//   forward:      y[n,oh,ow,c]    = sum_ij x[n, oh*s+i-pt, ow*s+j-pl, c] * w[i,j,c]
//   input grad:   dx[n,h,w,c]     = sum over (oh,ow,i,j) with oh*s+i = h+pt, ow*s+j = w+pl of
//                                   g[n,oh,ow,c] * w[i,j,c]
//   weight grad:  dw[i,j,c]       = sum_(n,oh,ow) x[n, oh*s+i-pt, ow*s+j-pl, c] * g[n,oh,ow,c]
// The weight gradient is computed per example and summed over n in order, so the result does
// not depend on how the batch is split across threads, and runs are bit-reproducible.

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs fn(i) for i in [0, count) on XLA's intra-op thread pool, the calling thread included.
// Workers claim indices from a shared counter, so the work completes even when no pooled task
// starts (the caller then runs every index); a task that starts after the work is done finds
// nothing to claim. Running on XLA's own threads, the kernels do not compete with its idle
// workers for the cores.
struct Job {
  std::atomic<int64_t> next{0}, done{0};
  int64_t count = 0;
  std::function<void(int64_t)> fn;
  void Work() {
    for (int64_t i; (i = next.fetch_add(1)) < count;) {
      fn(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, Fn fn) {
  if (count <= 0) return;
  auto job = std::make_shared<Job>();
  job->count = count;
  job->fn = fn;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

inline void Fma(float* __restrict acc, const float* __restrict a, const float* __restrict b,
                int64_t c) {
#pragma GCC ivdep
  for (int64_t i = 0; i < c; ++i) acc[i] += a[i] * b[i];
}

// 16 floats as one value (an AVX-512 register, or two AVX2 ones); loads and stores go through
// memcpy, so rows need no particular alignment.
typedef float V16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
inline V16 Load(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, V16 v) { std::memcpy(p, &v, sizeof(v)); }

// out[0:c] = sum over taps t of a[t][0:c] * b[t][0:c]. Each block of 64 channels is summed in
// registers across all taps and stored once.
inline void TapSum(float* __restrict out, const float* const* a_ptrs,
                   const float* const* b_ptrs, int64_t taps, int64_t c) {
  int64_t c0 = 0;
  for (; c0 + 4 * kLanes <= c; c0 += 4 * kLanes) {
    V16 s0 = {}, s1 = {}, s2 = {}, s3 = {};
    for (int64_t t = 0; t < taps; ++t) {
      const float* a = a_ptrs[t] + c0;
      const float* b = b_ptrs[t] + c0;
      s0 += Load(a) * Load(b);
      s1 += Load(a + kLanes) * Load(b + kLanes);
      s2 += Load(a + 2 * kLanes) * Load(b + 2 * kLanes);
      s3 += Load(a + 3 * kLanes) * Load(b + 3 * kLanes);
    }
    Store(out + c0, s0);
    Store(out + c0 + kLanes, s1);
    Store(out + c0 + 2 * kLanes, s2);
    Store(out + c0 + 3 * kLanes, s3);
  }
  for (; c0 + kLanes <= c; c0 += kLanes) {
    V16 s0 = {};
    for (int64_t t = 0; t < taps; ++t) s0 += Load(a_ptrs[t] + c0) * Load(b_ptrs[t] + c0);
    Store(out + c0, s0);
  }
  if (c0 < c) {
    std::memset(out + c0, 0, sizeof(float) * (c - c0));
    for (int64_t t = 0; t < taps; ++t) Fma(out + c0, a_ptrs[t] + c0, b_ptrs[t] + c0, c - c0);
  }
}

// Geometry of one depthwise convolution: input h x w, output ho x wo, k x k taps, stride,
// top and left padding, c channels.
struct Geometry {
  int64_t h, w, ho, wo, k, stride, pt, pl, c;
  // Collects the taps of output (oh, ow) that fall inside the input: their input rows in a,
  // their kernel rows in b. Returns how many.
  int64_t Taps(const float* x, const float* wt, int64_t oh, int64_t ow, const float** a,
               const float** b) const {
    int64_t taps = 0;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t ih = oh * stride + i - pt;
      if (ih < 0 || ih >= h) continue;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t iw = ow * stride + j - pl;
        if (iw < 0 || iw >= w) continue;
        a[taps] = x + (ih * w + iw) * c;
        b[taps] = wt + (i * k + j) * c;
        ++taps;
      }
    }
    return taps;
  }
  bool Interior(int64_t oh, int64_t ow) const {
    const int64_t ih = oh * stride - pt, iw = ow * stride - pl;
    return ih >= 0 && ih + k <= h && iw >= 0 && iw + k <= w;
  }
};

// Adds output (oh, ow)'s share of the weight gradient in channels [lo, c): for each tap inside
// the input, x there times g at (oh, ow).
void AddWeightGradTaps(const float* x, const float* g, float* dw, const Geometry& q, int64_t oh,
                       int64_t ow, int64_t lo) {
  const float* gv = g + (oh * q.wo + ow) * q.c + lo;
  for (int64_t i = 0; i < q.k; ++i) {
    const int64_t ih = oh * q.stride + i - q.pt;
    if (ih < 0 || ih >= q.h) continue;
    for (int64_t j = 0; j < q.k; ++j) {
      const int64_t iw = ow * q.stride + j - q.pl;
      if (iw < 0 || iw >= q.w) continue;
      Fma(dw + (i * q.k + j) * q.c + lo, x + (ih * q.w + iw) * q.c + lo, gv, q.c - lo);
    }
  }
}

// Weight gradient of one example for a k x k kernel known at compile time. The output rows go
// in tiles whose input rows stay in cache; per tile and block of 16 channels, the k*k
// accumulators stay in registers over the output positions whose window lies inside the
// input, and are then added to dw. The border positions add their valid taps afterwards.
template <int K>
void WeightGradBlocked(const float* __restrict x, const float* __restrict g, float* __restrict dw,
                       const Geometry& q) {
  const int64_t c = q.c;
  const int64_t full = c / kLanes * kLanes;  // channels in whole lane blocks
  std::memset(dw, 0, sizeof(float) * K * K * c);
  const int64_t row_bytes = q.stride * q.w * c * static_cast<int64_t>(sizeof(float));
  const int64_t tile = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, row_bytes));
  for (int64_t oh0 = 0; oh0 < q.ho; oh0 += tile) {
    const int64_t oh1 = std::min(q.ho, oh0 + tile);
    for (int64_t c0 = 0; c0 < full; c0 += kLanes) {
      V16 acc[K * K] = {};
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        for (int64_t ow = 0; ow < q.wo; ++ow) {
          if (!q.Interior(oh, ow)) continue;
          const V16 gv = Load(g + (oh * q.wo + ow) * c + c0);
          const float* base = x + ((oh * q.stride - q.pt) * q.w + ow * q.stride - q.pl) * c + c0;
#pragma GCC unroll 8
          for (int i = 0; i < K; ++i) {
#pragma GCC unroll 8
            for (int j = 0; j < K; ++j) acc[i * K + j] += Load(base + (i * q.w + j) * c) * gv;
          }
        }
      }
      for (int t = 0; t < K * K; ++t) Store(dw + t * c + c0, Load(dw + t * c + c0) + acc[t]);
    }
  }
  for (int64_t oh = 0; oh < q.ho; ++oh) {
    for (int64_t ow = 0; ow < q.wo; ++ow) {
      const bool inner = q.Interior(oh, ow);
      if (inner && full == c) continue;
      // interior positions only miss the leftover channels
      AddWeightGradTaps(x, g, dw, q, oh, ow, inner ? full : 0);
    }
  }
}

void WeightGradGeneric(const float* x, const float* g, float* dw, const Geometry& q) {
  std::memset(dw, 0, sizeof(float) * q.k * q.k * q.c);
  for (int64_t oh = 0; oh < q.ho; ++oh)
    for (int64_t ow = 0; ow < q.wo; ++ow) AddWeightGradTaps(x, g, dw, q, oh, ow, 0);
}

// One example's depthwise convolution out = conv(in, wk) with the geometry q (in: h x w,
// out: ho x wo). Positions whose window lies inside the input run with a compile-time k, per
// block of 16 channels over a tile of output rows (the input rows of a tile stay in cache);
// the border positions and the leftover channels sum their valid taps through TapSum.
template <int K>
void DwConv(const float* __restrict in, const float* __restrict wk, float* __restrict out,
            const Geometry& q) {
  const int64_t c = q.c;
  const int64_t full = c / kLanes * kLanes;
  const int64_t row_bytes = q.stride * q.w * c * static_cast<int64_t>(sizeof(float));
  const int64_t tile = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, row_bytes));
  for (int64_t oh0 = 0; oh0 < q.ho; oh0 += tile) {
    const int64_t oh1 = std::min(q.ho, oh0 + tile);
    for (int64_t c0 = 0; c0 < full; c0 += kLanes) {
      V16 wr[K * K];
      for (int t = 0; t < K * K; ++t) wr[t] = Load(wk + t * c + c0);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        for (int64_t ow = 0; ow < q.wo; ++ow) {
          if (!q.Interior(oh, ow)) continue;
          const float* base = in + ((oh * q.stride - q.pt) * q.w + ow * q.stride - q.pl) * c + c0;
          V16 acc = {};
#pragma GCC unroll 8
          for (int i = 0; i < K; ++i) {
#pragma GCC unroll 8
            for (int j = 0; j < K; ++j) acc += Load(base + (i * q.w + j) * c) * wr[i * K + j];
          }
          Store(out + (oh * q.wo + ow) * c + c0, acc);
        }
      }
    }
  }
  const float* a[K * K];
  const float* b[K * K];
  for (int64_t oh = 0; oh < q.ho; ++oh) {
    for (int64_t ow = 0; ow < q.wo; ++ow) {
      const bool inner = q.Interior(oh, ow);
      if (inner && full == c) continue;
      const int64_t lo = inner ? full : 0;
      const int64_t taps = q.Taps(in + lo, wk + lo, oh, ow, a, b);
      TapSum(out + (oh * q.wo + ow) * c + lo, a, b, taps, c - lo);
    }
  }
}

// The same for any k and stride, position by position over all channels.
void DwConvGeneric(const float* in, const float* wk, float* out, const Geometry& q) {
  std::vector<const float*> a(q.k * q.k), b(q.k * q.k);
  for (int64_t oh = 0; oh < q.ho; ++oh)
    for (int64_t ow = 0; ow < q.wo; ++ow) {
      const int64_t taps = q.Taps(in, wk, oh, ow, a.data(), b.data());
      TapSum(out + (oh * q.wo + ow) * q.c, a.data(), b.data(), taps, q.c);
    }
}

void DwConvAny(const float* in, const float* wk, float* out, const Geometry& q) {
  if (q.stride != 1) {  // strided, position by position over all channels ran faster
    DwConvGeneric(in, wk, out, q);
  } else if (q.k == 3) {
    DwConv<3>(in, wk, out, q);
  } else if (q.k == 5) {
    DwConv<5>(in, wk, out, q);
  } else {
    DwConvGeneric(in, wk, out, q);
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad_top,
                   int64_t pad_left) {
  auto xd = xb.dimensions();
  auto yd = y->dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 3) {
    return ffi::Error::InvalidArgument("depthwise forward: expected x, y of rank 4, w of rank 3");
  }
  const Geometry q{xd[1], xd[2], yd[1], yd[2], wd[0], stride, pad_top, pad_left, xd[3]};
  const float* x = xb.typed_data();
  const float* wt = w.typed_data();
  float* out = y->typed_data();
  ParallelFor(pool, xd[0], [&](int64_t n) {
    DwConvAny(x + n * q.h * q.w * q.c, wt, out + n * q.ho * q.wo * q.c, q);
  });
  return ffi::Error::Success();
}

void WeightGradAny(const float* x, const float* g, float* dw, const Geometry& q) {
  if (q.k == 3) {
    WeightGradBlocked<3>(x, g, dw, q);
  } else if (q.k == 5) {
    WeightGradBlocked<5>(x, g, dw, q);
  } else {
    WeightGradGeneric(x, g, dw, q);
  }
}

// One example's input gradient dx (h x w) from the output gradient g (ho x wo).
class InputGrad {
 public:
  InputGrad(const Geometry& q, const float* wt)
      : q_(q), wt_(wt), back_{q.ho, q.wo, q.h, q.w, q.k, 1, q.k - 1 - q.pt, q.k - 1 - q.pl, q.c} {
    const int64_t k = q.k;
    flipped_.resize(k * k * q.c);
    for (int64_t t = 0; t < k * k; ++t)
      std::memcpy(&flipped_[t * q.c], wt + (k * k - 1 - t) * q.c, sizeof(float) * q.c);
    rows_ = TapTable(q.h, q.pt, q.ho);
    cols_ = TapTable(q.w, q.pl, q.wo);
  }

  void Run(const float* g, float* dx) const {
    const int64_t k = q_.k, c = q_.c;
    if (q_.stride == 1) {
      // The input gradient of a stride-1 convolution is the convolution of g with the
      // flipped kernel, padded by k - 1 - pad.
      DwConvAny(g, flipped_.data(), dx, back_);
      return;
    }
    // Strided: gathered, each dx row written once from the taps that reach it.
    std::vector<const float*> a(k * k), b(k * k);
    for (int64_t y0 = 0; y0 < q_.h; ++y0) {
      for (int64_t x0 = 0; x0 < q_.w; ++x0) {
        int64_t taps = 0;
        for (const auto& [i, t] : rows_[y0]) {
          for (const auto& [j, u] : cols_[x0]) {
            a[taps] = g + (t * q_.wo + u) * c;
            b[taps] = wt_ + (i * k + j) * c;
            ++taps;
          }
        }
        TapSum(dx + (y0 * q_.w + x0) * c, a.data(), b.data(), taps, c);
      }
    }
  }

 private:
  // For each input row (column): the kernel rows i (columns j) and output rows t (columns u)
  // with t*stride + i = row + pad, inside the output.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> TapTable(int64_t size, int64_t pad,
                                                                 int64_t out) const {
    std::vector<std::vector<std::pair<int64_t, int64_t>>> table(size);
    for (int64_t p = 0; p < size; ++p)
      for (int64_t i = 0; i < q_.k; ++i) {
        const int64_t t = p + pad - i;
        if (t >= 0 && t % q_.stride == 0 && t / q_.stride < out) table[p].emplace_back(i, t / q_.stride);
      }
    return table;
  }

  Geometry q_;
  const float* wt_;
  Geometry back_;
  std::vector<float> flipped_;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rows_, cols_;
};

// out = sum over the n examples' arrays of `size` floats, added in example order.
void SumExamples(const float* per_example, int64_t n, int64_t size, float* out) {
  std::memcpy(out, per_example, sizeof(float) * size);
  for (int64_t e = 1; e < n; ++e) {
    const float* src = per_example + e * size;
#pragma GCC ivdep
    for (int64_t i = 0; i < size; ++i) out[i] += src[i];
  }
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb, ffi::Buffer<ffi::F32> w,
                    ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t pad_top,
                    int64_t pad_left) {
  auto xd = xb.dimensions();
  auto gd = g.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 3) {
    return ffi::Error::InvalidArgument("depthwise backward: unexpected ranks");
  }
  const Geometry q{xd[1], xd[2], gd[1], gd[2], wd[0], stride, pad_top, pad_left, xd[3]};
  const int64_t n_ = xd[0], k = q.k, c = q.c;
  std::vector<float> dw_per_example(n_ * k * k * c);
  const InputGrad input_grad(q, w.typed_data());
  ParallelFor(pool, n_, [&](int64_t n) {
    const float* gn = g.typed_data() + n * q.ho * q.wo * c;
    WeightGradAny(xb.typed_data() + n * q.h * q.w * c, gn, dw_per_example.data() + n * k * k * c, q);
    input_grad.Run(gn, dx->typed_data() + n * q.h * q.w * c);
  });
  SumExamples(dw_per_example.data(), n_, k * k * c, dw->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Training-mode BatchNorm fused with the activation after it, and optionally with the
// squeeze-and-excitation that follows (MBConv's depthwise BatchNorm).
//
// x is viewed as [B, R, C]: B blocks of R rows, C channels contiguous. Without SE a block is a
// BatchNorm group (R = examples x pixels); with SE a block is one example (R = pixels) and
// `group_blocks` consecutive blocks share their statistics. The per-block coefficients
// (a = inv * scale, b = bias - mean * a, so z = x * a + b; the SE gate) come as [B, C].
//   BnStats:      per group mean and (biased) variance, in one pass over x (sums of x - shift
//                 and its square, the shift being the group's first row).
//   AffineAct:    y = act(z) [* gate]  (and AffineActPool: sum over a block's rows of act(z)).
//   ActGradSums:  per block, sums over rows of gy * act'(z) and of that times xhat, and with SE
//                 also of gy * act(z), act'(z) and act'(z) * xhat (xhat = (x - mean) * inv).
//   BnActDx:      dx = (g * act'(z) - k1 - xhat * k2) * a, g = gy [* gate + u].
// The backward pass recomputes z and act'(z) from x instead of keeping them. XLA:CPU ran
// BatchNorm, the activation and SE as about a dozen separate memory passes; here the forward
// pass reads x two (three with SE) times and the backward reads x and gy twice. Sums accumulate
// in float over 64 rows and in double across those and across chunks, in a fixed order.

enum Activation : int64_t { kIdentity = 0, kSwish = 1, kRelu = 2, kRelu6 = 3 };

typedef int32_t I16 __attribute__((vector_size(64)));

inline V16 Splat(float v) { return V16{} + v; }
inline V16 LoadN(const float* p, int64_t n) {  // n < kLanes floats, the rest zero
  V16 v = {};
  std::memcpy(&v, p, sizeof(float) * n);
  return v;
}
inline void StoreN(float* p, V16 v, int64_t n) { std::memcpy(p, &v, sizeof(float) * n); }

// exp for float lanes: Cephes' expf polynomial after reducing by n*ln2 (rounded with the
// 1.5*2^23 trick), scaled by 2^n through the exponent bits. Relative error about 2e-7.
inline V16 Exp(V16 x) {
  x = x < Splat(-87.3f) ? Splat(-87.3f) : x;
  x = x > Splat(88.3f) ? Splat(88.3f) : x;
  V16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  V16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V16 p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  V16 y = p * r * r + r + 1.0f;
  I16 bits = (__builtin_convertvector(n, I16) + 127) << 23;
  V16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline V16 Act(V16 z, int64_t act) {
  switch (act) {
    case kSwish:
      return z / (Exp(-z) + 1.0f);
    case kRelu:
      return z > Splat(0.0f) ? z : Splat(0.0f);
    case kRelu6: {
      V16 r = z > Splat(0.0f) ? z : Splat(0.0f);
      return r < Splat(6.0f) ? r : Splat(6.0f);
    }
    default:
      return z;
  }
}

// act'(z) (relu's at 0 is 0, as jax's; relu6's is 1 strictly inside (0, 6)).
inline V16 ActGrad(V16 z, int64_t act) {
  switch (act) {
    case kSwish: {
      V16 s = 1.0f / (Exp(-z) + 1.0f);
      return s * (z * (1.0f - s) + 1.0f);
    }
    case kRelu:
      return z > Splat(0.0f) ? Splat(1.0f) : Splat(0.0f);
    case kRelu6:
      return (z > Splat(0.0f)) & (z < Splat(6.0f)) ? Splat(1.0f) : Splat(0.0f);
    default:
      return Splat(1.0f);
  }
}

constexpr int64_t kRowBlock = 64;  // rows summed in float before adding into double

// Channel block [c0, c0 + n) of a row: a full lane block or the zero-padded tail.
inline V16 LoadBlock(const float* p, int64_t n) { return n == kLanes ? Load(p) : LoadN(p, n); }
inline void StoreBlock(float* p, V16 v, int64_t n) {
  if (n == kLanes) {
    Store(p, v);
  } else {
    StoreN(p, v, n);
  }
}

// Parallel work over the rows of [B, R, C]: chunks of about 64K elements that never span two
// blocks. The chunks do not depend on the number of threads and their partial sums are added
// in chunk order, so results are reproducible.
struct Chunks {
  int64_t blocks, rows, c, per_chunk, per_block;
  Chunks(int64_t blocks, int64_t rows, int64_t c) : blocks(blocks), rows(rows), c(c) {
    per_chunk = std::max<int64_t>(kRowBlock, (1 << 16) / c / kRowBlock * kRowBlock);
    per_block = std::max<int64_t>(1, (rows + per_chunk - 1) / per_chunk);
  }
  int64_t count() const { return blocks * per_block; }
  // fn(block, first row, end row) for chunk k
  template <typename Fn>
  void Run(int64_t k, Fn fn) const {
    const int64_t b = k / per_block, lo = (k % per_block) * per_chunk;
    fn(b, lo, std::min(rows, lo + per_chunk));
  }
};

// Adds `Terms` per-channel sums over rows [lo, hi) into out[Terms][c] (double):
// f(row, c0, n, V16* values) computes the terms for the lane block [c0, c0 + n) of a row.
// Rows are read in order; the sums of 64 rows are kept in float, then added in double.
template <int Terms, typename F>
void SumRows(int64_t lo, int64_t hi, int64_t c, double* out, F f) {
  const int64_t cpad = (c + kLanes - 1) / kLanes * kLanes;
  std::vector<float> acc(Terms * cpad);
  for (int64_t r0 = lo; r0 < hi; r0 += kRowBlock) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t r = r0, r1 = std::min(hi, r0 + kRowBlock); r < r1; ++r) {
      for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
        V16 v[Terms];
        f(r, c0, std::min(kLanes, c - c0), v);
        for (int t = 0; t < Terms; ++t) Store(&acc[t * cpad + c0], Load(&acc[t * cpad + c0]) + v[t]);
      }
    }
    for (int t = 0; t < Terms; ++t)
      for (int64_t i = 0; i < c; ++i) out[t * c + i] += acc[t * cpad + i];
  }
}

// The coefficient rows of block b, zero-padded to whole lane blocks.
struct Coefficients {
  int64_t c, cpad;
  std::vector<float> data;
  Coefficients(const float* src, int64_t blocks, int64_t c)
      : c(c), cpad((c + kLanes - 1) / kLanes * kLanes), data(blocks * cpad, 0.0f) {
    for (int64_t b = 0; b < blocks; ++b) std::memcpy(&data[b * cpad], src + b * c, sizeof(float) * c);
  }
  const float* operator[](int64_t b) const { return &data[b * cpad]; }
};

ffi::Error BnStats(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb,
                   ffi::ResultBuffer<ffi::F32> mean_b, ffi::ResultBuffer<ffi::F32> var_b,
                   int64_t group_blocks) {
  auto xd = xb.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("batch norm stats: x must be [B, R, C]");
  const Chunks ch(xd[0], xd[1], xd[2]);
  const int64_t c = ch.c, groups = ch.blocks / group_blocks, m = group_blocks * ch.rows;
  const float* x = xb.typed_data();
  std::vector<float> shift_rows(groups * c);
  for (int64_t g = 0; g < groups; ++g)
    std::memcpy(&shift_rows[g * c], x + g * m * c, sizeof(float) * c);
  const Coefficients shift(shift_rows.data(), groups, c);
  std::vector<double> partial(ch.count() * 2 * c, 0.0);
  ParallelFor(pool, ch.count(), [&](int64_t k) {
    ch.Run(k, [&](int64_t b, int64_t lo, int64_t hi) {
      const float* xb_ = x + b * ch.rows * c;
      const float* sh = shift[b / group_blocks];
      SumRows<2>(lo, hi, c, &partial[k * 2 * c], [&](int64_t r, int64_t c0, int64_t n, V16* v) {
        const V16 d = LoadBlock(xb_ + r * c + c0, n) - Load(sh + c0);
        v[0] = d;
        v[1] = d * d;
      });
    });
  });
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = 0; i < c; ++i) {
      double t1 = 0, t2 = 0;
      for (int64_t k = g * group_blocks * ch.per_block; k < (g + 1) * group_blocks * ch.per_block; ++k) {
        t1 += partial[k * 2 * c + i];
        t2 += partial[k * 2 * c + c + i];
      }
      const double d = t1 / m;
      mean_b->typed_data()[g * c + i] = static_cast<float>(shift_rows[g * c + i] + d);
      var_b->typed_data()[g * c + i] = static_cast<float>(std::max(0.0, t2 / m - d * d));
    }
  }
  return ffi::Error::Success();
}

ffi::Error AffineAct(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb, ffi::Buffer<ffi::F32> ab,
                     ffi::Buffer<ffi::F32> bb, ffi::Buffer<ffi::F32> gate_b,
                     ffi::ResultBuffer<ffi::F32> yb, int64_t act, int64_t gated) {
  auto xd = xb.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("affine act: x must be [B, R, C]");
  const Chunks ch(xd[0], xd[1], xd[2]);
  const int64_t c = ch.c;
  const Coefficients a(ab.typed_data(), ch.blocks, c), b(bb.typed_data(), ch.blocks, c);
  const Coefficients gate(gate_b.typed_data(), gated ? ch.blocks : 1, c);
  const float* x = xb.typed_data();
  float* y = yb->typed_data();
  ParallelFor(pool, ch.count(), [&](int64_t k) {
    ch.Run(k, [&](int64_t blk, int64_t lo, int64_t hi) {
      const float *ak = a[blk], *bk = b[blk], *gk = gate[gated ? blk : 0];
      for (int64_t r = lo; r < hi; ++r) {
        const float* row = x + (blk * ch.rows + r) * c;
        float* out = y + (blk * ch.rows + r) * c;
        for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
          const int64_t n = std::min(kLanes, c - c0);
          V16 v = Act(LoadBlock(row + c0, n) * Load(ak + c0) + Load(bk + c0), act);
          if (gated) v *= Load(gk + c0);
          StoreBlock(out + c0, v, n);
        }
      }
    });
  });
  return ffi::Error::Success();
}

ffi::Error AffineActPool(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb, ffi::Buffer<ffi::F32> ab,
                         ffi::Buffer<ffi::F32> bb, ffi::ResultBuffer<ffi::F32> sum_b,
                         int64_t act) {
  auto xd = xb.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("affine act pool: x must be [B, R, C]");
  const Chunks ch(xd[0], xd[1], xd[2]);
  const int64_t c = ch.c;
  const Coefficients a(ab.typed_data(), ch.blocks, c), b(bb.typed_data(), ch.blocks, c);
  const float* x = xb.typed_data();
  std::vector<double> partial(ch.count() * c, 0.0);
  ParallelFor(pool, ch.count(), [&](int64_t k) {
    ch.Run(k, [&](int64_t blk, int64_t lo, int64_t hi) {
      const float *ak = a[blk], *bk = b[blk], *xk = x + blk * ch.rows * c;
      SumRows<1>(lo, hi, c, &partial[k * c], [&](int64_t r, int64_t c0, int64_t n, V16* v) {
        const V16 z = LoadBlock(xk + r * c + c0, n) * Load(ak + c0) + Load(bk + c0);
        v[0] = Act(z, act);
      });
    });
  });
  for (int64_t blk = 0; blk < ch.blocks; ++blk)
    for (int64_t i = 0; i < c; ++i) {
      double t = 0;
      for (int64_t k = blk * ch.per_block; k < (blk + 1) * ch.per_block; ++k) t += partial[k * c + i];
      sum_b->typed_data()[blk * c + i] = static_cast<float>(t);
    }
  return ffi::Error::Success();
}

ffi::Error ActGradSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb, ffi::Buffer<ffi::F32> gyb,
                       ffi::Buffer<ffi::F32> ab, ffi::Buffer<ffi::F32> bb,
                       ffi::Buffer<ffi::F32> mean_b, ffi::Buffer<ffi::F32> inv_b,
                       ffi::ResultBuffer<ffi::F32> sums_b, int64_t act, int64_t se) {
  auto xd = xb.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("act grad sums: x must be [B, R, C]");
  const Chunks ch(xd[0], xd[1], xd[2]);
  const int64_t c = ch.c, terms = se ? 5 : 2;
  const Coefficients a(ab.typed_data(), ch.blocks, c), b(bb.typed_data(), ch.blocks, c);
  const Coefficients mean(mean_b.typed_data(), ch.blocks, c), inv(inv_b.typed_data(), ch.blocks, c);
  const float* x = xb.typed_data();
  const float* gy = gyb.typed_data();
  std::vector<double> partial(ch.count() * terms * c, 0.0);
  ParallelFor(pool, ch.count(), [&](int64_t k) {
    ch.Run(k, [&](int64_t blk, int64_t lo, int64_t hi) {
      const float *ak = a[blk], *bk = b[blk], *mk = mean[blk], *ik = inv[blk];
      const float* xk = x + blk * ch.rows * c;
      const float* gk = gy + blk * ch.rows * c;
      double* out = &partial[k * terms * c];
      if (!se) {
        SumRows<2>(lo, hi, c, out, [&](int64_t r, int64_t c0, int64_t n, V16* v) {
          const V16 xv = LoadBlock(xk + r * c + c0, n);
          const V16 gz = LoadBlock(gk + r * c + c0, n) * ActGrad(xv * Load(ak + c0) + Load(bk + c0), act);
          v[0] = gz;
          v[1] = gz * ((xv - Load(mk + c0)) * Load(ik + c0));
        });
      } else {
        SumRows<5>(lo, hi, c, out, [&](int64_t r, int64_t c0, int64_t n, V16* v) {
          const V16 xv = LoadBlock(xk + r * c + c0, n);
          const V16 gv = LoadBlock(gk + r * c + c0, n);
          const V16 z = xv * Load(ak + c0) + Load(bk + c0);
          const V16 d = ActGrad(z, act);
          const V16 xhat = (xv - Load(mk + c0)) * Load(ik + c0);
          v[0] = gv * Act(z, act);  // the gate's gradient
          v[1] = gv * d;
          v[2] = d;
          v[3] = gv * d * xhat;
          v[4] = d * xhat;
        });
      }
    });
  });
  for (int64_t blk = 0; blk < ch.blocks; ++blk)
    for (int64_t t = 0; t < terms; ++t)
      for (int64_t i = 0; i < c; ++i) {
        double s = 0;
        for (int64_t k = blk * ch.per_block; k < (blk + 1) * ch.per_block; ++k)
          s += partial[(k * terms + t) * c + i];
        sums_b->typed_data()[(blk * terms + t) * c + i] = static_cast<float>(s);
      }
  return ffi::Error::Success();
}

ffi::Error BnActDx(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb, ffi::Buffer<ffi::F32> gyb,
                   ffi::Buffer<ffi::F32> ab, ffi::Buffer<ffi::F32> bb,
                   ffi::Buffer<ffi::F32> mean_b, ffi::Buffer<ffi::F32> inv_b,
                   ffi::Buffer<ffi::F32> k1b, ffi::Buffer<ffi::F32> k2b,
                   ffi::Buffer<ffi::F32> gate_b, ffi::Buffer<ffi::F32> u_b,
                   ffi::ResultBuffer<ffi::F32> dxb, int64_t act, int64_t se) {
  auto xd = xb.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("batch norm dx: x must be [B, R, C]");
  const Chunks ch(xd[0], xd[1], xd[2]);
  const int64_t c = ch.c, nb = ch.blocks, sb = se ? nb : 1;
  const Coefficients a(ab.typed_data(), nb, c), b(bb.typed_data(), nb, c);
  const Coefficients mean(mean_b.typed_data(), nb, c), inv(inv_b.typed_data(), nb, c);
  const Coefficients k1(k1b.typed_data(), nb, c), k2(k2b.typed_data(), nb, c);
  const Coefficients gate(gate_b.typed_data(), sb, c), u(u_b.typed_data(), sb, c);
  const float* x = xb.typed_data();
  const float* gy = gyb.typed_data();
  float* dx = dxb->typed_data();
  ParallelFor(pool, ch.count(), [&](int64_t k) {
    ch.Run(k, [&](int64_t blk, int64_t lo, int64_t hi) {
      const float *ak = a[blk], *bk = b[blk], *mk = mean[blk], *ik = inv[blk];
      const float *k1k = k1[blk], *k2k = k2[blk], *gk = gate[se ? blk : 0], *uk = u[se ? blk : 0];
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t off = (blk * ch.rows + r) * c;
        for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
          const int64_t n = std::min(kLanes, c - c0);
          const V16 xv = LoadBlock(x + off + c0, n);
          V16 g = LoadBlock(gy + off + c0, n);
          if (se) g = g * Load(gk + c0) + Load(uk + c0);
          const V16 gz = g * ActGrad(xv * Load(ak + c0) + Load(bk + c0), act);
          const V16 xhat = (xv - Load(mk + c0)) * Load(ik + c0);
          StoreBlock(dx + off + c0, (gz - Load(k1k + c0) - xhat * Load(k2k + c0)) * Load(ak + c0), n);
        }
      }
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EfficientNetDepthwiseForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EfficientNetDepthwiseBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));

#define F32_ARG .Arg<ffi::Buffer<ffi::F32>>()
#define F32_RET .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(EfficientNetBnStats, BnStats,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() F32_ARG F32_RET F32_RET
                                  .Attr<int64_t>("group_blocks"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EfficientNetAffineAct, AffineAct,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() F32_ARG F32_ARG F32_ARG
                                  F32_ARG F32_RET.Attr<int64_t>("act")
                                  .Attr<int64_t>("gated"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EfficientNetAffineActPool, AffineActPool,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() F32_ARG F32_ARG F32_ARG
                                  F32_RET.Attr<int64_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EfficientNetActGradSums, ActGradSums,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() F32_ARG F32_ARG F32_ARG
                                  F32_ARG F32_ARG F32_ARG F32_RET.Attr<int64_t>("act")
                                  .Attr<int64_t>("se"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EfficientNetBnActDx, BnActDx,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() F32_ARG F32_ARG F32_ARG
                                  F32_ARG F32_ARG F32_ARG F32_ARG F32_ARG F32_ARG F32_ARG F32_RET
                                  .Attr<int64_t>("act")
                                  .Attr<int64_t>("se"));
