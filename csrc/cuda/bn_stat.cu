// bn_stat: per-channel mean and biased variance of x (N, C, S) in one read, and the elementwise
// backward of SRe2L's ‖μ − rm‖₂ + ‖σ² − rv‖₂. Forward: block (channel, split) — each thread sums
// its elements shifted by the channel's first value (so the variance does not cancel), turns them
// into (count, mean, M2) and the block merges those with Chan's formula (warp shuffles, then shared
// memory). A one-block epilogue kernel merges the splits the same way (fp64) and writes μ, σ² and
// the loss ‖μ − rm‖₂ + ‖σ² − rv‖₂ (fp64 sums in a fixed order: deterministic); the backward's
// one-block kernel folds the norms and the incoming gradient into a_c, b_c. No host sync, two
// launches each way.
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
  // e = ni·s + si (0 ≤ si < s) is advanced by kThreads = step_n·s + step_s with one carry: the
  // divisions run once per thread, not per element (a 64-bit division per element spilled)
  int64_t e = lo + threadIdx.x;
  int64_t ni = e / s, si = e - ni * s;
  const int64_t step_n = kThreads / s, step_s = kThreads - step_n * s;
  for (; e < hi; e += kThreads) {
    const Acc d = to_acc(x[(ni * c_dim + c) * s + si]) - shift;
    sum += d;
    sumsq += d * d;
    cnt += Acc(1);
    ni += step_n;
    si += step_s;
    if (si >= s) {
      si -= s;
      ++ni;
    }
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

// Index: uint32_t when total + the grid stride fits (the launcher checks), so the per-element
// channel index is a 32-bit division, not a 64-bit one; int64_t otherwise.
template <typename T, typename Acc, typename Index>
__global__ void backward_kernel(const T* __restrict__ x, const Acc* __restrict__ a, const Acc* __restrict__ b,
                                const Acc* __restrict__ mean, Index c_dim, Index s, Index total,
                                T* __restrict__ out) {
  for (Index i = blockIdx.x * (Index)blockDim.x + threadIdx.x; i < total; i += (Index)gridDim.x * blockDim.x) {
    const Index c = (i / s) % c_dim;
    out[i] = from_acc<T, Acc>(a[c] + b[c] * (to_acc(x[i]) - mean[c]));
  }
}

// Sum of one double per thread over the block (fixed order: deterministic).
__device__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  return total;
}

// One block: channel ch of thread t is t, t + kThreads, ...; Chan's merge of its splits in fp64.
template <typename Acc>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const Acc* __restrict__ count, const Acc* __restrict__ pmean,
                                                            const Acc* __restrict__ pm2, const Acc* __restrict__ rm,
                                                            const Acc* __restrict__ rv, int64_t c_dim, int64_t splits,
                                                            Acc* __restrict__ mean_out, Acc* __restrict__ var_out,
                                                            Acc* __restrict__ loss_out) {
  double sq_mean = 0.0, sq_var = 0.0;
  for (int64_t ch = threadIdx.x; ch < c_dim; ch += kThreads) {
    const Acc* cnt = count + ch * splits;
    const Acc* mu_p = pmean + ch * splits;
    const Acc* m2_p = pm2 + ch * splits;
    double total = 0.0, weighted = 0.0;
    for (int64_t k = 0; k < splits; ++k) {
      total += static_cast<double>(cnt[k]);
      weighted += static_cast<double>(cnt[k]) * static_cast<double>(mu_p[k]);
    }
    const double mu = weighted / total;
    double m2 = 0.0;
    for (int64_t k = 0; k < splits; ++k) {
      const double d = static_cast<double>(mu_p[k]) - mu;
      m2 += static_cast<double>(m2_p[k]) + static_cast<double>(cnt[k]) * d * d;
    }
    const Acc mean_c = static_cast<Acc>(mu), var_c = static_cast<Acc>(m2 / total);
    mean_out[ch] = mean_c;
    var_out[ch] = var_c;
    const double dm = static_cast<double>(mean_c) - static_cast<double>(rm[ch]);
    const double dv = static_cast<double>(var_c) - static_cast<double>(rv[ch]);
    sq_mean += dm * dm;
    sq_var += dv * dv;
  }
  sq_mean = block_sum(sq_mean);
  sq_var = block_sum(sq_var);
  if (threadIdx.x == 0) *loss_out = static_cast<Acc>(sqrt(sq_mean) + sqrt(sq_var));
}

