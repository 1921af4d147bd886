// XLA:CPU kernels as XLA FFI custom calls, built and registered by qfsep_jax/models/native.py:
// the 3x3 depthwise convolution (NHWC, float32, TF "SAME" padding) and its gradients, the RGB
// stem's kernel gradient, and batch norm's per-channel sums for training.
//
// Why: XLA:CPU's grouped convolution is slow, and the shifted multiply-add formulation in
// depthwise.py makes several passes over memory (padded copy, per-tap loops, block sums). Here
// the forward pass reads the input once and writes the output once (padding is a bounds check);
// the backward pass makes two: the input gradient (a gather from the output gradient), then the
// kernel gradient (input and output gradient, sums kept in registers along each row).
//
// Also the kernel gradient of the RGB stem (a regular 3x3 conv with few input channels), where
// XLA:CPU's convolution gains little from a second thread.
//
// Work is split over images; each image is one task on XLA's intra-op thread pool. Kernel
// gradients are summed per image, then over images in a fixed order, so results do not depend
// on the schedule. Batch norm's sums are split the same way over fixed chunks of rows.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The conv's shapes (the kernel is 3 x 3, kTaps below).
struct Geometry {
  int64_t n, h, w, c;  // input
  int64_t oh, ow;      // output
  int64_t stride, pad_top, pad_left;
};

