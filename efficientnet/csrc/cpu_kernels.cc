// Depthwise 2-D convolution for XLA's CPU backend, as XLA FFI custom calls.
//
// XLA:CPU lowers a grouped convolution to a slow generic loop, and its reductions over the
// batch and spatial axes of a channels-minor tensor (the depthwise weight gradient) run far
// below memory bandwidth. These kernels do the same arithmetic in one pass each, vectorised
// along the channel axis (NHWC, float32, C contiguous) and parallel over the batch.
//
// All three take the input already padded (xp, [N, Hp, Wp, C]); the caller pads with the TF
// 'SAME' or symmetric amounts, so one kernel serves both conventions.
//   forward:      y[n,oh,ow,c]    = sum_ij xp[n, oh*s+i, ow*s+j, c] * w[i,j,c]
//   input grad:   dx[n,h,w,c]     = sum over (oh,ow,i,j) with oh*s+i = h+pt, ow*s+j = w+pl of
//                                   g[n,oh,ow,c] * w[i,j,c]            (dx is unpadded)
//   weight grad:  dw[n,i,j,c]     = sum_(oh,ow) xp[n, oh*s+i, ow*s+j, c] * g[n,oh,ow,c]
// The weight gradient is returned per example; the caller sums over n (so the result does not
// depend on how the batch is split across threads, and runs are bit-reproducible).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs fn(n) for n in [0, count) on up to hardware_concurrency threads, contiguous chunks.
template <typename Fn>
void ParallelFor(int64_t count, Fn fn) {
  int64_t threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  threads = std::min(threads, count);
  if (threads <= 1) {
    for (int64_t n = 0; n < count; ++n) fn(n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  auto chunk = [&](int64_t t) {
    int64_t lo = count * t / threads, hi = count * (t + 1) / threads;
    for (int64_t n = lo; n < hi; ++n) fn(n);
  };
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(chunk, t);
  chunk(0);
  for (auto& th : pool) th.join();
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

// Weight gradient of one example for a k x k kernel known at compile time: for each block of
// 16 channels, the k*k accumulators stay in registers over all output positions.
template <int K>
void WeightGradBlocked(const float* __restrict x, const float* __restrict g, float* __restrict dw,
                       int64_t hp, int64_t wp, int64_t ho, int64_t wo, int64_t c,
                       int64_t stride) {
  int64_t c0 = 0;
  for (; c0 + kLanes <= c; c0 += kLanes) {
    V16 acc[K * K] = {};
    for (int64_t oh = 0; oh < ho; ++oh) {
      for (int64_t ow = 0; ow < wo; ++ow) {
        const V16 gv = Load(g + (oh * wo + ow) * c + c0);
        const float* base = x + (oh * stride * wp + ow * stride) * c + c0;
#pragma GCC unroll 8
        for (int i = 0; i < K; ++i) {
#pragma GCC unroll 8
          for (int j = 0; j < K; ++j) acc[i * K + j] += Load(base + (i * wp + j) * c) * gv;
        }
      }
    }
    for (int t = 0; t < K * K; ++t) Store(dw + t * c + c0, acc[t]);
  }
  if (c0 < c) {  // leftover channels: accumulate in memory
    for (int t = 0; t < K * K; ++t) std::memset(dw + t * c + c0, 0, sizeof(float) * (c - c0));
    for (int64_t oh = 0; oh < ho; ++oh)
      for (int64_t ow = 0; ow < wo; ++ow)
        for (int i = 0; i < K; ++i)
          for (int j = 0; j < K; ++j)
            Fma(dw + (i * K + j) * c + c0,
                x + ((oh * stride + i) * wp + ow * stride + j) * c + c0,
                g + (oh * wo + ow) * c + c0, c - c0);
  }
}

void WeightGradGeneric(const float* x, const float* g, float* dw, int64_t k, int64_t hp,
                       int64_t wp, int64_t ho, int64_t wo, int64_t c, int64_t stride) {
  std::memset(dw, 0, sizeof(float) * k * k * c);
  for (int64_t oh = 0; oh < ho; ++oh)
    for (int64_t ow = 0; ow < wo; ++ow)
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j)
          Fma(dw + (i * k + j) * c, x + ((oh * stride + i) * wp + ow * stride + j) * c,
              g + (oh * wo + ow) * c, c);
}

ffi::Error Forward(ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride) {
  auto xd = xp.dimensions();
  auto yd = y->dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 3) {
    return ffi::Error::InvalidArgument("depthwise forward: expected xp, y of rank 4, w of rank 3");
  }
  const int64_t n_ = xd[0], hp = xd[1], wp = xd[2], c = xd[3];
  const int64_t ho = yd[1], wo = yd[2], k = wd[0];
  const float* x = xp.typed_data();
  const float* wt = w.typed_data();
  float* out = y->typed_data();
  ParallelFor(n_, [&](int64_t n) {
    std::vector<const float*> a(k * k), b(k * k);
    for (int64_t t = 0; t < k * k; ++t) b[t] = wt + t * c;
    for (int64_t oh = 0; oh < ho; ++oh) {
      for (int64_t ow = 0; ow < wo; ++ow) {
        for (int64_t i = 0; i < k; ++i) {
          const float* row = x + ((n * hp + oh * stride + i) * wp + ow * stride) * c;
          for (int64_t j = 0; j < k; ++j) a[i * k + j] = row + j * c;
        }
        TapSum(out + ((n * ho + oh) * wo + ow) * c, a.data(), b.data(), k * k, c);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> g,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                    int64_t stride, int64_t pad_top, int64_t pad_left) {
  auto xd = xp.dimensions();
  auto gd = g.dimensions();
  auto dxd = dx->dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || dxd.size() != 4 || wd.size() != 3) {
    return ffi::Error::InvalidArgument("depthwise backward: unexpected ranks");
  }
  const int64_t n_ = xd[0], hp = xd[1], wp = xd[2], c = xd[3];
  const int64_t ho = gd[1], wo = gd[2], h = dxd[1], wdim = dxd[2], k = wd[0];
  const float* x = xp.typed_data();
  const float* wt = w.typed_data();
  const float* gr = g.typed_data();
  float* dxo = dx->typed_data();
  float* dwo = dw->typed_data();
  ParallelFor(n_, [&](int64_t n) {
    const float* xn = x + n * hp * wp * c;
    const float* gn = gr + n * ho * wo * c;
    float* dwn = dwo + n * k * k * c;
    if (k == 3) {
      WeightGradBlocked<3>(xn, gn, dwn, hp, wp, ho, wo, c, stride);
    } else if (k == 5) {
      WeightGradBlocked<5>(xn, gn, dwn, hp, wp, ho, wo, c, stride);
    } else {
      WeightGradGeneric(xn, gn, dwn, k, hp, wp, ho, wo, c, stride);
    }
    // Input gradient, gathered: each dx row is written once, from the taps that reach it.
    std::vector<const float*> a(k * k), b(k * k);
    for (int64_t y0 = 0; y0 < h; ++y0) {
      const int64_t yp = y0 + pad_top;
      for (int64_t x0 = 0; x0 < wdim; ++x0) {
        const int64_t xq = x0 + pad_left;
        int64_t taps = 0;
        for (int64_t i = 0; i < k; ++i) {
          const int64_t t = yp - i;
          if (t < 0 || t % stride || t / stride >= ho) continue;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t u = xq - j;
            if (u < 0 || u % stride || u / stride >= wo) continue;
            a[taps] = gn + ((t / stride) * wo + u / stride) * c;
            b[taps] = wt + (i * k + j) * c;
            ++taps;
          }
        }
        TapSum(dxo + ((n * h + y0) * wdim + x0) * c, a.data(), b.data(), taps, c);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EfficientNetDepthwiseForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EfficientNetDepthwiseBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
