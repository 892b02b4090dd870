// Host-side layout helpers shared by the CPU and CUDA sources.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>

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

}  // namespace diffloss_native
