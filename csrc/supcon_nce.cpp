// supcon_nce: MIM4DD's supervised contrastive score (ops ddfast::supcon_nce_fwd/_bwd).
// CPU kernel here: the real columns are walked in chunks; each chunk's logits come from one
// BLAS GEMM (at::mm) into a bounded n_syn x chunk scratch, then at::parallel_for over anchors
// folds them into a running logsumexp (all columns and positive columns) or the nce softplus
// sums. Backward recomputes each chunk, forms dL/ds in place and accumulates both gradients with
// GEMMs. Scratch is at most kScratchElems elements, never the n_syn x n_real matrix.
// The CUDA kernels live in cuda/supcon_nce.cu and are registered when built with CUDA.
#include "ddfast_common.h"

#ifdef DDFAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/supcon_nce.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace ddfast {
namespace {

constexpr int64_t kScratchElems = 1 << 22;  // 16 MiB of fp32 logits per chunk
constexpr int64_t kMinChunk = 256;

int64_t chunk_cols(int64_t n_syn, int64_t n_real) {
  return std::min(n_real, std::max(kMinChunk, kScratchElems / std::max<int64_t>(n_syn, 1)));
}

// The per-row loops vectorise only if GCC may reassociate the sums and treat min/max as
// maxps/minps: allowed per function here (the build passes plain -O3). Sentinels in these
// functions are finite (lowest()), never +-inf, so finite-math-only changes no result.
#if defined(__GNUC__) && !defined(__clang__)
#define DDFAST_VEC_MATH __attribute__((optimize("associative-math", "no-signed-zeros", "no-trapping-math", "finite-math-only")))
#else
#define DDFAST_VEC_MATH
#endif

// Branch-free float exp/log1p (Cephes-style polynomials, ~2 ulp); std::exp/log1p block vectorisation.
// exp clamps its input to [-87, 88] (exp(-87) ~ 1.6e-38: negligible in the sums it enters).
DDFAST_VEC_MATH inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;  // ternaries, not std::min/max: those block vectorisation
  x = x > 88.0f ? 88.0f : x;
  const int32_t n = static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128;  // round to nearest
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}
// log(1 + y) for y in [0, 1]: 2 atanh(t), t = y / (2 + y) in [0, 1/3], odd series to t^17.
DDFAST_VEC_MATH inline float log1p_approx(float y) {
  const float t = y / (2.0f + y), t2 = t * t;
  float p = 1.0f / 17;
  p = p * t2 + 1.0f / 15;
  p = p * t2 + 1.0f / 13;
  p = p * t2 + 1.0f / 11;
  p = p * t2 + 1.0f / 9;
  p = p * t2 + 1.0f / 7;
  p = p * t2 + 1.0f / 5;
  p = p * t2 + 1.0f / 3;
  p = p * t2 + 1.0f;
  return 2.0f * t * p;
}
inline double exp_approx(double x) { return std::exp(x); }
inline double log1p_approx(double y) { return std::log1p(y); }

template <typename acc_t> DDFAST_VEC_MATH inline acc_t softplus(acc_t x) {
  return (x > acc_t(0) ? x : acc_t(0)) + log1p_approx(exp_approx(x > acc_t(0) ? -x : x));
}

// Row kernels over one chunk row s[0, n) with real labels yc and anchor label y.
// max over all columns and over positive columns; the latter is lowest() when no column is positive.
template <typename acc_t>
DDFAST_VEC_MATH void row_maxima(const acc_t* s, const int32_t* yc, int32_t y, int64_t n, acc_t& mx, acc_t& mx_pos) {
  const acc_t lowest = std::numeric_limits<acc_t>::lowest();
  acc_t m = lowest, mp = lowest;
  for (int64_t j = 0; j < n; ++j) {
    m = m > s[j] ? m : s[j];
    const acc_t v = yc[j] == y ? s[j] : lowest;
    mp = mp > v ? mp : v;
  }
  mx = m;
  mx_pos = mp;
}

