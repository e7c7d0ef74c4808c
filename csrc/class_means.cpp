// class_means: per-class means of the rows of x (N, D) in one pass (ops ddfast::class_means_fwd/_bwd).
// CPU kernel from class_means_cpu.h (fp32 blocks flushed into fp64); the CUDA kernel lives in cuda/class_means.cu.
#include "ddfast_common.h"
#include "eager_autograd.h"
#include "class_means_cpu.h"

#ifdef DDFAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/class_means.h"
#endif

namespace ddfast {
namespace {

std::tuple<at::Tensor, at::Tensor> class_means_fwd_cpu(const at::Tensor& x, const at::Tensor& labels, int64_t num_classes) {
  TORCH_CHECK(x.dim() == 2, "class_means_fwd: x must be (N, D)");
  TORCH_CHECK(labels.numel() == x.size(0), "class_means_fwd: one label per row");
  std::vector<double> sums;
  std::vector<int64_t> counts;
  segment_cpu::segment_sums(x, labels, num_classes, sums, counts);
  const int64_t d = x.size(1);
  at::Tensor counts_t = at::empty({num_classes}, labels.options());
  std::copy(counts.begin(), counts.end(), counts_t.data_ptr<int64_t>());
  at::Tensor means = at::empty({num_classes, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_means_fwd_cpu", [&] {
    scalar_t* mp = means.data_ptr<scalar_t>();
    for (int64_t c = 0; c < num_classes; ++c) {
      const double inv = 1.0 / static_cast<double>(std::max<int64_t>(counts[c], 1));
      for (int64_t j = 0; j < d; ++j) mp[c * d + j] = static_cast<scalar_t>(sums[c * d + j] * inv);
    }
  });
  return {means, counts_t};
}

at::Tensor class_means_bwd_cpu(const at::Tensor& grad_means, const at::Tensor& labels, const at::Tensor& counts) {
  const int64_t num_classes = grad_means.size(0), d = grad_means.size(1);
  segment_cpu::check_labels_in_range(labels, num_classes);
  // grad / count in the opmath type, as the reference's division backward
  const auto acc = acc_type(grad_means.scalar_type());
  at::Tensor g = grad_means.to(acc).contiguous();
  at::Tensor coef = (1.0 / counts.clamp_min(1).to(acc)).contiguous();
  if (acc == at::kDouble)
    return segment_cpu::gather_scale(g.data_ptr<double>(), coef.data_ptr<double>(), labels, d, grad_means.options());
  return segment_cpu::gather_scale(g.data_ptr<float>(), coef.data_ptr<float>(), labels, d, grad_means.options());
}

#ifdef DDFAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> class_means_fwd_cuda(const at::Tensor& x, const at::Tensor& labels, int64_t num_classes) {
  DDFAST_CHECK_CONTIGUOUS(x);
  DDFAST_CHECK_CONTIGUOUS(labels);
  TORCH_CHECK(x.dim() == 2 && labels.numel() == x.size(0), "class_means_fwd: x (N, D) and one label per row");
  c10::cuda::CUDAGuard guard(x.device());
  const SortedSegments seg = sorted_segments(labels, num_classes);  // no host sync (no bincount)
  const at::Tensor &perm = seg.perm, &offsets = seg.offsets, &counts = seg.counts;
  at::Tensor means = at::empty({num_classes, x.size(1)}, x.options());
  class_means_forward_cuda(x.data_ptr(), perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), num_classes, x.size(1),
                           dtype_code(x), means.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {means, counts};
}

at::Tensor class_means_bwd_cuda(const at::Tensor& grad_means, const at::Tensor& labels, const at::Tensor& counts) {
  c10::cuda::CUDAGuard guard(grad_means.device());
  const auto acc = acc_type(grad_means.scalar_type());
  at::Tensor g = grad_means.to(acc).contiguous();
  at::Tensor coef = (1.0 / counts.clamp_min(1).to(acc)).contiguous();
  at::Tensor lab = labels.contiguous();
  TORCH_CHECK(lab.numel() <= 2147483647, "labels: the CUDA backward handles at most 2^31 - 1 samples, got ",
              lab.numel());  // one block row per sample
  at::Tensor out = at::empty({lab.numel(), grad_means.size(1)}, grad_means.options());
  class_means_backward_cuda(g.data_ptr(), coef.data_ptr(), lab.data_ptr<int64_t>(), grad_means.size(0), lab.numel(),
                            grad_means.size(1), dtype_code(grad_means), out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
#endif

// Eager path (eager_autograd.h): one C++ node; gradient to x only, counts non-differentiable.
using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t);
using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);

class ClassMeansEager : public torch::autograd::Function<ClassMeansEager> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& labels,
                               int64_t num_classes) {
    static const auto fwd = op_handle<FwdSig>("ddfast::class_means_fwd");
    at::AutoDispatchBelowADInplaceOrView below;  // apply() only turns grad mode off: skip the Python autograd
    auto out = fwd.call(x, labels, num_classes);
    ctx->save_for_backward({labels, std::get<1>(out)});
    ctx->mark_non_differentiable({std::get<1>(out)});
    return {std::get<0>(out), std::get<1>(out)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<BwdSig>("ddfast::class_means_bwd");
    check_once_differentiable("class_means");
    at::AutoDispatchBelowADInplaceOrView below;
    const auto saved = ctx->get_saved_variables();
    return {bwd.call(grads[0].contiguous(), saved[0], saved[1]), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> class_means_eager(const at::Tensor& x, const at::Tensor& labels,
                                                     int64_t num_classes) {
  auto out = ClassMeansEager::apply(x, labels, num_classes);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> class_means_eager_nograd(const at::Tensor& x, const at::Tensor& labels,
                                                            int64_t num_classes) {
  static const auto fwd = op_handle<FwdSig>("ddfast::class_means_fwd");
  return fwd.call(x, labels, num_classes);
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_FRAGMENT(ddfast, m) {
  m.def("class_means_fwd(Tensor x, Tensor labels, int num_classes) -> (Tensor, Tensor)");
  m.def("class_means_bwd(Tensor grad_means, Tensor labels, Tensor counts) -> Tensor");
  m.def("class_means_eager(Tensor x, Tensor labels, int num_classes) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ddfast, Autograd, m) { m.impl("class_means_eager", &ddfast::class_means_eager); }
TORCH_LIBRARY_IMPL(ddfast, CompositeExplicitAutograd, m) {
  m.impl("class_means_eager", &ddfast::class_means_eager_nograd);
}

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("class_means_fwd", &ddfast::class_means_fwd_cpu);
  m.impl("class_means_bwd", &ddfast::class_means_bwd_cpu);
}

#ifdef DDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("class_means_fwd", &ddfast::class_means_fwd_cuda);
  m.impl("class_means_bwd", &ddfast::class_means_bwd_cuda);
}
#endif
