// Device kernels shared by class_means.cu and class_mean_loss.cu (each its own library).
// Rows arrive grouped by class through `perm`/`offsets` (a stable sort done by the caller), so a
// block reduces the rows of one class over kCols features: each feature read once, fp32 (fp64)
// accumulation, no atomics. Backward: grad[i] = coef[y_i] * G[y_i], one block row per sample row.
// Both read 16-byte vectors (vec16.cuh) where the rows allow it, element by element otherwise.
#pragma once
#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include "cuda_common.cuh"
#include "vec16.cuh"

namespace ddfast {
namespace segment_cuda {

constexpr int kColsPerThread = 8;  // consecutive features per thread: 1, 2 or 4 16-byte vectors
constexpr int kThreadCols = 32;    // threads across the features (one warp)
constexpr int kLanes = 8;          // row lanes per block
constexpr int kThreads = kThreadCols * kLanes;
constexpr int kCols = kThreadCols * kColsPerThread;  // features per block
static_assert(kThreads == kCols, "the epilogue gives each thread one feature");

// grid.x = C * dblocks. Without a reference: out = class mean (T). With one: out = mean − ref (Acc)
// for classes present on both sides (else 0) and partial[c * dblocks + pd] = Σ over the block of out².
template <typename T, typename Acc, bool kHasRef, typename Out>
__global__ void __launch_bounds__(kThreads) segment_mean_kernel(
    const T* __restrict__ x, const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets, int64_t num_classes,
    int64_t d, int64_t dblocks, Out* __restrict__ out, const Acc* __restrict__ ref,
    const int64_t* __restrict__ ref_counts, Acc* __restrict__ partial) {
  constexpr int V = Vec16<T>::kSize;
  static_assert(kColsPerThread % V == 0, "a thread's features are whole vectors");
  __shared__ Acc lane_sums[kLanes][kCols];  // [lane][j * kThreadCols + tcol]: conflict-free writes
  // 32-bit block index math: the grid has fewer than 2^31 blocks
  const unsigned c = blockIdx.x / static_cast<unsigned>(dblocks);
  const unsigned pd = blockIdx.x - c * static_cast<unsigned>(dblocks);
  if (c >= num_classes) return;
  const int tcol = threadIdx.x % kThreadCols, lane = threadIdx.x / kThreadCols;
  const int64_t col0 = static_cast<int64_t>(pd) * kCols + tcol * kColsPerThread;
  const int64_t start = offsets[c], end = offsets[c + 1];
  // whole vectors when every row start is 16-byte aligned (x aligned, d a multiple of V: col0 is
  // one) and all the thread's features lie inside the row
  const bool whole = misalignment16(x) == 0 && (d & (V - 1)) == 0 && col0 + kColsPerThread <= d;
  Acc acc[kColsPerThread] = {};
  for (int64_t r = start + lane; r < end; r += kLanes) {
    const T* row = x + perm[r] * d + col0;
    if (whole) {
#pragma unroll
      for (int v = 0; v < kColsPerThread / V; ++v) {
        const Vec16<T> xv = load16(row + v * V);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[v * V + j] += to_acc(xv.v[j]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j)
        if (col0 + j < d) acc[j] += to_acc(row[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kColsPerThread; ++j) lane_sums[lane][j * kThreadCols + tcol] = acc[j];
  __syncthreads();
  // epilogue: thread t owns feature pd * kCols + t (coalesced stores), summed over the lanes in order
  const int t = threadIdx.x;
  const int slot = (t % kColsPerThread) * kThreadCols + t / kColsPerThread;
  const int64_t col = static_cast<int64_t>(pd) * kCols + t;
  Acc total = 0;
  for (int l = 0; l < kLanes; ++l) total += lane_sums[l][slot];
  const int64_t count = end - start;
  const Acc mean = total / static_cast<Acc>(count > 0 ? count : 1);
  Acc sq = 0;
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
  if constexpr (kHasRef) {
    sq = block_sum<Acc, kThreads>(sq);  // fixed shuffle tree: deterministic
    if (threadIdx.x == 0) partial[c * dblocks + pd] = sq;
  }
}

// out[i, j] = coef[y_i] * g[y_i, j]; labels outside [0, C) give 0 (the host validated them).
// grid (n, column blocks): row i is blockIdx.x, no per-element index division; g (and out when it
// has g's type) is read (written) in 16-byte vectors when the rows share one misalignment.
template <typename T, typename Acc>
__global__ void gather_scale_kernel(const Acc* __restrict__ g, const Acc* __restrict__ coef,
                                    const int64_t* __restrict__ labels, int64_t num_classes, int64_t n, int64_t d,
                                    T* __restrict__ out) {
  constexpr int V = Vec16<Acc>::kSize;
  constexpr bool kSameType = std::is_same<T, Acc>::value;
  const int64_t i = blockIdx.x, c = labels[i];
  T* orow = out + i * d;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  if (c < 0 || c >= num_classes) {
    for (int64_t j = first; j < d; j += stride) orow[j] = from_acc<T, Acc>(Acc(0));
    return;
  }
  const Acc k = coef[c];
  const Acc* grow = g + c * d;
  int64_t head;
  if constexpr (kSameType) head = vec16_head(d, grow, static_cast<const Acc*>(orow));
  else head = vec16_head(d, grow, grow);  // out (a half type) is written element by element
  const int64_t nvec = (d - head) / V;
  for (int64_t j = first; j < head; j += stride) orow[j] = from_acc<T, Acc>(k * grow[j]);
  for (int64_t v = first; v < nvec; v += stride) {
    const int64_t at = head + v * V;
    const Vec16<Acc> gv = load16(grow + at);
    if constexpr (kSameType) {
      Vec16<Acc> o;
#pragma unroll
      for (int j = 0; j < V; ++j) o.v[j] = k * gv.v[j];
      store16(orow + at, o);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) orow[at + j] = from_acc<T, Acc>(k * gv.v[j]);
    }
  }
  for (int64_t j = head + nvec * V + first; j < d; j += stride) orow[j] = from_acc<T, Acc>(k * grow[j]);
}

inline int64_t dblocks_for(int64_t d) { return (d + kCols - 1) / kCols; }

// Column blocks of the gather grid: enough 256-thread blocks for one vector per thread, at most 65535.
inline unsigned gather_column_blocks(int64_t d) {
  const int64_t b = (d + 256 * 4 - 1) / (256 * 4);
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
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
  // one block row per sample: gridDim.x is at most 2^31 - 1 (the C++ callers check n)
  const dim3 grid(static_cast<unsigned>(n), gather_column_blocks(d));
  gather_scale_kernel<T, Acc><<<grid, 256, 0, stream>>>(
      static_cast<const Acc*>(g), static_cast<const Acc*>(coef), labels, num_classes, n, d, static_cast<T*>(out));
}

}  // namespace segment_cuda
}  // namespace ddfast
