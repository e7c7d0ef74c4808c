// gradient_match: DatasetCondensation's gradient-matching distance over lists of parameter
// gradients (ops ddfast::gradient_match_fwd/_bwd). Both kernels walk one segment table covering
// every tensor and group (multi-tensor apply): the CPU kernel here runs at::parallel_for over
// (group, segment) with one segment per DC row; the CUDA kernels (cuda/gradient_match.cu) split
// long rows into kGradientMatchSegment columns, one warp per segment, and fold them back in the
// last block of each group (one forward launch, one backward launch).
#include "ddfast_common.h"
#include "eager_autograd.h"

#ifdef DDFAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/gradient_match.h"
#endif

#include <cmath>
#include <deque>
#include <map>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

namespace ddfast {
namespace {

constexpr int64_t kCpuChunk = 1 << 14;  // mse/cos: elements per CPU task

int metric_code(const std::string& metric) {
  if (metric == "ours") return 0;
  if (metric == "mse") return 1;
  TORCH_CHECK(metric == "cos", "gradient_match: metric must be 'ours', 'mse' or 'cos', got ", metric);
  return 2;
}

// Segment table shared by the CPU and CUDA paths (field layout as in cuda/gradient_match.h).
struct Layout {
  int64_t groups = 1;
  std::vector<int64_t> gnumel;
  std::vector<int64_t> seg_k, seg_off, seg_len, seg_row;
  std::vector<int64_t> row_first, row_count;
  int64_t num_rows = 0;   // DC rows per group (ours)
  int64_t coef_rows = 1;  // rows of the coefficient table: num_rows for ours, 1 otherwise
  int64_t num_segs() const { return static_cast<int64_t>(seg_k.size()); }
};

// DC's row view (distance_wb): rank 4 -> out × in·h·w, 3 -> C × h·w, 2 as is, 0 -> 1×1,
// >= 5 -> leading axes × last axis; rank 1 contributes nothing (returns false).
bool dc_rows_cols(at::IntArrayRef shape, int64_t* rows, int64_t* cols) {
  const int64_t rank = static_cast<int64_t>(shape.size());
  if (rank == 1) return false;
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  if (rank == 0) { *rows = 1; *cols = 1; }
  else if (rank <= 4) { *rows = shape[0]; *cols = numel / shape[0]; }
  else { *cols = shape[rank - 1]; *rows = numel / *cols; }
  return true;
}

// row_segment: most columns of one DC row per segment (ours); flat_segment: elements per segment (mse/cos).
Layout build_layout(const std::vector<at::Tensor>& syn, int metric, bool grouped, int64_t row_segment,
                    int64_t flat_segment) {
  Layout L;
  L.groups = grouped ? syn[0].size(0) : 1;
  for (size_t k = 0; k < syn.size(); ++k) {
    at::IntArrayRef shape = grouped ? syn[k].sizes().slice(1) : syn[k].sizes();
    const int64_t numel = syn[k].numel() / L.groups;
    L.gnumel.push_back(numel);
    int64_t rows = 1, cols = numel;
    const bool active = metric != 0 || dc_rows_cols(shape, &rows, &cols);
    if (!active) { rows = 1; cols = numel; }
    const int64_t per_row = metric == 0 ? row_segment : flat_segment;
    const int64_t seg_cols = std::max<int64_t>(1, std::min(per_row, cols));
    const int64_t nseg = (cols + seg_cols - 1) / seg_cols;
    for (int64_t i = 0; i < rows; ++i) {
      if (metric == 0 && active) {
        L.row_first.push_back(L.num_segs());
        L.row_count.push_back(nseg);
      }
      for (int64_t j = 0; j < nseg; ++j) {
        L.seg_k.push_back(static_cast<int64_t>(k));
        L.seg_off.push_back(i * cols + j * seg_cols);
        L.seg_len.push_back(std::min(seg_cols, cols - j * seg_cols));
        L.seg_row.push_back(metric != 0 ? 0 : (active ? L.num_rows + i : -1));
      }
    }
    if (metric == 0 && active) L.num_rows += rows;
  }
  L.coef_rows = metric == 0 ? std::max<int64_t>(L.num_rows, 1) : 1;
  return L;
}

void check_inputs(const std::vector<at::Tensor>& syn, const std::vector<at::Tensor>& real, bool grouped) {
  TORCH_CHECK(!syn.empty() && syn.size() == real.size(), "gradient_match: g_syn and g_real need equal, non-zero lengths");
  for (size_t k = 0; k < syn.size(); ++k) {
    DDFAST_CHECK_CONTIGUOUS(syn[k]); DDFAST_CHECK_CONTIGUOUS(real[k]);
    TORCH_CHECK(syn[k].sizes() == real[k].sizes(), "gradient_match: shapes differ at index ", k);
    TORCH_CHECK(syn[k].scalar_type() == syn[0].scalar_type() && real[k].scalar_type() == syn[0].scalar_type(),
                "gradient_match: dtypes differ at index ", k);
    DDFAST_CHECK_SAME_DEVICE(syn[k], syn[0]); DDFAST_CHECK_SAME_DEVICE(real[k], syn[0]);
    TORCH_CHECK(syn[k].numel() > 0, "gradient_match: empty gradient at index ", k);
    if (grouped)
      TORCH_CHECK(syn[k].dim() >= 1 && syn[k].size(0) == syn[0].size(0), "gradient_match: group sizes differ at index ", k);
  }
}

// 1 − dot/D with D = ‖r‖‖s‖ + eps; d/ds = A·s − B·r (A = 0 where s = 0, as autograd's norm gives).
double cosine_terms(double dot, double nr, double ns, double eps, double* a, double* b) {
  const double norm_r = std::sqrt(nr), norm_s = std::sqrt(ns);
  const double den = norm_r * norm_s + eps;
  *b = 1.0 / den;
  *a = norm_s > 0 ? (dot / den) * (norm_r / norm_s) / den : 0.0;
  return 1.0 - dot / den;
}

// Segment sums in acc_t over independent lanes (vectorisable), folded in double.
template <typename scalar_t, int Metric>
void segment_sums(const scalar_t* s, const scalar_t* r, int64_t n, double* dot_out, double* nr_out, double* ns_out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kLanes = 16;
  acc_t dot[kLanes] = {}, nr[kLanes] = {}, ns[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t sv = static_cast<acc_t>(s[i + l]), rv = static_cast<acc_t>(r[i + l]);
      if (Metric == 1) {
        dot[l] += (sv - rv) * (sv - rv);
      } else {
        dot[l] += sv * rv;
        nr[l] += rv * rv;
        ns[l] += sv * sv;
      }
    }
  }
  double d = 0, a = 0, b = 0;
  for (; i < n; ++i) {
    const double sv = static_cast<double>(s[i]), rv = static_cast<double>(r[i]);
    if (Metric == 1) {
      d += (sv - rv) * (sv - rv);
    } else {
      d += sv * rv;
      a += rv * rv;
      b += sv * sv;
    }
  }
  for (int l = 0; l < kLanes; ++l) { d += dot[l]; a += nr[l]; b += ns[l]; }
  *dot_out = d;
  *nr_out = a;
  *ns_out = b;
}

template <typename scalar_t, int Metric>
void cpu_partials(const Layout& L, const std::vector<at::Tensor>& syn, const std::vector<at::Tensor>& real,
                  std::vector<double>& partials) {
  const int64_t S = L.num_segs(), total = L.groups * S;
  std::vector<const scalar_t*> sp, rp;
  for (size_t k = 0; k < syn.size(); ++k) {
    sp.push_back(syn[k].data_ptr<scalar_t>());
    rp.push_back(real[k].data_ptr<scalar_t>());
  }
  int64_t work = 0;
  for (int64_t k : L.gnumel) work += k;
  const int64_t grain = work * L.groups < 32768 ? total : 1;  // tiny problems: no thread start-up
  at::parallel_for(0, total, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t g = item / S, sid = item % S;
      double* out = partials.data() + 3 * item;
      if (L.seg_row[sid] < 0) { out[0] = out[1] = out[2] = 0; continue; }
      const int64_t k = L.seg_k[sid], base = g * L.gnumel[k] + L.seg_off[sid];
      segment_sums<scalar_t, Metric>(sp[k] + base, rp[k] + base, L.seg_len[sid], out, out + 1, out + 2);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fold_cpu(const Layout& L, const std::vector<double>& partials, int metric,
                                            double eps, bool sum_groups, const at::Tensor& like) {
  const int64_t S = L.num_segs();
  std::vector<double> losses(L.groups, 0.0), coefs(2 * L.groups * L.coef_rows, 0.0);
  const int64_t plane = L.groups * L.coef_rows;
  for (int64_t g = 0; g < L.groups; ++g) {
    const double* gp = partials.data() + 3 * g * S;
    if (metric == 0) {
      for (int64_t row = 0; row < L.num_rows; ++row) {
        double dot = 0, nr = 0, ns = 0;
        for (int64_t j = L.row_first[row]; j < L.row_first[row] + L.row_count[row]; ++j) {
          dot += gp[3 * j]; nr += gp[3 * j + 1]; ns += gp[3 * j + 2];
        }
        losses[g] += cosine_terms(dot, nr, ns, eps, &coefs[g * L.coef_rows + row], &coefs[plane + g * L.coef_rows + row]);
      }
    } else {
      double dot = 0, nr = 0, ns = 0;
      for (int64_t j = 0; j < S; ++j) { dot += gp[3 * j]; nr += gp[3 * j + 1]; ns += gp[3 * j + 2]; }
      if (metric == 1) {
        losses[g] = dot;
        coefs[g] = coefs[plane + g] = 2.0;  // d/ds Σ(s − r)² = 2s − 2r
      } else {
        losses[g] = cosine_terms(dot, nr, ns, eps, &coefs[g], &coefs[plane + g]);
      }
    }
  }
  const auto acc = acc_type(like.scalar_type());
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  // copy=true: the blobs live on this stack frame, and .to() to the same dtype would alias them
  at::Tensor coef_t = at::from_blob(coefs.data(), {2, L.groups, L.coef_rows}, f64)
                          .to(like.options().dtype(acc), /*non_blocking=*/false, /*copy=*/true);
  // round per group to the accumulation dtype first, as the fp32 reference sums fp32 distances
  at::Tensor loss_t = at::from_blob(losses.data(), {L.groups}, f64).to(acc, /*non_blocking=*/false, /*copy=*/true);
  loss_t = sum_groups ? loss_t.sum() : loss_t;
  return {loss_t.to(like.options()), coef_t};
}

std::tuple<at::Tensor, at::Tensor> gradient_match_fwd_cpu(at::TensorList g_syn, at::TensorList g_real,
                                                          c10::string_view metric_name, double eps, bool grouped,
                                                          c10::string_view reduction) {
  std::vector<at::Tensor> syn(g_syn.begin(), g_syn.end()), real(g_real.begin(), g_real.end());
  check_inputs(syn, real, grouped);
  const int metric = metric_code(std::string(metric_name));
  const Layout L = build_layout(syn, metric, grouped, std::numeric_limits<int64_t>::max(), kCpuChunk);
  std::vector<double> partials(3 * L.groups * L.num_segs(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, syn[0].scalar_type(), "gradient_match_fwd_cpu", [&] {
    if (metric == 1) cpu_partials<scalar_t, 1>(L, syn, real, partials);
    else cpu_partials<scalar_t, 0>(L, syn, real, partials);
  });
  return fold_cpu(L, partials, metric, eps, std::string(reduction) == "sum", syn[0]);
}

std::vector<at::Tensor> gradient_match_bwd_cpu(const at::Tensor& grad, at::TensorList g_syn, at::TensorList g_real,
                                               const at::Tensor& coefs, c10::string_view metric_name, bool grouped) {
  std::vector<at::Tensor> syn(g_syn.begin(), g_syn.end()), real(g_real.begin(), g_real.end());
  check_inputs(syn, real, grouped);
  const int metric = metric_code(std::string(metric_name));
  const Layout L = build_layout(syn, metric, grouped, std::numeric_limits<int64_t>::max(), kCpuChunk);
  std::vector<at::Tensor> grads;
  for (const auto& s : syn) grads.push_back(at::empty_like(s, at::MemoryFormat::Contiguous));
  at::Tensor go = grad.to(at::kDouble).contiguous().reshape({-1});
  at::Tensor cf = coefs.to(at::kDouble).contiguous();
  TORCH_CHECK(go.numel() == 1 || go.numel() == L.groups, "gradient_match_bwd: grad must be a scalar or (G,)");
  TORCH_CHECK(cf.numel() == 2 * L.groups * L.coef_rows, "gradient_match_bwd: coefs do not match the inputs");
  const double* gop = go.data_ptr<double>();
  const double* cp = cf.data_ptr<double>();
  const int64_t go_stride = go.numel() == 1 ? 0 : 1, plane = L.groups * L.coef_rows;
  const int64_t S = L.num_segs(), total = L.groups * S;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, syn[0].scalar_type(), "gradient_match_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> sp, rp;
    std::vector<scalar_t*> op;
    for (size_t k = 0; k < syn.size(); ++k) {
      sp.push_back(syn[k].data_ptr<scalar_t>());
      rp.push_back(real[k].data_ptr<scalar_t>());
      op.push_back(grads[k].data_ptr<scalar_t>());
    }
    int64_t work = 0;
    for (int64_t k : L.gnumel) work += k;
    const int64_t grain = work * L.groups < 32768 ? total : 1;
    at::parallel_for(0, total, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t g = item / S, sid = item % S, row = L.seg_row[sid];
        const int64_t k = L.seg_k[sid], base = g * L.gnumel[k] + L.seg_off[sid], n = L.seg_len[sid];
        scalar_t* out = op[k] + base;
        if (row < 0) {  // rank-1 tensor under "ours": zero gradient
          std::fill(out, out + n, static_cast<scalar_t>(0));
          continue;
        }
        const double go_g = gop[g * go_stride];
        const acc_t a = static_cast<acc_t>(go_g * cp[g * L.coef_rows + row]);
        const acc_t b = static_cast<acc_t>(go_g * cp[plane + g * L.coef_rows + row]);
        const scalar_t* s = sp[k] + base;
        const scalar_t* r = rp[k] + base;
        for (int64_t i = 0; i < n; ++i)
          out[i] = static_cast<scalar_t>(a * static_cast<acc_t>(s[i]) - b * static_cast<acc_t>(r[i]));
      }
    });
  });
  return grads;
}