// Runs body(i) for i in [0, count) on the caller and on XLA's pool. Items are claimed through
// an atomic counter, so a pool task that starts late finds nothing left and returns at once;
// the caller waits only for items already claimed. No thread ever blocks on a queued task.
void ParallelFor(ffi::ThreadPool& pool, int64_t count, const std::function<void(int64_t)>& body) {
  if (count <= 1 || pool.num_threads() <= 1) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
    std::function<void(int64_t)> body;
    int64_t count;
  };
  auto state = std::make_shared<State>();
  state->body = body;
  state->count = count;
  auto work = [state]() {
    for (;;) {
      int64_t i = state->next.fetch_add(1);
      if (i >= state->count) return;
      state->body(i);
      if (state->done.fetch_add(1) + 1 == state->count) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(std::function<void()>(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->count; });
}

// 3x3 kernels only (MobileNets'); depthwise.py uses its shifted multiply-adds for other sizes.
// Channels go in blocks of B (ForChannelBlocks: 16, 8, then single channels), with the block's nine
// kernel vectors (forward, input gradient) or nine sums (kernel gradient) held in registers
// while the loop runs along a row. Border columns take the same path with bounds checks.
constexpr int64_t kBlock = 16;
constexpr int64_t kTaps = 3;

// Calls f(block width, first channel) over [0, c): 16-wide blocks, then one 8-wide block where
// 8 or more channels remain (narrow models: 8-channel layers), then single channels.
template <class F>
inline void ForChannelBlocks(int64_t c, F&& f) {
  int64_t ch = 0;
  for (; ch + kBlock <= c; ch += kBlock) f(std::integral_constant<int64_t, kBlock>{}, ch);
  if (ch + 8 <= c) {
    f(std::integral_constant<int64_t, 8>{}, ch);
    ch += 8;
  }
  for (; ch < c; ++ch) f(std::integral_constant<int64_t, 1>{}, ch);
}

// Output columns [lo, hi) whose three taps all lie inside the input row.
inline void InteriorColumns(const Geometry& g, int64_t* lo, int64_t* hi) {
  *lo = std::min<int64_t>(g.ow, (g.pad_left + g.stride - 1) / g.stride);
  const int64_t last = g.w - kTaps + g.pad_left;  // largest ox * stride allowed
  *hi = last < 0 ? 0 : std::min<int64_t>(g.ow, last / g.stride + 1);
  if (*hi < *lo) *hi = *lo;
}

// y[oy, :, ch:ch+B] = sum over taps of x * k, for one output row. rows[i]: input row of tap i
// (nullptr outside the input). Used with g the conv's geometry; also for the stride-1 input
// gradient (g and flipped k as "input" and "kernel").
template <int64_t B>
inline void ForwardRowBlock(const Geometry& g, const float* const* rows,
                            const float* __restrict k, float* __restrict y, int64_t ch,
                            int64_t lo, int64_t hi) {
  float kr[kTaps * kTaps][B];
  for (int64_t t = 0; t < kTaps * kTaps; ++t)
    for (int64_t l = 0; l < B; ++l) kr[t][l] = k[t * g.c + ch + l];
  auto column = [&](int64_t ox, bool checked) {
    float acc[B] = {};
    const int64_t ix0 = ox * g.stride - g.pad_left;
    for (int64_t i = 0; i < kTaps; ++i) {
      if (rows[i] == nullptr) continue;
      for (int64_t j = 0; j < kTaps; ++j) {
        const int64_t ix = ix0 + j;
        if (checked && (ix < 0 || ix >= g.w)) continue;
        const float* xp = rows[i] + ix * g.c + ch;
        for (int64_t l = 0; l < B; ++l) acc[l] += xp[l] * kr[i * kTaps + j][l];
      }
    }
    float* yp = y + ox * g.c + ch;
    for (int64_t l = 0; l < B; ++l) yp[l] = acc[l];
  };
  for (int64_t ox = 0; ox < lo; ++ox) column(ox, true);
  for (int64_t ox = lo; ox < hi; ++ox) column(ox, false);
  for (int64_t ox = hi; ox < g.ow; ++ox) column(ox, true);
}

// Input rows of the three taps of output row oy (nullptr where a tap falls in the padding).
inline void TapRows(const Geometry& g, const float* x, int64_t oy, const float** rows) {
  for (int64_t i = 0; i < kTaps; ++i) {
    const int64_t iy = oy * g.stride + i - g.pad_top;
    rows[i] = (iy < 0 || iy >= g.h) ? nullptr : x + iy * g.w * g.c;
  }
}

// Output row oy of the depthwise conv of x (geometry g, kernel k laid out [3, 3, C]).
void ForwardRow(const Geometry& g, const float* __restrict x, const float* __restrict k,
                float* __restrict y, int64_t oy, int64_t lo, int64_t hi) {
  const float* rows[kTaps];
  TapRows(g, x, oy, rows);
  float* yr = y + oy * g.ow * g.c;
  ForChannelBlocks(g.c, [&](auto b, int64_t ch) {
    ForwardRowBlock<decltype(b)::value>(g, rows, k, yr, ch, lo, hi);
  });
}

// One image of the forward pass.
void ForwardImage(const Geometry& g, const float* __restrict x, const float* __restrict k,
                  float* __restrict y) {
  int64_t lo, hi;
  InteriorColumns(g, &lo, &hi);
  for (int64_t oy = 0; oy < g.oh; ++oy) ForwardRow(g, x, k, y, oy, lo, hi);
}

// Kernel gradient of one output row: dk[i, j] += sum over ox of g[oy, ox] * x[tap (i, j)].
// The nine sums stay in registers along the row; each output gradient is loaded once.
template <int64_t B>
inline void KernelGradRowBlock(const Geometry& g, const float* const* rows,
                               const float* __restrict gr, float* __restrict dk, int64_t ch,
                               int64_t lo, int64_t hi) {
  float acc[kTaps * kTaps][B] = {};
  auto column = [&](int64_t ox, bool checked) {
    const float* gp = gr + ox * g.c + ch;
    float gv[B];
    for (int64_t l = 0; l < B; ++l) gv[l] = gp[l];
    const int64_t ix0 = ox * g.stride - g.pad_left;
    for (int64_t i = 0; i < kTaps; ++i) {
      if (rows[i] == nullptr) continue;
      for (int64_t j = 0; j < kTaps; ++j) {
        const int64_t ix = ix0 + j;
        if (checked && (ix < 0 || ix >= g.w)) continue;
        const float* xp = rows[i] + ix * g.c + ch;
        for (int64_t l = 0; l < B; ++l) acc[i * kTaps + j][l] += gv[l] * xp[l];
      }
    }
  };
  for (int64_t ox = 0; ox < lo; ++ox) column(ox, true);
  for (int64_t ox = lo; ox < hi; ++ox) column(ox, false);
  for (int64_t ox = hi; ox < g.ow; ++ox) column(ox, true);
  for (int64_t t = 0; t < kTaps * kTaps; ++t)
    for (int64_t l = 0; l < B; ++l) dk[t * g.c + ch + l] += acc[t][l];
}

// The taps that reach input position `in` along one axis: pairs (tap t, output o) with
// o * stride + t - pad == in and 0 <= o < out. Returns how many (at most 3).
inline int64_t TapsReaching(int64_t in, int64_t stride, int64_t pad, int64_t out, int64_t* taps,
                            int64_t* outs) {
  int64_t count = 0;
  for (int64_t t = 0; t < kTaps; ++t) {
    const int64_t q = in + pad - t;
    if (q < 0 || q % stride != 0 || q / stride >= out) continue;
    taps[count] = t;
    outs[count] = q / stride;
    ++count;
  }
  return count;
}

// Strided input gradient, one input row: dx[iy, ix] = sum of g[oy, ox] * k[i, j] over the taps
// reaching (iy, ix). Rows: the ni taps ti reaching iy, with their gradient rows grows. Columns
// go by phase r = ix mod stride, whose taps j and column offsets are fixed, so the kernel
// vectors of a phase stay in registers.
template <int64_t B>
inline void StridedInputGradRowBlock(const Geometry& g, const float* const* grows,
                                     const int64_t* ti, int64_t ni, const float* __restrict k,
                                     float* __restrict dxr, int64_t ch) {
  for (int64_t r = 0; r < g.stride && r < g.w; ++r) {
    int64_t tj[kTaps], dj[kTaps], nj = 0;  // taps j reaching columns ix = r + m * stride,
    for (int64_t j = 0; j < kTaps; ++j) {  // at output column m + dj
      if ((r + g.pad_left - j) % g.stride != 0) continue;
      tj[nj] = j;
      dj[nj] = (r + g.pad_left - j) / g.stride;
      ++nj;
    }
    float kr[kTaps * kTaps][B];
    for (int64_t a = 0; a < ni; ++a)
      for (int64_t b = 0; b < nj; ++b)
        for (int64_t l = 0; l < B; ++l) kr[a * kTaps + b][l] = k[(ti[a] * kTaps + tj[b]) * g.c + ch + l];
    for (int64_t m = 0, ix = r; ix < g.w; ++m, ix += g.stride) {
      float acc[B] = {};
      for (int64_t b = 0; b < nj; ++b) {
        const int64_t ox = m + dj[b];
        if (ox < 0 || ox >= g.ow) continue;
        for (int64_t a = 0; a < ni; ++a) {
          const float* gp = grows[a] + ox * g.c + ch;
          for (int64_t l = 0; l < B; ++l) acc[l] += gp[l] * kr[a * kTaps + b][l];
        }
      }
      float* dxp = dxr + ix * g.c + ch;
      for (int64_t l = 0; l < B; ++l) dxp[l] = acc[l];
    }
  }
}

// One image: dx, and the image's kernel gradient dk (sums over rows of per-row sums), in two
// passes (interleaving them row by row, for cache reuse, was up to 34 % slower per layer).
// flipped: k rotated by 180 degrees (the stride-1 input gradient is a forward conv with it).
void BackwardImage(const Geometry& g, const float* __restrict x, const float* __restrict k,
                   const float* __restrict flipped, const float* __restrict gy,
                   float* __restrict dx, float* __restrict dk) {
  if (g.stride == 1) {
    // dx[iy, ix] = sum_ij g[iy + pt - i, ix + pl - j] k[i, j]: a stride-1 conv of g with the
    // flipped kernel and padding (2 - pt, 2 - pl).
    const Geometry t{1, g.oh, g.ow, g.c, g.h, g.w, 1, kTaps - 1 - g.pad_top,
                     kTaps - 1 - g.pad_left};
    ForwardImage(t, gy, flipped, dx);
  } else {
    for (int64_t iy = 0; iy < g.h; ++iy) {
      int64_t ti[kTaps], oi[kTaps];
      const int64_t ni = TapsReaching(iy, g.stride, g.pad_top, g.oh, ti, oi);
      const float* grows[kTaps];
      for (int64_t a = 0; a < ni; ++a) grows[a] = gy + oi[a] * g.ow * g.c;
      float* dxr = dx + iy * g.w * g.c;
      ForChannelBlocks(g.c, [&](auto b, int64_t ch) {
        StridedInputGradRowBlock<decltype(b)::value>(g, grows, ti, ni, k, dxr, ch);
      });
    }
  }
  std::fill(dk, dk + kTaps * kTaps * g.c, 0.0f);
  int64_t lo, hi;
  InteriorColumns(g, &lo, &hi);
  for (int64_t oy = 0; oy < g.oh; ++oy) {
    const float* rows[kTaps];
    TapRows(g, x, oy, rows);
    const float* gr = gy + oy * g.ow * g.c;
    ForChannelBlocks(g.c, [&](auto b, int64_t ch) {
      KernelGradRowBlock<decltype(b)::value>(g, rows, gr, dk, ch, lo, hi);
    });
  }
}

// out = the sum of the n partial results (size values each) in parts, in order and in double
// (the same bits whatever the thread schedule that computed the parts).
void SumParts(const std::vector<float>& parts, int64_t n, int64_t size, float* out) {
  std::vector<double> acc(size, 0.0);
  for (int64_t b = 0; b < n; ++b) {
    const float* p = parts.data() + b * size;
    for (int64_t t = 0; t < size; ++t) acc[t] += p[t];
  }
  for (int64_t t = 0; t < size; ++t) out[t] = static_cast<float>(acc[t]);
}

// Decodes and checks x [N, H, W, C], k [3, 3, C] and the output-side array o [N, OH, OW, C]
// (y in the forward pass, the output gradient in the backward pass) into *g.
ffi::Error DecodeGeometry(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> kd,
                          ffi::Span<const int64_t> od, int64_t stride, int64_t pad_top,
                          int64_t pad_left, Geometry* g) {
  if (xd.size() != 4 || kd.size() != 3 || od.size() != 4)
    return ffi::Error::InvalidArgument(
        "depthwise: expected x [N,H,W,C], k [3,3,C] and output-side [N,OH,OW,C] arrays");
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], od[1], od[2], stride, pad_top, pad_left};
  if (kd[0] != kTaps || kd[1] != kTaps)
    return ffi::Error::InvalidArgument("depthwise: only 3x3 kernels are implemented");
  if (kd[2] != g->c || od[0] != g->n || od[3] != g->c)
    return ffi::Error::InvalidArgument("depthwise: channel or batch sizes disagree");
  if (stride < 1) return ffi::Error::InvalidArgument("depthwise: stride must be >= 1");
  if (pad_top < 0 || pad_left < 0 || pad_top >= kTaps || pad_left >= kTaps)
    return ffi::Error::InvalidArgument("depthwise: padding out of range");
  if ((g->oh - 1) * stride - pad_top >= g->h || (g->ow - 1) * stride - pad_left >= g->w)
    return ffi::Error::InvalidArgument("depthwise: output larger than the padded input allows");
  return ffi::Error::Success();
}

