// gradient_match CUDA kernels: multi-tensor apply over a segment table (see gradient_match.h).
// Forward, ONE launch: partials_kernel (grid ceil(segments / 8) × groups, 256 threads = 8 warps, one
// segment per warp, warp-shuffle sums) writes <r,s>, ‖r‖², ‖s‖² (or Σ(s−r)²) per segment; then each
// block bumps its group's arrival counter and the block that arrives last folds the group in its
// epilogue (rows across its threads for "ours", segments for mse/cos), writes the closed-form
// gradient coefficients and the group's distance, or, for reduction "sum", stores the distance in a
// workspace and bumps a second counter: the last group folder adds the G distances in order
// g = 0..G−1. Fixed-order sums throughout: bitwise equal results across calls. The folders reset
// the counters to 0 (csrc/gradient_match.cpp keeps one zeroed buffer per stream).
// Backward: one warp per segment writes go·(A·s − B·r).
// A segment is read (and written) as a scalar head up to a 16-byte boundary, 128-bit vectors and a
// scalar tail when its pointers share one misalignment (vec16.cuh), else element by element.
// Segments hold at most kGradientMatchSegment elements: 32-bit indices within one.
#include "gradient_match.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "cuda_common.cuh"
#include "vec16.cuh"

static_assert(ddfast::kGradientMatchSegment <= 2147483647, "segment lengths are cast to int in the kernels");

namespace ddfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;  // segments per block: rows of 27..8192 elements keep a warp busy
constexpr int kBatch = 4;               // 16-byte vectors per lane loaded before the backward stores them

struct Segment {
  int64_t k, base, length, row;
};

__device__ __forceinline__ Segment load_segment(const GradientMatchTable& t, int64_t sid, int64_t gid) {
  Segment s;
  s.k = t.seg[sid];
  s.base = gid * t.gnumel[s.k] + t.seg[t.num_segs + sid];
  s.length = t.seg[2 * t.num_segs + sid];
  s.row = t.seg[3 * t.num_segs + sid];
  return s;
}

// This warp's segment: warp w of block x covers segment 8x + w (≥ num_segs: none).
__device__ __forceinline__ int64_t warp_segment() {
  return static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
}

// Sum over the 32 lanes of a warp (butterfly: every lane holds the same, fixed-order result).
template <typename Acc> __device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename Acc, int Metric>
__device__ __forceinline__ void accumulate(Acc s, Acc r, Acc& dot, Acc& nr, Acc& ns) {
  if (Metric == 1) {
    dot += (s - r) * (s - r);
  } else {
    dot += s * r;
    nr += r * r;
    ns += s * s;
  }
}

// One warp's lane-wise sums over segment sid of group gid (scalar head, 16-byte vectors, scalar tail).
template <typename T, typename Acc, int Metric>
__device__ __forceinline__ void warp_segment_sums(const GradientMatchTable& t, int64_t sid, int64_t gid, int lane,
                                                  Acc& dot, Acc& nr, Acc& ns) {
  constexpr int V = Vec16<T>::kSize;
  const Segment sg = load_segment(t, sid, gid);
  const T* syn = reinterpret_cast<const T*>(t.addr[sg.k]) + sg.base;
  const T* real = reinterpret_cast<const T*>(t.addr[t.num_tensors + sg.k]) + sg.base;
  const int length = sg.row >= 0 ? static_cast<int>(sg.length) : 0;  // rank-1 tensors under "ours" add nothing
  const int head = vec16_head(length, syn, real);
  const int nvec = (length - head) / V;
  for (int i = lane; i < head; i += 32)
    accumulate<Acc, Metric>(to_acc(ldg(syn + i)), to_acc(ldg(real + i)), dot, nr, ns);
#pragma unroll 4
  for (int i = lane; i < nvec; i += 32) {
    const Vec16<T> s = load16(syn + head + i * V), r = load16(real + head + i * V);
#pragma unroll
    for (int j = 0; j < V; ++j) accumulate<Acc, Metric>(to_acc(s.v[j]), to_acc(r.v[j]), dot, nr, ns);
  }
  for (int i = head + nvec * V + lane; i < length; i += 32)
    accumulate<Acc, Metric>(to_acc(ldg(syn + i)), to_acc(ldg(real + i)), dot, nr, ns);
}

