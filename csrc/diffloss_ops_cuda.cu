// CUDA kernels of the two fused DiffLoss ops. Same contracts as the CPU kernels in
// diffloss_ops.cpp (which validates the arguments, allocates the outputs and calls the
// *_cuda functions below); the definitions are the torch twins in diffloss_fast/ops/.
//
// - elementwise kernels (q_sample_pair forward / backward, weighted_l2 backward): grid-stride
//   loops over the elements in the memory order of the output; a FAST instantiation for the
//   case where every tensor is dense with one set of strides (index = linear offset), a strided
//   one otherwise (logical (B, C, H, W) index -> each tensor's offset).
// - weighted_l2 forward: deterministic two-stage reduction, no atomics. Stage 1: one block per
//   (sample, chunk of kChunk elements) sums d^2 in opmath (fp32, fp64 for fp64) and writes its
//   partial to its own slot; stage 2: one block sums weight[b] * partial in fp64 in a fixed
//   order and writes the result. The partition depends on the shape only (not on the device), so
//   the result is reproducible run to run and card to card.
// Arithmetic in at::opmath_type<scalar_t>: fp32 for fp32/fp16/bf16, fp64 for fp64.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>

#include "layout.h"

namespace diffloss_native {
namespace {

constexpr int kThreads = 256;     // threads per block (a power of two: tree reductions)
constexpr int64_t kChunk = 4096;  // elements of one sample per stage-1 block (16 per thread)

Walk make_walk(std::initializer_list<const at::Tensor*> ts, const at::Tensor& ref) {
  return walk_in_order_of(std::vector<const at::Tensor*>(ts), ref);
}

// Calls f(in_t{}, out_t{}) for the element types of two dtypes (fp32/fp64/fp16/bf16 each): the
// noising reads one dtype and writes another.
template <typename F>
void dispatch_q_sample(at::ScalarType in, at::ScalarType out, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in, "diffloss q_sample_pair cuda", [&] {
        using in_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out,
                                        "diffloss q_sample_pair cuda (out)",
                                        [&] { f(in_t{}, scalar_t{}); });
      });
}

// Offsets of element r (in Walk order) of sample b in every tensor.
__device__ __forceinline__ void locate(const Walk& w, int64_t b, int64_t r, int64_t* off) {
  const int64_t i3 = r % w.size[3];
  r /= w.size[3];
  const int64_t i2 = r % w.size[2];
  const int64_t i1 = r / w.size[2];
#pragma unroll
  for (int t = 0; t < kMaxT; ++t)
    off[t] = b * w.stride[t][0] + i1 * w.stride[t][1] + i2 * w.stride[t][2] + i3 * w.stride[t][3];
}

template <bool FAST>
__device__ __forceinline__ void offsets(const Walk& w, int64_t l, int64_t b, int64_t M,
                                        int64_t* off) {
  if constexpr (FAST) {
#pragma unroll
    for (int t = 0; t < kMaxT; ++t) off[t] = l;
  } else {
    locate(w, b, l - b * M, off);
  }
}

// Grid for a grid-stride loop over n elements on the current device (at most 16 blocks per SM).
int grid_for(int64_t n) {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(div_up(n, kThreads), static_cast<int64_t>(sms) * 16)));
}

// ------------------------------------------------------------------------------------------------
// q_sample_pair. Tensor order in the Walk: restored, gt, noise, out_r, out_g.

template <typename in_t, typename out_t, bool FAST>
__global__ void q_sample_fwd_kernel(const in_t* __restrict__ r, const in_t* __restrict__ g,
                                    const in_t* __restrict__ n,
                                    const at::opmath_type<in_t>* __restrict__ cs,
                                    const at::opmath_type<in_t>* __restrict__ cn,
                                    at::opmath_type<in_t> s, at::opmath_type<in_t> o,
                                    out_t* __restrict__ out_r, out_t* __restrict__ out_g,
                                    int64_t total, int64_t M, Walk w) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; l < total;
       l += step) {
    const int64_t b = l / M;
    int64_t off[kMaxT];
    offsets<FAST>(w, l, b, M, off);
    const acc_t a = cs[b];
    const acc_t kn = cn[b] * static_cast<acc_t>(n[off[2]]);
    out_r[off[3]] = static_cast<out_t>(a * (s * static_cast<acc_t>(r[off[0]]) + o) + kn);
    out_g[off[4]] = static_cast<out_t>(a * (s * static_cast<acc_t>(g[off[1]]) + o) + kn);
  }
}

