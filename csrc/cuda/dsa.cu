// One DSA stage over many images: each image does one op (identity, color, crop, cutout, flip,
// bilinear affine), given by its row of iparams/fparams (see ddfast/ops/dsa.py).
// Forward: a per-image reduction (one block per image) gives contrast's mean for color images,
// then one thread per output pixel writes all channels (gather). Backward: a per-image
// reduction gives Σ grad_y for color images; the integer ops and color are gathers (one write
// per input pixel); the bilinear affine op scatters its four weights with atomicAdd into a
// zeroed buffer in the accumulation type (so the last bits depend on the atomic order).
#include "dsa.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "cuda_common.cuh"

namespace ddfast {
namespace {

constexpr int kThreads = 256;
constexpr int kOpColor = 1, kOpCrop = 2, kOpCutout = 3, kOpFlip = 4, kOpAffine = 5;

__device__ __forceinline__ bool inside(int64_t y, int64_t x, int64_t H, int64_t W) {
  return y >= 0 && y < H && x >= 0 && x < W;
}

template <typename Acc>
struct Bilinear {
  int64_t y0, x0;
  Acc w00, w01, w10, w11;
};

// affine_grid (base grid @ theta^T) then grid_sample's unnormalisation and bilinear weights
template <typename Acc>
__device__ __forceinline__ Bilinear<Acc> bilinear_at(int64_t i, int64_t j, const Acc* __restrict__ t,
                                                     const Acc* __restrict__ base, int64_t H, int64_t W,
                                                     bool align_corners) {
  const Acc xs = base[j], ys = base[W + i];
  const Acc gx = fma(ys, t[1], xs * t[0]) + t[2];
  const Acc gy = fma(ys, t[4], xs * t[3]) + t[5];
  Acc ix, iy;
  if (align_corners) {
    ix = (gx + Acc(1)) * (static_cast<Acc>(W - 1) / Acc(2));
    iy = (gy + Acc(1)) * (static_cast<Acc>(H - 1) / Acc(2));
  } else {
    ix = fma(gx + Acc(1), static_cast<Acc>(W) / Acc(2), Acc(-0.5));
    iy = fma(gy + Acc(1), static_cast<Acc>(H) / Acc(2), Acc(-0.5));
  }
  const Acc x0f = floor(ix), y0f = floor(iy);
  const Acc w = ix - x0f, e = Acc(1) - w, n = iy - y0f, s = Acc(1) - n;
  return {static_cast<int64_t>(y0f), static_cast<int64_t>(x0f), s * e, s * w, n * e, n * w};
}

__device__ __forceinline__ bool in_cutout(int op, const int32_t* p, int64_t i, int64_t j) {
  return op == kOpCutout && i >= p[1] && i <= p[2] && j >= p[3] && j <= p[4];
}

// contrast's mean over (C, H, W) of the saturation output, one block per color image
template <typename T, typename Acc>
__global__ void color_mean_kernel(const T* __restrict__ x, const int32_t* __restrict__ ip, const Acc* __restrict__ fp,
                                  int64_t N, int64_t C, int64_t HW, Acc* __restrict__ means) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    if (ip[n * 5] != kOpColor) {
      if (threadIdx.x == 0) means[n] = Acc(0);
      continue;  // uniform across the block: no thread reaches block_sum for this image
    }
    const Acc shift = fp[n * 6], sat = fp[n * 6 + 1];
    const T* img = x + n * C * HW;
    Acc total = 0;
    for (int64_t q = threadIdx.x; q < HW; q += blockDim.x) {
      Acc csum = 0;
      for (int64_t c = 0; c < C; ++c) csum += to_acc(img[c * HW + q]) + shift;
      const Acc cmean = csum / static_cast<Acc>(C);
      for (int64_t c = 0; c < C; ++c) total += ((to_acc(img[c * HW + q]) + shift) - cmean) * sat + cmean;
    }
    total = block_sum(total);
    if (threadIdx.x == 0) means[n] = total / static_cast<Acc>(C * HW);
  }
}

