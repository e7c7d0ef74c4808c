// bn_stat: per-channel mean and biased variance of x (N, C, S) in one read, and the elementwise
// backward of SRe2L's ‖μ − rm‖₂ + ‖σ² − rv‖₂; one launch each way, no host sync.
//
// Forward, block (channel c, split): each thread sums its elements shifted by the channel's first
// value (so the variance does not cancel), 16-byte vectors along each contiguous run of S when S is
// a multiple of the vector width and x is 16-byte aligned; the block merges the threads'
// (count, mean, M2) with Chan's formula (warp shuffles, then shared memory) and stores the split's
// partial. Last-block epilogue, two levels of arrival counters: the last split of channel c to
// arrive merges c's splits (Chan's formula in fp64, split order) and writes μ_c, σ²_c and the
// squared deviations from the running statistics; the last channel to finish sums those in channel
// order (fp64, fixed order: deterministic) into the loss.
// Backward: a grid-stride elementwise kernel capped at one resident wave (occupancy query) and at
// 16·C elements per block; every block first takes
// the two norms (fp64, the same order in every block) and puts a_c, b_c, μ_c in shared memory, then
// writes grad_x = a_c + b_c (x − μ_c) with 16-byte vectors (scalar head and tail).
#include "bn_stat.h"

#include <atomic>
#include <map>
#include <mutex>
#include <tuple>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "cuda_common.cuh"
#include "vec16.cuh"

namespace ddfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kPerBlockTarget = 16384;  // elements per block before adding another split
constexpr int64_t kChunkAlign = 16;         // split boundaries: a multiple of every vector width
// a_c, b_c, μ_c in dynamic shared memory up to this size (under the 48 KiB needing no opt-in, with
// room for the static arrays); more channels read them from global memory per element
constexpr size_t kMaxCoefSmem = 40 * 1024;
// backward grid cap: the instance's resident blocks per SM (occupancy query), never above the
// 2048 threads an SM holds; that bound also decides the index type before the instance is known
constexpr int kMaxBlocksPerSm = 2048 / kThreads;
constexpr int64_t kElemsPerChannel = 16;  // backward: minimum elements per block, per channel

template <typename Acc> struct Stats { Acc n, mean, m2; };

