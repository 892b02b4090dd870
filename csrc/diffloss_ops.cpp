// Native (C++ CPU) kernels of the two fused DiffLoss ops, and the Python binding of the extension.
//
// The definitions are the plain-PyTorch twins in diffloss_fast/ops/noising.py
// (q_sample_pair_torch) and diffloss_fast/ops/weighted_l2.py (weighted_l2_torch):
//
//   q_sample_pair:  x_t = coef_signal[b] * (scale * x + offset) + coef_noise[b] * noise
//                   for x = restored and x = gt (shared noise); backward to restored only:
//                   grad_restored = (grad * coef_signal[b]) * scale
//   weighted_l2:    d = p - q                                  (x is None)
//                   d = x_coef[b] * (x - y) - p_coef[b] * (p - q)  (x given)
//                   loss = sum_b weight[b] * sum_i d^2 / p.numel()
//                   backward to p and x only.
//
// Arithmetic is done in at::opmath_type<scalar_t>: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64.
//
// Work is split into tasks of at most kChunk elements of one sample (so the per-sample
// coefficients are constants inside a task) and run with at::parallel_for (OpenMP when the
// extension is compiled with -fopenmp). The partition depends only on the shape, never on the
// thread count, and every reduction is done in a fixed order: weighted_l2 gives the same bits
// with 1 or N threads.
//
// Each kernel has two paths:
//   - fast: every tensor involved is dense, non-overlapping, with the same strides and the batch
//     dimension outermost (contiguous NCHW, channels_last, ...): each sample is one contiguous
//     block of memory, and the inner loops are plain pointer loops the compiler vectorizes;
//   - strided: anything else (mixed layouts, expanded or sliced views): the logical
//     (B, C, H, W) index is walked row by row, inner dimensions in the memory order of one of
//     the tensors (the one giving the longest rows once contiguous dimensions are merged, e.g.
//     H*W for NCHW inputs written to a channels_last output), every tensor addressed through
//     its own strides.
//
// The binding (bottom of the file) validates what the kernels assume, allocates the outputs and
// sends CUDA tensors to csrc/diffloss_ops_cuda.cu (compiled in when DIFFLOSS_WITH_CUDA is set).
// Dtype promotion, broadcasting of coefficients and autograd live in diffloss_fast/ops/native.py.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "layout.h"

