// Host-side layout helpers shared by the CPU and CUDA sources.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace diffloss_native {

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// True when all defined tensors are dense, non-overlapping, share one set of strides and keep
// the batch dimension outermost: sample b is then the block [b*M, (b+1)*M) of every tensor.
inline bool dense_same_layout(std::initializer_list<const at::Tensor*> ts) {
  const at::Tensor* ref = nullptr;
  for (const at::Tensor* t : ts) {
    if (t == nullptr || !t->defined()) continue;
    if (ref == nullptr) {
      ref = t;
      if (!t->is_non_overlapping_and_dense()) return false;
      const int64_t B = t->size(0);
      if (B > 1 && t->stride(0) * B != t->numel()) return false;
    } else if (t->strides() != ref->strides()) {
      return false;
    }
  }
  return true;
}

constexpr int kMaxT = 6;  // tensors walked together

// The logical (B, C, H, W) index of the strided paths, and each tensor's strides along it (all 0
// for an absent tensor). Plain data: passed by value to CUDA kernels.
struct Walk {
  int64_t size[4];
  int64_t stride[kMaxT][4];
};

// The batch dimension outermost and the inner three in the memory order of ``ref``.
inline Walk walk_in_order_of(const std::vector<const at::Tensor*>& ts, const at::Tensor& ref) {
  TORCH_INTERNAL_ASSERT(ts.size() <= static_cast<size_t>(kMaxT));
  std::array<int, 3> d{1, 2, 3};
  std::stable_sort(d.begin(), d.end(),
                   [&](int a, int b) { return ref.stride(a) > ref.stride(b); });
  const int perm[4] = {0, d[0], d[1], d[2]};
  Walk w{};
  for (int k = 0; k < 4; ++k) w.size[k] = ref.size(perm[k]);
  for (size_t t = 0; t < ts.size(); ++t)
    for (int k = 0; k < 4; ++k)
      w.stride[t][k] = (ts[t] != nullptr && ts[t]->defined()) ? ts[t]->stride(perm[k]) : 0;
  return w;
}

}  // namespace diffloss_native
