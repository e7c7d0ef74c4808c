// supcon_nce CUDA kernels: tiled z_syn z_real^T with an online logsumexp (flash-attention style).
// Blocks of 256 threads (16 x 16) own a BM x BM logit tile (BM = 16 * TM; each thread a TM x TM
// micro-tile, rows ty + 16 i, columns tx + 16 j), built from BK-wide slices of the feature axis
// staged in shared memory, accumulated in fp32 (fp64 for double) on the CUDA cores.
// Forward: a block of BM anchors walks every real column tile; each thread keeps a running
// (max, sum) for its rows over its columns, merged across the 16 threads of a row with
// half-warp shuffles at the end. Backward: one kernel, launched for grad z_syn (anchors are the
// rows) and for grad z_real (anchors are the columns); a block owns BM rows x BM feature columns
// of the output, recomputes the logit tiles, writes dL/ds to shared memory and multiplies it with
// the matching slice of the other side's features. Every output element has one writer: no atomics.
#include "supcon_nce.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ddfast {
namespace {

constexpr int kThreads = 256;
constexpr int kBK = 16;

template <typename Acc, typename T> __device__ __forceinline__ Acc to_acc(T v) { return static_cast<Acc>(v); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename Acc> __device__ __forceinline__ T from_acc(Acc v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16(v); }

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double acc_log1p(double x) { return log1p(x); }

// logit = dot * inv_temp, rounded on its own: nvcc would otherwise fuse the product into the
// backward's exp(v - lse) as one fma, so a recomputed logit no longer equals the rounded one the
// forward's lse was built from (at |logit| ~ 1e6, 1 ulp = 0.06: softmax weights off by ~6%, seen on
// an H200). __fmul_rn / __dmul_rn are never contracted.
__device__ __forceinline__ float logit_rn(float dot, float inv_temp) { return __fmul_rn(dot, inv_temp); }
__device__ __forceinline__ double logit_rn(double dot, double inv_temp) { return __dmul_rn(dot, inv_temp); }

template <typename Acc> __device__ __forceinline__ Acc neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000ULL); }

template <typename Acc> __device__ __forceinline__ Acc softplus(Acc x) {
  return (x > Acc(0) ? x : Acc(0)) + acc_log1p(acc_exp(-fabs(x)));
}

template <typename Acc> __device__ __forceinline__ Acc sigmoid(Acc x) { return Acc(1) / (Acc(1) + acc_exp(-x)); }

// running logsumexp state (m, l): adds one value / merges another state
template <typename Acc> __device__ __forceinline__ void lse_add(Acc& m, Acc& l, Acc v) {
  if (v > m) {
    l = l * acc_exp(m - v) + Acc(1);
    m = v;
  } else {
    l += acc_exp(v - m);
  }
}
template <typename Acc> __device__ __forceinline__ void lse_merge(Acc& m, Acc& l, Acc m2, Acc l2) {
  const Acc mx = m > m2 ? m : m2;
  if (mx == neg_inf<Acc>()) return;  // both empty
  l = l * acc_exp(m - mx) + l2 * acc_exp(m2 - mx);
  m = mx;
}

