// Device kernels shared by class_means.cu and class_mean_loss.cu (each its own library).
// Rows arrive grouped by class through `perm`/`offsets` (a stable sort done by the caller), so a
// block reduces the rows of one class over kCols features: each feature read once, fp32 (fp64)
// accumulation, no atomics. Backward: grad[i] = coef[y_i] * G[y_i], one grid-stride gather pass.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include "cuda_common.cuh"

namespace ddfast {
namespace segment_cuda {

constexpr int kCols = 64;   // features per block
constexpr int kLanes = 4;   // row lanes per block (kCols * kLanes threads)
constexpr int kThreads = kCols * kLanes;

// grid.x = C * dblocks. Without a reference: out = class mean (T). With one: out = mean − ref (Acc)
// for classes present on both sides (else 0) and partial[c * dblocks + pd] = Σ over the block of out².
template <typename T, typename Acc, bool kHasRef, typename Out>
__global__ void __launch_bounds__(kThreads) segment_mean_kernel(
    const T* __restrict__ x, const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets, int64_t num_classes,
    int64_t d, int64_t dblocks, Out* __restrict__ out, const Acc* __restrict__ ref,
    const int64_t* __restrict__ ref_counts, Acc* __restrict__ partial) {
  __shared__ Acc lane_sums[kLanes][kCols];
  const int64_t c = blockIdx.x / dblocks, pd = blockIdx.x % dblocks;
  if (c >= num_classes) return;
  const int col_in_block = threadIdx.x % kCols, lane = threadIdx.x / kCols;
  const int64_t col = pd * kCols + col_in_block;
  const int64_t start = offsets[c], end = offsets[c + 1];
  Acc acc = 0;
  if (col < d)
    for (int64_t r = start + lane; r < end; r += kLanes) acc += to_acc(x[perm[r] * d + col]);
  lane_sums[lane][col_in_block] = acc;
  __syncthreads();
  Acc sq = 0;
  if (lane == 0) {
    Acc total = 0;
    for (int l = 0; l < kLanes; ++l) total += lane_sums[l][col_in_block];
    const int64_t count = end - start;
    const Acc mean = total / static_cast<Acc>(count > 0 ? count : 1);
    if (col < d) {
      if constexpr (kHasRef) {
        const bool both = count > 0 && ref_counts[c] > 0;
        const Acc diff = both ? mean - ref[c * d + col] : Acc(0);
        out[c * d + col] = diff;
        sq = diff * diff;
      } else {
        out[c * d + col] = from_acc<Out, Acc>(mean);
      }
    }
  }
  if constexpr (kHasRef) {
    __syncthreads();  // lane_sums is reused for the block sum of squares
    if (lane == 0) lane_sums[0][col_in_block] = sq;
    __syncthreads();
    if (threadIdx.x == 0) {
      Acc total = 0;
      for (int i = 0; i < kCols; ++i) total += lane_sums[0][i];
      partial[c * dblocks + pd] = total;
    }
  }
}

// out[i, j] = coef[y_i] * g[y_i, j]; labels outside [0, C) give 0 (the host validated them).
template <typename T, typename Acc>
__global__ void gather_scale_kernel(const Acc* __restrict__ g, const Acc* __restrict__ coef,
                                    const int64_t* __restrict__ labels, int64_t num_classes, int64_t n, int64_t d,
                                    T* __restrict__ out) {
  const int64_t total = n * d;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = idx / d, j = idx - i * d;
    const int64_t c = labels[i];
    const Acc v = (c >= 0 && c < num_classes) ? coef[c] * g[c * d + j] : Acc(0);
    out[idx] = from_acc<T, Acc>(v);
  }
}

inline int64_t dblocks_for(int64_t d) { return (d + kCols - 1) / kCols; }

inline int gather_blocks(int64_t total) {
  const int64_t b = (total + 255) / 256;
  return static_cast<int>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
}

template <typename T, typename Acc, bool kHasRef, typename Out>
void launch_segment(const void* x, const int64_t* perm, const int64_t* offsets, int64_t num_classes, int64_t d,
                    void* out, const void* ref, const int64_t* ref_counts, void* partial, cudaStream_t stream) {
  const int64_t dblocks = dblocks_for(d);
  const int64_t blocks = num_classes * dblocks;
  if (blocks == 0) return;
  segment_mean_kernel<T, Acc, kHasRef, Out><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(x), perm, offsets, num_classes, d, dblocks, static_cast<Out*>(out),
      static_cast<const Acc*>(ref), ref_counts, static_cast<Acc*>(partial));
}

template <typename T, typename Acc>
void launch_gather(const void* g, const void* coef, const int64_t* labels, int64_t num_classes, int64_t n, int64_t d,
                   void* out, cudaStream_t stream) {
  if (n * d == 0) return;
  gather_scale_kernel<T, Acc><<<gather_blocks(n * d), 256, 0, stream>>>(
      static_cast<const Acc*>(g), static_cast<const Acc*>(coef), labels, num_classes, n, d, static_cast<T*>(out));
}

}  // namespace segment_cuda
}  // namespace ddfast