#ifdef DDFAST_WITH_CUDA
// Flattens the layout and the data addresses into one int64 tensor on the device, with no host
// sync: a table seen recently on this device and stream (same addresses and shapes: a DD loop
// that reuses its buffers) is reused as is; otherwise it is written into pinned host memory and
// copied asynchronously (the caching host allocator keeps the pinned block until the copy is done).
struct DeviceTable {
  at::Tensor storage;
  GradientMatchTable table;
};

struct CachedTable {
  std::vector<int64_t> host;
  int64_t device_index = 0, stream_id = 0;
  at::Tensor storage;
};

at::Tensor upload_table(const std::vector<int64_t>& host, const at::Device& device) {
  constexpr size_t kCacheSize = 8;
  static std::mutex mutex;
  static std::deque<CachedTable> cache;  // most recent first
  const int64_t stream_id = c10::cuda::getCurrentCUDAStream(device.index()).id();
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (it->device_index == device.index() && it->stream_id == stream_id && it->host == host) {
      CachedTable hit = std::move(*it);
      cache.erase(it);
      cache.push_front(std::move(hit));
      return cache.front().storage;
    }
  }
  const auto n = static_cast<int64_t>(host.size());
  at::Tensor pinned = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(host.begin(), host.end(), pinned.data_ptr<int64_t>());
  at::Tensor storage = pinned.to(device, /*non_blocking=*/true);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(), &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    // a graph replays this copy from `pinned`: its host block must never be handed out again
    // (whatever this torch's host allocator does under capture). A few hundred bytes per capture.
    static auto* captured_sources = new std::vector<at::Tensor>();
    captured_sources->push_back(pinned);
  }
  cache.push_front(CachedTable{host, device.index(), stream_id, storage});
  if (cache.size() > kCacheSize) cache.pop_back();
  return storage;
}