namespace diffloss_native {

#ifdef DIFFLOSS_WITH_CUDA
// Defined in diffloss_ops_cuda.cu; same contracts as the *_cpu functions below.
void q_sample_fwd_cuda(const at::Tensor& r, const at::Tensor& g, const at::Tensor& n,
                       const at::Tensor& cs, const at::Tensor& cn, double scale, double offset,
                       const at::Tensor& out_r, const at::Tensor& out_g);
void q_sample_bwd_cuda(const at::Tensor& grad, const at::Tensor& cs, double scale,
                       const at::Tensor& grad_r);
at::Tensor weighted_l2_fwd_cuda(const at::Tensor& p, const at::Tensor& q, const at::Tensor& w,
                                const at::Tensor& x, const at::Tensor& y, const at::Tensor& xc,
                                const at::Tensor& pc);
void weighted_l2_bwd_cuda(const at::Tensor& g, const at::Tensor& p, const at::Tensor& q,
                          const at::Tensor& w, const at::Tensor& x, const at::Tensor& y,
                          const at::Tensor& xc, const at::Tensor& pc, const at::Tensor& gp,
                          const at::Tensor& gx);
#endif

namespace {

constexpr int64_t kChunk = 4096;  // elements of one sample per task (and per partial sum)
constexpr int kLanes = 16;        // independent accumulators of one partial sum
constexpr int64_t kGrain = 4;     // tasks per thread at least (about 16K elements)

// ------------------------------------------------------------------------------------------------
// Layout helpers

// The Walk of the strided path: ``walk_in_order_of`` with adjacent inner dimensions that are
// contiguous in one another for every tensor merged, so that the innermost dimension (a "row")
// is as long as possible. size[k] == 1 (stride 0) for merged-away dimensions.
Walk merged_walk_in_order_of(const std::vector<const at::Tensor*>& ts, const at::Tensor& ref) {
  Walk w = walk_in_order_of(ts, ref);
  // merge inner dimensions, innermost first
  int64_t gs[3];
  int64_t gst[3][kMaxT];
  int ng = 0;
  for (int k = 3; k >= 1; --k) {
    const int64_t sk = w.size[k];
    if (sk == 1) continue;
    bool merge = ng > 0;
    for (int t = 0; merge && t < kMaxT; ++t)
      merge = w.stride[t][k] == gst[ng - 1][t] * gs[ng - 1];
    if (merge) {
      gs[ng - 1] *= sk;
    } else {
      gs[ng] = sk;
      for (int t = 0; t < kMaxT; ++t) gst[ng][t] = w.stride[t][k];
      ++ng;
    }
  }
  for (int k = 1; k <= 3; ++k) {
    w.size[k] = 1;
    for (int t = 0; t < kMaxT; ++t) w.stride[t][k] = 0;
  }
  for (int g = 0; g < ng; ++g) {
    w.size[3 - g] = gs[g];
    for (int t = 0; t < kMaxT; ++t) w.stride[t][3 - g] = gst[g][t];
  }
  return w;
}

// Tries the memory order of each tensor (the first one wins ties: pass the output first) and
// keeps the one with the longest rows.
Walk make_walk(std::initializer_list<const at::Tensor*> list) {
  const std::vector<const at::Tensor*> ts(list);
  TORCH_INTERNAL_ASSERT(ts.size() <= static_cast<size_t>(kMaxT));
  Walk best{};
  bool have = false;
  for (const at::Tensor* ref : ts) {
    if (ref == nullptr || !ref->defined()) continue;
    const Walk w = merged_walk_in_order_of(ts, *ref);
    if (!have || w.size[3] > best.size[3]) best = w;
    have = true;
  }
  TORCH_INTERNAL_ASSERT(have);
  return best;
}

// Calls row(off, n) for the runs of elements [lo, lo+len) of sample b (in Walk order) along the
// innermost dimension: off[t] is tensor t's offset of the run's first element, the next ones
// follow at stride w.stride[t][3].
template <typename F>
inline void for_each_row(const Walk& w, int64_t b, int64_t lo, int64_t len, const F& row) {
  const int64_t end = lo + len;
  for (int64_t r = lo; r < end;) {
    const int64_t i3 = r % w.size[3];
    const int64_t rest = r / w.size[3];
    const int64_t i2 = rest % w.size[2];
    const int64_t i1 = rest / w.size[2];
    const int64_t n = std::min(w.size[3] - i3, end - r);
    int64_t off[kMaxT];
    for (int t = 0; t < kMaxT; ++t)
      off[t] = b * w.stride[t][0] + i1 * w.stride[t][1] + i2 * w.stride[t][2] +
               i3 * w.stride[t][3];
    row(off, n);
    r += n;
  }
}

// Runs fn(task, b, lo, len) for every task: elements [lo, lo+len) of sample b (len <= kChunk).
template <typename F>
void for_each_task(int64_t B, int64_t M, const F& fn) {
  const int64_t nchunk = div_up(M, kChunk);
  if (B == 0 || nchunk == 0) return;
  at::parallel_for(0, B * nchunk, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nchunk;
      const int64_t lo = (task % nchunk) * kChunk;
      fn(task, b, lo, std::min(kChunk, M - lo));
    }
  });
}

// sum_{i<len} f(i), called with i = 0, 1, 2, ... in order, into kLanes accumulators (element i
// goes to lane i % kLanes) combined by a fixed tree. The lane loop vectorizes without
// reassociating anything, so the result does not depend on the compiler or the thread count.
template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t len, F&& f) {
  acc_t lane[kLanes];
  for (int j = 0; j < kLanes; ++j) lane[j] = acc_t(0);
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += f(i + j);
  for (int j = 0; i < len; ++i, ++j) lane[j] += f(i);
  for (int h = kLanes / 2; h > 0; h /= 2)
    for (int j = 0; j < h; ++j) lane[j] += lane[j + h];
  return lane[0];
}

template <typename F>
void bool_dispatch(bool v, const F& f) {
  if (v)
    f(std::true_type{});
  else
    f(std::false_type{});
}

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
inline T* mut_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// ------------------------------------------------------------------------------------------------
// q_sample_pair

