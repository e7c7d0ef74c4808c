// MTT trajectory loss ||s - t||^2 / ||a - t||^2: one pass over the three vectors.
// Forward: grid-stride partial sums per block (accumulation type), then one block folds the
// partials and writes the ratio (deterministic: no atomics). Backward: one elementwise pass.
// Both passes read (and write) a scalar head up to a 16-byte boundary, 128-bit vectors and a
// scalar tail when the pointers share one misalignment (vec16.cuh), else element by element.
#include "param_match.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "cuda_common.cuh"
#include "vec16.cuh"

namespace ddfast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;

template <typename Acc>
__device__ __forceinline__ void accumulate(Acc sv, Acc av, Acc tv, Acc& num, Acc& den) {
  const Acc ds = sv - tv, da = av - tv;
  num += ds * ds;
  den += da * da;
}

template <typename T, typename Acc>
__global__ void partial_sums_kernel(const T* __restrict__ s, const T* __restrict__ a, const T* __restrict__ t,
                                    int64_t n, Acc* __restrict__ partials) {
  constexpr int V = Vec16<T>::kSize;
  const int64_t first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t head = vec16_head(n, s, a, t), nvec = (n - head) / V;
  Acc num = 0, den = 0;
  for (int64_t i = first; i < head; i += stride) accumulate(to_acc(s[i]), to_acc(a[i]), to_acc(t[i]), num, den);
  for (int64_t i = first; i < nvec; i += stride) {
    const int64_t at = head + i * V;
    const Vec16<T> sv = load16(s + at), av = load16(a + at), tv = load16(t + at);
#pragma unroll
    for (int j = 0; j < V; ++j) accumulate(to_acc(sv.v[j]), to_acc(av.v[j]), to_acc(tv.v[j]), num, den);
  }
  for (int64_t i = head + nvec * V + first; i < n; i += stride)
    accumulate(to_acc(s[i]), to_acc(a[i]), to_acc(t[i]), num, den);
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
  constexpr int V = Vec16<T>::kSize;
  const Acc scale = Acc(2) * to_acc(g[0]) / den[0];
  const int64_t first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t head = vec16_head(n, s, t, static_cast<const T*>(out)), nvec = (n - head) / V;
  for (int64_t i = first; i < head; i += stride) out[i] = from_acc<T>(scale * (to_acc(s[i]) - to_acc(t[i])));
  for (int64_t i = first; i < nvec; i += stride) {
    const int64_t at = head + i * V;
    const Vec16<T> sv = load16(s + at), tv = load16(t + at);
    Vec16<T> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_acc<T>(scale * (to_acc(sv.v[j]) - to_acc(tv.v[j])));
    store16(out + at, o);
  }
  for (int64_t i = head + nvec * V + first; i < n; i += stride)
    out[i] = from_acc<T>(scale * (to_acc(s[i]) - to_acc(t[i])));
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