DeviceTable device_table(const Layout& L, const std::vector<at::Tensor>& syn, const std::vector<at::Tensor>& real,
                         const std::vector<at::Tensor>& out) {
  const int64_t K = static_cast<int64_t>(syn.size()), S = L.num_segs(), R = L.num_rows;
  std::vector<int64_t> host;
  host.reserve(4 * K + 4 * S + 2 * R);
  for (const auto& t : syn) host.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  for (const auto& t : real) host.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  for (int64_t k = 0; k < K; ++k) host.push_back(out.empty() ? 0 : reinterpret_cast<int64_t>(out[k].data_ptr()));
  host.insert(host.end(), L.gnumel.begin(), L.gnumel.end());
  for (const auto* v : {&L.seg_k, &L.seg_off, &L.seg_len, &L.seg_row}) host.insert(host.end(), v->begin(), v->end());
  host.insert(host.end(), L.row_first.begin(), L.row_first.end());
  host.insert(host.end(), L.row_count.begin(), L.row_count.end());
  DeviceTable d;
  d.storage = upload_table(host, syn[0].device());
  const int64_t* base = d.storage.data_ptr<int64_t>();
  d.table.addr = base;
  d.table.gnumel = base + 3 * K;
  d.table.seg = base + 4 * K;
  d.table.rows = base + 4 * K + 4 * S;
  d.table.num_tensors = K;
  d.table.num_segs = S;
  d.table.num_rows = R;
  d.table.coef_rows = L.coef_rows;
  d.table.groups = L.groups;
  TORCH_CHECK(L.groups <= 65535, "gradient_match: at most 65535 groups on CUDA, got ", L.groups);
  TORCH_CHECK(S <= std::numeric_limits<int32_t>::max(), "gradient_match: too many segments");
  return d;
}

