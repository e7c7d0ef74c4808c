// mmd kernel sums and their gradient, tiled in shared memory (fp32 FMA; fp64 for fp64 inputs).
// A block owns 64 rows of z (grid-stride over row blocks) and walks the 64-column tiles of its
// rows' classes only (rows are sorted by class). 256 threads = 16 x 16; thread (tx, ty) holds the
// 4 x 4 micro-tile rows ty + 16a, columns tx + 16b, so shared-memory reads are broadcasts or
// consecutive. Distances |a|^2 + |b|^2 - 2<a, b> (clamped at 0) and the kernel values stay in
// registers: memory is O(rows) besides z.
// Backward: per column tile the block writes P (the signed coefficient of z_j in grad z_i) to
// shared memory, then multiplies it by z's column rows in 16-wide chunks of D and adds the result to
// the workspace rows it owns (each (row, feature) entry has exactly one writing thread: no atomics).
#include "mmd.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ddfast {
namespace {

constexpr int kTile = 64;
constexpr int kThreads = 256;
constexpr int kChunk = 16;  // features per step of the backward's P x Z product (= threads per row)
constexpr int64_t kMaxBlocks = 1 << 20;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

template <typename Acc, int BK>
struct DotSmem {
  Acc a[BK][kTile + 1];
  Acc b[BK][kTile + 1];
};

template <typename Acc, int BK>
struct BwdSmem {
  // the row block's classes, shared rather than 4 x 64-bit registers per thread: ptxas aims at 128
  // registers (two 256-thread blocks per SM) and spilled with them in registers
  int64_t row_cls[kTile];
  Acc p[kTile][kTile + 1];
  union {  // the dot-product tiles and the feature chunk are never live at the same time
    DotSmem<Acc, BK> dot;
    Acc zc[kTile][kChunk + 1];
  } u;
};

// acc[a][b] = <z[r0 + ty + 16a], z[c0 + tx + 16b]>; rows >= `rows` and columns >= `col_end` read 0.
template <typename T, typename Acc, int BK>
__device__ void dot_tile(const T* __restrict__ z, int64_t rows, int64_t dim, int64_t r0, int64_t c0, int64_t col_end,
                         DotSmem<Acc, BK>& s, Acc (&acc)[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = Acc(0);
  for (int64_t k0 = 0; k0 < dim; k0 += BK) {
    for (int idx = threadIdx.x; idx < BK * kTile; idx += kThreads) {
      const int m = idx / BK, kk = idx % BK;  // consecutive threads read consecutive features of a row
      const int64_t k = k0 + kk, r = r0 + m, c = c0 + m;
      s.a[kk][m] = (r < rows && k < dim) ? to_acc(z[r * dim + k]) : Acc(0);
      s.b[kk][m] = (c < col_end && k < dim) ? to_acc(z[c * dim + k]) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc av[4], bv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) av[a] = s.a[kk][ty + 16 * a];
#pragma unroll
      for (int b = 0; b < 4; ++b) bv[b] = s.b[kk][tx + 16 * b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] += av[a] * bv[b];
    }
    __syncthreads();
  }
}

// rounding can make |a|^2 + |b|^2 - 2<a, b> negative; NaN must pass through (fmax would drop it)
template <typename Acc>
__device__ __forceinline__ Acc clamp_dist(Acc d) { return d < Acc(0) ? Acc(0) : d; }

// Gaussian kernel sum_s exp(-c_s d) and, in *deriv, -2 sum_s c_s exp(-c_s d) (dk/dz_i = deriv (z_i - z_j)).
template <typename Acc>
__device__ __forceinline__ Acc gaussian(Acc d, const Acc* __restrict__ coefs, int64_t num_bw, Acc* deriv) {
  Acc k = 0, g = 0;
  for (int64_t s = 0; s < num_bw; ++s) {
    const Acc c = coefs[s];
    const Acc e = exp_acc(-c * d);
    k += e;
    g -= Acc(2) * c * e;
  }
  *deriv = g;
  return k;
}

// sum over the 16 lanes (one half-warp) that share a row
template <typename Acc>
__device__ __forceinline__ Acc row_reduce(Acc v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, typename Acc, int BK>
__global__ void __launch_bounds__(kThreads)
mmd_forward_kernel(const T* __restrict__ z, const Acc* __restrict__ sq, const int64_t* __restrict__ cls,
                   const int32_t* __restrict__ side, const int64_t* __restrict__ offsets,
                   const Acc* __restrict__ coefs, int64_t num_bw, int64_t rows, int64_t dim, bool linear,
                   bool unbiased, Acc* __restrict__ out) {
  __shared__ DotSmem<Acc, BK> s;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row_blocks = (rows + kTile - 1) / kTile;
  for (int64_t rb = blockIdx.x; rb < row_blocks; rb += gridDim.x) {
    const int64_t r0 = rb * kTile;
    const int64_t r_last = (r0 + kTile < rows ? r0 + kTile : rows) - 1;
    const int64_t lo = offsets[cls[r0]], hi = offsets[cls[r_last] + 1];
    int64_t row_cls[4];
    Acc row_sq[4], sum_x[4], sum_y[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int64_t r = r0 + ty + 16 * a;
      row_cls[a] = r < rows ? cls[r] : -1;
      row_sq[a] = r < rows ? sq[r] : Acc(0);
      sum_x[a] = sum_y[a] = Acc(0);
    }
    for (int64_t c0 = lo; c0 < hi; c0 += kTile) {
      Acc acc[4][4];
      dot_tile<T, Acc, BK>(z, rows, dim, r0, c0, hi, s, acc);
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int64_t c = c0 + tx + 16 * b;
        if (c >= hi) continue;
        const int64_t col_cls = cls[c];
        const Acc col_sq = sq[c];
        const bool col_y = side[c] != 0;
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          const int64_t r = r0 + ty + 16 * a;
          if (row_cls[a] != col_cls || (unbiased && r == c)) continue;
          Acc k = acc[a][b];
          if (!linear) {
            Acc unused;
            const Acc d = clamp_dist(row_sq[a] + col_sq - Acc(2) * acc[a][b]);
            k = gaussian(d, coefs, num_bw, &unused);
          }
          if (col_y) sum_y[a] += k; else sum_x[a] += k;
        }
      }
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const Acc sx = row_reduce(sum_x[a]), sy = row_reduce(sum_y[a]);
      const int64_t r = r0 + ty + 16 * a;
      if (tx == 0 && r < rows) {
        out[2 * r] = sx;
        out[2 * r + 1] = sy;
      }
    }
  }
}