// grad_r = (grad * coef_signal[b]) * scale. Walk order: grad, grad_r.
template <typename in_t, typename out_t, bool FAST>
__global__ void q_sample_bwd_kernel(const out_t* __restrict__ grad,
                                    const at::opmath_type<in_t>* __restrict__ cs,
                                    at::opmath_type<in_t> s, in_t* __restrict__ grad_r,
                                    int64_t total, int64_t M, Walk w) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; l < total;
       l += step) {
    const int64_t b = l / M;
    int64_t off[kMaxT];
    offsets<FAST>(w, l, b, M, off);
    grad_r[off[1]] = static_cast<in_t>(static_cast<acc_t>(grad[off[0]]) * cs[b] * s);
  }
}

// ------------------------------------------------------------------------------------------------
// weighted_l2. Walk order: p, q, x, y, grad_p, grad_x.

template <typename T, bool HAS_X, bool FAST>
__global__ void weighted_l2_partial_kernel(const T* __restrict__ p, const T* __restrict__ q,
                                           const T* __restrict__ x, const T* __restrict__ y,
                                           const at::opmath_type<T>* __restrict__ xc,
                                           const at::opmath_type<T>* __restrict__ pc,
                                           at::opmath_type<T>* __restrict__ partial, int64_t M,
                                           int64_t nchunk, Walk w) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t sh[kThreads];
  const int64_t task = blockIdx.x;
  const int64_t b = task / nchunk;
  const int64_t lo = (task % nchunk) * kChunk;
  const int64_t hi = lo + kChunk < M ? lo + kChunk : M;
  acc_t xcb = acc_t(0), pcb = acc_t(0);
  if constexpr (HAS_X) {
    xcb = xc[b];
    pcb = pc[b];
  }
  acc_t sum = acc_t(0);
  for (int64_t r = lo + threadIdx.x; r < hi; r += blockDim.x) {
    int64_t off[kMaxT];
    offsets<FAST>(w, b * M + r, b, M, off);
    acc_t d = static_cast<acc_t>(p[off[0]]) - static_cast<acc_t>(q[off[1]]);
    if constexpr (HAS_X)
      d = xcb * (static_cast<acc_t>(x[off[2]]) - static_cast<acc_t>(y[off[3]])) - pcb * d;
    sum += d * d;
  }
  sh[threadIdx.x] = sum;
  __syncthreads();
  for (int h = kThreads / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) sh[threadIdx.x] += sh[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[task] = sh[0];
}

// One block: out = sum_j weight[j / nchunk] * partial[j] / numel, in fp64, fixed order.
template <typename acc_t>
__global__ void weighted_l2_final_kernel(const acc_t* __restrict__ partial,
                                         const acc_t* __restrict__ weight, int64_t ntask,
                                         int64_t nchunk, double numel, acc_t* __restrict__ out) {
  __shared__ double sh[kThreads];
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < ntask; j += blockDim.x)
    sum += static_cast<double>(weight[j / nchunk]) * static_cast<double>(partial[j]);
  sh[threadIdx.x] = sum;
  __syncthreads();
  for (int h = kThreads / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) sh[threadIdx.x] += sh[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<acc_t>(sh[0] / numel);  // 0/0 = NaN, like the twin
}

