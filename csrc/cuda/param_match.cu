// MTT trajectory loss ||s - t||^2 / ||a - t||^2: one pass over the three vectors.
// Forward: grid-stride partial sums per block (accumulation type), then one block folds the
// partials and writes the ratio (deterministic: no atomics). Backward: one elementwise pass.
#include "param_match.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "cuda_common.cuh"

namespace ddfast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;

template <typename T, typename Acc>
__global__ void partial_sums_kernel(const T* __restrict__ s, const T* __restrict__ a, const T* __restrict__ t,
                                    int64_t n, Acc* __restrict__ partials) {
  Acc num = 0, den = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const Acc tv = to_acc(t[i]);
    const Acc ds = to_acc(s[i]) - tv, da = to_acc(a[i]) - tv;
    num += ds * ds;
    den += da * da;
  }
  num = block_sum(num);
  den = block_sum(den);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = num;
    partials[gridDim.x + blockIdx.x] = den;
  }
}

template <typename T, typename Acc>
__global__ void finish_kernel(const Acc* __restrict__ partials, int blocks, T* __restrict__ loss, Acc* __restrict__ den_out) {
  Acc num = 0, den = 0;
  for (int i = threadIdx.x; i < blocks; i += blockDim.x) {
    num += partials[i];
    den += partials[blocks + i];
  }
  num = block_sum(num);
  den = block_sum(den);
  if (threadIdx.x == 0) {
    *loss = from_acc<T>(num / den);
    *den_out = den;
  }
}

template <typename T, typename Acc>
__global__ void backward_kernel(const T* __restrict__ g, const T* __restrict__ s, const T* __restrict__ t,
                                const Acc* __restrict__ den, int64_t n, T* __restrict__ out) {
  const Acc scale = Acc(2) * to_acc(g[0]) / den[0];
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = from_acc<T>(scale * (to_acc(s[i]) - to_acc(t[i])));
}
template <>
__global__ void backward_kernel<double, double>(const double* __restrict__ g, const double* __restrict__ s,
                                                const double* __restrict__ t, const double* __restrict__ den,
                                                int64_t n, double* __restrict__ out) {
  const double scale = 2.0 * g[0] / den[0];
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = scale * (s[i] - t[i]);
}

int blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

template <typename T, typename Acc>
void forward_impl(const void* s, const void* a, const void* t, int64_t n, void* ws, void* loss, void* den,
                  cudaStream_t stream) {
  const int blocks = blocks_for(n);
  partial_sums_kernel<T, Acc><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(s), static_cast<const T*>(a), static_cast<const T*>(t), n, static_cast<Acc*>(ws));
  finish_kernel<T, Acc><<<1, kThreads, 0, stream>>>(static_cast<const Acc*>(ws), blocks, static_cast<T*>(loss),
                                                     static_cast<Acc*>(den));
}

template <typename T, typename Acc>
void backward_impl(const void* g, const void* s, const void* t, const void* den, int64_t n, void* out,
                   cudaStream_t stream) {
  int64_t b = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(b < 1 ? 1 : (b > 65535 ? 65535 : b));
  backward_kernel<T, Acc><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(g), static_cast<const T*>(s),
                                                            static_cast<const T*>(t), static_cast<const Acc*>(den), n,
                                                            static_cast<T*>(out));
}

}  // namespace

int64_t param_match_workspace_size(int64_t n, int dtype) {
  return 2 * static_cast<int64_t>(blocks_for(n)) * (dtype == 1 ? sizeof(double) : sizeof(float));
}

void param_match_forward_cuda(const void* s, const void* a, const void* t, int64_t n, int dtype, void* ws,
                              void* loss, void* den, cudaStream_t stream) {
  switch (dtype) {
    case 0: forward_impl<float, float>(s, a, t, n, ws, loss, den, stream); break;
    case 1: forward_impl<double, double>(s, a, t, n, ws, loss, den, stream); break;
    case 2: forward_impl<__half, float>(s, a, t, n, ws, loss, den, stream); break;
    case 3: forward_impl<__nv_bfloat16, float>(s, a, t, n, ws, loss, den, stream); break;
  }
}

void param_match_backward_cuda(const void* g, const void* s, const void* t, const void* den, int64_t n, int dtype,
                               void* out, cudaStream_t stream) {
  switch (dtype) {
    case 0: backward_impl<float, float>(g, s, t, den, n, out, stream); break;
    case 1: backward_impl<double, double>(g, s, t, den, n, out, stream); break;
    case 2: backward_impl<__half, float>(g, s, t, den, n, out, stream); break;
    case 3: backward_impl<__nv_bfloat16, float>(g, s, t, den, n, out, stream); break;
  }
}

}  // namespace ddfast