// s[i][j] = <A[a0 + ty + 16 i], B[b0 + tx + 16 j]> (unscaled); zeros outside the matrices.
template <typename T, typename Acc, int TM>
__device__ __forceinline__ void dot_tile(const T* __restrict__ A, int64_t n_a, int64_t a0, const T* __restrict__ B,
                                         int64_t n_b, int64_t b0, int64_t dim, Acc (*sa)[16 * TM + 1],
                                         Acc (*sb)[16 * TM + 1], Acc s[TM][TM]) {
  constexpr int BM = 16 * TM;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TM; ++j) s[i][j] = Acc(0);
  for (int64_t k0 = 0; k0 < dim; k0 += kBK) {
    for (int idx = threadIdx.x; idx < BM * kBK; idx += kThreads) {
      const int r = idx / kBK, k = idx % kBK;
      const int64_t kk = k0 + k, ra = a0 + r, rb = b0 + r;
      sa[k][r] = (ra < n_a && kk < dim) ? to_acc<Acc>(A[ra * dim + kk]) : Acc(0);
      sb[k][r] = (rb < n_b && kk < dim) ? to_acc<Acc>(B[rb * dim + kk]) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      Acc av[TM], bv[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = sa[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TM; ++j) bv[j] = sb[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TM; ++j) s[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
}

template <typename T, typename Acc, int TM>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const T* __restrict__ zs, const int64_t* __restrict__ ys, const T* __restrict__ zr,
               const int64_t* __restrict__ yr, int64_t n_syn, int64_t n_real, int64_t dim, Acc inv_temp, bool nce,
               Acc log_c, Acc* __restrict__ loss, Acc* __restrict__ lse_all, Acc* __restrict__ lse_pos) {
  constexpr int BM = 16 * TM;
  __shared__ Acc sa[kBK][BM + 1];
  __shared__ Acc sb[kBK][BM + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * BM;
  Acc m_all[TM], l_all[TM], m_pos[TM], l_pos[TM], nce_sum[TM];
  int64_t y_row[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = r0 + ty + 16 * i;
    y_row[i] = row < n_syn ? ys[row] : -1;
    m_all[i] = m_pos[i] = neg_inf<Acc>();
    l_all[i] = l_pos[i] = nce_sum[i] = Acc(0);
  }
  for (int64_t c0 = 0; c0 < n_real; c0 += BM) {
    Acc s[TM][TM];
    dot_tile<T, Acc, TM>(zs, n_syn, r0, zr, n_real, c0, dim, sa, sb, s);
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      const int64_t col = c0 + tx + 16 * j;
      if (col >= n_real) continue;
      const int64_t y_col = yr[col];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const Acc v = logit_rn(s[i][j], inv_temp);
        const bool pos = y_col == y_row[i];
        if (nce) {
          nce_sum[i] += softplus(pos ? log_c - v : v - log_c);
        } else {
          lse_add(m_all[i], l_all[i], v);
          if (pos) lse_add(m_pos[i], l_pos[i], v);
        }
      }
    }
  }
  // the 16 threads of a row group are lanes 16*(ty%2) .. +15 of one warp: fold them with shuffles
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    for (int off = 8; off > 0; off >>= 1) {
      if (nce) {
        nce_sum[i] += __shfl_xor_sync(0xffffffffu, nce_sum[i], off, 16);
      } else {
        const Acc ma = __shfl_xor_sync(0xffffffffu, m_all[i], off, 16);
        const Acc la = __shfl_xor_sync(0xffffffffu, l_all[i], off, 16);
        const Acc mp = __shfl_xor_sync(0xffffffffu, m_pos[i], off, 16);
        const Acc lp = __shfl_xor_sync(0xffffffffu, l_pos[i], off, 16);
        lse_merge(m_all[i], l_all[i], ma, la);
        lse_merge(m_pos[i], l_pos[i], mp, lp);
      }
    }
    const int64_t row = r0 + ty + 16 * i;
    if (tx == 0 && row < n_syn) {
      if (nce) {
        loss[row] = nce_sum[i];
        lse_all[row] = Acc(0);
        lse_pos[row] = Acc(0);
      } else {
        const Acc a = m_all[i] + acc_log(l_all[i]);
        const bool has_pos = m_pos[i] != neg_inf<Acc>();
        const Acc p = has_pos ? m_pos[i] + acc_log(l_pos[i]) : neg_inf<Acc>();
        lse_all[row] = a;
        lse_pos[row] = p;
        loss[row] = has_pos ? a - p : Acc(0);
      }
    }
  }
}