ffi::Error DepthwiseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> y,
                            int64_t stride, int64_t pad_top, int64_t pad_left) {
  Geometry g;
  if (auto err = DecodeGeometry(x.dimensions(), k.dimensions(), y->dimensions(), stride, pad_top,
                                pad_left, &g);
      err.failure())
    return err;
  const float* xs = x.typed_data();
  const float* ks = k.typed_data();
  float* ys = y->typed_data();
  ParallelFor(pool, g.n, [&](int64_t b) {
    ForwardImage(g, xs + b * g.h * g.w * g.c, ks, ys + b * g.oh * g.ow * g.c);
  });
  return ffi::Error::Success();
}

ffi::Error DepthwiseBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> gy,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dk,
                             int64_t stride, int64_t pad_top, int64_t pad_left) {
  Geometry g;
  if (auto err = DecodeGeometry(x.dimensions(), k.dimensions(), gy.dimensions(), stride, pad_top,
                                pad_left, &g);
      err.failure())
    return err;
  const int64_t taps = kTaps * kTaps * g.c;
  std::vector<float> per_image(g.n * taps);  // each image's kernel-gradient sum
  const float* ks = k.typed_data();
  std::vector<float> flipped(taps);
  for (int64_t t = 0; t < kTaps * kTaps; ++t)
    std::copy(ks + t * g.c, ks + (t + 1) * g.c, flipped.data() + (kTaps * kTaps - 1 - t) * g.c);
  const float* xs = x.typed_data();
  const float* gs = gy.typed_data();
  float* dxs = dx->typed_data();
  ParallelFor(pool, g.n, [&](int64_t b) {
    BackwardImage(g, xs + b * g.h * g.w * g.c, ks, flipped.data(), gs + b * g.oh * g.ow * g.c,
                  dxs + b * g.h * g.w * g.c, per_image.data() + b * taps);
  });
  SumParts(per_image, g.n, taps, dk->typed_data());
  return ffi::Error::Success();
}