// 1 − dot/D with D = ‖r‖‖s‖ + eps; d/ds = A·s − B·r (A = 0 where s = 0, as autograd's norm gives).
template <typename Acc>
__device__ __forceinline__ Acc cosine_terms(Acc dot, Acc nr, Acc ns, Acc eps, Acc* a, Acc* b) {
  const Acc norm_r = sqrt(nr), norm_s = sqrt(ns);
  const Acc den = norm_r * norm_s + eps;
  *b = Acc(1) / den;
  *a = norm_s > Acc(0) ? (dot / den) * (norm_r / norm_s) / den : Acc(0);  // D² alone overflows fp32
  return Acc(1) - dot / den;
}

// Group g's distance from its segments' partials (written by other blocks: read with __ldcg, past
// L1), with its coefficients written; the result is valid in thread 0. Every thread calls it.
template <typename Acc, int Metric>
__device__ __forceinline__ Acc fold_group(const GradientMatchTable& t, const Acc* partials, Acc eps, Acc* coefs, int64_t g) {
  const int64_t plane = t.groups * t.num_segs, coef_plane = t.groups * t.coef_rows;
  const Acc* gp = partials + g * t.num_segs;
  if (Metric == 0) {  // one thread per DC row, its segments in order
    Acc acc = 0;
    for (int64_t row = threadIdx.x; row < t.num_rows; row += blockDim.x) {
      const int64_t first = t.rows[row], count = t.rows[t.num_rows + row];
      Acc dot = 0, nr = 0, ns = 0;
      for (int64_t j = first; j < first + count; ++j) {
        dot += __ldcg(gp + j);
        nr += __ldcg(gp + plane + j);
        ns += __ldcg(gp + 2 * plane + j);
      }
      Acc a, b;
      acc += cosine_terms(dot, nr, ns, eps, &a, &b);
      coefs[g * t.coef_rows + row] = a;
      coefs[coef_plane + g * t.coef_rows + row] = b;
    }
    return block_sum(acc);
  }
  Acc dot = 0, nr = 0, ns = 0;
  for (int64_t j = threadIdx.x; j < t.num_segs; j += blockDim.x) {
    dot += __ldcg(gp + j);
    if (Metric == 2) {
      nr += __ldcg(gp + plane + j);
      ns += __ldcg(gp + 2 * plane + j);
    }
  }
  dot = block_sum(dot);
  if (Metric == 2) {
    nr = block_sum(nr);
    ns = block_sum(ns);
  }
  Acc a = 2, b = 2;  // mse: d/ds Σ(s − r)² = 2s − 2r
  const Acc group_loss = Metric == 2 ? cosine_terms(dot, nr, ns, eps, &a, &b) : dot;
  if (threadIdx.x == 0) {
    coefs[g] = a;  // coefs is [2, G, 1] here
    coefs[t.groups + g] = b;
  }
  return group_loss;
}

// Thread 0 of group g's folder: the distance to loss[g], or (sum) to the workspace, and the last
// group folder adds the G distances in order 0..G−1. Resets the counters it completed.
template <typename T, typename Acc>
__device__ __forceinline__ void finish_group(const GradientMatchTable& t, Acc group_loss, bool sum_groups, Acc* workspace,
                             unsigned* counters, T* loss, int64_t g) {
  if (!sum_groups) {
    loss[g] = from_acc<T, Acc>(group_loss);
    return;
  }
  workspace[g] = group_loss;
  __threadfence();  // release: the distance is visible before this group's arrival is
  if (atomicAdd(counters + t.groups, 1u) != static_cast<unsigned>(t.groups - 1)) return;
  counters[t.groups] = 0;  // every group arrived: nobody touches it again in this launch
  __threadfence();         // acquire: the other folders' distances are read after their arrivals
  Acc total = 0;           // 0 + d0 + d1 + …, as the former one-block fold
  for (int64_t h = 0; h < t.groups; ++h) total += __ldcg(workspace + h);
  *loss = from_acc<T, Acc>(total);
}

