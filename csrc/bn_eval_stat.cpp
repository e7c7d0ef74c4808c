// bn_eval_stat: an eval-mode BatchNorm y = (x − rm_c)·α_c + β_c, α_c = w_c / sqrt(rv_c + eps), and
// SRe2L's statistic loss of its input, over x viewed as (N, C, S) (ops ddfast::bn_eval_stat_fwd/_bwd,
// CPU; on CUDA the Triton kernels run the fused op). Forward: per channel one pass over x that
// sums the shifted values (fp64, as bn_stat.cpp) and writes y. Backward: one pass
// grad_x = a_c + b_c (x − μ_c) + grad_y·α_c, where the layer and the loss apart take three passes
// and autograd's sum of their two gradients.
#include "bn_stat_cpu.h"
#include "ddfast_common.h"
#include "eager_autograd.h"

#include <c10/util/Optional.h>

#include <cmath>
#include <vector>

namespace ddfast {
namespace {

constexpr int64_t kChunk = 2048;  // forward: elements of a row summed, then normalised, at a time

void check_inputs(const at::Tensor& x, const at::Tensor& rm, const at::Tensor& rv, const c10::optional<at::Tensor>& w,
                  const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 3, "bn_eval_stat: x must be viewed as (N, C, S)");
  DDFAST_CHECK_CONTIGUOUS(x);
  const int64_t c = x.size(1);
  TORCH_CHECK(rm.numel() == c && rv.numel() == c, "bn_eval_stat: running stats must have C entries");
  TORCH_CHECK(!w || w->numel() == c, "bn_eval_stat: weight must have C entries");
  TORCH_CHECK(!b || b->numel() == c, "bn_eval_stat: bias must have C entries");
}

using bn_stat_cpu::to_doubles;

// α_c = w_c / sqrt(rv_c + eps) (w = 1 without weight), in fp64.
std::vector<double> scales(const std::vector<double>& rv, const c10::optional<at::Tensor>& w, double eps) {
  std::vector<double> alpha(rv.size(), 1.0);
  if (w) alpha = to_doubles(*w);
  for (size_t ch = 0; ch < alpha.size(); ++ch) alpha[ch] /= std::sqrt(rv[ch] + eps);
  return alpha;
}

// C doubles as a tensor of ``dtype`` (fp32 or fp64) on the CPU.
at::Tensor from_doubles(const std::vector<double>& v, const at::TensorOptions& options) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, options);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "from_doubles", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_eval_stat_fwd_cpu(
    const at::Tensor& x, const at::Tensor& rm, const at::Tensor& rv, const c10::optional<at::Tensor>& w,
    const c10::optional<at::Tensor>& b, double eps) {
  check_inputs(x, rm, rv, w, b);
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2);
  TORCH_CHECK(n * s > 0, "bn_eval_stat: x has no elements per channel");
  const double m = static_cast<double>(n * s);
  const std::vector<double> shift = to_doubles(rm), rvd = to_doubles(rv), alpha = scales(rvd, w, eps);
  const std::vector<double> beta = b ? to_doubles(*b) : std::vector<double>(c, 0.0);
  std::vector<double> mean(c), var(c);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_eval_stat_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, c, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        const double first = static_cast<double>(xp[ch * s]);
        const acc_t a = static_cast<acc_t>(alpha[ch]), rmv = static_cast<acc_t>(shift[ch]);
        const acc_t bv = static_cast<acc_t>(beta[ch]);
        double sum = 0.0, sumsq = 0.0;
        // chunks small enough to stay in L1 between the sums and the y pass: x read once from memory
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t j0 = 0; j0 < s; j0 += kChunk) {
            const int64_t at = (i * c + ch) * s + j0, len = std::min(kChunk, s - j0);
            bn_stat_cpu::add_shifted_sums(xp + at, len, first, sum, sumsq);
            for (int64_t j = at; j < at + len; ++j) {
              yp[j] = static_cast<scalar_t>((static_cast<acc_t>(xp[j]) - rmv) * a + bv);
            }
          }
        }
        const double md = sum / m;
        mean[ch] = first + md;
        var[ch] = std::max(0.0, sumsq / m - md * md);
      }
    });
  });
  const auto n_ = bn_stat_cpu::norms(mean.data(), var.data(), shift.data(), rvd.data(), c);
  const auto acc = x.options().dtype(acc_type(x.scalar_type()));
  return {y, at::scalar_tensor(n_.first + n_.second, acc), from_doubles(mean, acc), from_doubles(var, acc)};
}