template <typename T, typename Acc, typename Index>
__global__ void forward_kernel(const T* __restrict__ x, const int32_t* __restrict__ ip, const Acc* __restrict__ fp,
                               const Acc* __restrict__ base, const Acc* __restrict__ means, int64_t N, int64_t C,
                               int64_t H, int64_t W, bool align_corners, T* __restrict__ y) {
  const int64_t HW = H * W;
  const Index hw = static_cast<Index>(HW), w = static_cast<Index>(W), total = static_cast<Index>(N * HW);
  for (Index idx = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<Index>(gridDim.x) * blockDim.x) {
    // Index is uint32_t whenever N·H·W fits (the launcher picks it): 32-bit divisions, no 64-bit
    // division call per element; the offsets below stay 64-bit
    const Index n_ = idx / hw, q_ = idx - n_ * hw, i_ = q_ / w;
    const int64_t n = n_, q = q_, i = i_, j = static_cast<int64_t>(q_ - i_ * w);
    const int32_t* p = ip + n * 5;
    const Acc* f = fp + n * 6;
    const T* img = x + n * C * HW;
    T* out = y + n * C * HW;
    const int op = p[0];
    if (op == kOpAffine) {
      const Bilinear<Acc> b = bilinear_at<Acc>(i, j, f, base, H, W, align_corners);
      const bool in00 = inside(b.y0, b.x0, H, W), in01 = inside(b.y0, b.x0 + 1, H, W);
      const bool in10 = inside(b.y0 + 1, b.x0, H, W), in11 = inside(b.y0 + 1, b.x0 + 1, H, W);
      const int64_t o = b.y0 * W + b.x0;
      for (int64_t c = 0; c < C; ++c) {
        const T* plane = img + c * HW;
        Acc v = (in00 ? to_acc(plane[o]) : Acc(0)) * b.w00;
        v = fma(in01 ? to_acc(plane[o + 1]) : Acc(0), b.w01, v);
        v = fma(in10 ? to_acc(plane[o + W]) : Acc(0), b.w10, v);
        v = fma(in11 ? to_acc(plane[o + W + 1]) : Acc(0), b.w11, v);
        out[c * HW + q] = from_acc<T, Acc>(v);
      }
    } else if (op == kOpColor) {
      const Acc shift = f[0], sat = f[1], con = f[2], m = means[n];
      Acc csum = 0;
      for (int64_t c = 0; c < C; ++c) csum += to_acc(img[c * HW + q]) + shift;
      const Acc cmean = csum / static_cast<Acc>(C);
      for (int64_t c = 0; c < C; ++c) {
        const Acc v = ((to_acc(img[c * HW + q]) + shift) - cmean) * sat + cmean;
        out[c * HW + q] = from_acc<T, Acc>((v - m) * con + m);
      }
    } else {
      int64_t si = i, sj = j;
      if (op == kOpCrop) { si = i + p[1]; sj = j + p[2]; }
      if (op == kOpFlip) sj = W - 1 - j;
      const bool valid = inside(si, sj, H, W);
      const Acc keep = in_cutout(op, p, i, j) ? Acc(0) : Acc(1);
      for (int64_t c = 0; c < C; ++c) {
        const Acc v = valid ? to_acc(img[c * HW + si * W + sj]) : Acc(0);
        out[c * HW + q] = from_acc<T, Acc>(v * keep);
      }
    }
  }
}

// Σ grad_y over (C, H, W), one block per color image
template <typename T, typename Acc>
__global__ void grad_sum_kernel(const T* __restrict__ g, const int32_t* __restrict__ ip, int64_t N, int64_t CHW,
                                Acc* __restrict__ sums) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    if (ip[n * 5] != kOpColor) {
      if (threadIdx.x == 0) sums[n] = Acc(0);
      continue;
    }
    Acc total = 0;
    for (int64_t k = threadIdx.x; k < CHW; k += blockDim.x) total += to_acc(g[n * CHW + k]);
    total = block_sum(total);
    if (threadIdx.x == 0) sums[n] = total;
  }
}