template <typename Acc> __device__ __forceinline__ Stats<Acc> merge(Stats<Acc> a, Stats<Acc> b) {
  const Acc n = a.n + b.n;
  if (n == Acc(0)) return a;
  const Acc delta = b.mean - a.mean;
  const Acc wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

// Chan's merge over the block; the result is valid in thread 0.
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

// Sum of one double per thread over the block, returned to every thread (fixed order: deterministic).
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

// Shifted sums of one thread (sum, sum of squares, count of x − shift).
template <typename Acc> struct ShiftedSums {
  Acc sum = 0, sumsq = 0, cnt = 0;
  __device__ __forceinline__ void add(Acc d) {
    sum += d;
    sumsq += d * d;
    cnt += Acc(1);
  }
};

// Position e = ni·width + si (0 ≤ si < width) advanced by kThreads = step_n·width + step_s with one
// carry: the divisions run once per thread, not per element (a 64-bit division per element spilled).
struct RowWalker {
  int64_t ni, si, step_n, step_s, width;
  __device__ __forceinline__ RowWalker(int64_t e, int64_t w) : width(w) {
    ni = e / w;
    si = e - ni * w;
    step_n = kThreads / w;
    step_s = kThreads - step_n * w;
  }
  __device__ __forceinline__ void advance() {
    ni += step_n;
    si += step_s;
    if (si >= width) {
      si -= width;
      ++ni;
    }
  }
};

// Elements lo + threadIdx.x, + kThreads, ... below hi of channel c (element e = ni·s + si lies at
// x[(ni·C + c)·s + si]), one at a time.
template <typename T, typename Acc>
__device__ __forceinline__ void accumulate_scalar(const T* __restrict__ x, int64_t c_dim, int64_t c, int64_t s,
                                                  int64_t lo, int64_t hi, Acc shift, ShiftedSums<Acc>& acc) {
  RowWalker w(lo + threadIdx.x, s);
  for (int64_t e = lo + threadIdx.x; e < hi; e += kThreads, w.advance())
    acc.add(to_acc(ldg(x + (w.ni * c_dim + c) * s + w.si)) - shift);
}

// The same elements as 16-byte vectors: needs S % V == 0, lo % V == 0, hi % V == 0 and x 16-byte
// aligned, so vector j = ni·(S/V) + si of the channel is one aligned load at x + ((ni·C + c)·(S/V) + si)·V.
template <typename T, typename Acc>
__device__ __forceinline__ void accumulate_vec16(const T* __restrict__ x, int64_t c_dim, int64_t c, int64_t s,
                                                 int64_t lo, int64_t hi, Acc shift, ShiftedSums<Acc>& acc) {
  constexpr int V = Vec16<T>::kSize;
  const int64_t sv = s / V, hi_v = hi / V;
  RowWalker w(lo / V + threadIdx.x, sv);
  for (int64_t j = lo / V + threadIdx.x; j < hi_v; j += kThreads, w.advance()) {
    const Vec16<T> v = load16(x + ((w.ni * c_dim + c) * sv + w.si) * V);
#pragma unroll
    for (int k = 0; k < V; ++k) acc.add(to_acc(v.v[k]) - shift);
  }
}

// The last split of a channel: Chan's merge of its splits in fp64 (split order, one thread), reading
// the partials through L2 (__ldcg: other blocks wrote them). Stores μ_c, σ²_c (acc dtype) and the
// squared deviations of the stored values from the running statistics (fp64).
template <typename Acc>
__device__ void merge_channel(const Acc* partials, int64_t c_dim, int64_t c, int64_t splits, const Acc* __restrict__ rm,
                              const Acc* __restrict__ rv, double* squares, Acc* __restrict__ mean_out,
                              Acc* __restrict__ var_out) {
  const Acc* cnt = partials + c * splits;
  const Acc* mu_p = cnt + c_dim * splits;
  const Acc* m2_p = mu_p + c_dim * splits;
  double total = 0.0, weighted = 0.0;
  for (int64_t k = 0; k < splits; ++k) {
    const double n_k = static_cast<double>(__ldcg(cnt + k));
    total += n_k;
    weighted += n_k * static_cast<double>(__ldcg(mu_p + k));
  }
  const double mu = weighted / total;
  double m2 = 0.0;
  for (int64_t k = 0; k < splits; ++k) {
    const double d = static_cast<double>(__ldcg(mu_p + k)) - mu;
    m2 += static_cast<double>(__ldcg(m2_p + k)) + static_cast<double>(__ldcg(cnt + k)) * d * d;
  }
  const Acc mean_c = static_cast<Acc>(mu), var_c = static_cast<Acc>(m2 / total);
  mean_out[c] = mean_c;
  var_out[c] = var_c;
  // the norms use the statistics as stored (acc dtype), like the reference's fp32 tensors
  const double dm = static_cast<double>(mean_c) - static_cast<double>(rm[c]);
  const double dv = static_cast<double>(var_c) - static_cast<double>(rv[c]);
  squares[c] = dm * dm;
  squares[c_dim + c] = dv * dv;
}

// grid.x = C · splits; block (c, sp) covers elements [sp·chunk, (sp+1)·chunk) of channel c.
// counters[c] counts the arrived splits of c, counters[C] the finished channels; both start at 0
// (the launcher's memset). Ordering: the writer's stores, __threadfence, then its atomicAdd; the
// block that sees the last arrival fences again before reading the others' stores through L2.
template <typename T, typename Acc, bool kVec>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, int64_t c_dim, int64_t s, int64_t m, int64_t splits, int64_t chunk,
                   const Acc* __restrict__ rm, const Acc* __restrict__ rv, Acc* partials, double* squares,
                   int* counters, Acc* __restrict__ mean_out, Acc* __restrict__ var_out, Acc* __restrict__ loss_out) {
  __shared__ bool last_split, last_channel;
  const int64_t c = blockIdx.x / splits, sp = blockIdx.x - c * splits;
  const int64_t lo = sp * chunk;
  const int64_t hi = lo + chunk < m ? lo + chunk : m;
  const Acc shift = to_acc(ldg(x + c * s));
  ShiftedSums<Acc> acc;
  if (kVec)
    accumulate_vec16<T, Acc>(x, c_dim, c, s, lo, hi, shift, acc);
  else
    accumulate_scalar<T, Acc>(x, c_dim, c, s, lo, hi, shift, acc);
  Stats<Acc> st{acc.cnt, Acc(0), Acc(0)};
  if (acc.cnt > Acc(0)) {
    const Acc md = acc.sum / acc.cnt;
    const Acc m2 = acc.sumsq - acc.sum * md;
    st = {acc.cnt, shift + md, m2 > Acc(0) ? m2 : Acc(0)};
  }
  st = block_merge(st);
  if (threadIdx.x == 0) {
    const int64_t o = c * splits + sp;
    partials[o] = st.n;
    partials[c_dim * splits + o] = st.mean;
    partials[2 * c_dim * splits + o] = st.m2;
    __threadfence();  // the partial is visible device-wide before the arrival is counted
    last_split = atomicAdd(counters + c, 1) == static_cast<int>(splits - 1);
  }
  __syncthreads();
  if (!last_split) return;  // uniform over the block
  if (threadIdx.x == 0) {
    __threadfence();  // pairs with the other splits' fences: their partials are read after this
    merge_channel(partials, c_dim, c, splits, rm, rv, squares, mean_out, var_out);
    __threadfence();
    last_channel = atomicAdd(counters + c_dim, 1) == static_cast<int>(c_dim - 1);
  }
  __syncthreads();
  if (!last_channel) return;
  __threadfence();
  double sq_mean = 0.0, sq_var = 0.0;  // thread t: channels t, t + kThreads, ... (fixed order)
  for (int64_t ch = threadIdx.x; ch < c_dim; ch += kThreads) {
    sq_mean += __ldcg(squares + ch);
    sq_var += __ldcg(squares + c_dim + ch);
  }
  sq_mean = block_sum(sq_mean);
  sq_var = block_sum(sq_var);
  if (threadIdx.x == 0) *loss_out = static_cast<Acc>(sqrt(sq_mean) + sqrt(sq_var));
}

