// bn_stat: SRe2L's BatchNorm statistic loss ‖μ − running_mean‖₂ + ‖σ²_biased − running_var‖₂ over
// the channels of x viewed as (N, C, S) (ops ddfast::bn_stat_fwd/_bwd). Forward reads x once
// (per channel: sums shifted by the channel's first value, fp64 on CPU); backward is one
// elementwise pass grad_x = a_c + b_c (x − μ_c). The CUDA kernels live in cuda/bn_stat.cu: one
// launch each way (the forward's counters are zeroed by a memset on the stream).
#include "ddfast_common.h"
#include "bn_stat_cpu.h"
#include "eager_autograd.h"

#ifdef DDFAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/bn_stat.h"
#endif

#include <cmath>
#include <vector>

namespace ddfast {
namespace {

void check_shapes(const at::Tensor& x, const at::Tensor& rm, const at::Tensor& rv) {
  TORCH_CHECK(x.dim() == 3, "bn_stat: x must be viewed as (N, C, S)");
  TORCH_CHECK(rm.numel() == x.size(1) && rv.numel() == x.size(1), "bn_stat: running stats must have C entries");
  DDFAST_CHECK_CONTIGUOUS(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_stat_fwd_cpu(const at::Tensor& x, const at::Tensor& rm,
                                                               const at::Tensor& rv) {
  check_shapes(x, rm, rv);
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2);
  const double m = static_cast<double>(n * s);
  TORCH_CHECK(n * s > 0, "bn_stat: x has no elements per channel");
  at::Tensor mean = at::empty({c}, x.options().dtype(at::kDouble));
  at::Tensor var = at::empty({c}, x.options().dtype(at::kDouble));
  double* mp = mean.data_ptr<double>();
  double* vp = var.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_fwd_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, c, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        const double shift = static_cast<double>(xp[ch * s]);
        double sum = 0.0, sumsq = 0.0;
        for (int64_t i = 0; i < n; ++i) bn_stat_cpu::add_shifted_sums(xp + (i * c + ch) * s, s, shift, sum, sumsq);
        const double md = sum / m;
        mp[ch] = shift + md;
        vp[ch] = std::max(0.0, sumsq / m - md * md);
      }
    });
  });
  const auto acc = acc_type(x.scalar_type());
  at::Tensor loss = at::scalar_tensor(bn_stat_cpu::loss_from_stats(mp, vp, rm, rv), x.options().dtype(at::kDouble));
  return {loss.to(acc), mean.to(acc), var.to(acc)};
}

at::Tensor bn_stat_bwd_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& rm, const at::Tensor& rv,
                           const at::Tensor& mean, const at::Tensor& var) {
  check_shapes(x, rm, rv);
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2);
  at::Tensor mu = mean.to(at::kDouble).contiguous(), vd = var.to(at::kDouble).contiguous();
  std::vector<double> a, b;
  bn_stat_cpu::coefficients(grad.to(at::kDouble).item<double>(), mu.data_ptr<double>(), vd.data_ptr<double>(), rm, rv, n * s, a, b);
  const double* ap = a.data();
  const double* bp = b.data();
  const double* mup = mu.data_ptr<double>();
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stat_bwd_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(s, 1));
    at::parallel_for(0, n * c, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t ch = r % c;
        const acc_t av = static_cast<acc_t>(ap[ch]), bv = static_cast<acc_t>(bp[ch]), mv = static_cast<acc_t>(mup[ch]);
        const scalar_t* xr = xp + r * s;
        scalar_t* orow = op + r * s;
        for (int64_t j = 0; j < s; ++j) orow[j] = static_cast<scalar_t>(av + bv * (static_cast<acc_t>(xr[j]) - mv));
      }
    });
  });
  return out;
}

