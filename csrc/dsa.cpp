// dsa: one stage of Differentiable Siamese Augmentation over many images (ops ddfast::dsa_fwd/_bwd).
// Each image n does one op, given by iparams[n] = [op, a, b, c, d] (int32) and fparams[n] (6 values,
// accumulation dtype); see ddfast/ops/dsa.py. CPU kernels here (at::parallel_for over images: every
// image is independent, so the bilinear backward scatters without atomics); CUDA kernels in
// cuda/dsa.cu. The affine sampling follows the operation order of CPU affine_grid + grid_sample
// (fma where they use one), so fp32 results equal the reference bitwise on CPU.
#include "ddfast_common.h"

#ifdef DDFAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/dsa.h"
#endif

#include <cmath>

namespace ddfast {
namespace {

enum DsaOp : int32_t { kIdentity = 0, kColor = 1, kCrop = 2, kCutout = 3, kFlip = 4, kAffine = 5 };

template <typename acc_t>
struct Bilinear {
  int64_t y0, x0;
  acc_t w00, w01, w10, w11;  // weights of (y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1)
};

template <typename acc_t>
Bilinear<acc_t> bilinear_at(int64_t i, int64_t j, const acc_t* t, const acc_t* base, int64_t H, int64_t W,
                            bool align_corners) {
  const acc_t xs = base[j], ys = base[W + i];
  const acc_t gx = std::fma(ys, t[1], xs * t[0]) + t[2];
  const acc_t gy = std::fma(ys, t[4], xs * t[3]) + t[5];
  acc_t ix, iy;
  if (align_corners) {
    ix = (gx + 1) * (static_cast<acc_t>(W - 1) / 2);
    iy = (gy + 1) * (static_cast<acc_t>(H - 1) / 2);
  } else {
    ix = std::fma(gx + 1, static_cast<acc_t>(W) / 2, static_cast<acc_t>(-0.5));
    iy = std::fma(gy + 1, static_cast<acc_t>(H) / 2, static_cast<acc_t>(-0.5));
  }
  const acc_t x0f = std::floor(ix), y0f = std::floor(iy);
  const acc_t w = ix - x0f, e = 1 - w, n = iy - y0f, s = 1 - n;
  return {static_cast<int64_t>(y0f), static_cast<int64_t>(x0f), s * e, s * w, n * e, n * w};
}

inline bool inside(int64_t y, int64_t x, int64_t H, int64_t W) { return y >= 0 && y < H && x >= 0 && x < W; }

// Which input pixel an integer op reads for output pixel (i, j); false: zero fill.
inline bool integer_source(int32_t op, const int32_t* p, int64_t i, int64_t j, int64_t H, int64_t W, int64_t& si,
                           int64_t& sj) {
  si = i;
  sj = j;
  if (op == kCrop) { si = i + p[1]; sj = j + p[2]; }
  if (op == kFlip) sj = W - 1 - j;
  return inside(si, sj, H, W);
}

inline bool in_cutout(int32_t op, const int32_t* p, int64_t i, int64_t j) {
  return op == kCutout && i >= p[1] && i <= p[2] && j >= p[3] && j <= p[4];
}

template <typename scalar_t>
void forward_image(const scalar_t* x, scalar_t* y, const int32_t* p, const at::opmath_type<scalar_t>* f,
                   const at::opmath_type<scalar_t>* base, int64_t C, int64_t H, int64_t W, bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W;
  const int32_t op = p[0];
  if (op == kAffine) {
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) {
        const auto b = bilinear_at<acc_t>(i, j, f, base, H, W, align_corners);
        const bool in00 = inside(b.y0, b.x0, H, W), in01 = inside(b.y0, b.x0 + 1, H, W);
        const bool in10 = inside(b.y0 + 1, b.x0, H, W), in11 = inside(b.y0 + 1, b.x0 + 1, H, W);
        const int64_t o = b.y0 * W + b.x0;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* plane = x + c * HW;
          acc_t v = (in00 ? static_cast<acc_t>(plane[o]) : acc_t(0)) * b.w00;
          v = std::fma(in01 ? static_cast<acc_t>(plane[o + 1]) : acc_t(0), b.w01, v);
          v = std::fma(in10 ? static_cast<acc_t>(plane[o + W]) : acc_t(0), b.w10, v);
          v = std::fma(in11 ? static_cast<acc_t>(plane[o + W + 1]) : acc_t(0), b.w11, v);
          y[c * HW + i * W + j] = static_cast<scalar_t>(v);
        }
      }
  } else if (op == kColor) {
    const acc_t shift = f[0], sat = f[1], con = f[2];
    // contrast's mean M = mean over (C, H, W) of the saturation output v (fp64 sum)
    double total = 0.0;
    for (int64_t q = 0; q < HW; ++q) {
      acc_t csum = 0;
      for (int64_t c = 0; c < C; ++c) csum += static_cast<acc_t>(x[c * HW + q]) + shift;
      const acc_t cmean = csum / static_cast<acc_t>(C);
      for (int64_t c = 0; c < C; ++c) total += ((static_cast<acc_t>(x[c * HW + q]) + shift) - cmean) * sat + cmean;
    }
    const acc_t m = static_cast<acc_t>(total / static_cast<double>(C * HW));
    for (int64_t q = 0; q < HW; ++q) {
      acc_t csum = 0;
      for (int64_t c = 0; c < C; ++c) csum += static_cast<acc_t>(x[c * HW + q]) + shift;
      const acc_t cmean = csum / static_cast<acc_t>(C);
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = ((static_cast<acc_t>(x[c * HW + q]) + shift) - cmean) * sat + cmean;
        y[c * HW + q] = static_cast<scalar_t>((v - m) * con + m);
      }
    }
  } else {
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) {
        int64_t si, sj;
        const bool valid = integer_source(op, p, i, j, H, W, si, sj);
        const acc_t keep = in_cutout(op, p, i, j) ? acc_t(0) : acc_t(1);
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = valid ? static_cast<acc_t>(x[c * HW + si * W + sj]) : acc_t(0);
          y[c * HW + i * W + j] = static_cast<scalar_t>(v * keep);
        }
      }
  }
}