// Per-channel a_c = g (μ_c − rm_c)/(‖μ − rm‖ M), b_c = 2 g (σ²_c − rv_c)/(‖σ² − rv‖ M) (fp64, rounded
// to Acc) and μ_c: from the block's shared-memory table (kSmem), or recomputed from global memory
// (more channels than kMaxCoefSmem holds).
template <typename Acc, typename Index, bool kSmem> struct Coefficients {
  const Acc* table;  // shared: a[C], b[C], μ[C]
  const Acc *mean, *var, *rm, *rv;
  double scale_mean, scale_var;
  Index c_dim;
  __device__ __forceinline__ Acc a_of(Index c) const {
    return static_cast<Acc>(scale_mean * (static_cast<double>(mean[c]) - static_cast<double>(rm[c])));
  }
  __device__ __forceinline__ Acc b_of(Index c) const {
    return static_cast<Acc>(scale_var * (static_cast<double>(var[c]) - static_cast<double>(rv[c])));
  }
  __device__ __forceinline__ void get(Index c, Acc& a, Acc& b, Acc& mu) const {
    if (kSmem) {
      a = table[c];
      b = table[c_dim + c];
      mu = table[2 * c_dim + c];
    } else {
      a = a_of(c);
      b = b_of(c);
      mu = mean[c];
    }
  }
};

extern __shared__ __align__(16) unsigned char coef_smem[];

