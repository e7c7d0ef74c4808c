// Launchers of the bn_stat CUDA kernels (pure CUDA: no ATen types cross this boundary).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ddfast {
// Number of partial blocks per channel for x viewed as (N, C, S).
int64_t bn_stat_num_splits(int64_t n, int64_t s);
// Writes per (channel, split) partial count, mean and M2 (each (C, splits), accumulation dtype:
// fp64 for fp64 inputs, else fp32), reading x once.
void bn_stat_forward_cuda(const void* x, int64_t n, int64_t c, int64_t s, int64_t splits, int dtype, void* count_out,
                          void* mean_out, void* m2_out, cudaStream_t stream);
// One block: Chan's merge of the (C, splits) partials into mean and biased var (C each) and the loss
// ‖mean − rm‖₂ + ‖var − rv‖₂ (0-dim); every buffer in the accumulation dtype (fp64 if fp64).
void bn_stat_finalize_cuda(const void* count, const void* pmean, const void* pm2, const void* rm, const void* rv,
                           int64_t c, int64_t splits, bool fp64, void* mean_out, void* var_out, void* loss_out,
                           cudaStream_t stream);
// One block: the backward coefficients a, b (C each) from the incoming gradient (0-dim), mean, var,
// rm, rv and the element count m per channel; accumulation dtype throughout.
void bn_stat_coefficients_cuda(const void* grad, const void* mean, const void* var, const void* rm, const void* rv,
                               int64_t c, int64_t m, bool fp64, void* a_out, void* b_out, cudaStream_t stream);
// grad_x = a[c] + b[c] * (x − mean[c]); a, b, mean in the accumulation dtype.
void bn_stat_backward_cuda(const void* x, const void* a, const void* b, const void* mean, int64_t n, int64_t c,
                           int64_t s, int dtype, void* grad_x, cudaStream_t stream);
}  // namespace ddfast