// One block: a_c = g (μ_c − rm_c) / (‖μ − rm‖ M), b_c = 2 g (σ²_c − rv_c) / (‖σ² − rv‖ M); zero norm → 0.
template <typename Acc>
__global__ void __launch_bounds__(kThreads) coefficients_kernel(const Acc* __restrict__ grad, const Acc* __restrict__ mean,
                                                                const Acc* __restrict__ var, const Acc* __restrict__ rm,
                                                                const Acc* __restrict__ rv, int64_t c_dim, double m,
                                                                Acc* __restrict__ a, Acc* __restrict__ b) {
  double sq_mean = 0.0, sq_var = 0.0;
  for (int64_t ch = threadIdx.x; ch < c_dim; ch += kThreads) {
    const double dm = static_cast<double>(mean[ch]) - static_cast<double>(rm[ch]);
    const double dv = static_cast<double>(var[ch]) - static_cast<double>(rv[ch]);
    sq_mean += dm * dm;
    sq_var += dv * dv;
  }
  const double norm_mean = sqrt(block_sum(sq_mean));
  const double norm_var = sqrt(block_sum(sq_var));
  const double g = static_cast<double>(*grad);
  const double scale_mean = norm_mean > 0.0 ? g / (norm_mean * m) : 0.0;
  const double scale_var = norm_var > 0.0 ? 2.0 * g / (norm_var * m) : 0.0;
  for (int64_t ch = threadIdx.x; ch < c_dim; ch += kThreads) {
    a[ch] = static_cast<Acc>(scale_mean * (static_cast<double>(mean[ch]) - static_cast<double>(rm[ch])));
    b[ch] = static_cast<Acc>(scale_var * (static_cast<double>(var[ch]) - static_cast<double>(rv[ch])));
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
  const auto* xt = static_cast<const T*>(x);
  const auto *at = static_cast<const Acc*>(a), *bt = static_cast<const Acc*>(b), *mt = static_cast<const Acc*>(mean);
  if (total + blocks * kThreads <= static_cast<int64_t>(UINT32_MAX))  // i + stride never wraps
    backward_kernel<T, Acc, uint32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        xt, at, bt, mt, static_cast<uint32_t>(c), static_cast<uint32_t>(s), static_cast<uint32_t>(total),
        static_cast<T*>(out));
  else
    backward_kernel<T, Acc, int64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        xt, at, bt, mt, c, s, total, static_cast<T*>(out));
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

void bn_stat_finalize_cuda(const void* count, const void* pmean, const void* pm2, const void* rm, const void* rv,
                           int64_t c, int64_t splits, bool fp64, void* mean_out, void* var_out, void* loss_out,
                           cudaStream_t stream) {
  if (fp64) {
    finalize_kernel<double><<<1, kThreads, 0, stream>>>(
        static_cast<const double*>(count), static_cast<const double*>(pmean), static_cast<const double*>(pm2),
        static_cast<const double*>(rm), static_cast<const double*>(rv), c, splits, static_cast<double*>(mean_out),
        static_cast<double*>(var_out), static_cast<double*>(loss_out));
  } else {
    finalize_kernel<float><<<1, kThreads, 0, stream>>>(
        static_cast<const float*>(count), static_cast<const float*>(pmean), static_cast<const float*>(pm2),
        static_cast<const float*>(rm), static_cast<const float*>(rv), c, splits, static_cast<float*>(mean_out),
        static_cast<float*>(var_out), static_cast<float*>(loss_out));
  }
}

void bn_stat_coefficients_cuda(const void* grad, const void* mean, const void* var, const void* rm, const void* rv,
                               int64_t c, int64_t m, bool fp64, void* a_out, void* b_out, cudaStream_t stream) {
  if (fp64) {
    coefficients_kernel<double><<<1, kThreads, 0, stream>>>(
        static_cast<const double*>(grad), static_cast<const double*>(mean), static_cast<const double*>(var),
        static_cast<const double*>(rm), static_cast<const double*>(rv), c, static_cast<double>(m),
        static_cast<double*>(a_out), static_cast<double*>(b_out));
  } else {
    coefficients_kernel<float><<<1, kThreads, 0, stream>>>(
        static_cast<const float*>(grad), static_cast<const float*>(mean), static_cast<const float*>(var),
        static_cast<const float*>(rm), static_cast<const float*>(rv), c, static_cast<double>(m),
        static_cast<float*>(a_out), static_cast<float*>(b_out));
  }
}

}  // namespace ddfast