// Arrival counters of the last-block epilogue: n zeros (unsigned 32-bit) that every forward launch
// leaves at zero (the folding blocks reset the counters they completed). So one buffer per device
// and stream is zeroed once and reused: launches on one stream run in order, and a step pays no
// memset node. While the stream is being captured into a CUDA graph the zeros are a fresh buffer
// whose memset is captured with the kernel, so a graph never shares the cached buffer with eager
// launches or with another graph replayed on another stream.
at::Tensor arrival_counters(int64_t n, const at::Device& device) {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capture));
  const auto options = at::TensorOptions().dtype(at::kInt).device(device);
  auto fresh = [&](int64_t size) {
    at::Tensor zeros = at::empty({size}, options);
    C10_CUDA_CHECK(cudaMemsetAsync(zeros.data_ptr(), 0, size * sizeof(int32_t), stream.stream()));
    return zeros;
  };
  if (capture != cudaStreamCaptureStatusNone) return fresh(n);
  static std::mutex mutex;
  // never destroyed: freeing device memory from a static destructor can outlive the CUDA context
  static auto* buffers = new std::map<std::pair<int64_t, int64_t>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buf = (*buffers)[{device.index(), stream.id()}];
  if (!buf.defined() || buf.numel() < n) buf = fresh(std::max<int64_t>(n, 64));
  return buf;
}