template <typename in_t, typename out_t>
void q_sample_fwd_kernel(const at::Tensor& r, const at::Tensor& g, const at::Tensor& n,
                         const at::Tensor& cs, const at::Tensor& cn, double scale, double offset,
                         const at::Tensor& out_r, const at::Tensor& out_g) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t B = r.size(0);
  const int64_t M = B > 0 ? r.numel() / B : 0;
  const acc_t s = static_cast<acc_t>(scale);
  const acc_t o = static_cast<acc_t>(offset);
  const acc_t* A = cs.const_data_ptr<acc_t>();
  const acc_t* K = cn.const_data_ptr<acc_t>();
  const in_t* rp = r.const_data_ptr<in_t>();
  const in_t* gp = g.const_data_ptr<in_t>();
  const in_t* np = n.const_data_ptr<in_t>();
  out_t* orp = out_r.mutable_data_ptr<out_t>();
  out_t* ogp = out_g.mutable_data_ptr<out_t>();

  if (dense_same_layout({&out_r, &out_g, &r, &g, &n})) {
    for_each_task(B, M, [&](int64_t, int64_t b, int64_t lo, int64_t len) {
      const acc_t a = A[b], k = K[b];
      const int64_t base = b * M + lo;
      const in_t* __restrict R = rp + base;
      const in_t* __restrict G = gp + base;
      const in_t* __restrict N = np + base;
      out_t* __restrict OR = orp + base;
      out_t* __restrict OG = ogp + base;
      for (int64_t i = 0; i < len; ++i) {
        const acc_t kn = k * static_cast<acc_t>(N[i]);
        OR[i] = static_cast<out_t>(a * (s * static_cast<acc_t>(R[i]) + o) + kn);
        OG[i] = static_cast<out_t>(a * (s * static_cast<acc_t>(G[i]) + o) + kn);
      }
    });
    return;
  }
  // Walk order: out_r, out_g, r, g, n
  const Walk w = make_walk({&out_r, &out_g, &r, &g, &n});
  for_each_task(B, M, [&](int64_t, int64_t b, int64_t lo, int64_t len) {
    const acc_t a = A[b], k = K[b];
    for_each_row(w, b, lo, len, [&](const int64_t* off, int64_t cnt) {
      const int64_t s0 = w.stride[0][3], s1 = w.stride[1][3], s2 = w.stride[2][3],
                    s3 = w.stride[3][3], s4 = w.stride[4][3];
      out_t* OR = orp + off[0];
      out_t* OG = ogp + off[1];
      const in_t* R = rp + off[2];
      const in_t* G = gp + off[3];
      const in_t* N = np + off[4];
      for (int64_t i = 0; i < cnt; ++i) {
        const acc_t kn = k * static_cast<acc_t>(N[i * s4]);
        OR[i * s0] = static_cast<out_t>(a * (s * static_cast<acc_t>(R[i * s2]) + o) + kn);
        OG[i * s1] = static_cast<out_t>(a * (s * static_cast<acc_t>(G[i * s3]) + o) + kn);
      }
    });
  });
}

// grad_r = (grad * coef_signal[b]) * scale, in restored's dtype (in_t); grad is in out_t.
template <typename in_t, typename out_t>
void q_sample_bwd_kernel(const at::Tensor& grad, const at::Tensor& cs, double scale,
                         const at::Tensor& grad_r) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t B = grad.size(0);
  const int64_t M = B > 0 ? grad.numel() / B : 0;
  const acc_t s = static_cast<acc_t>(scale);
  const acc_t* A = cs.const_data_ptr<acc_t>();
  const out_t* gp = grad.const_data_ptr<out_t>();
  in_t* op = grad_r.mutable_data_ptr<in_t>();

  if (dense_same_layout({&grad_r, &grad})) {
    for_each_task(B, M, [&](int64_t, int64_t b, int64_t lo, int64_t len) {
      const acc_t a = A[b];
      const out_t* __restrict G = gp + b * M + lo;
      in_t* __restrict O = op + b * M + lo;
      for (int64_t i = 0; i < len; ++i) O[i] = static_cast<in_t>(static_cast<acc_t>(G[i]) * a * s);
    });
    return;
  }
  const Walk w = make_walk({&grad_r, &grad});
  for_each_task(B, M, [&](int64_t, int64_t b, int64_t lo, int64_t len) {
    const acc_t a = A[b];
    for_each_row(w, b, lo, len, [&](const int64_t* off, int64_t cnt) {
      const int64_t so = w.stride[0][3], sg = w.stride[1][3];
      in_t* O = op + off[0];
      const out_t* G = gp + off[1];
      for (int64_t i = 0; i < cnt; ++i)
        O[i * so] = static_cast<in_t>(static_cast<acc_t>(G[i * sg]) * a * s);
    });
  });
}