template <typename T, typename Acc, int BK>
__global__ void __launch_bounds__(kThreads)
mmd_backward_kernel(const Acc* __restrict__ grad, const T* __restrict__ z, const Acc* __restrict__ sq,
                    const int64_t* __restrict__ cls, const int32_t* __restrict__ side,
                    const int64_t* __restrict__ offsets, const Acc* __restrict__ coefs, int64_t num_bw, int64_t rows,
                    int64_t dim, bool linear, bool unbiased, Acc* __restrict__ ws) {
  __shared__ BwdSmem<Acc, BK> s;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row_blocks = (rows + kTile - 1) / kTile;
  for (int64_t rb = blockIdx.x; rb < row_blocks; rb += gridDim.x) {
    const int64_t r0 = rb * kTile;
    const int64_t r_last = (r0 + kTile < rows ? r0 + kTile : rows) - 1;
    const int64_t lo = offsets[cls[r0]], hi = offsets[cls[r_last] + 1];
    bool row_y[4];
    Acc row_sq[4], ga_r[4], gb_r[4], row_sum[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int64_t r = r0 + ty + 16 * a;
      const bool in = r < rows;
      if (tx == 0) s.row_cls[ty + 16 * a] = in ? cls[r] : -1;
      row_sq[a] = in ? sq[r] : Acc(0);
      row_y[a] = in && side[r] != 0;
      ga_r[a] = in ? grad[2 * r] : Acc(0);
      gb_r[a] = in ? grad[2 * r + 1] : Acc(0);
      row_sum[a] = Acc(0);
    }
    // s.row_cls is complete before any thread reads it; the previous row block's last reads of it
    // (its last tile's epilogue) are behind the barrier that follows that tile's P
    __syncthreads();
    for (int64_t c0 = lo; c0 < hi; c0 += kTile) {
      Acc acc[4][4];
      if (!linear) dot_tile<T, Acc, BK>(z, rows, dim, r0, c0, hi, s.u.dot, acc);
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int64_t c = c0 + tx + 16 * b;
        const bool in = c < hi;
        const int64_t col_cls = in ? cls[c] : -2;
        const Acc col_sq = in ? sq[c] : Acc(0);
        const bool col_y = in && side[c] != 0;
        const Acc ga_c = in ? grad[2 * c] : Acc(0), gb_c = in ? grad[2 * c + 1] : Acc(0);
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          const int64_t r = r0 + ty + 16 * a;
          Acc coef = Acc(0);
          if (s.row_cls[ty + 16 * a] == col_cls && !(unbiased && r == c)) {
            // k(z_r, z_c) is in row r's sum (weight by c's side) and in row c's (weight by r's side)
            const Acc w = (col_y ? gb_r[a] : ga_r[a]) + (row_y[a] ? gb_c : ga_c);
            if (linear) {
              coef = w;  // d<z_r, z_c>/d z_r = z_c
            } else {
              Acc g;
              const Acc d = clamp_dist(row_sq[a] + col_sq - Acc(2) * acc[a][b]);
              gaussian(d, coefs, num_bw, &g);
              row_sum[a] += w * g;  // grad z_r = sum_c w g (z_r - z_c)
              coef = -w * g;
            }
          }
          s.p[ty + 16 * a][tx + 16 * b] = coef;
        }
      }
      __syncthreads();
      for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
        for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kThreads) {
          const int j = idx / kChunk, dd = idx % kChunk;
          const int64_t c = c0 + j, k = d0 + dd;
          s.u.zc[j][dd] = (c < hi && k < dim) ? to_acc(z[c * dim + k]) : Acc(0);
        }
        __syncthreads();
        const int64_t k = d0 + tx;
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          Acc v = 0;
#pragma unroll 16
          for (int j = 0; j < kTile; ++j) v += s.p[ty + 16 * a][j] * s.u.zc[j][tx];
          const int64_t r = r0 + ty + 16 * a;
          if (r < rows && k < dim) ws[r * dim + k] += v;
        }
        __syncthreads();  // zc (and, after the last chunk, p and the dot tiles) are rewritten next
      }
    }
    if (!linear) {
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        const Acc total = row_reduce(row_sum[a]);
        const int64_t r = r0 + ty + 16 * a;
        if (r >= rows) continue;
        for (int64_t k = tx; k < dim; k += kChunk) ws[r * dim + k] += total * to_acc(z[r * dim + k]);
      }
    }
  }
}

