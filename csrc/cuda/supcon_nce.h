// Launchers of the supcon_nce CUDA kernels (pure CUDA: no ATen types cross this boundary).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ddfast {
// z_syn (n_syn x dim), z_real (n_real x dim): row-major, dtype code (see ddfast_common.h); labels int64.
// Writes per-anchor loss, lse_all, lse_pos (n_syn each, accumulation dtype: fp64 for fp64 inputs,
// else fp32). infonce: lse_pos = -inf and loss = 0 for anchors without a positive. nce: the lse
// outputs are zeros.
void supcon_nce_forward_cuda(const void* z_syn, const int64_t* y_syn, const void* z_real, const int64_t* y_real,
                             int64_t n_syn, int64_t n_real, int64_t dim, int dtype, double inv_temp, bool nce,
                             double log_c, void* loss, void* lse_all, void* lse_pos, cudaStream_t stream);
// g, lse_all, lse_pos: (n_syn,) accumulation dtype. grad_syn / grad_real: input dtype, same shapes as z.
void supcon_nce_backward_cuda(const void* g, const void* z_syn, const int64_t* y_syn, const void* z_real,
                              const int64_t* y_real, const void* lse_all, const void* lse_pos, int64_t n_syn,
                              int64_t n_real, int64_t dim, int dtype, double inv_temp, bool nce, double log_c,
                              void* grad_syn, void* grad_real, cudaStream_t stream);
}  // namespace ddfast
