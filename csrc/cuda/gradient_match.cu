// gradient_match CUDA kernels: multi-tensor apply over a segment table (see gradient_match.h).
// Forward: partials_kernel (grid segments × groups) reduces <r,s>, ‖r‖², ‖s‖² (or Σ(s−r)²) per
// segment; fold_kernel (one block, deterministic) re-joins segments into DC rows / groups, writes
// the distances and the closed-form gradient coefficients. Backward: one grid writes go·(A·s − B·r).
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

template <typename T, typename Acc, int Metric>
__global__ void partials_kernel(GradientMatchTable t, Acc* __restrict__ partials) {
  constexpr int V = Vec16<T>::kSize;
  const int64_t sid = blockIdx.x, gid = blockIdx.y;
  const Segment sg = load_segment(t, sid, gid);
  const T* syn = reinterpret_cast<const T*>(t.addr[sg.k]) + sg.base;
  const T* real = reinterpret_cast<const T*>(t.addr[t.num_tensors + sg.k]) + sg.base;
  const int length = sg.row >= 0 ? static_cast<int>(sg.length) : 0;  // rank-1 tensors under "ours" add nothing
  const int head = vec16_head(length, syn, real);
  const int nvec = (length - head) / V;
  Acc dot = 0, nr = 0, ns = 0;
  for (int i = threadIdx.x; i < head; i += blockDim.x)
    accumulate<Acc, Metric>(to_acc(ldg(syn + i)), to_acc(ldg(real + i)), dot, nr, ns);
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Vec16<T> s = load16(syn + head + i * V), r = load16(real + head + i * V);
#pragma unroll
    for (int j = 0; j < V; ++j) accumulate<Acc, Metric>(to_acc(s.v[j]), to_acc(r.v[j]), dot, nr, ns);
  }
  for (int i = head + nvec * V + threadIdx.x; i < length; i += blockDim.x)
    accumulate<Acc, Metric>(to_acc(ldg(syn + i)), to_acc(ldg(real + i)), dot, nr, ns);
  const int64_t plane = t.groups * t.num_segs, at = gid * t.num_segs + sid;
  dot = block_sum(dot);
  if (Metric != 1) {
    nr = block_sum(nr);
    ns = block_sum(ns);
  }
  if (threadIdx.x == 0) {
    partials[at] = dot;
    if (Metric != 1) {
      partials[plane + at] = nr;
      partials[2 * plane + at] = ns;
    }
  }
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

template <typename T, typename Acc, int Metric>
__global__ void fold_kernel(GradientMatchTable t, const Acc* __restrict__ partials, Acc eps, bool sum_groups,
                            T* __restrict__ loss, Acc* __restrict__ coefs) {
  const int64_t plane = t.groups * t.num_segs, coef_plane = t.groups * t.coef_rows;
  Acc total = 0;
  for (int64_t g = 0; g < t.groups; ++g) {
    const Acc* gp = partials + g * t.num_segs;
    Acc group_loss;
    if (Metric == 0) {
      Acc acc = 0;
      for (int64_t row = threadIdx.x; row < t.num_rows; row += blockDim.x) {
        const int64_t first = t.rows[row], count = t.rows[t.num_rows + row];
        Acc dot = 0, nr = 0, ns = 0;
        for (int64_t j = first; j < first + count; ++j) {
          dot += gp[j];
          nr += gp[plane + j];
          ns += gp[2 * plane + j];
        }
        Acc a, b;
        acc += cosine_terms(dot, nr, ns, eps, &a, &b);
        coefs[g * t.coef_rows + row] = a;
        coefs[coef_plane + g * t.coef_rows + row] = b;
      }
      group_loss = block_sum(acc);
    } else {
      Acc dot = 0, nr = 0, ns = 0;
      for (int64_t j = threadIdx.x; j < t.num_segs; j += blockDim.x) {
        dot += gp[j];
        if (Metric == 2) {
          nr += gp[plane + j];
          ns += gp[2 * plane + j];
        }
      }
      dot = block_sum(dot);
      if (Metric == 2) {
        nr = block_sum(nr);
        ns = block_sum(ns);
      }
      Acc a = 2, b = 2;  // mse: d/ds Σ(s − r)² = 2s − 2r
      group_loss = Metric == 2 ? cosine_terms(dot, nr, ns, eps, &a, &b) : dot;
      if (threadIdx.x == 0) {
        coefs[g] = a;  // coefs is [2, G, 1] here
        coefs[t.groups + g] = b;
      }
    }
    if (threadIdx.x == 0) {
      if (sum_groups) total += group_loss;
      else loss[g] = from_acc<T, Acc>(group_loss);
    }
  }
  if (threadIdx.x == 0 && sum_groups) *loss = from_acc<T, Acc>(total);
}

