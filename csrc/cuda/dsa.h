// Launchers of the dsa CUDA kernels (pure CUDA: no ATen types cross this boundary).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ddfast {
// One DSA stage on contiguous (N, C, H, W) images x of dtype code `dtype` (0 f32, 1 f64, 2 f16, 3 bf16).
// iparams: int32 (N, 5) [op, a, b, c, d]; fparams: (N, 6) and base: W + H affine_grid coordinates,
// both in the accumulation type (fp64 for f64, else fp32). `means` (N, accumulation type) is
// workspace for contrast's per-image mean. Writes y (dtype of x).
void dsa_forward_cuda(const void* x, const void* iparams, const void* fparams, const void* base, int64_t N,
                      int64_t C, int64_t H, int64_t W, bool align_corners, int dtype, void* means, void* y,
                      cudaStream_t stream);
// Gradient of that stage: grad_x (accumulation type, must be zeroed: the bilinear op scatters with
// atomicAdd) from grad_y (dtype of x). `sums` (N, accumulation type) is workspace.
void dsa_backward_cuda(const void* grad_y, const void* iparams, const void* fparams, const void* base, int64_t N,
                       int64_t C, int64_t H, int64_t W, bool align_corners, int dtype, void* sums, void* grad_x,
                       cudaStream_t stream);
}  // namespace ddfast