// gx (accumulation dtype, zeroed) of one image from its grad_y.
template <typename scalar_t>
void backward_image(const scalar_t* g, at::opmath_type<scalar_t>* gx, const int32_t* p,
                    const at::opmath_type<scalar_t>* f, const at::opmath_type<scalar_t>* base, int64_t C, int64_t H,
                    int64_t W, bool align_corners) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W;
  const int32_t op = p[0];
  if (op == kAffine) {
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) {
        const auto b = bilinear_at<acc_t>(i, j, f, base, H, W, align_corners);
        const bool in00 = inside(b.y0, b.x0, H, W), in01 = inside(b.y0, b.x0 + 1, H, W);
        const bool in10 = inside(b.y0 + 1, b.x0, H, W), in11 = inside(b.y0 + 1, b.x0 + 1, H, W);
        const int64_t o = b.y0 * W + b.x0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t gv = static_cast<acc_t>(g[c * HW + i * W + j]);
          acc_t* plane = gx + c * HW;
          if (in00) plane[o] += gv * b.w00;
          if (in01) plane[o + 1] += gv * b.w01;
          if (in10) plane[o + W] += gv * b.w10;
          if (in11) plane[o + W + 1] += gv * b.w11;
        }
      }
  } else if (op == kColor) {
    const acc_t sat = f[1], con = f[2];
    double total = 0.0;
    for (int64_t q = 0; q < C * HW; ++q) total += static_cast<double>(g[q]);
    // y = c v + (1 − c) mean(v): gv = c gy + (1 − c) Σgy / (CHW); v = s u + (1 − s) mean_C u
    const acc_t shift = (1 - con) * static_cast<acc_t>(total / static_cast<double>(C * HW));
    for (int64_t q = 0; q < HW; ++q) {
      acc_t gsum = 0;
      for (int64_t c = 0; c < C; ++c) gsum += static_cast<acc_t>(g[c * HW + q]) * con + shift;
      const acc_t gmean = gsum / static_cast<acc_t>(C);
      for (int64_t c = 0; c < C; ++c)
        gx[c * HW + q] = (static_cast<acc_t>(g[c * HW + q]) * con + shift) * sat + (1 - sat) * gmean;
    }
  } else {
    // integer ops are injective: input pixel (i, j) was read by at most one output pixel
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) {
        int64_t di = i, dj = j;
        if (op == kCrop) { di = i - p[1]; dj = j - p[2]; }
        if (op == kFlip) dj = W - 1 - j;
        const bool valid = inside(di, dj, H, W);
        const acc_t keep = in_cutout(op, p, di, dj) ? acc_t(0) : acc_t(1);
        for (int64_t c = 0; c < C; ++c)
          gx[c * HW + i * W + j] = valid ? static_cast<acc_t>(g[c * HW + di * W + dj]) * keep : acc_t(0);
      }
  }
}

