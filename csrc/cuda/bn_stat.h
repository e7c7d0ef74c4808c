// Launchers of the bn_stat CUDA kernels (pure CUDA: no ATen types cross this boundary).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace ddfast {
// Number of partial blocks per channel for x viewed as (N, C, S).
int64_t bn_stat_num_splits(int64_t n, int64_t s);

// Forward workspace, one buffer: the squared deviations (2·C doubles) at 0, the (count, mean, M2)
// partials (3·C·splits, accumulation dtype) at partials_offset, the C + 1 int32 arrival counters at
// counters_offset. The counters must be zero when the forward starts (the caller memsets them).
struct BnStatWorkspace {
  size_t partials_offset, counters_offset, bytes;
};
BnStatWorkspace bn_stat_workspace(int64_t c, int64_t splits, bool fp64);

// One launch: per-channel mean and biased var (C each) and loss ‖mean − rm‖₂ + ‖var − rv‖₂ (0-dim),
// reading x once; rm, rv and the outputs in the accumulation dtype (fp64 for fp64 x, else fp32).
void bn_stat_forward_cuda(const void* x, int64_t n, int64_t c, int64_t s, int64_t splits, int dtype, const void* rm,
                          const void* rv, void* workspace, void* mean_out, void* var_out, void* loss_out,
                          cudaStream_t stream);
// One launch: grad_x = a_c + b_c (x − mean_c) with a_c, b_c from the incoming gradient (0-dim), mean,
// var, rm, rv (accumulation dtype) recomputed in every block of a grid capped at the blocks resident at
// once on the current device (occupancy of the launched instance).
void bn_stat_backward_cuda(const void* grad, const void* x, const void* mean, const void* var, const void* rm,
                           const void* rv, int64_t n, int64_t c, int64_t s, int dtype, void* grad_x,
                           cudaStream_t stream);
}  // namespace ddfast