void q_sample_fwd_cpu(const at::Tensor& r, const at::Tensor& g, const at::Tensor& n,
                      const at::Tensor& cs, const at::Tensor& cn, double scale, double offset,
                      const at::Tensor& out_r, const at::Tensor& out_g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, r.scalar_type(), "diffloss q_sample_pair forward", [&] {
        using in_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, out_r.scalar_type(), "diffloss q_sample_pair out", [&] {
              q_sample_fwd_kernel<in_t, scalar_t>(r, g, n, cs, cn, scale, offset, out_r, out_g);
            });
      });
}

void q_sample_bwd_cpu(const at::Tensor& grad, const at::Tensor& cs, double scale,
                      const at::Tensor& grad_r) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_r.scalar_type(), "diffloss q_sample_pair backward", [&] {
        using in_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, grad.scalar_type(), "diffloss q_sample_pair grad", [&] {
              q_sample_bwd_kernel<in_t, scalar_t>(grad, cs, scale, grad_r);
            });
      });
}

// ------------------------------------------------------------------------------------------------
// weighted_l2

template <typename T, bool HAS_X>
at::Tensor weighted_l2_fwd_kernel(const at::Tensor& p, const at::Tensor& q, const at::Tensor& wt,
                                  const at::Tensor& x, const at::Tensor& y, const at::Tensor& xc,
                                  const at::Tensor& pc) {
  using acc_t = at::opmath_type<T>;
  const int64_t B = p.size(0);
  const int64_t M = B > 0 ? p.numel() / B : 0;
  const int64_t nchunk = div_up(M, kChunk);
  const T* P = p.const_data_ptr<T>();
  const T* Q = q.const_data_ptr<T>();
  const T* X = HAS_X ? x.const_data_ptr<T>() : nullptr;
  const T* Y = HAS_X ? y.const_data_ptr<T>() : nullptr;
  const acc_t* W = wt.const_data_ptr<acc_t>();
  const acc_t* XC = HAS_X ? xc.const_data_ptr<acc_t>() : nullptr;
  const acc_t* PC = HAS_X ? pc.const_data_ptr<acc_t>() : nullptr;

  // Stage 1: one partial sum of d^2 per task (sample b, chunk c), written to its own slot.
  std::vector<acc_t> partial(static_cast<size_t>(B * nchunk), acc_t(0));
  if (dense_same_layout({&p, &q, &x, &y})) {
    for_each_task(B, M, [&](int64_t task, int64_t b, int64_t lo, int64_t len) {
      const int64_t base = b * M + lo;
      const T* __restrict Pb = P + base;
      const T* __restrict Qb = Q + base;
      const T* __restrict Xb = HAS_X ? X + base : nullptr;
      const T* __restrict Yb = HAS_X ? Y + base : nullptr;
      const acc_t xcb = HAS_X ? XC[b] : acc_t(0);
      const acc_t pcb = HAS_X ? PC[b] : acc_t(0);
      partial[task] = lane_sum<acc_t>(len, [&](int64_t i) {
        acc_t d = static_cast<acc_t>(Pb[i]) - static_cast<acc_t>(Qb[i]);
        if constexpr (HAS_X)
          d = xcb * (static_cast<acc_t>(Xb[i]) - static_cast<acc_t>(Yb[i])) - pcb * d;
        return d * d;
      });
    });
  } else {
    const Walk w = make_walk({&p, &q, &x, &y});
    for_each_task(B, M, [&](int64_t task, int64_t b, int64_t lo, int64_t len) {
      const acc_t xcb = HAS_X ? XC[b] : acc_t(0);
      const acc_t pcb = HAS_X ? PC[b] : acc_t(0);
      acc_t lane[kLanes];
      for (int j = 0; j < kLanes; ++j) lane[j] = acc_t(0);
      int64_t e = 0;  // element e of the task goes to lane e % kLanes, as in lane_sum
      for_each_row(w, b, lo, len, [&](const int64_t* off, int64_t cnt) {
        const int64_t sp = w.stride[0][3], sq = w.stride[1][3], sx = w.stride[2][3],
                      sy = w.stride[3][3];
        for (int64_t i = 0; i < cnt; ++i, ++e) {
          acc_t d = static_cast<acc_t>(P[off[0] + i * sp]) - static_cast<acc_t>(Q[off[1] + i * sq]);
          if constexpr (HAS_X)
            d = xcb * (static_cast<acc_t>(X[off[2] + i * sx]) -
                       static_cast<acc_t>(Y[off[3] + i * sy])) -
                pcb * d;
          lane[e % kLanes] += d * d;
        }
      });
      for (int h = kLanes / 2; h > 0; h /= 2)
        for (int j = 0; j < h; ++j) lane[j] += lane[j + h];
      partial[task] = lane[0];
    });
  }
  // Stage 2, serial and in a fixed order: per-sample sums, weighted, over the batch.
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    double sb = 0.0;
    for (int64_t k = 0; k < nchunk; ++k) sb += static_cast<double>(partial[b * nchunk + k]);
    total += static_cast<double>(W[b]) * sb;
  }
  const double result = total / static_cast<double>(p.numel());  // 0/0 = NaN, like the twin
  return at::scalar_tensor(result, p.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// G = 2 * g * weight[b] / N * d;  x None: grad_p = G;  x given: grad_x = G * x_coef[b],
// grad_p = -G * p_coef[b]. gp / gx may be undefined (not needed).
template <typename T, bool HAS_X, bool NEED_P, bool NEED_X>
void weighted_l2_bwd_kernel(double gval, const at::Tensor& p, const at::Tensor& q,
                            const at::Tensor& wt, const at::Tensor& x, const at::Tensor& y,
                            const at::Tensor& xc, const at::Tensor& pc, const at::Tensor& gp,
                            const at::Tensor& gx) {
  using acc_t = at::opmath_type<T>;
  const int64_t B = p.size(0);
  const int64_t M = B > 0 ? p.numel() / B : 0;
  const double two_g_over_n = 2.0 * gval / static_cast<double>(p.numel());
  const T* P = p.const_data_ptr<T>();
  const T* Q = q.const_data_ptr<T>();
  const T* X = ptr_or_null<T>(x);
  const T* Y = ptr_or_null<T>(y);
  const acc_t* W = wt.const_data_ptr<acc_t>();
  const acc_t* XC = ptr_or_null<acc_t>(xc);
  const acc_t* PC = ptr_or_null<acc_t>(pc);
  T* GP = mut_ptr_or_null<T>(gp);
  T* GX = mut_ptr_or_null<T>(gx);

  auto coefs = [&](int64_t b, acc_t& k, acc_t& kx, acc_t& kp) {
    k = static_cast<acc_t>(two_g_over_n * static_cast<double>(W[b]));
    kx = HAS_X ? XC[b] : acc_t(0);
    kp = HAS_X ? -PC[b] : acc_t(0);
  };

  if (dense_same_layout({&p, &q, &x, &y, &gp, &gx})) {
    for_each_task(B, M, [&](int64_t, int64_t b, int64_t lo, int64_t len) {
      acc_t k, kx, kp;
      coefs(b, k, kx, kp);
      const int64_t base = b * M + lo;
      const T* __restrict Pb = P + base;
      const T* __restrict Qb = Q + base;
      const T* __restrict Xb = HAS_X ? X + base : nullptr;
      const T* __restrict Yb = HAS_X ? Y + base : nullptr;
      T* __restrict GPb = NEED_P ? GP + base : nullptr;
      T* __restrict GXb = NEED_X ? GX + base : nullptr;
      for (int64_t i = 0; i < len; ++i) {
        acc_t d = static_cast<acc_t>(Pb[i]) - static_cast<acc_t>(Qb[i]);
        if constexpr (HAS_X) {
          d = kx * (static_cast<acc_t>(Xb[i]) - static_cast<acc_t>(Yb[i])) + kp * d;
          const acc_t t = k * d;
          if constexpr (NEED_X) GXb[i] = static_cast<T>(t * kx);
          if constexpr (NEED_P) GPb[i] = static_cast<T>(t * kp);
        } else {
          if constexpr (NEED_P) GPb[i] = static_cast<T>(k * d);
        }
      }
    });
    return;
  }
  // Walk order: gp, gx, p, q, x, y (the gradients first: their order wins ties)
  const Walk w = make_walk({&gp, &gx, &p, &q, &x, &y});
  for_each_task(B, M, [&](int64_t, int64_t b, int64_t lo, int64_t len) {
    acc_t k, kx, kp;
    coefs(b, k, kx, kp);
    for_each_row(w, b, lo, len, [&](const int64_t* off, int64_t cnt) {
      const int64_t sgp = w.stride[0][3], sgx = w.stride[1][3], sp = w.stride[2][3],
                    sq = w.stride[3][3], sx = w.stride[4][3], sy = w.stride[5][3];
      for (int64_t i = 0; i < cnt; ++i) {
        acc_t d = static_cast<acc_t>(P[off[2] + i * sp]) - static_cast<acc_t>(Q[off[3] + i * sq]);
        if constexpr (HAS_X) {
          d = kx * (static_cast<acc_t>(X[off[4] + i * sx]) -
                    static_cast<acc_t>(Y[off[5] + i * sy])) +
              kp * d;
          const acc_t t = k * d;
          if constexpr (NEED_X) GX[off[1] + i * sgx] = static_cast<T>(t * kx);
          if constexpr (NEED_P) GP[off[0] + i * sgp] = static_cast<T>(t * kp);
        } else {
          if constexpr (NEED_P) GP[off[0] + i * sgp] = static_cast<T>(k * d);
        }
      }
    });
  });
}

at::Tensor weighted_l2_fwd_cpu(const at::Tensor& p, const at::Tensor& q, const at::Tensor& w,
                               const at::Tensor& x, const at::Tensor& y, const at::Tensor& xc,
                               const at::Tensor& pc) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.scalar_type(), "diffloss weighted_l2 forward", [&] {
        bool_dispatch(x.defined(), [&](auto has_x) {
          out = weighted_l2_fwd_kernel<scalar_t, decltype(has_x)::value>(p, q, w, x, y, xc, pc);
        });
      });
  return out;
}