// sum_j exp(s_j - m) and sum_{j pos} exp(s_j - m_pos)
template <typename acc_t>
DDFAST_VEC_MATH void row_exp_sums(const acc_t* s, const int32_t* yc, int32_t y, int64_t n, acc_t m, acc_t m_pos,
                                  acc_t& sum, acc_t& sum_pos) {
  acc_t a = 0, b = 0;
  for (int64_t j = 0; j < n; ++j) {
    a += exp_approx(s[j] - m);
    // positives have s_j <= m_pos; the clamp keeps masked-out columns from overflowing (0 * inf)
    b += static_cast<acc_t>(yc[j] == y) * exp_approx(s[j] < m_pos ? s[j] - m_pos : acc_t(0));
  }
  sum = a;
  sum_pos = b;
}

// sum_pos softplus(log c - s) + sum_neg softplus(s - log c)
template <typename acc_t>
DDFAST_VEC_MATH acc_t row_nce_sum(const acc_t* s, const int32_t* yc, int32_t y, int64_t n, acc_t log_c) {
  acc_t sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t sign = acc_t(1) - acc_t(2) * static_cast<acc_t>(yc[j] == y);
    sum += softplus<acc_t>(sign * (s[j] - log_c));
  }
  return sum;
}

// in place: s -> g (softmax_all - [pos] softmax_pos)
template <typename acc_t>
DDFAST_VEC_MATH void row_grad_infonce(acc_t* s, const int32_t* yc, int32_t y, int64_t n, acc_t g, acc_t lse_all,
                                      acc_t lse_pos) {
  for (int64_t j = 0; j < n; ++j)
    s[j] = g * (exp_approx(s[j] - lse_all) -
                static_cast<acc_t>(yc[j] == y) * exp_approx(s[j] < lse_pos ? s[j] - lse_pos : acc_t(0)));
}

// in place: s -> g (pos: -sigmoid(log c - s), neg: sigmoid(s - log c)); no 1 - sigmoid cancellation
template <typename acc_t>
DDFAST_VEC_MATH void row_grad_nce(acc_t* s, const int32_t* yc, int32_t y, int64_t n, acc_t g, acc_t log_c) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t sign = acc_t(1) - acc_t(2) * static_cast<acc_t>(yc[j] == y);
    s[j] = sign * g / (acc_t(1) + exp_approx(sign * (log_c - s[j])));
  }
}

// int32 copies of the labels: 32-bit compares vectorise with SSE2, 64-bit ones do not.
at::Tensor labels32(const at::Tensor& y, const char* name) {
  const auto [lo, hi] = at::aminmax(y);
  TORCH_CHECK(lo.item<int64_t>() >= INT32_MIN && hi.item<int64_t>() <= INT32_MAX, "supcon_nce: ", name,
              " holds labels outside the int32 range");
  return y.to(at::kInt);
}