at::Tensor bn_eval_stat_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& grad_loss, const at::Tensor& x,
                                const at::Tensor& rm, const at::Tensor& rv, const c10::optional<at::Tensor>& w,
                                const at::Tensor& mean, const at::Tensor& var, double eps) {
  check_inputs(x, rm, rv, w, c10::nullopt);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "bn_eval_stat: grad_y must have x's shape");
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2);
  const at::Tensor gy = grad_y.contiguous();
  const std::vector<double> mu = to_doubles(mean), vd = to_doubles(var), rmd = to_doubles(rm), rvd = to_doubles(rv);
  const std::vector<double> alpha = scales(rvd, w, eps);
  std::vector<double> a, b;
  bn_stat_cpu::coefficients(grad_loss.item<double>(), mu.data(), vd.data(), rmd.data(), rvd.data(), c, n * s, a, b);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_eval_stat_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = gy.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(s, 1));
    at::parallel_for(0, n * c, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t ch = r % c;
        const acc_t av = static_cast<acc_t>(a[ch]), bv = static_cast<acc_t>(b[ch]);
        const acc_t mv = static_cast<acc_t>(mu[ch]), al = static_cast<acc_t>(alpha[ch]);
        const scalar_t* xr = xp + r * s;
        const scalar_t* gr = gp + r * s;
        scalar_t* orow = op + r * s;
        for (int64_t j = 0; j < s; ++j) {
          orow[j] = static_cast<scalar_t>(av + bv * (static_cast<acc_t>(xr[j]) - mv) + static_cast<acc_t>(gr[j]) * al);
        }
      }
    });
  });
  return out;
}

using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, double);
using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double);

c10::optional<at::Tensor> maybe(const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; }

// One C++ autograd node per layer: (y, loss) forward, grad_x from (grad_y, grad_loss) backward.
class BnEvalStatEager : public torch::autograd::Function<BnEvalStatEager> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& rm, const at::Tensor& rv,
                               const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& b, double eps) {
    static const auto fwd = op_handle<FwdSig>("ddfast::bn_eval_stat_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    auto out = fwd.call(x, rm, rv, w, b, eps);
    ctx->save_for_backward({x, rm, rv, w.value_or(at::Tensor()), std::get<2>(out), std::get<3>(out)});
    ctx->saved_data["eps"] = eps;
    return {std::get<0>(out), std::get<1>(out)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<BwdSig>("ddfast::bn_eval_stat_bwd");
    check_once_differentiable("bn_eval_stat");
    at::AutoDispatchBelowADInplaceOrView below;
    const auto s = ctx->get_saved_variables();
    const at::Tensor gy = grads[0].defined() ? grads[0] : at::zeros_like(s[0]);
    const at::Tensor gl = grads[1].defined() ? grads[1] : at::zeros({}, s[4].options());
    return {bwd.call(gy, gl, s[0], s[1], s[2], maybe(s[3]), s[4], s[5], ctx->saved_data["eps"].toDouble()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> bn_eval_stat_eager(const at::Tensor& x, const at::Tensor& rm, const at::Tensor& rv,
                                                      const c10::optional<at::Tensor>& w,
                                                      const c10::optional<at::Tensor>& b, double eps) {
  auto out = BnEvalStatEager::apply(x, rm, rv, w, b, eps);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> bn_eval_stat_eager_nograd(const at::Tensor& x, const at::Tensor& rm,
                                                             const at::Tensor& rv, const c10::optional<at::Tensor>& w,
                                                             const c10::optional<at::Tensor>& b, double eps) {
  static const auto fwd = op_handle<FwdSig>("ddfast::bn_eval_stat_fwd");
  auto out = fwd.call(x, rm, rv, w, b, eps);
  return {std::get<0>(out), std::get<1>(out)};
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_FRAGMENT(ddfast, m) {
  m.def("bn_eval_stat_eager(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, "
        "float eps) -> (Tensor, Tensor)");
  m.def("bn_eval_stat_fwd(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_eval_stat_bwd(Tensor grad_y, Tensor grad_loss, Tensor x, Tensor running_mean, Tensor running_var, "
        "Tensor? weight, Tensor mean, Tensor var, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(ddfast, Autograd, m) { m.impl("bn_eval_stat_eager", &ddfast::bn_eval_stat_eager); }
TORCH_LIBRARY_IMPL(ddfast, CompositeExplicitAutograd, m) {
  m.impl("bn_eval_stat_eager", &ddfast::bn_eval_stat_eager_nograd);
}

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("bn_eval_stat_fwd", &ddfast::bn_eval_stat_fwd_cpu);
  m.impl("bn_eval_stat_bwd", &ddfast::bn_eval_stat_bwd_cpu);
}