template <typename T, typename Acc>
__global__ void backward_kernel(GradientMatchTable t, const T* __restrict__ grad, int64_t grad_stride,
                                const Acc* __restrict__ coefs) {
  constexpr int V = Vec16<T>::kSize;
  const int64_t sid = blockIdx.x, gid = blockIdx.y;
  const Segment sg = load_segment(t, sid, gid);
  const T* syn = reinterpret_cast<const T*>(t.addr[sg.k]) + sg.base;
  const T* real = reinterpret_cast<const T*>(t.addr[t.num_tensors + sg.k]) + sg.base;
  T* out = reinterpret_cast<T*>(t.addr[2 * t.num_tensors + sg.k]) + sg.base;
  __builtin_assume(__isGlobal(out));  // a device tensor: global stores, not generic ones
  const int length = static_cast<int>(sg.length);
  if (sg.row < 0) {  // rank-1 tensor under "ours": no contribution, zero gradient
    for (int i = threadIdx.x; i < length; i += blockDim.x) out[i] = from_acc<T, Acc>(Acc(0));
    return;
  }
  const Acc go = to_acc(grad[gid * grad_stride]);
  const Acc a = go * coefs[gid * t.coef_rows + sg.row];
  const Acc b = go * coefs[t.groups * t.coef_rows + gid * t.coef_rows + sg.row];
  const int head = vec16_head(length, syn, real, static_cast<const T*>(out));
  const int nvec = (length - head) / V;
  for (int i = threadIdx.x; i < head; i += blockDim.x)
    out[i] = from_acc<T, Acc>(a * to_acc(ldg(syn + i)) - b * to_acc(ldg(real + i)));
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const int at = head + i * V;
    const Vec16<T> s = load16(syn + at), r = load16(real + at);
    Vec16<T> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_acc<T, Acc>(a * to_acc(s.v[j]) - b * to_acc(r.v[j]));
    store16(out + at, o);
  }
  for (int i = head + nvec * V + threadIdx.x; i < length; i += blockDim.x)
    out[i] = from_acc<T, Acc>(a * to_acc(ldg(syn + i)) - b * to_acc(ldg(real + i)));
}

template <typename T, typename Acc, int Metric>
void forward_metric(const GradientMatchTable& t, double eps, bool sum_groups, void* partials, void* loss, void* coefs,
                    cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(t.num_segs), static_cast<unsigned>(t.groups));
  partials_kernel<T, Acc, Metric><<<grid, kThreads, 0, stream>>>(t, static_cast<Acc*>(partials));
  fold_kernel<T, Acc, Metric><<<1, kThreads, 0, stream>>>(t, static_cast<const Acc*>(partials), static_cast<Acc>(eps),
                                                          sum_groups, static_cast<T*>(loss), static_cast<Acc*>(coefs));
}

template <typename T, typename Acc>
void forward_impl(const GradientMatchTable& t, int metric, double eps, bool sum_groups, void* partials, void* loss,
                  void* coefs, cudaStream_t stream) {
  switch (metric) {
    case 0: forward_metric<T, Acc, 0>(t, eps, sum_groups, partials, loss, coefs, stream); break;
    case 1: forward_metric<T, Acc, 1>(t, eps, sum_groups, partials, loss, coefs, stream); break;
    default: forward_metric<T, Acc, 2>(t, eps, sum_groups, partials, loss, coefs, stream); break;
  }
}

template <typename T, typename Acc>
void backward_impl(const GradientMatchTable& t, const void* grad, int64_t grad_stride, const void* coefs,
                   cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(t.num_segs), static_cast<unsigned>(t.groups));
  backward_kernel<T, Acc><<<grid, kThreads, 0, stream>>>(t, static_cast<const T*>(grad), grad_stride,
                                                         static_cast<const Acc*>(coefs));
}

}  // namespace

void gradient_match_forward_cuda(const GradientMatchTable& table, int metric, int dtype, double eps, bool sum_groups,
                                 void* partials, void* loss, void* coefs, cudaStream_t stream) {
  switch (dtype) {
    case 0: forward_impl<float, float>(table, metric, eps, sum_groups, partials, loss, coefs, stream); break;
    case 1: forward_impl<double, double>(table, metric, eps, sum_groups, partials, loss, coefs, stream); break;
    case 2: forward_impl<__half, float>(table, metric, eps, sum_groups, partials, loss, coefs, stream); break;
    case 3: forward_impl<__nv_bfloat16, float>(table, metric, eps, sum_groups, partials, loss, coefs, stream); break;
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