#ifdef DDFAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_stat_fwd_cuda(const at::Tensor& x, const at::Tensor& rm,
                                                                const at::Tensor& rv) {
  check_shapes(x, rm, rv);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2);
  TORCH_CHECK(n * s > 0, "bn_stat: x has no elements per channel");
  const auto acc = acc_type(x.scalar_type());
  at::Tensor mean = at::empty({c}, x.options().dtype(acc));
  at::Tensor var = at::empty({c}, x.options().dtype(acc));
  if (c == 0) return {at::zeros({}, x.options().dtype(acc)), mean, var};
  at::Tensor loss = at::empty({}, x.options().dtype(acc));
  const int64_t splits = bn_stat_num_splits(n, s);
  const BnStatWorkspace layout = bn_stat_workspace(c, splits, acc == at::kDouble);
  at::Tensor workspace = at::empty({static_cast<int64_t>(layout.bytes)}, x.options().dtype(at::kByte));
  at::Tensor rm_acc = rm.to(acc).contiguous(), rv_acc = rv.to(acc).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // The arrival counters start from zeros written by a memset on the stream (in a CUDA graph, a
  // memset node, not a kernel): every call is independent of what earlier calls, other streams or
  // graphs left behind, and no device buffer has to outlive the call.
  auto* counters = static_cast<unsigned char*>(workspace.data_ptr()) + layout.counters_offset;
  C10_CUDA_CHECK(cudaMemsetAsync(counters, 0, layout.bytes - layout.counters_offset, stream));
  // one launch: partial statistics, Chan's merge per channel and the loss in last-block epilogues
  bn_stat_forward_cuda(x.data_ptr(), n, c, s, splits, dtype_code(x), rm_acc.data_ptr(), rv_acc.data_ptr(),
                       workspace.data_ptr(), mean.data_ptr(), var.data_ptr(), loss.data_ptr(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, mean, var};
}

at::Tensor bn_stat_bwd_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& rm, const at::Tensor& rv,
                            const at::Tensor& mean, const at::Tensor& var) {
  check_shapes(x, rm, rv);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2);
  // the kernel reads the gradient, the statistics and the running statistics in the accumulation
  // dtype of x (no copies when they already are: the forward's outputs, fp32 BatchNorm buffers)
  const auto acc = acc_type(x.scalar_type());
  at::Tensor mu = mean.to(acc).contiguous(), var_acc = var.to(acc).contiguous();
  at::Tensor rm_acc = rm.to(acc).contiguous(), rv_acc = rv.to(acc).contiguous(), g = grad.to(acc).contiguous();
  at::Tensor out = at::empty_like(x);
  // one launch: every block takes the norms and the coefficients itself, then its share of x
  bn_stat_backward_cuda(g.data_ptr(), x.data_ptr(), mu.data_ptr(), var_acc.data_ptr(), rm_acc.data_ptr(),
                        rv_acc.data_ptr(), n, c, s, dtype_code(x), out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
#endif

// Eager path (eager_autograd.h): one C++ node; gradient to x only.
using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&);

class BnStatEager : public torch::autograd::Function<BnStatEager> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& rm, const at::Tensor& rv) {
    static const auto fwd = op_handle<FwdSig>("ddfast::bn_stat_fwd");
    at::AutoDispatchBelowADInplaceOrView below;  // apply() only turns grad mode off: skip the Python autograd
    auto out = fwd.call(x, rm, rv);
    ctx->save_for_backward({x, rm, rv, std::get<1>(out), std::get<2>(out)});
    return std::get<0>(out);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<BwdSig>("ddfast::bn_stat_bwd");
    check_once_differentiable("bn_stat_loss");
    at::AutoDispatchBelowADInplaceOrView below;
    const auto s = ctx->get_saved_variables();
    return {bwd.call(grads[0], s[0], s[1], s[2], s[3], s[4]), at::Tensor(), at::Tensor()};
  }
};

at::Tensor bn_stat_eager(const at::Tensor& x, const at::Tensor& rm, const at::Tensor& rv) {
  return BnStatEager::apply(x, rm, rv);
}

at::Tensor bn_stat_eager_nograd(const at::Tensor& x, const at::Tensor& rm, const at::Tensor& rv) {
  static const auto fwd = op_handle<FwdSig>("ddfast::bn_stat_fwd");
  return std::get<0>(fwd.call(x, rm, rv));
}

// Σ_l w_l · bn_stat_loss(x_l) over many layers as one C++ node (BNStatMatcher's loss over a
// model's BatchNorms): the per-layer kernels run in a C++ loop, so a model with L BatchNorms costs
// one Python call and one autograd node instead of L of each, and no Python add/mul per layer.
// The sum is taken in order, w_l applied where it is not 1 (as the per-layer sum in Python).
at::Tensor add_weighted(const at::Tensor& total, const at::Tensor& loss, double w) {
  at::Tensor term = w == 1.0 ? loss : loss * w;
  return total.defined() ? total + term : term;
}