template <typename T, typename Acc, int Metric>
__global__ void partials_kernel(GradientMatchTable t, Acc* __restrict__ partials, unsigned* __restrict__ counters,
                                Acc eps, bool sum_groups, T* __restrict__ loss, Acc* __restrict__ coefs) {
  const int lane = threadIdx.x & 31;
  const int64_t sid = warp_segment(), gid = blockIdx.y;
  const int64_t plane = t.groups * t.num_segs;
  if (sid < t.num_segs) {  // warp-uniform: the shuffles see all 32 lanes
    Acc dot = 0, nr = 0, ns = 0;
    warp_segment_sums<T, Acc, Metric>(t, sid, gid, lane, dot, nr, ns);
    dot = warp_sum(dot);
    if (Metric != 1) {
      nr = warp_sum(nr);
      ns = warp_sum(ns);
    }
    if (lane == 0) {
      const int64_t at = gid * t.num_segs + sid;
      partials[at] = dot;
      if (Metric != 1) {
        partials[plane + at] = nr;
        partials[2 * plane + at] = ns;
      }
    }
  }
  // last-block epilogue (the classic threadfence reduction): blocks of this group count in
  __shared__ bool is_last;
  __threadfence();  // release: this thread's partials are visible device-wide before the arrival
  __syncthreads();  // ... and every thread's are, before thread 0 arrives
  if (threadIdx.x == 0) {
    is_last = atomicAdd(counters + gid, 1u) == gridDim.x - 1;
    if (is_last) counters[gid] = 0;  // all blocks of the group arrived: reset for the next launch
  }
  __syncthreads();
  if (!is_last) return;  // block-uniform
  __threadfence();  // acquire: the other blocks' partials are read (with __ldcg) after their arrivals
  const Acc group_loss = fold_group<Acc, Metric>(t, partials, eps, coefs, gid);
  if (threadIdx.x == 0)
    finish_group<T, Acc>(t, group_loss, sum_groups, partials + (Metric == 1 ? 1 : 3) * plane, counters, loss, gid);
}

