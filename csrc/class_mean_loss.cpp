// class_mean_loss: DM/CAFE's Σ_c ‖mean_real[c] − mean_syn[c]‖² with the real means given
// (ops ddfast::class_mean_loss_fwd/_bwd). Forward: syn segmented sums (class_means_cpu.h), then
// diff and its per-class squared norm; backward: 2 g_c diff_c / n_c gathered per syn row.
// The CUDA kernels live in cuda/class_mean_loss.cu.
#include "ddfast_common.h"
#include "eager_autograd.h"
#include "class_means_cpu.h"

#ifdef DDFAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/class_mean_loss.h"
#endif

namespace ddfast {
namespace {

void check_fwd_args(const at::Tensor& f_syn, const at::Tensor& y_syn, const at::Tensor& mean_real,
                    const at::Tensor& count_real, int64_t num_classes) {
  TORCH_CHECK(f_syn.dim() == 2 && y_syn.numel() == f_syn.size(0), "class_mean_loss_fwd: f_syn (N, D), one label per row");
  TORCH_CHECK(mean_real.dim() == 2 && mean_real.size(0) == num_classes && mean_real.size(1) == f_syn.size(1),
              "class_mean_loss_fwd: mean_real must be (num_classes, D)");
  TORCH_CHECK(count_real.numel() == num_classes && count_real.scalar_type() == at::kLong,
              "class_mean_loss_fwd: count_real must be int64 (num_classes,)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_mean_loss_fwd_cpu(const at::Tensor& f_syn, const at::Tensor& y_syn,
                                                                       const at::Tensor& mean_real,
                                                                       const at::Tensor& count_real, int64_t num_classes) {
  check_fwd_args(f_syn, y_syn, mean_real, count_real, num_classes);
  std::vector<double> sums;
  std::vector<int64_t> counts;
  segment_cpu::segment_sums(f_syn, y_syn, num_classes, sums, counts);
  const int64_t d = f_syn.size(1);
  const auto acc = acc_type(f_syn.scalar_type());
  at::Tensor ref = mean_real.to(at::kDouble).contiguous();
  at::Tensor cr = count_real.contiguous();
  const double* rp = ref.data_ptr<double>();
  const int64_t* crp = cr.data_ptr<int64_t>();
  at::Tensor diff = at::empty({num_classes, d}, f_syn.options().dtype(at::kDouble));
  at::Tensor loss = at::empty({num_classes}, f_syn.options().dtype(at::kDouble));
  double* dp = diff.data_ptr<double>();
  double* lp = loss.data_ptr<double>();
  for (int64_t c = 0; c < num_classes; ++c) {
    const bool both = counts[c] > 0 && crp[c] > 0;
    const double inv = 1.0 / static_cast<double>(std::max<int64_t>(counts[c], 1));
    double sq = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const double v = both ? sums[c * d + j] * inv - rp[c * d + j] : 0.0;
      dp[c * d + j] = v;
      sq += v * v;
    }
    lp[c] = sq;
  }
  at::Tensor counts_t = at::empty({num_classes}, y_syn.options());
  std::copy(counts.begin(), counts.end(), counts_t.data_ptr<int64_t>());
  return {loss.to(acc), diff.to(acc), counts_t};
}

at::Tensor class_mean_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& y_syn, const at::Tensor& diff,
                                   const at::Tensor& count_syn, at::ScalarType dtype) {
  const int64_t num_classes = diff.size(0), d = diff.size(1);
  segment_cpu::check_labels_in_range(y_syn, num_classes);
  const auto acc = acc_type(dtype);
  at::Tensor g = diff.to(acc).contiguous();
  at::Tensor coef = (2.0 * grad_loss.to(acc) / count_syn.clamp_min(1).to(acc)).contiguous();
  const auto opts = diff.options().dtype(dtype);
  if (acc == at::kDouble)
    return segment_cpu::gather_scale(g.data_ptr<double>(), coef.data_ptr<double>(), y_syn, d, opts);
  return segment_cpu::gather_scale(g.data_ptr<float>(), coef.data_ptr<float>(), y_syn, d, opts);
}

#ifdef DDFAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> class_mean_loss_fwd_cuda(const at::Tensor& f_syn, const at::Tensor& y_syn,
                                                                        const at::Tensor& mean_real,
                                                                        const at::Tensor& count_real, int64_t num_classes) {
  check_fwd_args(f_syn, y_syn, mean_real, count_real, num_classes);
  DDFAST_CHECK_CONTIGUOUS(f_syn);
  DDFAST_CHECK_CONTIGUOUS(y_syn);
  c10::cuda::CUDAGuard guard(f_syn.device());
  const auto acc = acc_type(f_syn.scalar_type());
  const int64_t d = f_syn.size(1);
  const SortedSegments seg = sorted_segments(y_syn, num_classes);  // no host sync (no bincount)
  const at::Tensor &perm = seg.perm, &offsets = seg.offsets, &counts = seg.counts;
  at::Tensor ref = mean_real.to(acc).contiguous();
  at::Tensor cr = count_real.contiguous();
  const int64_t dblocks = class_mean_loss_num_dblocks(d);
  at::Tensor diff = at::empty({num_classes, d}, f_syn.options().dtype(acc));
  at::Tensor partial = at::empty({num_classes, dblocks}, f_syn.options().dtype(acc));
  class_mean_loss_forward_cuda(f_syn.data_ptr(), perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), num_classes, d,
                               dtype_code(f_syn), ref.data_ptr(), cr.data_ptr<int64_t>(), diff.data_ptr(),
                               partial.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {partial.sum(1), diff, counts};
}