int grid_for(int64_t rows) {
  const int64_t blocks = (rows + kTile - 1) / kTile;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

template <typename T, typename Acc, int BK>
void forward_impl(const void* z, const void* sq, const int64_t* cls, const int32_t* side, const int64_t* offsets,
                  const void* coefs, int64_t num_bw, int64_t rows, int64_t dim, bool linear, bool unbiased, void* out,
                  cudaStream_t stream) {
  mmd_forward_kernel<T, Acc, BK><<<grid_for(rows), kThreads, 0, stream>>>(
      static_cast<const T*>(z), static_cast<const Acc*>(sq), cls, side, offsets, static_cast<const Acc*>(coefs),
      num_bw, rows, dim, linear, unbiased, static_cast<Acc*>(out));
}

template <typename T, typename Acc, int BK>
void backward_impl(const void* grad, const void* z, const void* sq, const int64_t* cls, const int32_t* side,
                   const int64_t* offsets, const void* coefs, int64_t num_bw, int64_t rows, int64_t dim, bool linear,
                   bool unbiased, void* ws, cudaStream_t stream) {
  mmd_backward_kernel<T, Acc, BK><<<grid_for(rows), kThreads, 0, stream>>>(
      static_cast<const Acc*>(grad), static_cast<const T*>(z), static_cast<const Acc*>(sq), cls, side, offsets,
      static_cast<const Acc*>(coefs), num_bw, rows, dim, linear, unbiased, static_cast<Acc*>(ws));
}

}  // namespace

void mmd_forward_cuda(const void* z, const void* sq, const int64_t* cls, const int32_t* side, const int64_t* offsets,
                      const void* coefs, int64_t num_bw, int64_t rows, int64_t dim, bool linear, bool unbiased,
                      int dtype, void* out, cudaStream_t stream) {
  if (rows <= 0) return;
  switch (dtype) {  // BK: fp64 tiles are halved so the backward's shared memory stays under 48 KiB
    case 0: forward_impl<float, float, 16>(z, sq, cls, side, offsets, coefs, num_bw, rows, dim, linear, unbiased, out, stream); break;
    case 1: forward_impl<double, double, 8>(z, sq, cls, side, offsets, coefs, num_bw, rows, dim, linear, unbiased, out, stream); break;
    case 2: forward_impl<__half, float, 16>(z, sq, cls, side, offsets, coefs, num_bw, rows, dim, linear, unbiased, out, stream); break;
    case 3: forward_impl<__nv_bfloat16, float, 16>(z, sq, cls, side, offsets, coefs, num_bw, rows, dim, linear, unbiased, out, stream); break;
  }
}

void mmd_backward_cuda(const void* grad, const void* z, const void* sq, const int64_t* cls, const int32_t* side,
                       const int64_t* offsets, const void* coefs, int64_t num_bw, int64_t rows, int64_t dim,
                       bool linear, bool unbiased, int dtype, void* ws, cudaStream_t stream) {
  if (rows <= 0) return;
  switch (dtype) {
    case 0: backward_impl<float, float, 16>(grad, z, sq, cls, side, offsets, coefs, num_bw, rows, dim, linear, unbiased, ws, stream); break;
    case 1: backward_impl<double, double, 8>(grad, z, sq, cls, side, offsets, coefs, num_bw, rows, dim, linear, unbiased, ws, stream); break;
    case 2: backward_impl<__half, float, 16>(grad, z, sq, cls, side, offsets, coefs, num_bw, rows, dim, linear, unbiased, ws, stream); break;
    case 3: backward_impl<__nv_bfloat16, float, 16>(grad, z, sq, cls, side, offsets, coefs, num_bw, rows, dim, linear, unbiased, ws, stream); break;
  }
}

}  // namespace ddfast