void weighted_l2_bwd_cpu(const at::Tensor& g, const at::Tensor& p, const at::Tensor& q,
                         const at::Tensor& w, const at::Tensor& x, const at::Tensor& y,
                         const at::Tensor& xc, const at::Tensor& pc, const at::Tensor& gp,
                         const at::Tensor& gx) {
  const double gval = g.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.scalar_type(), "diffloss weighted_l2 backward", [&] {
        bool_dispatch(x.defined(), [&](auto has_x) {
          bool_dispatch(gp.defined(), [&](auto need_p) {
            bool_dispatch(gx.defined(), [&](auto need_x) {
              constexpr bool HX = decltype(has_x)::value;
              constexpr bool NX = HX && decltype(need_x)::value;
              weighted_l2_bwd_kernel<scalar_t, HX, decltype(need_p)::value, NX>(
                  gval, p, q, w, x, y, xc, pc, gp, gx);
            });
          });
        });
      });
}

// ------------------------------------------------------------------------------------------------
// Binding: validation, allocation, CPU / CUDA dispatch.

#ifdef DIFFLOSS_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "diffloss native: ", name, " is on ", t.device(),
              ", expected ", ref.device());
  TORCH_CHECK(t.device().is_cpu() || (kWithCuda && t.device().is_cuda()),
              "diffloss native: unsupported device ", t.device(),
              kWithCuda ? "" : " (this build has no CUDA kernels)");
}