template <typename T, typename Acc>
__global__ void backward_kernel(GradientMatchTable t, const T* __restrict__ grad, int64_t grad_stride,
                                const Acc* __restrict__ coefs) {
  constexpr int V = Vec16<T>::kSize;
  const int lane = threadIdx.x & 31;
  const int64_t sid = warp_segment(), gid = blockIdx.y;
  if (sid >= t.num_segs) return;  // no block-wide barrier below
  const Segment sg = load_segment(t, sid, gid);
  const T* syn = reinterpret_cast<const T*>(t.addr[sg.k]) + sg.base;
  const T* real = reinterpret_cast<const T*>(t.addr[t.num_tensors + sg.k]) + sg.base;
  T* out = reinterpret_cast<T*>(t.addr[2 * t.num_tensors + sg.k]) + sg.base;
  __builtin_assume(__isGlobal(out));  // a device tensor: global stores, not generic ones
  const int length = static_cast<int>(sg.length);
  if (sg.row < 0) {  // rank-1 tensor under "ours": no contribution, zero gradient
    for (int i = lane; i < length; i += 32) out[i] = from_acc<T, Acc>(Acc(0));
    return;
  }
  const Acc go = to_acc(grad[gid * grad_stride]);
  const Acc a = go * coefs[gid * t.coef_rows + sg.row];
  const Acc b = go * coefs[t.groups * t.coef_rows + gid * t.coef_rows + sg.row];
  const int head = vec16_head(length, syn, real, static_cast<const T*>(out));
  const int nvec = (length - head) / V;
  for (int i = lane; i < head; i += 32)
    out[i] = from_acc<T, Acc>(a * to_acc(ldg(syn + i)) - b * to_acc(ldg(real + i)));
  // Batches of kBatch vectors per lane, every load issued before the batch's stores: the stores
  // may alias the loads as far as the compiler knows (table pointers), so a plain unrolled loop
  // (the former code) issued load, load, store per vector: 2 loads in flight per lane, against 8 here
  // (the PTX order, checked by tests/test_cuda_sources.py). The forward already batches its loads.
  for (int i0 = lane; i0 < nvec; i0 += 32 * kBatch) {
    Vec16<T> s[kBatch], r[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + 32 * u;
      if (i < nvec) {
        s[u] = load16(syn + head + i * V);
        r[u] = load16(real + head + i * V);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + 32 * u;
      if (i < nvec) {
        Vec16<T> o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = from_acc<T, Acc>(a * to_acc(s[u].v[j]) - b * to_acc(r[u].v[j]));
        store16_wb(out + head + i * V, o);
      }
    }
  }
  for (int i = head + nvec * V + lane; i < length; i += 32)
    out[i] = from_acc<T, Acc>(a * to_acc(ldg(syn + i)) - b * to_acc(ldg(real + i)));
}

dim3 warp_grid(const GradientMatchTable& t) {
  return dim3(static_cast<unsigned>((t.num_segs + kWarps - 1) / kWarps), static_cast<unsigned>(t.groups));
}

template <typename T, typename Acc, int Metric>
void forward_metric(const GradientMatchTable& t, double eps, bool sum_groups, void* partials, unsigned* counters,
                    void* loss, void* coefs, cudaStream_t stream) {
  partials_kernel<T, Acc, Metric><<<warp_grid(t), kThreads, 0, stream>>>(
      t, static_cast<Acc*>(partials), counters, static_cast<Acc>(eps), sum_groups, static_cast<T*>(loss),
      static_cast<Acc*>(coefs));
}

template <typename T, typename Acc>
void forward_impl(const GradientMatchTable& t, int metric, double eps, bool sum_groups, void* partials,
                  unsigned* counters, void* loss, void* coefs, cudaStream_t stream) {
  switch (metric) {
    case 0: forward_metric<T, Acc, 0>(t, eps, sum_groups, partials, counters, loss, coefs, stream); break;
    case 1: forward_metric<T, Acc, 1>(t, eps, sum_groups, partials, counters, loss, coefs, stream); break;
    default: forward_metric<T, Acc, 2>(t, eps, sum_groups, partials, counters, loss, coefs, stream); break;
  }
}

template <typename T, typename Acc>
void backward_impl(const GradientMatchTable& t, const void* grad, int64_t grad_stride, const void* coefs,
                   cudaStream_t stream) {
  backward_kernel<T, Acc><<<warp_grid(t), kThreads, 0, stream>>>(t, static_cast<const T*>(grad), grad_stride,
                                                         static_cast<const Acc*>(coefs));
}

}  // namespace

void gradient_match_forward_cuda(const GradientMatchTable& table, int metric, int dtype, double eps, bool sum_groups,
                                 void* partials, unsigned* counters, void* loss, void* coefs, cudaStream_t stream) {
  switch (dtype) {
    case 0: forward_impl<float, float>(table, metric, eps, sum_groups, partials, counters, loss, coefs, stream); break;
    case 1: forward_impl<double, double>(table, metric, eps, sum_groups, partials, counters, loss, coefs, stream); break;
    case 2: forward_impl<__half, float>(table, metric, eps, sum_groups, partials, counters, loss, coefs, stream); break;
    case 3:
      forward_impl<__nv_bfloat16, float>(table, metric, eps, sum_groups, partials, counters, loss, coefs, stream);
      break;
  }
}

void gradient_match_backward_cuda(const GradientMatchTable& table, int dtype, const void* grad, int64_t grad_stride,
                                  const void* coefs, cudaStream_t stream) {
  switch (dtype) {
    case 0: backward_impl<float, float>(table, grad, grad_stride, coefs, stream); break;
    case 1: backward_impl<double, double>(table, grad, grad_stride, coefs, stream); break;
    case 2: backward_impl<__half, float>(table, grad, grad_stride, coefs, stream); break;
    case 3: backward_impl<__nv_bfloat16, float>(table, grad, grad_stride, coefs, stream); break;
  }
}

}  // namespace ddfast