std::tuple<at::Tensor, at::Tensor> gradient_match_fwd_cuda(at::TensorList g_syn, at::TensorList g_real,
                                                           c10::string_view metric_name, double eps, bool grouped,
                                                           c10::string_view reduction) {
  std::vector<at::Tensor> syn(g_syn.begin(), g_syn.end()), real(g_real.begin(), g_real.end());
  check_inputs(syn, real, grouped);
  c10::cuda::CUDAGuard guard(syn[0].device());
  const int metric = metric_code(std::string(metric_name));
  const Layout L = build_layout(syn, metric, grouped, kGradientMatchSegment, kGradientMatchSegment);
  const bool sum_groups = std::string(reduction) == "sum";
  const auto acc = acc_type(syn[0].scalar_type());
  DeviceTable d = device_table(L, syn, real, {});
  // the partial planes (1 for mse, else 3), then G slots for the group distances of reduction "sum"
  const int64_t planes = metric == 1 ? 1 : 3;
  at::Tensor partials = at::empty({(planes * L.num_segs() + 1) * L.groups}, syn[0].options().dtype(acc));
  at::Tensor counters = arrival_counters(L.groups + 1, syn[0].device());
  // "ours" with only rank-1 tensors: the fold writes no coefficient (no row), so zero them as the CPU path
  at::Tensor coefs = metric == 0 && L.num_rows == 0
                         ? at::zeros({2, L.groups, L.coef_rows}, syn[0].options().dtype(acc))
                         : at::empty({2, L.groups, L.coef_rows}, syn[0].options().dtype(acc));
  at::Tensor loss = sum_groups ? at::empty({}, syn[0].options()) : at::empty({L.groups}, syn[0].options());
  gradient_match_forward_cuda(d.table, metric, dtype_code(syn[0]), eps, sum_groups, partials.data_ptr(),
                              static_cast<unsigned*>(counters.data_ptr()), loss.data_ptr(), coefs.data_ptr(),
                              c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, coefs};
}