void check_coef(const at::Tensor& c, const at::Tensor& ref, at::ScalarType acc, int64_t B,
                const char* name) {
  check_device(c, ref, name);
  TORCH_CHECK(c.dim() == 1 && c.size(0) == B && c.is_contiguous(), "diffloss native: ", name,
              " must be a contiguous 1-D tensor of ", B, " elements, got sizes ", c.sizes());
  TORCH_CHECK(c.scalar_type() == acc, "diffloss native: ", name, " must have dtype ", acc,
              ", got ", c.scalar_type());
}

void check_float(at::ScalarType t, const char* name) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "diffloss native: ", name, " must be float32, float64, float16 or bfloat16, got ",
              t);
}

// (B, ...) -> a 4-D view (B, d1, d2, d3): trailing unit dimensions, or dims >= 3 flattened
// (callers make tensors with more than 4 dimensions contiguous first, so that is a view).
at::Tensor to4d(const at::Tensor& t) {
  if (!t.defined()) return t;
  at::Tensor v = t;
  while (v.dim() < 4) v = v.unsqueeze(-1);
  if (v.dim() > 4) v = v.flatten(3);
  return v;
}

std::vector<at::Tensor> q_sample_pair_forward(const at::Tensor& restored, const at::Tensor& gt,
                                              const at::Tensor& noise,
                                              const at::Tensor& coef_signal,
                                              const at::Tensor& coef_noise, double scale,
                                              double offset, at::ScalarType out_dtype,
                                              bool channels_last) {
  TORCH_CHECK(restored.dim() == 4, "diffloss native q_sample_pair: restored must be 4-D, got ",
              restored.sizes());
  TORCH_CHECK(gt.sizes() == restored.sizes() && noise.sizes() == restored.sizes(),
              "diffloss native q_sample_pair: restored, gt and noise must have one shape, got ",
              restored.sizes(), ", ", gt.sizes(), ", ", noise.sizes());
  check_float(restored.scalar_type(), "restored");
  check_float(out_dtype, "out_dtype");
  TORCH_CHECK(gt.scalar_type() == restored.scalar_type() &&
                  noise.scalar_type() == restored.scalar_type(),
              "diffloss native q_sample_pair: restored, gt and noise must have one dtype");
  check_device(restored, restored, "restored");
  check_device(gt, restored, "gt");
  check_device(noise, restored, "noise");
  const auto acc = at::toOpMathType(restored.scalar_type());
  check_coef(coef_signal, restored, acc, restored.size(0), "coef_signal");
  check_coef(coef_noise, restored, acc, restored.size(0), "coef_noise");

  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto opts = restored.options().dtype(out_dtype).memory_format(fmt);
  at::Tensor out_r = at::empty(restored.sizes(), opts);
  at::Tensor out_g = at::empty(restored.sizes(), opts);
  if (restored.is_cuda()) {
#ifdef DIFFLOSS_WITH_CUDA
    q_sample_fwd_cuda(restored, gt, noise, coef_signal, coef_noise, scale, offset, out_r, out_g);
#endif
  } else {
    q_sample_fwd_cpu(restored, gt, noise, coef_signal, coef_noise, scale, offset, out_r, out_g);
  }
  return {out_r, out_g};
}