// The stem conv's kernel gradient for one image and one block of B output channels:
// dk[i, j, c, co] += sum over (oy, ox) of xp[oy * s + i, ox * s + j, c] * gy[oy, ox, co], over
// the already padded input xp [HP, WP, C] (a VALID conv; C input channels, CO output channels).
// One kernel row i at a time: its 3 * C taps are contiguous in xp, and their B-wide sums stay
// in registers along the whole image.
template <int64_t C, int64_t B>
void StemKernelGradBlock(const float* __restrict xp, const float* __restrict gy, int64_t wp,
                         int64_t oh, int64_t ow, int64_t co, int64_t stride, int64_t ch,
                         float* __restrict dk) {
  constexpr int64_t kRowTaps = kTaps * C;
  for (int64_t i = 0; i < kTaps; ++i) {
    float acc[kRowTaps][B] = {};
    for (int64_t oy = 0; oy < oh; ++oy) {
      const float* row = xp + (oy * stride + i) * wp * C;
      const float* grow = gy + oy * ow * co + ch;
      for (int64_t ox = 0; ox < ow; ++ox) {
        const float* px = row + ox * stride * C;
        const float* gp = grow + ox * co;
        float gv[B];
        for (int64_t l = 0; l < B; ++l) gv[l] = gp[l];
        // Fully unrolled, so that acc lives in registers (5x faster than GCC's default here).
#pragma GCC unroll 12
        for (int64_t t = 0; t < kRowTaps; ++t)
#pragma GCC unroll 16
          for (int64_t l = 0; l < B; ++l) acc[t][l] += px[t] * gv[l];
      }
    }
    for (int64_t t = 0; t < kRowTaps; ++t)
      for (int64_t l = 0; l < B; ++l) dk[(i * kRowTaps + t) * co + ch + l] = acc[t][l];
  }
}