// Every block: the norms (thread t: channels t, t + kThreads, ...; fixed order, the same in every
// block), then the coefficient table; zero norm → zero coefficients (as torch.norm's backward).
template <typename Acc, typename Index, bool kSmem>
__device__ Coefficients<Acc, Index, kSmem> block_coefficients(const Acc* __restrict__ grad, const Acc* __restrict__ mean,
                                                              const Acc* __restrict__ var, const Acc* __restrict__ rm,
                                                              const Acc* __restrict__ rv, Index c_dim, double m) {
  double sq_mean = 0.0, sq_var = 0.0;
  for (Index ch = threadIdx.x; ch < c_dim; ch += kThreads) {
    const double dm = static_cast<double>(mean[ch]) - static_cast<double>(rm[ch]);
    const double dv = static_cast<double>(var[ch]) - static_cast<double>(rv[ch]);
    sq_mean += dm * dm;
    sq_var += dv * dv;
  }
  const double norm_mean = sqrt(block_sum(sq_mean));
  const double norm_var = sqrt(block_sum(sq_var));
  const double g = static_cast<double>(*grad);
  Coefficients<Acc, Index, kSmem> k{nullptr, mean, var, rm, rv, norm_mean > 0.0 ? g / (norm_mean * m) : 0.0,
                             norm_var > 0.0 ? 2.0 * g / (norm_var * m) : 0.0, c_dim};
  if (kSmem) {
    Acc* table = reinterpret_cast<Acc*>(coef_smem);
    for (Index ch = threadIdx.x; ch < c_dim; ch += kThreads) {
      table[ch] = k.a_of(ch);
      table[c_dim + ch] = k.b_of(ch);
      table[2 * c_dim + ch] = mean[ch];
    }
    __syncthreads();
    k.table = table;
  }
  return k;
}

// Index: uint32_t when total + the grid stride fits (the launcher checks), so the per-element
// channel index is a 32-bit division, not a 64-bit one; int64_t otherwise. Elements [0, head) and
// the tail are scalar; the vectors between are 16-byte loads and stores (head: vec16_head of x and
// out). Element i has channel (i / S) % C; inside a vector the channel advances with a carry.
template <typename T, typename Acc, typename Index, bool kSmem>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const Acc* __restrict__ grad, const T* __restrict__ x, const Acc* __restrict__ mean,
                    const Acc* __restrict__ var, const Acc* __restrict__ rm, const Acc* __restrict__ rv, Index c_dim,
                    Index s, Index total, double m, T* __restrict__ out) {
  constexpr int V = Vec16<T>::kSize;
  const Coefficients<Acc, Index, kSmem> k = block_coefficients<Acc, Index, kSmem>(grad, mean, var, rm, rv, c_dim, m);
  const Index first = blockIdx.x * (Index)kThreads + threadIdx.x, stride = (Index)gridDim.x * kThreads;
  const Index head = vec16_head(total, x, static_cast<const T*>(out));
  const Index nvec = (total - head) / V;
  Acc a, b, mu;
  for (Index i = first; i < head; i += stride) {
    k.get((i / s) % c_dim, a, b, mu);
    out[i] = from_acc<T, Acc>(a + b * (to_acc(ldg(x + i)) - mu));
  }
  for (Index j = first; j < nvec; j += stride) {
    const Index at = head + j * V;
    const Index q = at / s;
    Index r = at - q * s, c = q % c_dim;
    k.get(c, a, b, mu);
    const Vec16<T> xv = load16(x + at);
    Vec16<T> o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e > 0 && ++r == s) {  // the next element starts the next row: next channel (mod C)
        r = 0;
        c = c + 1 == c_dim ? Index(0) : c + 1;
        k.get(c, a, b, mu);
      }
      o.v[e] = from_acc<T, Acc>(a + b * (to_acc(xv.v[e]) - mu));
    }
    store16(out + at, o);
  }
  for (Index i = head + nvec * V + first; i < total; i += stride) {
    k.get((i / s) % c_dim, a, b, mu);
    out[i] = from_acc<T, Acc>(a + b * (to_acc(ldg(x + i)) - mu));
  }
}

