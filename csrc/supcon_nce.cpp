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
#include <limits>
#include <vector>

namespace ddfast {
namespace {

constexpr int64_t kScratchElems = 1 << 22;  // 16 MiB of fp32 logits per chunk
constexpr int64_t kMinChunk = 256;

int64_t chunk_cols(int64_t n_syn, int64_t n_real) {
  return std::min(n_real, std::max(kMinChunk, kScratchElems / std::max<int64_t>(n_syn, 1)));
}

template <typename acc_t> inline acc_t softplus(acc_t x) {
  return std::max(x, acc_t(0)) + std::log1p(std::exp(-std::abs(x)));
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
  AT_DISPATCH_FLOATING_TYPES(acc, "supcon_nce_fwd_cpu", [&] {
    using acc_t = scalar_t;
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    const int64_t* y_s = ys.data_ptr<int64_t>();
    const int64_t* y_r = yr.data_ptr<int64_t>();
    // running state per anchor: (max, sum) over all columns and over positive columns, or nce sum
    std::vector<acc_t> m_all(n_syn, kNegInf), l_all(n_syn, 0), m_pos(n_syn, kNegInf), l_pos(n_syn, 0);
    acc_t* nce_sum = loss.data_ptr<acc_t>();
    const acc_t scale = static_cast<acc_t>(inv_temp), lc = static_cast<acc_t>(log_c);
    for (int64_t c0 = 0; c0 < n_real; c0 += chunk) {
      const int64_t cn = std::min(chunk, n_real - c0);
      const at::Tensor logits = at::mm(zs_a, zr_a.narrow(0, c0, cn).t()).mul_(scale);
      const acc_t* s_ptr = logits.data_ptr<acc_t>();
      const int64_t* yc = y_r + c0;
      at::parallel_for(0, n_syn, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          const acc_t* s = s_ptr + i * cn;
          const int64_t y = y_s[i];
          if (nce) {
            acc_t sum = 0;
            for (int64_t j = 0; j < cn; ++j) sum += softplus<acc_t>(yc[j] == y ? lc - s[j] : s[j] - lc);
            nce_sum[i] += sum;
            continue;
          }
          // two passes over the chunk row (max, then sum of exp), merged into the running state
          acc_t mx = kNegInf, mx_pos = kNegInf;
          for (int64_t j = 0; j < cn; ++j) {
            mx = std::max(mx, s[j]);
            if (yc[j] == y) mx_pos = std::max(mx_pos, s[j]);
          }
          const acc_t m_new = std::max(m_all[i], mx);
          acc_t sum = 0;
          for (int64_t j = 0; j < cn; ++j) sum += std::exp(s[j] - m_new);
          l_all[i] = l_all[i] * std::exp(m_all[i] - m_new) + sum;
          m_all[i] = m_new;
          if (mx_pos != kNegInf) {
            const acc_t mp_new = std::max(m_pos[i], mx_pos);
            acc_t sum_pos = 0;
            for (int64_t j = 0; j < cn; ++j)
              if (yc[j] == y) sum_pos += std::exp(s[j] - mp_new);
            l_pos[i] = l_pos[i] * std::exp(m_pos[i] - mp_new) + sum_pos;
            m_pos[i] = mp_new;
          }
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
  AT_DISPATCH_FLOATING_TYPES(acc, "supcon_nce_bwd_cpu", [&] {
    using acc_t = scalar_t;
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    const int64_t* y_s = ys.data_ptr<int64_t>();
    const int64_t* y_r = yr.data_ptr<int64_t>();
    const acc_t* gp = g_a.data_ptr<acc_t>();
    const acc_t* la = la_a.data_ptr<acc_t>();
    const acc_t* lq = lp_a.data_ptr<acc_t>();
    const acc_t scale = static_cast<acc_t>(inv_temp), lc = static_cast<acc_t>(log_c);
    for (int64_t c0 = 0; c0 < n_real; c0 += chunk) {
      const int64_t cn = std::min(chunk, n_real - c0);
      const at::Tensor zr_chunk = zr_a.narrow(0, c0, cn);
      at::Tensor dlogits = at::mm(zs_a, zr_chunk.t()).mul_(scale);  // logits, turned into dL/ds in place
      acc_t* s_ptr = dlogits.data_ptr<acc_t>();
      const int64_t* yc = y_r + c0;
      at::parallel_for(0, n_syn, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          acc_t* s = s_ptr + i * cn;
          const int64_t y = y_s[i];
          const acc_t gi = gp[i];
          if (nce) {
            for (int64_t j = 0; j < cn; ++j) {
              // pos: -sigmoid(log c - s), neg: sigmoid(s - log c); no 1 - sigmoid cancellation
              const bool pos = yc[j] == y;
              const acc_t x = pos ? s[j] - lc : lc - s[j];
              s[j] = (pos ? -gi : gi) / (acc_t(1) + std::exp(x));
            }
          } else if (lq[i] == kNegInf) {  // anchor without a positive: constant 0 loss
            std::fill(s, s + cn, acc_t(0));
          } else {
            const acc_t a = la[i], p = lq[i];
            for (int64_t j = 0; j < cn; ++j) {
              const acc_t soft_pos = yc[j] == y ? std::exp(s[j] - p) : acc_t(0);
              s[j] = gi * (std::exp(s[j] - a) - soft_pos);
            }
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
