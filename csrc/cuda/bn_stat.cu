// bn_stat: per-channel mean and biased variance of x (N, C, S) in one read, and the elementwise
// backward of SRe2L's ‖μ − rm‖₂ + ‖σ² − rv‖₂. Forward: block (channel, split) — each thread sums
// its elements shifted by the channel's first value (so the variance does not cancel), turns them
// into (count, mean, M2) and the block merges those with Chan's formula (warp shuffles, then shared
// memory). The host merges the splits the same way.
#include "bn_stat.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "cuda_common.cuh"

namespace ddfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kPerBlockTarget = 16384;  // elements per block before adding another split

template <typename Acc> struct Stats { Acc n, mean, m2; };

template <typename Acc> __device__ __forceinline__ Stats<Acc> merge(Stats<Acc> a, Stats<Acc> b) {
  const Acc n = a.n + b.n;
  if (n == Acc(0)) return a;
  const Acc delta = b.mean - a.mean;
  const Acc wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

template <typename Acc> __device__ Stats<Acc> block_merge(Stats<Acc> v) {
  __shared__ Acc sn[kThreads / 32], smean[kThreads / 32], sm2[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    Stats<Acc> o{__shfl_down_sync(0xffffffffu, v.n, off), __shfl_down_sync(0xffffffffu, v.mean, off),
                 __shfl_down_sync(0xffffffffu, v.m2, off)};
    v = merge(v, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { sn[warp] = v.n; smean[warp] = v.mean; sm2[warp] = v.m2; }
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? Stats<Acc>{sn[lane], smean[lane], sm2[lane]} : Stats<Acc>{0, 0, 0};
    for (int off = 16; off > 0; off >>= 1) {
      Stats<Acc> o{__shfl_down_sync(0xffffffffu, v.n, off), __shfl_down_sync(0xffffffffu, v.mean, off),
                   __shfl_down_sync(0xffffffffu, v.m2, off)};
      v = merge(v, o);
    }
  }
  return v;
}

// grid.x = C * splits; block (c, sp) covers elements [sp*chunk, (sp+1)*chunk) of channel c.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) partial_stats_kernel(const T* __restrict__ x, int64_t c_dim, int64_t s,
                                                                 int64_t m, int64_t splits, int64_t chunk,
                                                                 Acc* __restrict__ count_out, Acc* __restrict__ mean_out,
                                                                 Acc* __restrict__ m2_out) {
  const int64_t c = blockIdx.x / splits, sp = blockIdx.x % splits;
  if (c >= c_dim) return;
  const int64_t lo = sp * chunk;
  const int64_t hi = lo + chunk < m ? lo + chunk : m;
  const Acc shift = to_acc(x[c * s]);
  Acc sum = 0, sumsq = 0, cnt = 0;
  for (int64_t e = lo + threadIdx.x; e < hi; e += kThreads) {
    const int64_t ni = e / s, si = e - ni * s;
    const Acc d = to_acc(x[(ni * c_dim + c) * s + si]) - shift;
    sum += d;
    sumsq += d * d;
    cnt += Acc(1);
  }
  Stats<Acc> st{cnt, Acc(0), Acc(0)};
  if (cnt > Acc(0)) {
    const Acc md = sum / cnt;
    Acc m2 = sumsq - sum * md;
    st = {cnt, shift + md, m2 > Acc(0) ? m2 : Acc(0)};
  }
  st = block_merge(st);
  if (threadIdx.x == 0) {
    const int64_t o = c * splits + sp;
    count_out[o] = st.n;
    mean_out[o] = st.mean;
    m2_out[o] = st.m2;
  }
}

template <typename T, typename Acc>
__global__ void backward_kernel(const T* __restrict__ x, const Acc* __restrict__ a, const Acc* __restrict__ b,
                                const Acc* __restrict__ mean, int64_t c_dim, int64_t s, int64_t total,
                                T* __restrict__ out) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = (i / s) % c_dim;
    out[i] = from_acc<T, Acc>(a[c] + b[c] * (to_acc(x[i]) - mean[c]));
  }
}

int64_t chunk_for(int64_t m, int64_t splits) { return (m + splits - 1) / splits; }

template <typename T, typename Acc>
void forward_impl(const void* x, int64_t n, int64_t c, int64_t s, int64_t splits, void* count, void* mean, void* m2,
                  cudaStream_t stream) {
  const int64_t m = n * s;
  if (c == 0 || m == 0) return;
  partial_stats_kernel<T, Acc><<<static_cast<unsigned>(c * splits), kThreads, 0, stream>>>(
      static_cast<const T*>(x), c, s, m, splits, chunk_for(m, splits), static_cast<Acc*>(count),
      static_cast<Acc*>(mean), static_cast<Acc*>(m2));
}

template <typename T, typename Acc>
void backward_impl(const void* x, const void* a, const void* b, const void* mean, int64_t n, int64_t c, int64_t s,
                   void* out, cudaStream_t stream) {
  const int64_t total = n * c * s;
  if (total == 0) return;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  blocks = blocks > 65535 ? 65535 : blocks;
  backward_kernel<T, Acc><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const Acc*>(a), static_cast<const Acc*>(b), static_cast<const Acc*>(mean),
      c, s, total, static_cast<T*>(out));
}

}  // namespace

int64_t bn_stat_num_splits(int64_t n, int64_t s) {
  const int64_t m = n * s;
  int64_t splits = (m + kPerBlockTarget - 1) / kPerBlockTarget;
  return splits < 1 ? 1 : (splits > kMaxSplits ? kMaxSplits : splits);
}

void bn_stat_forward_cuda(const void* x, int64_t n, int64_t c, int64_t s, int64_t splits, int dtype, void* count_out,
                          void* mean_out, void* m2_out, cudaStream_t stream) {
  switch (dtype) {
    case 0: forward_impl<float, float>(x, n, c, s, splits, count_out, mean_out, m2_out, stream); break;
    case 1: forward_impl<double, double>(x, n, c, s, splits, count_out, mean_out, m2_out, stream); break;
    case 2: forward_impl<__half, float>(x, n, c, s, splits, count_out, mean_out, m2_out, stream); break;
    case 3: forward_impl<__nv_bfloat16, float>(x, n, c, s, splits, count_out, mean_out, m2_out, stream); break;
  }
}

void bn_stat_backward_cuda(const void* x, const void* a, const void* b, const void* mean, int64_t n, int64_t c,
                           int64_t s, int dtype, void* grad_x, cudaStream_t stream) {
  switch (dtype) {
    case 0: backward_impl<float, float>(x, a, b, mean, n, c, s, grad_x, stream); break;
    case 1: backward_impl<double, double>(x, a, b, mean, n, c, s, grad_x, stream); break;
    case 2: backward_impl<__half, float>(x, a, b, mean, n, c, s, grad_x, stream); break;
    case 3: backward_impl<__nv_bfloat16, float>(x, a, b, mean, n, c, s, grad_x, stream); break;
  }
}

}  // namespace ddfast
