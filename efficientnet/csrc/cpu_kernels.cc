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
      const int64_t lo = inner ? full : 0;  // interior positions only miss the leftover channels
      const float* gv = g + (oh * q.wo + ow) * c;
      for (int64_t i = 0; i < K; ++i) {
        const int64_t ih = oh * q.stride + i - q.pt;
        if (ih < 0 || ih >= q.h) continue;
        for (int64_t j = 0; j < K; ++j) {
          const int64_t iw = ow * q.stride + j - q.pl;
          if (iw < 0 || iw >= q.w) continue;
          Fma(dw + (i * K + j) * c + lo, x + (ih * q.w + iw) * c + lo, gv + lo, c - lo);
        }
      }
    }
  }
}

void WeightGradGeneric(const float* x, const float* g, float* dw, const Geometry& q) {
  const int64_t c = q.c;
  std::memset(dw, 0, sizeof(float) * q.k * q.k * c);
  for (int64_t oh = 0; oh < q.ho; ++oh)
    for (int64_t ow = 0; ow < q.wo; ++ow)
      for (int64_t i = 0; i < q.k; ++i) {
        const int64_t ih = oh * q.stride + i - q.pt;
        if (ih < 0 || ih >= q.h) continue;
        for (int64_t j = 0; j < q.k; ++j) {
          const int64_t iw = ow * q.stride + j - q.pl;
          if (iw < 0 || iw >= q.w) continue;
          Fma(dw + (i * q.k + j) * c, x + (ih * q.w + iw) * c, g + (oh * q.wo + ow) * c, c);
        }
      }
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
  const float* x = xb.typed_data();
  const float* wt = w.typed_data();
  const float* gr = g.typed_data();
  float* dxo = dx->typed_data();
  std::vector<float> dw_per_example(n_ * k * k * c);
  // For each input row (column): the kernel rows i (columns j) and output rows t (columns u)
  // with t*stride + i = row + pt, inside the output.
  auto tap_table = [&](int64_t size, int64_t pad, int64_t out) {
    std::vector<std::vector<std::pair<int64_t, int64_t>>> table(size);
    for (int64_t p = 0; p < size; ++p)
      for (int64_t i = 0; i < k; ++i) {
        const int64_t t = p + pad - i;
        if (t >= 0 && t % stride == 0 && t / stride < out) table[p].emplace_back(i, t / stride);
      }
    return table;
  };
  const auto rows = tap_table(q.h, q.pt, q.ho), cols = tap_table(q.w, q.pl, q.wo);
  std::vector<float> flipped(k * k * c);
  for (int64_t t = 0; t < k * k; ++t)
    std::memcpy(&flipped[t * c], wt + (k * k - 1 - t) * c, sizeof(float) * c);
  const Geometry back{q.ho, q.wo, q.h, q.w, k, 1, k - 1 - q.pt, k - 1 - q.pl, c};
  ParallelFor(pool, n_, [&](int64_t n) {
    const float* xn = x + n * q.h * q.w * c;
    const float* gn = gr + n * q.ho * q.wo * c;
    float* dwn = dw_per_example.data() + n * k * k * c;
    if (k == 3) {
      WeightGradBlocked<3>(xn, gn, dwn, q);
    } else if (k == 5) {
      WeightGradBlocked<5>(xn, gn, dwn, q);
    } else {
      WeightGradGeneric(xn, gn, dwn, q);
    }
    if (stride == 1) {
      // The input gradient of a stride-1 convolution is the convolution of g with the
      // flipped kernel, padded by k - 1 - pad.
      DwConvAny(gn, flipped.data(), dxo + n * q.h * q.w * c, back);
      return;
    }
    // Strided: gathered, each dx row written once from the taps that reach it.
    std::vector<const float*> a(k * k), b(k * k);
    for (int64_t y0 = 0; y0 < q.h; ++y0) {
      for (int64_t x0 = 0; x0 < q.w; ++x0) {
        int64_t taps = 0;
        for (const auto& [i, t] : rows[y0]) {
          for (const auto& [j, u] : cols[x0]) {
            a[taps] = gn + (t * q.wo + u) * c;
            b[taps] = wt + (i * k + j) * c;
            ++taps;
          }
        }
        TapSum(dxo + ((n * q.h + y0) * q.w + x0) * c, a.data(), b.data(), taps, c);
      }
    }
  });
  float* dwo = dw->typed_data();
  std::memcpy(dwo, dw_per_example.data(), sizeof(float) * k * k * c);
  for (int64_t n = 1; n < n_; ++n) {
    const float* src = dw_per_example.data() + n * k * k * c;
#pragma GCC ivdep
    for (int64_t i = 0; i < k * k * c; ++i) dwo[i] += src[i];
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Training-mode BatchNorm fused with the activation that follows it.
//
// x is [G, M, C]: G groups (the BatchNorm groups; 1 without them) of M rows (examples x pixels),
// C channels contiguous. Per group and channel: mean = sum(x)/M, var = sum((x-mean)^2)/M (two
// passes, as the XLA form), z = (x - mean) * rsqrt(var + eps) * scale + bias, y = act(z).
// The backward pass recomputes z and act'(z) from x instead of keeping them:
//   gz = gy * act'(z);  xhat = (x - mean) * inv
//   dbias = sum gz,  dscale = sum gz * xhat  (over groups, rows)
//   dx = (gz - mean_M(gz) - xhat * mean_M(gz * xhat)) * inv * scale
// XLA:CPU ran these as about ten separate memory passes (reductions, the normalisation, the
// activation and its gradient); here the forward pass is three passes over x and the backward
// two over x and gy. Sums accumulate in float over blocks of rows and in double across blocks
// and threads.

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

// Rows per chunk of parallel work: about 64K elements. The chunks do not depend on the number
// of threads, and their partial sums are added in chunk order, so results are reproducible.
int64_t ChunkRows(int64_t c) { return std::max<int64_t>(kRowBlock, (1 << 16) / c / kRowBlock * kRowBlock); }

// Channel block [c0, c0 + n) of a row: a full lane block or the zero-padded tail.
inline V16 LoadBlock(const float* p, int64_t n) { return n == kLanes ? Load(p) : LoadN(p, n); }
inline void StoreBlock(float* p, V16 v, int64_t n) {
  if (n == kLanes) {
    Store(p, v);
  } else {
    StoreN(p, v, n);
  }
}

ffi::Error BnActForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb,
                        ffi::Buffer<ffi::F32> scale_b, ffi::Buffer<ffi::F32> bias_b,
                        ffi::ResultBuffer<ffi::F32> yb, ffi::ResultBuffer<ffi::F32> mean_b,
                        ffi::ResultBuffer<ffi::F32> var_b, int64_t act, float epsilon) {
  auto xd = xb.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("batch norm forward: x must be [G, M, C]");
  const int64_t groups = xd[0], m = xd[1], c = xd[2];
  const int64_t cpad = (c + kLanes - 1) / kLanes * kLanes;
  const float* x = xb.typed_data();
  const float* scale = scale_b.typed_data();
  const float* bias = bias_b.typed_data();
  float* y = yb->typed_data();
  const int64_t rows = ChunkRows(c), per_group = (m + rows - 1) / rows;
  // Statistics in one pass: sums of d = x - shift and of d*d, the shift being each group's
  // first row (close to the mean, so the variance S2/M - (S1/M)^2 does not cancel badly).
  std::vector<float> shift(groups * cpad, 0.0f);
  for (int64_t g = 0; g < groups; ++g) std::memcpy(&shift[g * cpad], x + g * m * c, sizeof(float) * c);
  std::vector<double> partial(groups * per_group * 2 * c);
  ParallelFor(pool, groups * per_group, [&](int64_t k) {
    const int64_t g = k / per_group, lo = (k % per_group) * rows, hi = std::min(m, lo + rows);
    const float* xg = x + g * m * c;
    const float* sh = &shift[g * cpad];
    double* s1 = &partial[k * 2 * c];
    double* s2 = s1 + c;
    std::vector<float> b1(cpad), b2(cpad);
    for (int64_t r0 = lo; r0 < hi; r0 += kRowBlock) {
      std::fill(b1.begin(), b1.end(), 0.0f);
      std::fill(b2.begin(), b2.end(), 0.0f);
      for (int64_t r = r0, r1 = std::min(hi, r0 + kRowBlock); r < r1; ++r) {
        const float* row = xg + r * c;
        for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
          const int64_t n = std::min(kLanes, c - c0);
          const V16 d = LoadBlock(row + c0, n) - Load(sh + c0);
          Store(&b1[c0], Load(&b1[c0]) + d);
          Store(&b2[c0], Load(&b2[c0]) + d * d);
        }
      }
      for (int64_t i = 0; i < c; ++i) {
        s1[i] += b1[i];
        s2[i] += b2[i];
      }
    }
  });
  std::vector<float> a(groups * cpad), b(groups * cpad);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = 0; i < c; ++i) {
      double t1 = 0, t2 = 0;
      for (int64_t k = g * per_group; k < (g + 1) * per_group; ++k) {
        t1 += partial[k * 2 * c + i];
        t2 += partial[k * 2 * c + c + i];
      }
      const double d = t1 / m;
      const float mean = static_cast<float>(shift[g * cpad + i] + d);
      const float var = static_cast<float>(std::max(0.0, t2 / m - d * d));
      mean_b->typed_data()[g * c + i] = mean;
      var_b->typed_data()[g * c + i] = var;
      a[g * cpad + i] = scale[i] / std::sqrt(var + epsilon);
      b[g * cpad + i] = bias[i] - mean * a[g * cpad + i];
    }
  }
  ParallelFor(pool, groups * per_group, [&](int64_t k) {
    const int64_t g = k / per_group, lo = (k % per_group) * rows, hi = std::min(m, lo + rows);
    const float* ag = &a[g * cpad];
    const float* bg = &b[g * cpad];
    for (int64_t r = lo; r < hi; ++r) {
      const float* row = x + (g * m + r) * c;
      float* out = y + (g * m + r) * c;
      for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
        const int64_t n = std::min(kLanes, c - c0);
        StoreBlock(out + c0, Act(LoadBlock(row + c0, n) * Load(ag + c0) + Load(bg + c0), act), n);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error BnActBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xb,
                         ffi::Buffer<ffi::F32> scale_b, ffi::Buffer<ffi::F32> bias_b,
                         ffi::Buffer<ffi::F32> mean_b, ffi::Buffer<ffi::F32> var_b,
                         ffi::Buffer<ffi::F32> gyb, ffi::ResultBuffer<ffi::F32> dxb,
                         ffi::ResultBuffer<ffi::F32> dscale_b, ffi::ResultBuffer<ffi::F32> dbias_b,
                         int64_t act, float epsilon) {
  auto xd = xb.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("batch norm backward: x must be [G, M, C]");
  const int64_t groups = xd[0], m = xd[1], c = xd[2];
  const int64_t cpad = (c + kLanes - 1) / kLanes * kLanes;
  const float* x = xb.typed_data();
  const float* gy = gyb.typed_data();
  float* dx = dxb->typed_data();
  const int64_t rows = ChunkRows(c), per_group = (m + rows - 1) / rows;
  // Per group and channel: mean, inv = rsqrt(var + eps), a = inv*scale, b = bias - mean*a
  // (z = x*a + b, as the forward pass), then the two mean terms of dx.
  std::vector<float> mean(groups * cpad), inv(groups * cpad), a(groups * cpad), b(groups * cpad),
      k1(groups * cpad), k2(groups * cpad);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = 0; i < c; ++i) {
      const int64_t j = g * cpad + i;
      mean[j] = mean_b.typed_data()[g * c + i];
      inv[j] = 1.0f / std::sqrt(var_b.typed_data()[g * c + i] + epsilon);
      a[j] = scale_b.typed_data()[i] / std::sqrt(var_b.typed_data()[g * c + i] + epsilon);
      b[j] = bias_b.typed_data()[i] - mean[j] * a[j];
    }
  }
  std::vector<double> partial(groups * per_group * 2 * c);
  ParallelFor(pool, groups * per_group, [&](int64_t k) {
    const int64_t g = k / per_group, lo = (k % per_group) * rows, hi = std::min(m, lo + rows);
    const float *mg = &mean[g * cpad], *ig = &inv[g * cpad], *ag = &a[g * cpad], *bg = &b[g * cpad];
    double* s1 = &partial[k * 2 * c];
    double* s2 = s1 + c;
    std::vector<float> b1(cpad), b2(cpad);
    for (int64_t r0 = lo; r0 < hi; r0 += kRowBlock) {
      std::fill(b1.begin(), b1.end(), 0.0f);
      std::fill(b2.begin(), b2.end(), 0.0f);
      for (int64_t r = r0, r1 = std::min(hi, r0 + kRowBlock); r < r1; ++r) {
        const float* xr = x + (g * m + r) * c;
        const float* gr = gy + (g * m + r) * c;
        for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
          const int64_t n = std::min(kLanes, c - c0);
          const V16 xv = LoadBlock(xr + c0, n);
          const V16 gz = LoadBlock(gr + c0, n) * ActGrad(xv * Load(ag + c0) + Load(bg + c0), act);
          Store(&b1[c0], Load(&b1[c0]) + gz);
          Store(&b2[c0], Load(&b2[c0]) + gz * ((xv - Load(mg + c0)) * Load(ig + c0)));
        }
      }
      for (int64_t i = 0; i < c; ++i) {
        s1[i] += b1[i];
        s2[i] += b2[i];
      }
    }
  });
  std::vector<double> total(2 * c, 0.0);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = 0; i < c; ++i) {
      double t1 = 0, t2 = 0;
      for (int64_t k = g * per_group; k < (g + 1) * per_group; ++k) {
        t1 += partial[k * 2 * c + i];
        t2 += partial[k * 2 * c + c + i];
      }
      total[i] += t1;
      total[c + i] += t2;
      k1[g * cpad + i] = static_cast<float>(t1 / m);
      k2[g * cpad + i] = static_cast<float>(t2 / m);
    }
  }
  for (int64_t i = 0; i < c; ++i) {
    dbias_b->typed_data()[i] = static_cast<float>(total[i]);
    dscale_b->typed_data()[i] = static_cast<float>(total[c + i]);
  }
  ParallelFor(pool, groups * per_group, [&](int64_t k) {
    const int64_t g = k / per_group, lo = (k % per_group) * rows, hi = std::min(m, lo + rows);
    const float *mg = &mean[g * cpad], *ig = &inv[g * cpad], *ag = &a[g * cpad], *bg = &b[g * cpad];
    const float *k1g = &k1[g * cpad], *k2g = &k2[g * cpad];
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = x + (g * m + r) * c;
      const float* gr = gy + (g * m + r) * c;
      float* out = dx + (g * m + r) * c;
      for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
        const int64_t n = std::min(kLanes, c - c0);
        const V16 xv = LoadBlock(xr + c0, n);
        const V16 gz = LoadBlock(gr + c0, n) * ActGrad(xv * Load(ag + c0) + Load(bg + c0), act);
        const V16 xhat = (xv - Load(mg + c0)) * Load(ig + c0);
        StoreBlock(out + c0, (gz - Load(k1g + c0) - xhat * Load(k2g + c0)) * Load(ag + c0), n);
      }
    }
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(EfficientNetBnActForward, BnActForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("act")
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EfficientNetBnActBackward, BnActBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("act")
                                  .Attr<float>("epsilon"));