std::vector<at::Tensor> gradient_match_bwd_cuda(const at::Tensor& grad, at::TensorList g_syn, at::TensorList g_real,
                                                const at::Tensor& coefs, c10::string_view metric_name, bool grouped) {
  std::vector<at::Tensor> syn(g_syn.begin(), g_syn.end()), real(g_real.begin(), g_real.end());
  check_inputs(syn, real, grouped);
  c10::cuda::CUDAGuard guard(syn[0].device());
  const int metric = metric_code(std::string(metric_name));
  const Layout L = build_layout(syn, metric, grouped, kGradientMatchSegment, kGradientMatchSegment);
  std::vector<at::Tensor> grads;
  for (const auto& s : syn) grads.push_back(at::empty_like(s, at::MemoryFormat::Contiguous));
  at::Tensor go = grad.to(syn[0].device(), syn[0].scalar_type()).contiguous();
  TORCH_CHECK(go.numel() == 1 || go.numel() == L.groups, "gradient_match_bwd: grad must be a scalar or (G,)");
  at::Tensor cf = coefs.to(syn[0].device(), acc_type(syn[0].scalar_type())).contiguous();
  TORCH_CHECK(cf.numel() == 2 * L.groups * L.coef_rows, "gradient_match_bwd: coefs do not match the inputs");
  DeviceTable d = device_table(L, syn, real, grads);
  gradient_match_backward_cuda(d.table, dtype_code(syn[0]), go.data_ptr(), go.numel() == 1 ? 0 : 1, cf.data_ptr(),
                               c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grads;
}
#endif

// Eager path (eager_autograd.h): one C++ node; gradient to g_syn only.
using FwdSig = std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList, c10::string_view, double, bool,
                                                  c10::string_view);
using BwdSig = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&,
                                       c10::string_view, bool);

class GradientMatchEager : public torch::autograd::Function<GradientMatchEager> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList g_syn, at::TensorList g_real,
                            c10::string_view metric, double eps, bool grouped, c10::string_view reduction) {
    static const auto fwd = op_handle<FwdSig>("ddfast::gradient_match_fwd");
    at::AutoDispatchBelowADInplaceOrView below;  // apply() only turns grad mode off: skip the Python autograd
    auto out = fwd.call(g_syn, g_real, metric, eps, grouped, reduction);
    std::vector<at::Tensor> saved(g_syn.begin(), g_syn.end());
    saved.insert(saved.end(), g_real.begin(), g_real.end());
    saved.push_back(std::get<1>(out));
    ctx->save_for_backward(saved);
    ctx->saved_data["metric"] = std::string(metric);
    ctx->saved_data["grouped"] = grouped;
    return std::get<0>(out);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<BwdSig>("ddfast::gradient_match_bwd");
    check_once_differentiable("gradient_match");
    at::AutoDispatchBelowADInplaceOrView below;
    const auto saved = ctx->get_saved_variables();
    const size_t k = (saved.size() - 1) / 2;
    const at::TensorList all(saved);
    const std::string metric = ctx->saved_data["metric"].toStringRef();
    variable_list out = bwd.call(grads[0], all.slice(0, k), all.slice(k, k), saved.back(), metric,
                                 ctx->saved_data["grouped"].toBool());
    out.resize(2 * k + 4);  // no gradient to g_real, metric, eps, grouped, reduction
    return out;
  }
};

at::Tensor gradient_match_eager(at::TensorList g_syn, at::TensorList g_real, c10::string_view metric, double eps,
                                bool grouped, c10::string_view reduction) {
  return GradientMatchEager::apply(g_syn, g_real, metric, eps, grouped, reduction);
}

at::Tensor gradient_match_eager_nograd(at::TensorList g_syn, at::TensorList g_real, c10::string_view metric,
                                       double eps, bool grouped, c10::string_view reduction) {
  static const auto fwd = op_handle<FwdSig>("ddfast::gradient_match_fwd");
  return std::get<0>(fwd.call(g_syn, g_real, metric, eps, grouped, reduction));
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_FRAGMENT(ddfast, m) {
  m.def("gradient_match_fwd(Tensor[] g_syn, Tensor[] g_real, str metric, float eps, bool grouped, str reduction)"
        " -> (Tensor, Tensor)");
  m.def("gradient_match_bwd(Tensor grad, Tensor[] g_syn, Tensor[] g_real, Tensor coefs, str metric, bool grouped)"
        " -> Tensor[]");
  m.def("gradient_match_eager(Tensor[] g_syn, Tensor[] g_real, str metric, float eps, bool grouped, str reduction)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(ddfast, Autograd, m) { m.impl("gradient_match_eager", &ddfast::gradient_match_eager); }
TORCH_LIBRARY_IMPL(ddfast, CompositeExplicitAutograd, m) {
  m.impl("gradient_match_eager", &ddfast::gradient_match_eager_nograd);
}

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("gradient_match_fwd", &ddfast::gradient_match_fwd_cpu);
  m.impl("gradient_match_bwd", &ddfast::gradient_match_bwd_cpu);
}

#ifdef DDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("gradient_match_fwd", &ddfast::gradient_match_fwd_cuda);
  m.impl("gradient_match_bwd", &ddfast::gradient_match_bwd_cuda);
}
#endif