template <int64_t C>
void StemKernelGradImage(const float* xp, const float* gy, int64_t wp, int64_t oh, int64_t ow,
                         int64_t co, int64_t stride, float* dk) {
  ForChannelBlocks(co, [&](auto b, int64_t ch) {
    StemKernelGradBlock<C, decltype(b)::value>(xp, gy, wp, oh, ow, co, stride, ch, dk);
  });
}

constexpr int64_t kMaxStemChannels = 4;

ffi::Error StemKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xp,
                          ffi::Buffer<ffi::F32> gy, ffi::ResultBuffer<ffi::F32> dk,
                          int64_t stride) {
  const auto xd = xp.dimensions(), gd = gy.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4)
    return ffi::Error::InvalidArgument(
        "stem kernel gradient: expected xp [N,HP,WP,C], gy [N,OH,OW,CO], dk [3,3,C,CO]");
  const int64_t n = xd[0], hp = xd[1], wp = xd[2], c = xd[3], oh = gd[1], ow = gd[2], co = gd[3];
  if (kd[0] != kTaps || kd[1] != kTaps || kd[2] != c || kd[3] != co || gd[0] != n)
    return ffi::Error::InvalidArgument("stem kernel gradient: shapes disagree");
  if (c < 1 || c > kMaxStemChannels)
    return ffi::Error::InvalidArgument("stem kernel gradient: 1 to 4 input channels only");
  // VALID over xp: the output covers all of it but at most stride - 1 trailing rows/columns.
  auto fits = [&](int64_t out, int64_t in) {
    const int64_t need = (out - 1) * stride + kTaps;
    return out >= 1 && need <= in && in < need + stride;
  };
  if (stride < 1 || !fits(oh, hp) || !fits(ow, wp))
    return ffi::Error::InvalidArgument(
        "stem kernel gradient: the padded input does not match the output size and stride");
  const int64_t taps = kTaps * kTaps * c * co;
  std::vector<float> per_image(n * taps);
  const float* xs = xp.typed_data();
  const float* gs = gy.typed_data();
  ParallelFor(pool, n, [&](int64_t b) {
    const float* x = xs + b * hp * wp * c;
    const float* g = gs + b * oh * ow * co;
    float* d = per_image.data() + b * taps;
    switch (c) {
      case 1: StemKernelGradImage<1>(x, g, wp, oh, ow, co, stride, d); break;
      case 2: StemKernelGradImage<2>(x, g, wp, oh, ow, co, stride, d); break;
      case 3: StemKernelGradImage<3>(x, g, wp, oh, ow, co, stride, d); break;
      default: StemKernelGradImage<4>(x, g, wp, oh, ow, co, stride, d); break;
    }
  });
  SumParts(per_image, n, taps, dk->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Batch norm's per-channel sums over [..., C] arrays (every leading axis is rows), for training:
// * moments: s0 = sum of y, s1 = sum of y^2, in one pass (XLA makes one pass per sum);
// * gradient sums of BN followed by an activation: s0 = sum of g * w, s1 = sum of g * w * y, with
//   w the activation's derivative at z = (y - mean) * alpha + beta recomputed from y (XLA writes
//   g * w to memory, then reads it back for each sum).
// Rows go in fixed chunks, each summed in registers, then over chunks in chunk order (SumParts):
// the same bits whatever the number of threads.

constexpr int64_t kSumChunkRows = 512;

// Activation codes (the "activation" attribute; qfsep_jax/models/layers.py ACTIVATION_CODES).
constexpr int64_t kActNone = 0, kActRelu = 1, kActRelu6 = 2;

// The activation's derivative as JAX's autodiff has it: relu 1 above 0 and 0 at 0; relu6 (a clip
// to [0, 6]) 1 inside, 1/2 at exactly 0 or 6. Branch-free, so that GCC vectorizes it.
template <int64_t kAct>
inline float ActivationGrad(float z) {
  if (kAct == kActRelu) return static_cast<float>(z > 0.0f);
  if (kAct == kActRelu6)
    return static_cast<float>((z > 0.0f) & (z < 6.0f)) +
           0.5f * static_cast<float>((z == 0.0f) | (z == 6.0f));
  return 1.0f;
}

// Sums over `rows` rows (row stride c) of channels [ch, ch + B) into s0, s1; the B-wide sums stay
// in registers. (No unroll pragma: with it GCC stopped vectorizing the masked loop, 3.5x slower.)
template <int64_t B, int64_t kAct, bool kMoments>
inline void ChannelSumsBlock(const float* __restrict g, const float* __restrict y,
                             const float* __restrict params, int64_t rows, int64_t c, int64_t ch,
                             float* __restrict s0, float* __restrict s1) {
  float a0[B] = {}, a1[B] = {};
  float mean[B], alpha[B], beta[B];
  if (!kMoments)
    for (int64_t l = 0; l < B; ++l) {
      mean[l] = params[ch + l];
      alpha[l] = params[c + ch + l];
      beta[l] = params[2 * c + ch + l];
    }
  for (int64_t r = 0; r < rows; ++r) {
    const float* yr = y + r * c + ch;
    if (kMoments) {
      for (int64_t l = 0; l < B; ++l) {
        a0[l] += yr[l];
        a1[l] += yr[l] * yr[l];
      }
    } else {
      const float* gr = g + r * c + ch;
      for (int64_t l = 0; l < B; ++l) {
        const float gw = gr[l] * ActivationGrad<kAct>((yr[l] - mean[l]) * alpha[l] + beta[l]);
        a0[l] += gw;
        a1[l] += gw * yr[l];
      }
    }
  }
  for (int64_t l = 0; l < B; ++l) {
    s0[ch + l] = a0[l];
    s1[ch + l] = a1[l];
  }
}

// One chunk of rows, all channels: 64-wide blocks, then 16, 8 and single channels. (Not
// ForChannelBlocks made generic over its widths: with that, the depthwise forward pass summed
// over MobileNetV1's layers ran 26 -> 28-30 ms in alternating runs; GCC inlined less.)
template <int64_t kAct, bool kMoments>
void ChannelSumsChunk(const float* g, const float* y, const float* params, int64_t rows,
                      int64_t c, float* s0, float* s1) {
  int64_t ch = 0;
  for (; ch + 64 <= c; ch += 64)
    ChannelSumsBlock<64, kAct, kMoments>(g, y, params, rows, c, ch, s0, s1);
  for (; ch + 16 <= c; ch += 16)
    ChannelSumsBlock<16, kAct, kMoments>(g, y, params, rows, c, ch, s0, s1);
  for (; ch + 8 <= c; ch += 8)
    ChannelSumsBlock<8, kAct, kMoments>(g, y, params, rows, c, ch, s0, s1);
  for (; ch < c; ++ch) ChannelSumsBlock<1, kAct, kMoments>(g, y, params, rows, c, ch, s0, s1);
}

// out [2, C] = (s0, s1) of ChannelSumsChunk<kAct, kMoments> over all rows of y (and g).
template <int64_t kAct, bool kMoments>
void ChannelSums(ffi::ThreadPool& pool, const float* g, const float* y, const float* params,
                 int64_t rows, int64_t c, float* out) {
  const int64_t chunks = (rows + kSumChunkRows - 1) / kSumChunkRows;
  std::vector<float> parts(chunks * 2 * c);
  ParallelFor(pool, chunks, [&](int64_t b) {
    const int64_t r0 = b * kSumChunkRows;
    float* s0 = parts.data() + b * 2 * c;
    ChannelSumsChunk<kAct, kMoments>(kMoments ? nullptr : g + r0 * c, y + r0 * c, params,
                                     std::min(kSumChunkRows, rows - r0), c, s0, s0 + c);
  });
  SumParts(parts, chunks, 2 * c, out);
}

// Checks y [..., C] and out [2, C]; *rows = the product of y's leading dimensions.
ffi::Error DecodeChannelSums(const char* name, ffi::Span<const int64_t> yd,
                             ffi::Span<const int64_t> od, int64_t* rows, int64_t* c) {
  if (yd.size() < 1 || od.size() != 2 || od[0] != 2 || od[1] != yd.back())
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": expected y [..., C] and a [2, C] result");
  *c = yd.back();
  *rows = 1;
  for (size_t i = 0; i + 1 < yd.size(); ++i) *rows *= yd[i];
  return ffi::Error::Success();
}

