// Device helpers shared by the CUDA kernels (pure CUDA: no torch headers).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ddfast {

// Accumulation type: fp32 for half types and float, fp64 for double.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Load-side conversion to the accumulation type (also right when called as to_acc<double>(x)).
template <typename T> __device__ __forceinline__ typename AccOf<T>::type to_acc(T v) {
  return static_cast<typename AccOf<T>::type>(v);
}
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Store-side conversion from the accumulation type.
template <typename T, typename Acc> __device__ __forceinline__ T from_acc(Acc v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16(v);
}

// Sum over a block of Threads threads (a multiple of 32); the result is valid in thread 0.
template <typename Acc, int Threads = 256> __device__ Acc block_sum(Acc v) {
  static_assert(Threads % 32 == 0 && Threads <= 1024, "block_sum needs whole warps");
  __shared__ Acc warp_sums[Threads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < Threads / 32 ? warp_sums[threadIdx.x] : Acc(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  __syncthreads();  // warp_sums is reused by the next call
  return v;
}

}  // namespace ddfast