// G = 2 * g * weight[b] / N * d;  x None: grad_p = G;  x given: grad_x = G * x_coef[b],
// grad_p = -G * p_coef[b]. gp / gx are null when not needed.
template <typename T, bool HAS_X, bool FAST>
__global__ void weighted_l2_bwd_kernel(const at::opmath_type<T>* __restrict__ g,
                                       const T* __restrict__ p, const T* __restrict__ q,
                                       const T* __restrict__ x, const T* __restrict__ y,
                                       const at::opmath_type<T>* __restrict__ weight,
                                       const at::opmath_type<T>* __restrict__ xc,
                                       const at::opmath_type<T>* __restrict__ pc,
                                       T* __restrict__ gp, T* __restrict__ gx, int64_t total,
                                       int64_t M, double two_over_n, Walk w) {
  using acc_t = at::opmath_type<T>;
  const double g2n = two_over_n * static_cast<double>(g[0]);
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; l < total;
       l += step) {
    const int64_t b = l / M;
    int64_t off[kMaxT];
    offsets<FAST>(w, l, b, M, off);
    const acc_t k = static_cast<acc_t>(g2n * static_cast<double>(weight[b]));
    acc_t d = static_cast<acc_t>(p[off[0]]) - static_cast<acc_t>(q[off[1]]);
    if constexpr (HAS_X) {
      const acc_t kx = xc[b];
      const acc_t kp = -pc[b];
      d = kx * (static_cast<acc_t>(x[off[2]]) - static_cast<acc_t>(y[off[3]])) + kp * d;
      const acc_t t = k * d;
      if (gx != nullptr) gx[off[5]] = static_cast<T>(t * kx);
      if (gp != nullptr) gp[off[4]] = static_cast<T>(t * kp);
    } else {
      if (gp != nullptr) gp[off[4]] = static_cast<T>(k * d);
    }
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mptr(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Entry points (declared in diffloss_ops.cpp). Arguments are validated there: one device, 4-D,
// one dtype for the data tensors, contiguous 1-D opmath coefficients of B elements.

void q_sample_fwd_cuda(const at::Tensor& r, const at::Tensor& g, const at::Tensor& n,
                       const at::Tensor& cs, const at::Tensor& cn, double scale, double offset,
                       const at::Tensor& out_r, const at::Tensor& out_g) {
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t total = r.numel();
  if (total == 0) return;
  const int64_t M = total / r.size(0);
  const bool fast = dense_same_layout({&out_r, &out_g, &r, &g, &n});
  const Walk w = make_walk({&r, &g, &n, &out_r, &out_g}, out_r);
  const int grid = grid_for(total);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_q_sample(r.scalar_type(), out_r.scalar_type(), [&](auto in, auto out) {
    using in_t = decltype(in);
    using out_t = decltype(out);
    using acc_t = at::opmath_type<in_t>;
    auto kernel = fast ? &q_sample_fwd_kernel<in_t, out_t, true>
                       : &q_sample_fwd_kernel<in_t, out_t, false>;
    kernel<<<grid, kThreads, 0, stream>>>(
        r.const_data_ptr<in_t>(), g.const_data_ptr<in_t>(), n.const_data_ptr<in_t>(),
        cs.const_data_ptr<acc_t>(), cn.const_data_ptr<acc_t>(), static_cast<acc_t>(scale),
        static_cast<acc_t>(offset), out_r.mutable_data_ptr<out_t>(),
        out_g.mutable_data_ptr<out_t>(), total, M, w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void q_sample_bwd_cuda(const at::Tensor& grad, const at::Tensor& cs, double scale,
                       const at::Tensor& grad_r) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t total = grad.numel();
  if (total == 0) return;
  const int64_t M = total / grad.size(0);
  const bool fast = dense_same_layout({&grad_r, &grad});
  const Walk w = make_walk({&grad, &grad_r}, grad_r);
  const int grid = grid_for(total);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_q_sample(grad_r.scalar_type(), grad.scalar_type(), [&](auto in, auto out) {
    using in_t = decltype(in);
    using out_t = decltype(out);
    using acc_t = at::opmath_type<in_t>;
    auto kernel = fast ? &q_sample_bwd_kernel<in_t, out_t, true>
                       : &q_sample_bwd_kernel<in_t, out_t, false>;
    kernel<<<grid, kThreads, 0, stream>>>(
        grad.const_data_ptr<out_t>(), cs.const_data_ptr<acc_t>(), static_cast<acc_t>(scale),
        grad_r.mutable_data_ptr<in_t>(), total, M, w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor weighted_l2_fwd_cuda(const at::Tensor& p, const at::Tensor& q, const at::Tensor& wt,
                                const at::Tensor& x, const at::Tensor& y, const at::Tensor& xc,
                                const at::Tensor& pc) {
  const c10::cuda::CUDAGuard guard(p.device());
  const auto acc = at::toOpMathType(p.scalar_type());
  const int64_t B = p.size(0);
  const int64_t M = B > 0 ? p.numel() / B : 0;
  const int64_t nchunk = div_up(M, kChunk);
  const int64_t ntask = B * nchunk;
  TORCH_CHECK(ntask <= INT32_MAX, "diffloss native weighted_l2: too many elements per batch");
  at::Tensor partial = at::empty({ntask}, p.options().dtype(acc));
  at::Tensor out = at::empty({}, p.options().dtype(acc));
  const bool has_x = x.defined();
  const bool fast = dense_same_layout({&p, &q, &x, &y});
  const Walk w = make_walk({&p, &q, &x, &y}, p);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.scalar_type(), "diffloss weighted_l2 forward cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (ntask > 0) {
          auto kernel =
              has_x ? (fast ? &weighted_l2_partial_kernel<scalar_t, true, true>
                            : &weighted_l2_partial_kernel<scalar_t, true, false>)
                    : (fast ? &weighted_l2_partial_kernel<scalar_t, false, true>
                            : &weighted_l2_partial_kernel<scalar_t, false, false>);
          kernel<<<static_cast<unsigned int>(ntask), kThreads, 0, stream>>>(
              p.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), cptr<scalar_t>(x),
              cptr<scalar_t>(y), cptr<acc_t>(xc), cptr<acc_t>(pc),
              partial.mutable_data_ptr<acc_t>(), M, nchunk, w);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        weighted_l2_final_kernel<acc_t><<<1, kThreads, 0, stream>>>(
            cptr<acc_t>(partial), wt.const_data_ptr<acc_t>(), ntask, nchunk,
            static_cast<double>(p.numel()), out.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

void weighted_l2_bwd_cuda(const at::Tensor& g, const at::Tensor& p, const at::Tensor& q,
                          const at::Tensor& wt, const at::Tensor& x, const at::Tensor& y,
                          const at::Tensor& xc, const at::Tensor& pc, const at::Tensor& gp,
                          const at::Tensor& gx) {
  const c10::cuda::CUDAGuard guard(p.device());
  const int64_t total = p.numel();
  if (total == 0 || (!gp.defined() && !gx.defined())) return;
  const int64_t M = total / p.size(0);
  const bool has_x = x.defined();
  const bool fast = dense_same_layout({&p, &q, &x, &y, &gp, &gx});
  const Walk w = make_walk({&p, &q, &x, &y, &gp, &gx}, gp.defined() ? gp : gx);
  const int grid = grid_for(total);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.scalar_type(), "diffloss weighted_l2 backward cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto kernel = has_x ? (fast ? &weighted_l2_bwd_kernel<scalar_t, true, true>
                                    : &weighted_l2_bwd_kernel<scalar_t, true, false>)
                            : (fast ? &weighted_l2_bwd_kernel<scalar_t, false, true>
                                    : &weighted_l2_bwd_kernel<scalar_t, false, false>);
        kernel<<<grid, kThreads, 0, stream>>>(
            g.const_data_ptr<acc_t>(), p.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
            cptr<scalar_t>(x), cptr<scalar_t>(y), wt.const_data_ptr<acc_t>(), cptr<acc_t>(xc),
            cptr<acc_t>(pc), mptr<scalar_t>(gp), mptr<scalar_t>(gx), total, M,
            2.0 / static_cast<double>(total), w);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace diffloss_native