at::Tensor class_mean_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& y_syn, const at::Tensor& diff,
                                    const at::Tensor& count_syn, at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(diff.device());
  const auto acc = acc_type(dtype);  // the launcher reads diff and coef as acc_type(dtype)
  at::Tensor g = diff.to(acc).contiguous();
  at::Tensor coef = (2.0 * grad_loss.to(acc) / count_syn.clamp_min(1).to(acc)).contiguous();
  at::Tensor lab = y_syn.contiguous();
  TORCH_CHECK(lab.numel() <= 2147483647, "labels: the CUDA backward handles at most 2^31 - 1 samples, got ",
              lab.numel());  // one block row per sample
  at::Tensor out = at::empty({lab.numel(), diff.size(1)}, diff.options().dtype(dtype));
  class_mean_loss_backward_cuda(g.data_ptr(), coef.data_ptr(), lab.data_ptr<int64_t>(), diff.size(0), lab.numel(),
                                diff.size(1), dtype_code(out), out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
#endif

// Eager path (eager_autograd.h): one C++ node; gradient to f_syn only.
using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, int64_t);
using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType);

class ClassMeanLossEager : public torch::autograd::Function<ClassMeanLossEager> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& f_syn, const at::Tensor& y_syn,
                            const at::Tensor& mean_real, const at::Tensor& count_real, int64_t num_classes) {
    static const auto fwd = op_handle<FwdSig>("ddfast::class_mean_loss_fwd");
    at::AutoDispatchBelowADInplaceOrView below;  // apply() only turns grad mode off: skip the Python autograd
    auto out = fwd.call(f_syn, y_syn, mean_real, count_real, num_classes);
    ctx->save_for_backward({y_syn, std::get<1>(out), std::get<2>(out)});
    ctx->saved_data["dtype"] = f_syn.scalar_type();
    return std::get<0>(out);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<BwdSig>("ddfast::class_mean_loss_bwd");
    check_once_differentiable("class_mean_loss");
    at::AutoDispatchBelowADInplaceOrView below;
    const auto saved = ctx->get_saved_variables();
    return {bwd.call(grads[0].contiguous(), saved[0], saved[1], saved[2], ctx->saved_data["dtype"].toScalarType()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor class_mean_loss_eager(const at::Tensor& f_syn, const at::Tensor& y_syn, const at::Tensor& mean_real,
                                 const at::Tensor& count_real, int64_t num_classes) {
  return ClassMeanLossEager::apply(f_syn, y_syn, mean_real, count_real, num_classes);
}

at::Tensor class_mean_loss_eager_nograd(const at::Tensor& f_syn, const at::Tensor& y_syn, const at::Tensor& mean_real,
                                        const at::Tensor& count_real, int64_t num_classes) {
  static const auto fwd = op_handle<FwdSig>("ddfast::class_mean_loss_fwd");
  return std::get<0>(fwd.call(f_syn, y_syn, mean_real, count_real, num_classes));
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_FRAGMENT(ddfast, m) {
  m.def("class_mean_loss_fwd(Tensor f_syn, Tensor y_syn, Tensor mean_real, Tensor count_real, int num_classes) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("class_mean_loss_bwd(Tensor grad_loss, Tensor y_syn, Tensor diff, Tensor count_syn, ScalarType dtype) -> Tensor");
  m.def("class_mean_loss_eager(Tensor f_syn, Tensor y_syn, Tensor mean_real, Tensor count_real, int num_classes) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(ddfast, Autograd, m) { m.impl("class_mean_loss_eager", &ddfast::class_mean_loss_eager); }
TORCH_LIBRARY_IMPL(ddfast, CompositeExplicitAutograd, m) {
  m.impl("class_mean_loss_eager", &ddfast::class_mean_loss_eager_nograd);
}

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("class_mean_loss_fwd", &ddfast::class_mean_loss_fwd_cpu);
  m.impl("class_mean_loss_bwd", &ddfast::class_mean_loss_bwd_cpu);
}

#ifdef DDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("class_mean_loss_fwd", &ddfast::class_mean_loss_fwd_cuda);
  m.impl("class_mean_loss_bwd", &ddfast::class_mean_loss_bwd_cuda);
}
#endif