ffi::Error ChannelMoments(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y,
                          ffi::ResultBuffer<ffi::F32> out) {
  int64_t rows, c;
  if (auto err = DecodeChannelSums("channel moments", y.dimensions(), out->dimensions(), &rows, &c);
      err.failure())
    return err;
  ChannelSums<kActNone, true>(pool, nullptr, y.typed_data(), nullptr, rows, c, out->typed_data());
  return ffi::Error::Success();
}

ffi::Error BnGradSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> y,
                      ffi::Buffer<ffi::F32> params, ffi::ResultBuffer<ffi::F32> out,
                      int64_t activation) {
  int64_t rows, c;
  if (auto err = DecodeChannelSums("BN gradient sums", y.dimensions(), out->dimensions(), &rows, &c);
      err.failure())
    return err;
  const auto gd = g.dimensions(), yd = y.dimensions(), pd = params.dimensions();
  if (!std::equal(gd.begin(), gd.end(), yd.begin(), yd.end()))
    return ffi::Error::InvalidArgument("BN gradient sums: g and y shapes differ");
  if (pd.size() != 2 || pd[0] != 3 || pd[1] != c)
    return ffi::Error::InvalidArgument("BN gradient sums: expected params [3, C] (mean, alpha, beta)");
  const float* gs = g.typed_data();
  const float* ys = y.typed_data();
  const float* ps = params.typed_data();
  float* os = out->typed_data();
  switch (activation) {
    case kActNone: ChannelSums<kActNone, false>(pool, gs, ys, ps, rows, c, os); break;
    case kActRelu: ChannelSums<kActRelu, false>(pool, gs, ys, ps, rows, c, os); break;
    case kActRelu6: ChannelSums<kActRelu6, false>(pool, gs, ys, ps, rows, c, os); break;
    default: return ffi::Error::InvalidArgument("BN gradient sums: unknown activation code");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QfsepChannelMoments, ChannelMoments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QfsepBnGradSums, BnGradSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QfsepStemKernelGrad, StemKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QfsepDepthwiseForward, DepthwiseForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QfsepDepthwiseBackward, DepthwiseBackward,
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

