// Launchers of the mmd CUDA kernels (pure CUDA: no ATen types cross this boundary).
// z (rows, dim) in the input dtype (see ddfast_common.h dtype codes), rows sorted by class;
// sq (rows,), coefs (num_bw,) 1/(2 s^2), grad (rows, 2), out (rows, 2) and workspace (rows, dim) in the
// accumulation dtype (fp64 for fp64 inputs, else fp32). cls int64 (rows,), side int32 (rows,)
// (0 = x, 1 = y), offsets int64 (C+1,) class row ranges.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ddfast {
// out[i] = {sum over same-class x columns j of k(z_i, z_j), same over y columns}; the diagonal is
// left out when `unbiased`.
void mmd_forward_cuda(const void* z, const void* sq, const int64_t* cls, const int32_t* side, const int64_t* offsets,
                      const void* coefs, int64_t num_bw, int64_t rows, int64_t dim, bool linear, bool unbiased,
                      int dtype, void* out, cudaStream_t stream);
// workspace (zero-initialised by the caller) += d(sum_i grad[i] . out[i]) / d z_i.
void mmd_backward_cuda(const void* grad, const void* z, const void* sq, const int64_t* cls, const int32_t* side,
                       const int64_t* offsets, const void* coefs, int64_t num_bw, int64_t rows, int64_t dim,
                       bool linear, bool unbiased, int dtype, void* workspace, cudaStream_t stream);
}  // namespace ddfast
