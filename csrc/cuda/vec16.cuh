// 16-byte vector access for the bandwidth kernels (pure CUDA: no torch headers).
// A range [0, n) of element pointers is split into a scalar head (up to the first 16-byte
// boundary), whole 16-byte vectors (one 128-bit load or store each) and a scalar tail. Pointers
// read together must share their offset from a 16-byte boundary; otherwise the whole range is the
// head (scalar). Tensors of T are always aligned to sizeof(T), which the split relies on.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ddfast {

template <typename T> struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);  // 4 float, 2 double, 8 half / bfloat16
  T v[kSize];
};

__device__ __forceinline__ unsigned misalignment16(const void* p) {
  return static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) & 15u);
}

// Elements of the scalar head of [0, n) for pointers p, q, r read together: those before p's first
// 16-byte boundary when all three share p's misalignment, else n (everything scalar).
template <typename T, typename Int>
__device__ __forceinline__ Int vec16_head(Int n, const T* p, const T* q, const T* r = nullptr) {
  const unsigned mis = misalignment16(p);
  if (misalignment16(q) != mis || (r != nullptr && misalignment16(r) != mis)) return n;
  const Int head = mis == 0 ? Int(0) : static_cast<Int>((16u - mis) / sizeof(T));
  return head < n ? head : n;
}

// Loads through the read-only path (ld.global.nc): the pointers may come from a device address
// table, where the compiler cannot tell global memory and would emit generic loads. Only for data
// the kernel does not write.
template <typename T> __device__ __forceinline__ T ldg(const T* p) { return __ldg(p); }

template <typename T> __device__ __forceinline__ Vec16<T> load16(const T* p) {
  const uint4 bits = __ldg(reinterpret_cast<const uint4*>(p));
  Vec16<T> v;
  memcpy(&v, &bits, sizeof(v));  // a register bit cast
  return v;
}

template <typename T> __device__ __forceinline__ void store16(T* p, const Vec16<T>& v) {
  uint4 bits;
  memcpy(&bits, &v, sizeof(v));
  __builtin_assume(__isGlobal(p));  // device tensors: st.global, not a generic store
  *reinterpret_cast<uint4*>(p) = bits;
}

// store16 through the st.global.wb intrinsic: in a loop body that stores several vectors, nvcc
// split the first plain store16 into four 4-byte stores (sm_90 PTX, CUDA 13); this one stays one
// 128-bit store.
template <typename T> __device__ __forceinline__ void store16_wb(T* p, const Vec16<T>& v) {
  uint4 bits;
  memcpy(&bits, &v, sizeof(v));
  __stwb(reinterpret_cast<uint4*>(p), bits);
}

}  // namespace ddfast
