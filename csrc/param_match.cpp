// param_match: MTT's trajectory loss ||s - t||^2 / ||a - t||^2 (ops ddfast::param_match_fwd/_bwd).
// CPU kernel here (at::parallel_for over chunks, fp64 partials for a reference-grade sum);
// the CUDA kernel lives in cuda/param_match.cu and is registered when built with CUDA.
#include "ddfast_common.h"
#include "eager_autograd.h"

#ifdef DDFAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/param_match.h"
#endif

#include <vector>

namespace ddfast {
namespace {

constexpr int64_t kChunk = 1 << 14;

std::tuple<at::Tensor, at::Tensor> param_match_fwd_cpu(const at::Tensor& s, const at::Tensor& a, const at::Tensor& t) {
  DDFAST_CHECK_CONTIGUOUS(s); DDFAST_CHECK_CONTIGUOUS(a); DDFAST_CHECK_CONTIGUOUS(t);
  TORCH_CHECK(s.numel() == a.numel() && s.numel() == t.numel(), "param_match: sizes differ");
  const int64_t n = s.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> num(chunks, 0.0), den(chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "param_match_fwd_cpu", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    using acc_t = at::opmath_type<scalar_t>;  // fp32 within a chunk (fp64 for double), fp64 across chunks
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      constexpr int kLanes = 16;  // independent accumulators so the compiler can vectorise the sum
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
        acc_t acc_n[kLanes] = {}, acc_d[kLanes] = {};
        int64_t i = lo;
        for (; i + kLanes <= hi; i += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            const acc_t tv = static_cast<acc_t>(tp[i + l]);
            const acc_t ds = static_cast<acc_t>(sp[i + l]) - tv, da = static_cast<acc_t>(ap[i + l]) - tv;
            acc_n[l] += ds * ds;
            acc_d[l] += da * da;
          }
        }
        double tot_n = 0.0, tot_d = 0.0;
        for (; i < hi; ++i) {
          const double tv = static_cast<double>(tp[i]);
          const double ds = static_cast<double>(sp[i]) - tv, da = static_cast<double>(ap[i]) - tv;
          tot_n += ds * ds;
          tot_d += da * da;
        }
        for (int l = 0; l < kLanes; ++l) { tot_n += acc_n[l]; tot_d += acc_d[l]; }
        num[c] = tot_n;
        den[c] = tot_d;
      }
    });
  });
  double total_n = 0.0, total_d = 0.0;
  for (int64_t c = 0; c < chunks; ++c) { total_n += num[c]; total_d += den[c]; }
  auto acc = acc_type(s.scalar_type());
  at::Tensor loss = at::scalar_tensor(total_n / total_d, s.options().dtype(acc)).to(s.scalar_type());
  at::Tensor den_t = at::scalar_tensor(total_d, s.options().dtype(acc));
  return {loss, den_t};
}

at::Tensor param_match_bwd_cpu(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& t, const at::Tensor& den) {
  DDFAST_CHECK_CONTIGUOUS(s); DDFAST_CHECK_CONTIGUOUS(t);
  at::Tensor out = at::empty_like(s);
  const int64_t n = s.numel();
  const double scale = 2.0 * grad.item<double>() / den.item<double>();  // two scalars: one sync
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "param_match_bwd_cpu", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t sc = static_cast<acc_t>(scale);
    at::parallel_for(0, n, kChunk, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        op[i] = static_cast<scalar_t>(sc * (static_cast<acc_t>(sp[i]) - static_cast<acc_t>(tp[i])));
    });
  });
  return out;
}