// SMs of the current device, read once per device (an attribute query: no sync).
int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) device = 0;
  int sms = cached[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    // a failed query (never expected) gets an H100's count, uncached: the grid size sets speed, not results
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) return 132;
    cached[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// Blocks of `kernel` resident on one SM at kThreads threads and `smem` dynamic bytes (registers and
// shared memory both count), cached per (device, instance, smem). A host query: allowed during graph
// capture. A failed query (never expected) is cleared and gives kMaxBlocksPerSm, uncached: the grid
// size sets speed, not results.
int resident_blocks_per_sm(const void* kernel, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, size_t>, int> cache;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) device = 0;
  const auto key = std::make_tuple(device, kernel, smem);
  std::lock_guard<std::mutex> lock(mutex);
  const auto hit = cache.find(key);
  if (hit != cache.end()) return hit->second;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem) != cudaSuccess || blocks <= 0) {
    (void)cudaGetLastError();
    return kMaxBlocksPerSm;
  }
  blocks = blocks < kMaxBlocksPerSm ? blocks : kMaxBlocksPerSm;
  cache.emplace(key, blocks);
  return blocks;
}

int64_t chunk_for(int64_t m, int64_t splits) {
  const int64_t chunk = (m + splits - 1) / splits;
  return (chunk + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
}

template <typename T, typename Acc>
void forward_impl(const void* x, int64_t n, int64_t c, int64_t s, int64_t splits, const void* rm, const void* rv,
                  void* workspace, void* mean, void* var, void* loss, cudaStream_t stream) {
  const int64_t m = n * s;
  if (c == 0 || m == 0) return;
  const BnStatWorkspace ws = bn_stat_workspace(c, splits, sizeof(Acc) == 8);
  auto* base = static_cast<unsigned char*>(workspace);
  const auto* xt = static_cast<const T*>(x);
  // 16-byte vectors: every run of S starts on a 16-byte boundary and split bounds are multiples of V
  const bool vec = s % Vec16<T>::kSize == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  auto kernel = vec ? forward_kernel<T, Acc, true> : forward_kernel<T, Acc, false>;
  kernel<<<static_cast<unsigned>(c * splits), kThreads, 0, stream>>>(
      xt, c, s, m, splits, chunk_for(m, splits), static_cast<const Acc*>(rm), static_cast<const Acc*>(rv),
      reinterpret_cast<Acc*>(base + ws.partials_offset), reinterpret_cast<double*>(base),
      reinterpret_cast<int*>(base + ws.counters_offset), static_cast<Acc*>(mean), static_cast<Acc*>(var),
      static_cast<Acc*>(loss));
}

// One launch of a backward instance, its grid lowered to what is resident at once on the device.
template <typename T, typename Acc, typename Index, bool kSmem>
void launch_backward(int64_t blocks, int64_t sms, size_t smem, const Acc* g, const T* x, const Acc* mean,
                     const Acc* var, const Acc* rm, const Acc* rv, int64_t c, int64_t s, int64_t total, double md,
                     T* out, cudaStream_t stream) {
  const auto kernel = backward_kernel<T, Acc, Index, kSmem>;
  const int64_t resident = resident_blocks_per_sm(reinterpret_cast<const void*>(kernel), smem) * sms;
  const auto grid = static_cast<unsigned>(blocks < resident ? blocks : resident);
  kernel<<<grid, kThreads, smem, stream>>>(g, x, mean, var, rm, rv, static_cast<Index>(c), static_cast<Index>(s),
                                           static_cast<Index>(total), md, out);
}

template <typename T, typename Acc>
void backward_impl(const void* grad, const void* x, const void* mean, const void* var, const void* rm, const void* rv,
                   int64_t n, int64_t c, int64_t s, int64_t sms, void* out, cudaStream_t stream) {
  const int64_t total = n * c * s;
  if (total == 0) return;
  constexpr int64_t V = Vec16<T>::kSize;
  // a block per kThreads vectors, at most kMaxBlocksPerSm per SM (launch_backward lowers it to the
  // instance's occupancy), and at least kElemsPerChannel·C elements per block: every block first
  // reads 4·C accumulator values (norms + coefficient table), so this keeps that prologue a small
  // fraction (~1/4 of the bytes in fp32) of the block's x traffic
  int64_t blocks = (total / V + kThreads - 1) / kThreads;
  blocks = blocks < kMaxBlocksPerSm * sms ? blocks : kMaxBlocksPerSm * sms;
  const int64_t min_share = total / (kElemsPerChannel * c);
  blocks = blocks < min_share ? blocks : min_share;
  blocks = blocks < 1 ? 1 : blocks;
  const size_t table = 3 * static_cast<size_t>(c) * sizeof(Acc);
  const bool use_smem = table <= kMaxCoefSmem;
  const size_t smem = use_smem ? table : 0;
  const auto* g = static_cast<const Acc*>(grad);
  const auto* xt = static_cast<const T*>(x);
  const auto *mt = static_cast<const Acc*>(mean), *vt = static_cast<const Acc*>(var);
  const auto *rmt = static_cast<const Acc*>(rm), *rvt = static_cast<const Acc*>(rv);
  const double md = static_cast<double>(n * s);
  auto* ot = static_cast<T*>(out);
  // the grid only shrinks after this check, so i + stride never wraps in the uint32 instances
  if (total + blocks * kThreads <= static_cast<int64_t>(UINT32_MAX)) {
    if (use_smem)
      launch_backward<T, Acc, uint32_t, true>(blocks, sms, smem, g, xt, mt, vt, rmt, rvt, c, s, total, md, ot, stream);
    else
      launch_backward<T, Acc, uint32_t, false>(blocks, sms, smem, g, xt, mt, vt, rmt, rvt, c, s, total, md, ot, stream);
  } else if (use_smem) {
    launch_backward<T, Acc, int64_t, true>(blocks, sms, smem, g, xt, mt, vt, rmt, rvt, c, s, total, md, ot, stream);
  } else {
    launch_backward<T, Acc, int64_t, false>(blocks, sms, smem, g, xt, mt, vt, rmt, rvt, c, s, total, md, ot, stream);
  }
}

}  // namespace