void check_params(const at::Tensor& x, const at::Tensor& ip, const at::Tensor& fp, const at::Tensor& base) {
  TORCH_CHECK(x.dim() == 4, "dsa: x must be (N, C, H, W)");
  DDFAST_CHECK_CONTIGUOUS(x); DDFAST_CHECK_CONTIGUOUS(ip); DDFAST_CHECK_CONTIGUOUS(fp); DDFAST_CHECK_CONTIGUOUS(base);
  TORCH_CHECK(ip.scalar_type() == at::kInt && ip.dim() == 2 && ip.size(0) == x.size(0) && ip.size(1) == 5,
              "dsa: iparams must be int32 (N, 5)");
  TORCH_CHECK(fp.scalar_type() == acc_type(x.scalar_type()) && fp.dim() == 2 && fp.size(0) == x.size(0) &&
                  fp.size(1) == 6, "dsa: fparams must be (N, 6) in the accumulation dtype");
  TORCH_CHECK(base.scalar_type() == acc_type(x.scalar_type()) && base.numel() == x.size(2) + x.size(3),
              "dsa: base grid must hold W + H coordinates in the accumulation dtype");
  DDFAST_CHECK_SAME_DEVICE(x, ip); DDFAST_CHECK_SAME_DEVICE(x, fp); DDFAST_CHECK_SAME_DEVICE(x, base);
}

at::Tensor dsa_fwd_cpu(const at::Tensor& x, const at::Tensor& ip, const at::Tensor& fp, const at::Tensor& base,
                       bool align_corners) {
  check_params(x, ip, fp, base);
  at::Tensor y = at::empty_like(x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dsa_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int32_t* ipp = ip.data_ptr<int32_t>();
    const acc_t* fpp = fp.data_ptr<acc_t>();
    const acc_t* bp = base.data_ptr<acc_t>();
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        forward_image<scalar_t>(xp + n * C * H * W, yp + n * C * H * W, ipp + n * 5, fpp + n * 6, bp, C, H, W,
                                align_corners);
    });
  });
  return y;
}

at::Tensor dsa_bwd_cpu(const at::Tensor& grad, const at::Tensor& ip, const at::Tensor& fp, const at::Tensor& base,
                       bool align_corners) {
  check_params(grad, ip, fp, base);
  at::Tensor gx = at::zeros(grad.sizes(), grad.options().dtype(acc_type(grad.scalar_type())));
  const int64_t N = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "dsa_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    acc_t* gxp = gx.data_ptr<acc_t>();
    const int32_t* ipp = ip.data_ptr<int32_t>();
    const acc_t* fpp = fp.data_ptr<acc_t>();
    const acc_t* bp = base.data_ptr<acc_t>();
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        backward_image<scalar_t>(gp + n * C * H * W, gxp + n * C * H * W, ipp + n * 5, fpp + n * 6, bp, C, H, W,
                                 align_corners);
    });
  });
  return gx.to(grad.scalar_type());
}

#ifdef DDFAST_WITH_CUDA
at::Tensor dsa_fwd_cuda(const at::Tensor& x, const at::Tensor& ip, const at::Tensor& fp, const at::Tensor& base,
                        bool align_corners) {
  check_params(x, ip, fp, base);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor y = at::empty_like(x);
  at::Tensor means = at::empty({N}, x.options().dtype(acc_type(x.scalar_type())));
  dsa_forward_cuda(x.data_ptr(), ip.data_ptr(), fp.data_ptr(), base.data_ptr(), N, C, H, W, align_corners,
                   dtype_code(x), means.data_ptr(), y.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor dsa_bwd_cuda(const at::Tensor& grad, const at::Tensor& ip, const at::Tensor& fp, const at::Tensor& base,
                        bool align_corners) {
  check_params(grad, ip, fp, base);
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t N = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3);
  const auto acc = acc_type(grad.scalar_type());
  at::Tensor sums = at::empty({N}, grad.options().dtype(acc));
  at::Tensor gx = at::zeros(grad.sizes(), grad.options().dtype(acc));
  dsa_backward_cuda(grad.data_ptr(), ip.data_ptr(), fp.data_ptr(), base.data_ptr(), N, C, H, W, align_corners,
                    dtype_code(grad), sums.data_ptr(), gx.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx.to(grad.scalar_type());
}
#endif

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_FRAGMENT(ddfast, m) {
  m.def("dsa_fwd(Tensor x, Tensor iparams, Tensor fparams, Tensor base, bool align_corners) -> Tensor");
  m.def("dsa_bwd(Tensor grad, Tensor iparams, Tensor fparams, Tensor base, bool align_corners) -> Tensor");
}

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("dsa_fwd", &ddfast::dsa_fwd_cpu);
  m.impl("dsa_bwd", &ddfast::dsa_bwd_cpu);
}

#ifdef DDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("dsa_fwd", &ddfast::dsa_fwd_cuda);
  m.impl("dsa_bwd", &ddfast::dsa_bwd_cuda);
}
#endif