void check_inputs(const at::Tensor& zs, const at::Tensor& ys, const at::Tensor& zr, const at::Tensor& yr) {
  DDFAST_CHECK_CONTIGUOUS(zs); DDFAST_CHECK_CONTIGUOUS(zr); DDFAST_CHECK_CONTIGUOUS(ys); DDFAST_CHECK_CONTIGUOUS(yr);
  TORCH_CHECK(zs.dim() == 2 && zr.dim() == 2 && zs.size(1) == zr.size(1), "supcon_nce: z_syn, z_real must be (n, D)");
  TORCH_CHECK(ys.scalar_type() == at::kLong && yr.scalar_type() == at::kLong, "supcon_nce: labels must be int64");
  TORCH_CHECK(ys.numel() == zs.size(0) && yr.numel() == zr.size(0), "supcon_nce: label lengths differ from features");
  TORCH_CHECK(zs.scalar_type() == zr.scalar_type(), "supcon_nce: z_syn and z_real dtypes differ");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_nce_fwd_cpu(const at::Tensor& zs, const at::Tensor& ys,
                                                                  const at::Tensor& zr, const at::Tensor& yr,
                                                                  double inv_temp, bool nce, double log_c) {
  check_inputs(zs, ys, zr, yr);
  const auto acc = acc_type(zs.scalar_type());
  const at::Tensor zs_a = zs.to(acc), zr_a = zr.to(acc);
  const int64_t n_syn = zs.size(0), n_real = zr.size(0);
  at::Tensor loss = at::zeros({n_syn}, zs.options().dtype(acc));
  at::Tensor lse_all = at::zeros({n_syn}, zs.options().dtype(acc));
  at::Tensor lse_pos = at::zeros({n_syn}, zs.options().dtype(acc));
  const int64_t chunk = chunk_cols(n_syn, n_real);
  const at::Tensor ys32 = labels32(ys, "y_syn"), yr32 = labels32(yr, "y_real");
  AT_DISPATCH_FLOATING_TYPES(acc, "supcon_nce_fwd_cpu", [&] {
    using acc_t = scalar_t;
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    const int32_t* y_s = ys32.data_ptr<int32_t>();
    const int32_t* y_r = yr32.data_ptr<int32_t>();
    // running state per anchor: (max, sum) over all columns and over positive columns, or nce sum
    std::vector<acc_t> m_all(n_syn, kNegInf), l_all(n_syn, 0), m_pos(n_syn, kNegInf), l_pos(n_syn, 0);
    acc_t* nce_sum = loss.data_ptr<acc_t>();
    const acc_t scale = static_cast<acc_t>(inv_temp), lc = static_cast<acc_t>(log_c);
    for (int64_t c0 = 0; c0 < n_real; c0 += chunk) {
      const int64_t cn = std::min(chunk, n_real - c0);
      const at::Tensor logits = at::mm(zs_a, zr_a.narrow(0, c0, cn).t()).mul_(scale);
      const acc_t* s_ptr = logits.data_ptr<acc_t>();
      const int32_t* yc = y_r + c0;
      at::parallel_for(0, n_syn, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          const acc_t* s = s_ptr + i * cn;
          const int32_t y = y_s[i];
          if (nce) {
            nce_sum[i] += row_nce_sum<acc_t>(s, yc, y, cn, lc);
            continue;
          }
          // maxima of the chunk row, then sums of exp against the merged maxima
          acc_t mx, mx_pos;
          row_maxima<acc_t>(s, yc, y, cn, mx, mx_pos);
          const acc_t m_new = std::max(m_all[i], mx);
          const bool chunk_has_pos = mx_pos != std::numeric_limits<acc_t>::lowest();
          const acc_t mp_new = chunk_has_pos ? std::max(m_pos[i], mx_pos) : m_pos[i];
          const acc_t mp_ref = mp_new == kNegInf ? acc_t(0) : mp_new;  // no positive yet: sums stay 0
          acc_t sum, sum_pos;
          row_exp_sums<acc_t>(s, yc, y, cn, m_new, mp_ref, sum, sum_pos);
          l_all[i] = l_all[i] * std::exp(m_all[i] - m_new) + sum;
          m_all[i] = m_new;
          l_pos[i] = l_pos[i] * std::exp(m_pos[i] - mp_ref) + sum_pos;
          m_pos[i] = mp_new;
        }
      });
    }
    if (!nce) {
      acc_t* lp = loss.data_ptr<acc_t>();
      acc_t* la = lse_all.data_ptr<acc_t>();
      acc_t* lq = lse_pos.data_ptr<acc_t>();
      for (int64_t i = 0; i < n_syn; ++i) {
        la[i] = m_all[i] + std::log(l_all[i]);
        const bool has_pos = m_pos[i] != kNegInf;
        lq[i] = has_pos ? m_pos[i] + std::log(l_pos[i]) : kNegInf;
        lp[i] = has_pos ? la[i] - lq[i] : acc_t(0);
      }
    }
  });
  // the vectorised row loops clamp and assume finite values, so NaN/Inf would not propagate:
  // report them as the reference does, with NaN (O((n_syn + n_real) D), small next to the GEMMs)
  if (!(at::isfinite(zs_a).all().item<bool>() && at::isfinite(zr_a).all().item<bool>()))
    loss.fill_(std::numeric_limits<double>::quiet_NaN());
  return {loss, lse_all, lse_pos};
}