template <typename T, typename Acc, typename Index>
__global__ void backward_kernel(const T* __restrict__ g, const int32_t* __restrict__ ip, const Acc* __restrict__ fp,
                                const Acc* __restrict__ base, const Acc* __restrict__ sums, int64_t N, int64_t C,
                                int64_t H, int64_t W, bool align_corners, Acc* __restrict__ gx) {
  const int64_t HW = H * W;
  const Index hw = static_cast<Index>(HW), w = static_cast<Index>(W), total = static_cast<Index>(N * HW);
  for (Index idx = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<Index>(gridDim.x) * blockDim.x) {
    // Index is uint32_t whenever N·H·W fits (the launcher picks it): 32-bit divisions, no 64-bit
    // division call per element; the offsets below stay 64-bit
    const Index n_ = idx / hw, q_ = idx - n_ * hw, i_ = q_ / w;
    const int64_t n = n_, q = q_, i = i_, j = static_cast<int64_t>(q_ - i_ * w);
    const int32_t* p = ip + n * 5;
    const Acc* f = fp + n * 6;
    const T* gimg = g + n * C * HW;
    Acc* gout = gx + n * C * HW;
    const int op = p[0];
    if (op == kOpAffine) {  // (i, j) is an output pixel: scatter to its four source pixels
      const Bilinear<Acc> b = bilinear_at<Acc>(i, j, f, base, H, W, align_corners);
      const bool in00 = inside(b.y0, b.x0, H, W), in01 = inside(b.y0, b.x0 + 1, H, W);
      const bool in10 = inside(b.y0 + 1, b.x0, H, W), in11 = inside(b.y0 + 1, b.x0 + 1, H, W);
      const int64_t o = b.y0 * W + b.x0;
      for (int64_t c = 0; c < C; ++c) {
        const Acc gv = to_acc(gimg[c * HW + q]);
        Acc* plane = gout + c * HW;
        if (in00) atomicAdd(plane + o, gv * b.w00);
        if (in01) atomicAdd(plane + o + 1, gv * b.w01);
        if (in10) atomicAdd(plane + o + W, gv * b.w10);
        if (in11) atomicAdd(plane + o + W + 1, gv * b.w11);
      }
    } else if (op == kOpColor) {
      const Acc sat = f[1], con = f[2];
      const Acc shift = (Acc(1) - con) * sums[n] / static_cast<Acc>(C * HW);
      Acc gsum = 0;
      for (int64_t c = 0; c < C; ++c) gsum += to_acc(gimg[c * HW + q]) * con + shift;
      const Acc gmean = gsum / static_cast<Acc>(C);
      for (int64_t c = 0; c < C; ++c)
        gout[c * HW + q] = (to_acc(gimg[c * HW + q]) * con + shift) * sat + (Acc(1) - sat) * gmean;
    } else {  // (i, j) is an input pixel: gather from the one output pixel that read it
      int64_t di = i, dj = j;
      if (op == kOpCrop) { di = i - p[1]; dj = j - p[2]; }
      if (op == kOpFlip) dj = W - 1 - j;
      const bool valid = inside(di, dj, H, W);
      const Acc keep = in_cutout(op, p, di, dj) ? Acc(0) : Acc(1);
      for (int64_t c = 0; c < C; ++c)
        gout[c * HW + q] = valid ? to_acc(gimg[c * HW + di * W + dj]) * keep : Acc(0);
    }
  }
}

int grid_for(int64_t work) {
  int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
}

// the uint32_t index loop stays exact while idx + the grid stride (< 2^24) cannot wrap past 2^32
bool fits_32_bits(int64_t total) { return total <= 2147483647; }

