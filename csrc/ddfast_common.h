// Shared helpers for the per-op C++ sources (each csrc/<op>.cpp is its own shared library).
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#define DDFAST_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define DDFAST_CHECK_SAME_DEVICE(a, b) \
  TORCH_CHECK((a).device() == (b).device(), #a " and " #b " must be on the same device")

namespace ddfast {

// dtype codes passed to the pure-CUDA launchers in csrc/cuda (they see no ATen types).
enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

inline int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "ddfast: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

// Accumulation type: fp32 for half types and float, fp64 for double.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace ddfast