std::tuple<at::Tensor, at::Tensor> supcon_nce_bwd_cpu(const at::Tensor& g, const at::Tensor& zs, const at::Tensor& ys,
                                                      const at::Tensor& zr, const at::Tensor& yr,
                                                      const at::Tensor& lse_all, const at::Tensor& lse_pos,
                                                      double inv_temp, bool nce, double log_c) {
  check_inputs(zs, ys, zr, yr);
  const auto acc = acc_type(zs.scalar_type());
  const at::Tensor zs_a = zs.to(acc), zr_a = zr.to(acc);
  const at::Tensor g_a = g.to(acc).contiguous(), la_a = lse_all.to(acc).contiguous(), lp_a = lse_pos.to(acc).contiguous();
  const int64_t n_syn = zs.size(0), n_real = zr.size(0);
  at::Tensor grad_syn = at::zeros_like(zs_a);
  at::Tensor grad_real = at::empty_like(zr_a);
  const int64_t chunk = chunk_cols(n_syn, n_real);
  const at::Tensor ys32 = labels32(ys, "y_syn"), yr32 = labels32(yr, "y_real");
  AT_DISPATCH_FLOATING_TYPES(acc, "supcon_nce_bwd_cpu", [&] {
    using acc_t = scalar_t;
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    const int32_t* y_s = ys32.data_ptr<int32_t>();
    const int32_t* y_r = yr32.data_ptr<int32_t>();
    const acc_t* gp = g_a.data_ptr<acc_t>();
    const acc_t* la = la_a.data_ptr<acc_t>();
    const acc_t* lq = lp_a.data_ptr<acc_t>();
    const acc_t scale = static_cast<acc_t>(inv_temp), lc = static_cast<acc_t>(log_c);
    for (int64_t c0 = 0; c0 < n_real; c0 += chunk) {
      const int64_t cn = std::min(chunk, n_real - c0);
      const at::Tensor zr_chunk = zr_a.narrow(0, c0, cn);
      at::Tensor dlogits = at::mm(zs_a, zr_chunk.t()).mul_(scale);  // logits, turned into dL/ds in place
      acc_t* s_ptr = dlogits.data_ptr<acc_t>();
      const int32_t* yc = y_r + c0;
      at::parallel_for(0, n_syn, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          acc_t* s = s_ptr + i * cn;
          const int32_t y = y_s[i];
          const acc_t gi = gp[i];
          if (nce) {
            row_grad_nce<acc_t>(s, yc, y, cn, gi, lc);
          } else if (lq[i] == kNegInf) {  // anchor without a positive: constant 0 loss
            std::fill(s, s + cn, acc_t(0));
          } else {
            row_grad_infonce<acc_t>(s, yc, y, cn, gi, la[i], lq[i]);
          }
        }
      });
      grad_syn.addmm_(dlogits, zr_chunk);
      at::Tensor grad_real_rows = grad_real.narrow(0, c0, cn);
      at::mm_out(grad_real_rows, dlogits.t(), zs_a);
    }
  });
  grad_syn.mul_(inv_temp);
  grad_real.mul_(inv_temp);
  return {grad_syn.to(zs.scalar_type()), grad_real.to(zr.scalar_type())};
}

