// Launchers of the param_match CUDA kernels (pure CUDA: no ATen types cross this boundary).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ddfast {
// Writes loss = sum((s-t)^2) / sum((a-t)^2) to loss_out (input dtype) and the denominator to
// den_out (accumulation dtype: fp64 for fp64 inputs, else fp32). `workspace` holds 2 * blocks
// accumulators (see param_match_workspace_size).
int64_t param_match_workspace_size(int64_t n, int dtype);
void param_match_forward_cuda(const void* student, const void* start, const void* target, int64_t n, int dtype,
                              void* workspace, void* loss_out, void* den_out, cudaStream_t stream);
// grad_student = grad * 2 (s - t) / den
void param_match_backward_cuda(const void* grad, const void* student, const void* target, const void* den,
                               int64_t n, int dtype, void* grad_student, cudaStream_t stream);
}  // namespace ddfast