at::Tensor q_sample_pair_backward(const at::Tensor& grad, const at::Tensor& coef_signal,
                                  double scale, at::ScalarType in_dtype, bool channels_last) {
  TORCH_CHECK(grad.dim() == 4, "diffloss native q_sample_pair backward: grad must be 4-D, got ",
              grad.sizes());
  check_float(grad.scalar_type(), "grad");
  check_float(in_dtype, "in_dtype");
  check_device(grad, grad, "grad");
  check_coef(coef_signal, grad, at::toOpMathType(in_dtype), grad.size(0), "coef_signal");
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor grad_r = at::empty(grad.sizes(), grad.options().dtype(in_dtype).memory_format(fmt));
  if (grad.is_cuda()) {
#ifdef DIFFLOSS_WITH_CUDA
    q_sample_bwd_cuda(grad, coef_signal, scale, grad_r);
#endif
  } else {
    q_sample_bwd_cpu(grad, coef_signal, scale, grad_r);
  }
  return grad_r;
}

struct L2Args {
  at::Tensor p, q, w, x, y, xc, pc;
  bool wide = false;  // more than 4 dims: made contiguous, viewed as 4-D
};

L2Args check_l2(const at::Tensor& p, const at::Tensor& q, const at::Tensor& w,
                const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& y,
                const std::optional<at::Tensor>& x_coef, const std::optional<at::Tensor>& p_coef) {
  TORCH_CHECK(p.dim() >= 1, "diffloss native weighted_l2: p must have a batch dimension");
  TORCH_CHECK(q.sizes() == p.sizes(), "diffloss native weighted_l2: q must have p's shape ",
              p.sizes(), ", got ", q.sizes());
  check_float(p.scalar_type(), "p");
  TORCH_CHECK(q.scalar_type() == p.scalar_type(),
              "diffloss native weighted_l2: p and q must have one dtype");
  check_device(p, p, "p");
  check_device(q, p, "q");
  const auto acc = at::toOpMathType(p.scalar_type());
  const int64_t B = p.size(0);
  check_coef(w, p, acc, B, "weight");
  const bool has_x = x.has_value() && x->defined();
  L2Args a;
  a.wide = p.dim() > 4;
  auto prep = [&](const at::Tensor& t) { return to4d(a.wide ? t.contiguous() : t); };
  a.p = prep(p);
  a.q = prep(q);
  a.w = w;
  if (has_x) {
    TORCH_CHECK(y.has_value() && y->defined() && x_coef.has_value() && x_coef->defined() &&
                    p_coef.has_value() && p_coef->defined(),
                "diffloss native weighted_l2: x needs y, x_coef and p_coef");
    TORCH_CHECK(x->sizes() == p.sizes() && y->sizes() == p.sizes(),
                "diffloss native weighted_l2: x and y must have p's shape");
    TORCH_CHECK(x->scalar_type() == p.scalar_type() && y->scalar_type() == p.scalar_type(),
                "diffloss native weighted_l2: p, q, x and y must have one dtype");
    check_device(*x, p, "x");
    check_device(*y, p, "y");
    check_coef(*x_coef, p, acc, B, "x_coef");
    check_coef(*p_coef, p, acc, B, "p_coef");
    a.x = prep(*x);
    a.y = prep(*y);
    a.xc = *x_coef;
    a.pc = *p_coef;
  }
  return a;
}