class BnStatSumEager : public torch::autograd::Function<BnStatSumEager> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList xs, at::TensorList rms, at::TensorList rvs,
                            at::ArrayRef<double> weights) {
    static const auto fwd = op_handle<FwdSig>("ddfast::bn_stat_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    std::vector<at::Tensor> saved;
    saved.reserve(5 * xs.size());
    at::Tensor total;
    for (size_t l = 0; l < xs.size(); ++l) {
      auto out = fwd.call(xs[l], rms[l], rvs[l]);
      total = add_weighted(total, std::get<0>(out), weights[l]);
      saved.insert(saved.end(), {xs[l], rms[l], rvs[l], std::get<1>(out), std::get<2>(out)});
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["weights"] = std::vector<double>(weights.begin(), weights.end());
    return total;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<BwdSig>("ddfast::bn_stat_bwd");
    check_once_differentiable("bn_stat_loss_sum");
    at::AutoDispatchBelowADInplaceOrView below;
    const auto s = ctx->get_saved_variables();
    const auto weights = ctx->saved_data["weights"].toDoubleVector();
    const size_t layers = weights.size();
    variable_list out(3 * layers + 1);  // gradients to xs only (not the running statistics, not weights)
    for (size_t l = 0; l < layers; ++l) {
      const at::Tensor grad = weights[l] == 1.0 ? grads[0] : grads[0] * weights[l];
      out[l] = bwd.call(grad, s[5 * l], s[5 * l + 1], s[5 * l + 2], s[5 * l + 3], s[5 * l + 4]);
    }
    return out;
  }
};

void check_sum_args(at::TensorList xs, at::TensorList rms, at::TensorList rvs, at::ArrayRef<double> weights) {
  TORCH_CHECK(!xs.empty(), "bn_stat_loss_sum: xs is empty");
  TORCH_CHECK(rms.size() == xs.size() && rvs.size() == xs.size() && weights.size() == xs.size(),
              "bn_stat_loss_sum: xs, running_means, running_vars and weights must have one entry per layer");
}

at::Tensor bn_stat_sum_eager(at::TensorList xs, at::TensorList rms, at::TensorList rvs, at::ArrayRef<double> weights) {
  check_sum_args(xs, rms, rvs, weights);
  return BnStatSumEager::apply(xs, rms, rvs, weights);
}

at::Tensor bn_stat_sum_eager_nograd(at::TensorList xs, at::TensorList rms, at::TensorList rvs,
                                    at::ArrayRef<double> weights) {
  static const auto fwd = op_handle<FwdSig>("ddfast::bn_stat_fwd");
  check_sum_args(xs, rms, rvs, weights);
  at::Tensor total;
  for (size_t l = 0; l < xs.size(); ++l) {
    total = add_weighted(total, std::get<0>(fwd.call(xs[l], rms[l], rvs[l])), weights[l]);
  }
  return total;
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_FRAGMENT(ddfast, m) {
  m.def("bn_stat_fwd(Tensor x, Tensor running_mean, Tensor running_var) -> (Tensor, Tensor, Tensor)");
  m.def("bn_stat_bwd(Tensor grad, Tensor x, Tensor running_mean, Tensor running_var, Tensor mean, Tensor var) -> Tensor");
  m.def("bn_stat_eager(Tensor x, Tensor running_mean, Tensor running_var) -> Tensor");
  m.def("bn_stat_sum_eager(Tensor[] xs, Tensor[] running_means, Tensor[] running_vars, float[] weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(ddfast, Autograd, m) {
  m.impl("bn_stat_eager", &ddfast::bn_stat_eager);
  m.impl("bn_stat_sum_eager", &ddfast::bn_stat_sum_eager);
}
TORCH_LIBRARY_IMPL(ddfast, CompositeExplicitAutograd, m) {
  m.impl("bn_stat_eager", &ddfast::bn_stat_eager_nograd);
  m.impl("bn_stat_sum_eager", &ddfast::bn_stat_sum_eager_nograd);
}

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("bn_stat_fwd", &ddfast::bn_stat_fwd_cpu);
  m.impl("bn_stat_bwd", &ddfast::bn_stat_bwd_cpu);
}

#ifdef DDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("bn_stat_fwd", &ddfast::bn_stat_fwd_cuda);
  m.impl("bn_stat_bwd", &ddfast::bn_stat_bwd_cuda);
}
#endif