// one thread per pixel of N·H·W: the 32-bit index instantiation when it fits, else the 64-bit one
template <typename Kernel32, typename Kernel64, typename... Args>
void launch_per_pixel(Kernel32 kernel32, Kernel64 kernel64, int64_t total, cudaStream_t stream, Args... args) {
  if (fits_32_bits(total))
    kernel32<<<grid_for(total), kThreads, 0, stream>>>(args...);
  else
    kernel64<<<grid_for(total), kThreads, 0, stream>>>(args...);
}

int image_blocks(int64_t n) { return static_cast<int>(n < 1 ? 1 : (n > 65535 ? 65535 : n)); }

template <typename T, typename Acc>
void forward_impl(const void* x, const void* ip, const void* fp, const void* base, int64_t N, int64_t C, int64_t H,
                  int64_t W, bool align, void* means, void* y, cudaStream_t stream) {
  color_mean_kernel<T, Acc><<<image_blocks(N), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const int32_t*>(ip), static_cast<const Acc*>(fp), N, C, H * W,
      static_cast<Acc*>(means));
  launch_per_pixel(forward_kernel<T, Acc, uint32_t>, forward_kernel<T, Acc, int64_t>, N * H * W, stream,
                   static_cast<const T*>(x), static_cast<const int32_t*>(ip), static_cast<const Acc*>(fp),
                   static_cast<const Acc*>(base), static_cast<const Acc*>(means), N, C, H, W, align,
                   static_cast<T*>(y));
}

template <typename T, typename Acc>
void backward_impl(const void* g, const void* ip, const void* fp, const void* base, int64_t N, int64_t C, int64_t H,
                   int64_t W, bool align, void* sums, void* gx, cudaStream_t stream) {
  grad_sum_kernel<T, Acc><<<image_blocks(N), kThreads, 0, stream>>>(
      static_cast<const T*>(g), static_cast<const int32_t*>(ip), N, C * H * W, static_cast<Acc*>(sums));
  launch_per_pixel(backward_kernel<T, Acc, uint32_t>, backward_kernel<T, Acc, int64_t>, N * H * W, stream,
                   static_cast<const T*>(g), static_cast<const int32_t*>(ip), static_cast<const Acc*>(fp),
                   static_cast<const Acc*>(base), static_cast<const Acc*>(sums), N, C, H, W, align,
                   static_cast<Acc*>(gx));
}

}  // namespace

void dsa_forward_cuda(const void* x, const void* ip, const void* fp, const void* base, int64_t N, int64_t C, int64_t H,
                      int64_t W, bool align, int dtype, void* means, void* y, cudaStream_t stream) {
  switch (dtype) {
    case 0: forward_impl<float, float>(x, ip, fp, base, N, C, H, W, align, means, y, stream); break;
    case 1: forward_impl<double, double>(x, ip, fp, base, N, C, H, W, align, means, y, stream); break;
    case 2: forward_impl<__half, float>(x, ip, fp, base, N, C, H, W, align, means, y, stream); break;
    case 3: forward_impl<__nv_bfloat16, float>(x, ip, fp, base, N, C, H, W, align, means, y, stream); break;
  }
}

void dsa_backward_cuda(const void* g, const void* ip, const void* fp, const void* base, int64_t N, int64_t C,
                       int64_t H, int64_t W, bool align, int dtype, void* sums, void* gx, cudaStream_t stream) {
  switch (dtype) {
    case 0: backward_impl<float, float>(g, ip, fp, base, N, C, H, W, align, sums, gx, stream); break;
    case 1: backward_impl<double, double>(g, ip, fp, base, N, C, H, W, align, sums, gx, stream); break;
    case 2: backward_impl<__half, float>(g, ip, fp, base, N, C, H, W, align, sums, gx, stream); break;
    case 3: backward_impl<__nv_bfloat16, float>(g, ip, fp, base, N, C, H, W, align, sums, gx, stream); break;
  }
}

}  // namespace ddfast