at::Tensor weighted_l2_forward(const at::Tensor& p, const at::Tensor& q, const at::Tensor& weight,
                               const std::optional<at::Tensor>& x,
                               const std::optional<at::Tensor>& y,
                               const std::optional<at::Tensor>& x_coef,
                               const std::optional<at::Tensor>& p_coef) {
  const L2Args a = check_l2(p, q, weight, x, y, x_coef, p_coef);
  if (p.is_cuda()) {
#ifdef DIFFLOSS_WITH_CUDA
    return weighted_l2_fwd_cuda(a.p, a.q, a.w, a.x, a.y, a.xc, a.pc);
#endif
  }
  return weighted_l2_fwd_cpu(a.p, a.q, a.w, a.x, a.y, a.xc, a.pc);
}

// Returns (grad_p, grad_x); each is None when not asked for (grad_x also when x is None).
std::tuple<at::Tensor, at::Tensor> weighted_l2_backward(
    const at::Tensor& grad, const at::Tensor& p, const at::Tensor& q, const at::Tensor& weight,
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& y,
    const std::optional<at::Tensor>& x_coef, const std::optional<at::Tensor>& p_coef, bool need_p,
    bool need_x) {
  const L2Args a = check_l2(p, q, weight, x, y, x_coef, p_coef);
  TORCH_CHECK(grad.numel() == 1 && grad.scalar_type() == a.w.scalar_type(),
              "diffloss native weighted_l2 backward: grad must be one element of dtype ",
              a.w.scalar_type());
  check_device(grad, p, "grad");
  need_x = need_x && a.x.defined();
  // Gradients get p's (and x's) layout when dense; contiguous for the > 4-D case.
  at::Tensor gp, gx;
  if (need_p) gp = a.wide ? at::empty(p.sizes(), p.options()) : at::empty_like(p);
  if (need_x) gx = a.wide ? at::empty(x->sizes(), x->options()) : at::empty_like(*x);
  if (need_p || need_x) {
    const at::Tensor gp4 = to4d(gp), gx4 = to4d(gx);
    if (p.is_cuda()) {
#ifdef DIFFLOSS_WITH_CUDA
      weighted_l2_bwd_cuda(grad, a.p, a.q, a.w, a.x, a.y, a.xc, a.pc, gp4, gx4);
#endif
    } else {
      weighted_l2_bwd_cpu(grad, a.p, a.q, a.w, a.x, a.y, a.xc, a.pc, gp4, gx4);
    }
  }
  return {gp, gx};
}

}  // namespace
}  // namespace diffloss_native

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace dn = diffloss_native;
  using release = py::call_guard<py::gil_scoped_release>;
  m.doc() = "diffloss_fast native kernels (C++ CPU, CUDA when built with it)";
  m.def("with_cuda", [] { return dn::kWithCuda; }, "Whether the CUDA kernels are compiled in.");
  m.def("q_sample_pair_forward", &dn::q_sample_pair_forward, release(), py::arg("restored"),
        py::arg("gt"), py::arg("noise"), py::arg("coef_signal"), py::arg("coef_noise"),
        py::arg("scale"), py::arg("offset"), py::arg("out_dtype"), py::arg("channels_last"));
  m.def("q_sample_pair_backward", &dn::q_sample_pair_backward, release(), py::arg("grad"),
        py::arg("coef_signal"), py::arg("scale"), py::arg("in_dtype"), py::arg("channels_last"));
  m.def("weighted_l2_forward", &dn::weighted_l2_forward, release(), py::arg("p"), py::arg("q"),
        py::arg("weight"), py::arg("x") = py::none(), py::arg("y") = py::none(),
        py::arg("x_coef") = py::none(), py::arg("p_coef") = py::none());
  m.def("weighted_l2_backward", &dn::weighted_l2_backward, release(), py::arg("grad"),
        py::arg("p"), py::arg("q"), py::arg("weight"), py::arg("x"), py::arg("y"),
        py::arg("x_coef"), py::arg("p_coef"), py::arg("need_p"), py::arg("need_x"));
}
