// Launchers of the class_means CUDA kernels (pure CUDA: no ATen types cross this boundary).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ddfast {
// means_out (C, D) in the input dtype: mean of the rows perm[offsets[c]:offsets[c+1]] of x (N, D).
void class_means_forward_cuda(const void* x, const int64_t* perm, const int64_t* offsets, int64_t num_classes,
                              int64_t d, int dtype, void* means_out, cudaStream_t stream);
// grad_x (N, D, input dtype) = coef[y_i] * grad_means[y_i]; grad_means (C, D) and coef (C) in the
// accumulation dtype (fp64 for fp64 inputs, else fp32).
void class_means_backward_cuda(const void* grad_means, const void* coef, const int64_t* labels, int64_t num_classes,
                               int64_t n, int64_t d, int dtype, void* grad_x, cudaStream_t stream);
}  // namespace ddfast
