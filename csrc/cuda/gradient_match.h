// Launchers of the gradient_match CUDA kernels (pure CUDA: no ATen types cross this boundary).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ddfast {

// Columns per segment: a longer DC row is split over several warps and re-joined by the fold.
constexpr int64_t kGradientMatchSegment = 8192;

// Device table (int64), one array per field, built by csrc/gradient_match.cpp:
//   addr[3K]      data addresses: syn[0..K), real[K..2K), grad_out[2K..3K) (backward only)
//   gnumel[K]     elements of one group of tensor k (group stride)
//   seg[4S]       per segment: tensor k [0,S), offset in the group [S,2S), length [2S,3S), row [3S,4S)
//                 (row −1: rank-1 tensor under "ours", gradient 0; row 0 for mse/cos)
//   rows[2R]      per DC row (ours): first segment [0,R), segment count [R,2R)
struct GradientMatchTable {
  const int64_t* addr;
  const int64_t* gnumel;
  const int64_t* seg;
  const int64_t* rows;
  int64_t num_tensors, num_segs, num_rows, coef_rows, groups;
};

// metric: 0 ours, 1 mse, 2 cos. `partials` holds (P·S + 1)·G accumulators, P = 1 for mse, else 3
// (accumulation dtype: fp64 for fp64 inputs, else fp32): the partial planes, then G group distances.
// `counters` holds G + 1 unsigned zeros, left at zero by the launch. One launch: writes the (G,)
// distances (sum_groups=false) or their sum to `loss` (input dtype) and the gradient coefficients
// [2, G, coef_rows] to `coefs` (accumulation dtype).
void gradient_match_forward_cuda(const GradientMatchTable& table, int metric, int dtype, double eps, bool sum_groups,
                                 void* partials, unsigned* counters, void* loss, void* coefs, cudaStream_t stream);
// grad_syn = go[g·grad_stride] · (A·s − B·r) for every segment and group (grad_stride 0: scalar go).
void gradient_match_backward_cuda(const GradientMatchTable& table, int dtype, const void* grad, int64_t grad_stride,
                                  const void* coefs, cudaStream_t stream);

}  // namespace ddfast