#ifdef DDFAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> param_match_fwd_cuda(const at::Tensor& s, const at::Tensor& a, const at::Tensor& t) {
  DDFAST_CHECK_CONTIGUOUS(s); DDFAST_CHECK_CONTIGUOUS(a); DDFAST_CHECK_CONTIGUOUS(t);
  // the launcher reads all three as s's dtype over s.numel() elements
  TORCH_CHECK(s.numel() == a.numel() && s.numel() == t.numel(), "param_match: sizes differ");
  TORCH_CHECK(a.scalar_type() == s.scalar_type() && t.scalar_type() == s.scalar_type(), "param_match: dtypes differ");
  DDFAST_CHECK_SAME_DEVICE(a, s); DDFAST_CHECK_SAME_DEVICE(t, s);
  c10::cuda::CUDAGuard guard(s.device());
  const int64_t n = s.numel();
  const int code = dtype_code(s);
  auto acc = acc_type(s.scalar_type());
  at::Tensor ws = at::empty({param_match_workspace_size(n, code)}, s.options().dtype(at::kByte));
  at::Tensor loss = at::empty({}, s.options());
  at::Tensor den = at::empty({}, s.options().dtype(acc));
  param_match_forward_cuda(s.data_ptr(), a.data_ptr(), t.data_ptr(), n, code, ws.data_ptr(), loss.data_ptr(),
                           den.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, den};
}

at::Tensor param_match_bwd_cuda(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& t, const at::Tensor& den) {
  DDFAST_CHECK_CONTIGUOUS(s); DDFAST_CHECK_CONTIGUOUS(t);
  TORCH_CHECK(t.numel() == s.numel() && t.scalar_type() == s.scalar_type(), "param_match_bwd: student/target differ");
  TORCH_CHECK(grad.numel() == 1 && den.numel() == 1, "param_match_bwd: grad and den must be scalars");
  DDFAST_CHECK_SAME_DEVICE(t, s);
  c10::cuda::CUDAGuard guard(s.device());
  // the kernel reads g[0] as s's dtype and den[0] as the accumulation dtype, on s's device
  at::Tensor g = grad.to(s.device(), s.scalar_type()).contiguous();
  at::Tensor dn = den.to(s.device(), acc_type(s.scalar_type())).contiguous();
  at::Tensor out = at::empty_like(s);
  param_match_backward_cuda(g.data_ptr(), s.data_ptr(), t.data_ptr(), dn.data_ptr(), s.numel(), dtype_code(s),
                            out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
#endif

// Eager path (eager_autograd.h): one C++ node; gradient to student only.
using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

class ParamMatchEager : public torch::autograd::Function<ParamMatchEager> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& s, const at::Tensor& a, const at::Tensor& t) {
    static const auto fwd = op_handle<FwdSig>("ddfast::param_match_fwd");
    at::AutoDispatchBelowADInplaceOrView below;  // apply() only turns grad mode off: skip the Python autograd
    auto out = fwd.call(s, a, t);
    ctx->save_for_backward({s, t, std::get<1>(out)});
    return std::get<0>(out);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<BwdSig>("ddfast::param_match_bwd");
    check_once_differentiable("param_match");
    at::AutoDispatchBelowADInplaceOrView below;
    const auto saved = ctx->get_saved_variables();
    return {bwd.call(grads[0], saved[0], saved[1], saved[2]), at::Tensor(), at::Tensor()};
  }
};

at::Tensor param_match_eager(const at::Tensor& s, const at::Tensor& a, const at::Tensor& t) {
  return ParamMatchEager::apply(s, a, t);
}

at::Tensor param_match_eager_nograd(const at::Tensor& s, const at::Tensor& a, const at::Tensor& t) {
  static const auto fwd = op_handle<FwdSig>("ddfast::param_match_fwd");
  return std::get<0>(fwd.call(s, a, t));
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_FRAGMENT(ddfast, m) {
  m.def("param_match_fwd(Tensor student, Tensor start, Tensor target) -> (Tensor, Tensor)");
  m.def("param_match_bwd(Tensor grad, Tensor student, Tensor target, Tensor den) -> Tensor");
  m.def("param_match_eager(Tensor student, Tensor start, Tensor target) -> Tensor");
}

TORCH_LIBRARY_IMPL(ddfast, Autograd, m) { m.impl("param_match_eager", &ddfast::param_match_eager); }
TORCH_LIBRARY_IMPL(ddfast, CompositeExplicitAutograd, m) {
  m.impl("param_match_eager", &ddfast::param_match_eager_nograd);
}

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("param_match_fwd", &ddfast::param_match_fwd_cpu);
  m.impl("param_match_bwd", &ddfast::param_match_bwd_cpu);
}

#ifdef DDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("param_match_fwd", &ddfast::param_match_fwd_cuda);
  m.impl("param_match_bwd", &ddfast::param_match_bwd_cuda);
}
#endif