// out[a, d] = inv_temp * sum_b dL/ds(a, b) * B[b, d]. Anchor statistics (g, lse_all, lse_pos)
// index the rows of A when ANCHOR_ROWS (grad z_syn), else the rows of B (grad z_real).
template <typename T, typename Acc, int TM, bool ANCHOR_ROWS>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const T* __restrict__ A, const int64_t* __restrict__ ya, const T* __restrict__ B,
                const int64_t* __restrict__ yb, const Acc* __restrict__ g, const Acc* __restrict__ lse_all,
                const Acc* __restrict__ lse_pos, int64_t n_a, int64_t n_b, int64_t dim, Acc inv_temp, bool nce,
                Acc log_c, T* __restrict__ out) {
  constexpr int BM = 16 * TM;
  __shared__ Acc sa[kBK][BM + 1];
  __shared__ Acc sb[kBK][BM + 1];
  __shared__ Acc dlogit[BM][BM + 1];
  __shared__ Acc b_slice[BM][BM + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * BM;
  int64_t y_row[TM];
  Acc g_row[TM], la_row[TM], lp_row[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = a0 + ty + 16 * i;
    const bool ok = row < n_a;
    y_row[i] = ok ? ya[row] : -1;
    g_row[i] = (ANCHOR_ROWS && ok) ? g[row] : Acc(0);
    la_row[i] = (ANCHOR_ROWS && ok) ? lse_all[row] : Acc(0);
    lp_row[i] = (ANCHOR_ROWS && ok) ? lse_pos[row] : neg_inf<Acc>();
  }
  Acc acc[TM][TM];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TM; ++j) acc[i][j] = Acc(0);

  for (int64_t b0 = 0; b0 < n_b; b0 += BM) {
    Acc s[TM][TM];
    dot_tile<T, Acc, TM>(A, n_a, a0, B, n_b, b0, dim, sa, sb, s);
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      const int64_t col = b0 + tx + 16 * j;
      const bool col_ok = col < n_b;
      const int64_t y_col = col_ok ? yb[col] : -2;
      const Acc g_col = (!ANCHOR_ROWS && col_ok) ? g[col] : Acc(0);
      const Acc la_col = (!ANCHOR_ROWS && col_ok) ? lse_all[col] : Acc(0);
      const Acc lp_col = (!ANCHOR_ROWS && col_ok) ? lse_pos[col] : neg_inf<Acc>();
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int64_t row = a0 + ty + 16 * i;
        Acc d = Acc(0);
        if (row < n_a && col_ok) {
          const Acc v = logit_rn(s[i][j], inv_temp);
          const bool pos = y_row[i] == y_col;
          const Acc gg = ANCHOR_ROWS ? g_row[i] : g_col;
          if (nce) {
            d = pos ? -gg * sigmoid(log_c - v) : gg * sigmoid(v - log_c);  // no 1 - sigmoid cancellation
          } else {
            const Acc la = ANCHOR_ROWS ? la_row[i] : la_col;
            const Acc lp = ANCHOR_ROWS ? lp_row[i] : lp_col;
            if (lp != neg_inf<Acc>())  // anchors without a positive have a constant 0 loss
              d = gg * (acc_exp(v - la) - (pos ? acc_exp(v - lp) : Acc(0)));
          }
        }
        dlogit[ty + 16 * i][tx + 16 * j] = d;
      }
    }
    for (int idx = threadIdx.x; idx < BM * BM; idx += kThreads) {
      const int c = idx / BM, dd = idx % BM;
      const int64_t rb = b0 + c, col_d = d0 + dd;
      b_slice[c][dd] = (rb < n_b && col_d < dim) ? to_acc<Acc>(B[rb * dim + col_d]) : Acc(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int c = 0; c < BM; ++c) {
      Acc bv[TM];
#pragma unroll
      for (int j = 0; j < TM; ++j) bv[j] = b_slice[c][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const Acc dv = dlogit[ty + 16 * i][c];
#pragma unroll
        for (int j = 0; j < TM; ++j) acc[i][j] += dv * bv[j];
      }
    }
    __syncthreads();  // dlogit / b_slice are rewritten by the next tile
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = a0 + ty + 16 * i;
    if (row >= n_a) continue;
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      const int64_t col_d = d0 + tx + 16 * j;
      if (col_d < dim) out[row * dim + col_d] = from_acc<T>(acc[i][j] * inv_temp);
    }
  }
}

int64_t blocks_of(int64_t n, int bm) { return (n + bm - 1) / bm; }

template <typename T, typename Acc, int TM>
void forward_impl(const void* zs, const int64_t* ys, const void* zr, const int64_t* yr, int64_t n_syn,
                  int64_t n_real, int64_t dim, double inv_temp, bool nce, double log_c, void* loss, void* lse_all,
                  void* lse_pos, cudaStream_t stream) {
  if (n_syn <= 0) return;  // no anchors: nothing to write (a 0-block launch is an invalid configuration)
  const dim3 grid(static_cast<unsigned>(blocks_of(n_syn, 16 * TM)));
  forward_kernel<T, Acc, TM><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(zs), ys, static_cast<const T*>(zr), yr, n_syn, n_real, dim, static_cast<Acc>(inv_temp),
      nce, static_cast<Acc>(log_c), static_cast<Acc*>(loss), static_cast<Acc*>(lse_all), static_cast<Acc*>(lse_pos));
}