int64_t bn_stat_num_splits(int64_t n, int64_t s) {
  const int64_t m = n * s;
  int64_t splits = (m + kPerBlockTarget - 1) / kPerBlockTarget;
  splits = splits < 1 ? 1 : (splits > kMaxSplits ? kMaxSplits : splits);
  return (m + chunk_for(m, splits) - 1) / chunk_for(m, splits);  // every split non-empty
}

BnStatWorkspace bn_stat_workspace(int64_t c, int64_t splits, bool fp64) {
  const size_t squares = 2 * static_cast<size_t>(c) * sizeof(double);
  const size_t partials = 3 * static_cast<size_t>(c * splits) * (fp64 ? sizeof(double) : sizeof(float));
  return {squares, squares + partials, squares + partials + static_cast<size_t>(c + 1) * sizeof(int)};
}

void bn_stat_forward_cuda(const void* x, int64_t n, int64_t c, int64_t s, int64_t splits, int dtype, const void* rm,
                          const void* rv, void* workspace, void* mean_out, void* var_out, void* loss_out,
                          cudaStream_t stream) {
  switch (dtype) {
    case 0: forward_impl<float, float>(x, n, c, s, splits, rm, rv, workspace, mean_out, var_out, loss_out, stream); break;
    case 1: forward_impl<double, double>(x, n, c, s, splits, rm, rv, workspace, mean_out, var_out, loss_out, stream); break;
    case 2: forward_impl<__half, float>(x, n, c, s, splits, rm, rv, workspace, mean_out, var_out, loss_out, stream); break;
    case 3:
      forward_impl<__nv_bfloat16, float>(x, n, c, s, splits, rm, rv, workspace, mean_out, var_out, loss_out, stream);
      break;
  }
}

void bn_stat_backward_cuda(const void* grad, const void* x, const void* mean, const void* var, const void* rm,
                           const void* rv, int64_t n, int64_t c, int64_t s, int dtype, void* grad_x,
                           cudaStream_t stream) {
  const int64_t sms = sm_count();
  switch (dtype) {
    case 0: backward_impl<float, float>(grad, x, mean, var, rm, rv, n, c, s, sms, grad_x, stream); break;
    case 1: backward_impl<double, double>(grad, x, mean, var, rm, rv, n, c, s, sms, grad_x, stream); break;
    case 2: backward_impl<__half, float>(grad, x, mean, var, rm, rv, n, c, s, sms, grad_x, stream); break;
    case 3: backward_impl<__nv_bfloat16, float>(grad, x, mean, var, rm, rv, n, c, s, sms, grad_x, stream); break;
  }
}

}  // namespace ddfast