#ifdef DDFAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_nce_fwd_cuda(const at::Tensor& zs, const at::Tensor& ys,
                                                                   const at::Tensor& zr, const at::Tensor& yr,
                                                                   double inv_temp, bool nce, double log_c) {
  check_inputs(zs, ys, zr, yr);
  // the kernels dereference every pointer on the device: a CPU label tensor would fault there
  DDFAST_CHECK_SAME_DEVICE(zs, ys); DDFAST_CHECK_SAME_DEVICE(zs, zr); DDFAST_CHECK_SAME_DEVICE(zs, yr);
  c10::cuda::CUDAGuard guard(zs.device());
  const auto acc = acc_type(zs.scalar_type());
  const int64_t n_syn = zs.size(0);
  at::Tensor loss = at::empty({n_syn}, zs.options().dtype(acc));
  at::Tensor lse_all = at::empty({n_syn}, zs.options().dtype(acc));
  at::Tensor lse_pos = at::empty({n_syn}, zs.options().dtype(acc));
  supcon_nce_forward_cuda(zs.data_ptr(), ys.data_ptr<int64_t>(), zr.data_ptr(), yr.data_ptr<int64_t>(), n_syn,
                          zr.size(0), zs.size(1), dtype_code(zs), inv_temp, nce, log_c, loss.data_ptr(),
                          lse_all.data_ptr(), lse_pos.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse_all, lse_pos};
}

std::tuple<at::Tensor, at::Tensor> supcon_nce_bwd_cuda(const at::Tensor& g, const at::Tensor& zs, const at::Tensor& ys,
                                                       const at::Tensor& zr, const at::Tensor& yr,
                                                       const at::Tensor& lse_all, const at::Tensor& lse_pos,
                                                       double inv_temp, bool nce, double log_c) {
  check_inputs(zs, ys, zr, yr);
  DDFAST_CHECK_SAME_DEVICE(zs, ys); DDFAST_CHECK_SAME_DEVICE(zs, zr); DDFAST_CHECK_SAME_DEVICE(zs, yr);
  DDFAST_CHECK_SAME_DEVICE(zs, g); DDFAST_CHECK_SAME_DEVICE(zs, lse_all); DDFAST_CHECK_SAME_DEVICE(zs, lse_pos);
  TORCH_CHECK(g.numel() == zs.size(0) && lse_all.numel() == zs.size(0) && lse_pos.numel() == zs.size(0),
              "supcon_nce: g, lse_all, lse_pos must have n_syn elements");
  // the backward grid's second axis tiles the feature dim in blocks of 32 (fp64) or 64
  TORCH_CHECK(zs.size(1) <= int64_t(65535) * 32, "supcon_nce: feature size D too large for the CUDA kernel");
  c10::cuda::CUDAGuard guard(zs.device());
  const auto acc = acc_type(zs.scalar_type());
  const at::Tensor g_a = g.to(acc).contiguous(), la_a = lse_all.to(acc).contiguous(), lp_a = lse_pos.to(acc).contiguous();
  at::Tensor grad_syn = at::empty_like(zs);
  at::Tensor grad_real = at::empty_like(zr);
  supcon_nce_backward_cuda(g_a.data_ptr(), zs.data_ptr(), ys.data_ptr<int64_t>(), zr.data_ptr(),
                           yr.data_ptr<int64_t>(), la_a.data_ptr(), lp_a.data_ptr(), zs.size(0), zr.size(0),
                           zs.size(1), dtype_code(zs), inv_temp, nce, log_c, grad_syn.data_ptr(),
                           grad_real.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_syn, grad_real};
}
#endif

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_FRAGMENT(ddfast, m) {
  m.def("supcon_nce_fwd(Tensor z_syn, Tensor y_syn, Tensor z_real, Tensor y_real, float inv_temp, bool nce, "
        "float log_c) -> (Tensor, Tensor, Tensor)");
  m.def("supcon_nce_bwd(Tensor g, Tensor z_syn, Tensor y_syn, Tensor z_real, Tensor y_real, Tensor lse_all, "
        "Tensor lse_pos, float inv_temp, bool nce, float log_c) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("supcon_nce_fwd", &ddfast::supcon_nce_fwd_cpu);
  m.impl("supcon_nce_bwd", &ddfast::supcon_nce_bwd_cpu);
}

#ifdef DDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("supcon_nce_fwd", &ddfast::supcon_nce_fwd_cuda);
  m.impl("supcon_nce_bwd", &ddfast::supcon_nce_bwd_cuda);
}
#endif