template <typename T, typename Acc, int TM>
void backward_impl(const void* g, const void* zs, const int64_t* ys, const void* zr, const int64_t* yr,
                   const void* lse_all, const void* lse_pos, int64_t n_syn, int64_t n_real, int64_t dim,
                   double inv_temp, bool nce, double log_c, void* grad_syn, void* grad_real, cudaStream_t stream) {
  constexpr int BM = 16 * TM;
  const unsigned d_blocks = static_cast<unsigned>(blocks_of(dim, BM));
  const Acc* gp = static_cast<const Acc*>(g);
  const Acc* la = static_cast<const Acc*>(lse_all);
  const Acc* lp = static_cast<const Acc*>(lse_pos);
  const Acc t = static_cast<Acc>(inv_temp), c = static_cast<Acc>(log_c);
  // an empty output (n = 0 or dim = 0) gets no launch: a 0-block grid is an invalid configuration
  if (d_blocks == 0) return;
  if (n_syn > 0)
    backward_kernel<T, Acc, TM, true><<<dim3(static_cast<unsigned>(blocks_of(n_syn, BM)), d_blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(zs), ys, static_cast<const T*>(zr), yr, gp, la, lp, n_syn, n_real, dim, t, nce, c,
        static_cast<T*>(grad_syn));
  if (n_real > 0)
    backward_kernel<T, Acc, TM, false><<<dim3(static_cast<unsigned>(blocks_of(n_real, BM)), d_blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(zr), yr, static_cast<const T*>(zs), ys, gp, la, lp, n_real, n_syn, dim, t, nce, c,
        static_cast<T*>(grad_real));
}

}  // namespace

void supcon_nce_forward_cuda(const void* zs, const int64_t* ys, const void* zr, const int64_t* yr, int64_t n_syn,
                             int64_t n_real, int64_t dim, int dtype, double inv_temp, bool nce, double log_c,
                             void* loss, void* lse_all, void* lse_pos, cudaStream_t stream) {
  switch (dtype) {
    case 0: forward_impl<float, float, 4>(zs, ys, zr, yr, n_syn, n_real, dim, inv_temp, nce, log_c, loss, lse_all, lse_pos, stream); break;
    case 1: forward_impl<double, double, 2>(zs, ys, zr, yr, n_syn, n_real, dim, inv_temp, nce, log_c, loss, lse_all, lse_pos, stream); break;
    case 2: forward_impl<__half, float, 4>(zs, ys, zr, yr, n_syn, n_real, dim, inv_temp, nce, log_c, loss, lse_all, lse_pos, stream); break;
    case 3: forward_impl<__nv_bfloat16, float, 4>(zs, ys, zr, yr, n_syn, n_real, dim, inv_temp, nce, log_c, loss, lse_all, lse_pos, stream); break;
  }
}

void supcon_nce_backward_cuda(const void* g, const void* zs, const int64_t* ys, const void* zr, const int64_t* yr,
                              const void* lse_all, const void* lse_pos, int64_t n_syn, int64_t n_real, int64_t dim,
                              int dtype, double inv_temp, bool nce, double log_c, void* grad_syn, void* grad_real,
                              cudaStream_t stream) {
  switch (dtype) {
    case 0: backward_impl<float, float, 4>(g, zs, ys, zr, yr, lse_all, lse_pos, n_syn, n_real, dim, inv_temp, nce, log_c, grad_syn, grad_real, stream); break;
    case 1: backward_impl<double, double, 2>(g, zs, ys, zr, yr, lse_all, lse_pos, n_syn, n_real, dim, inv_temp, nce, log_c, grad_syn, grad_real, stream); break;
    case 2: backward_impl<__half, float, 4>(g, zs, ys, zr, yr, lse_all, lse_pos, n_syn, n_real, dim, inv_temp, nce, log_c, grad_syn, grad_real, stream); break;
    case 3: backward_impl<__nv_bfloat16, float, 4>(g, zs, ys, zr, yr, lse_all, lse_pos, n_syn, n_real, dim, inv_temp, nce, log_c, grad_syn, grad_real, stream); break;
  }
}

}  // namespace ddfast
