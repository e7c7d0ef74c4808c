// mmd: per-row kernel sums over same-class columns and their gradient (ops ddfast::mmd_fwd/_bwd).
// Contract (see ddfast/ops/mmd.py): z (R, D) rows sorted by class; cls (R,) int64; side (R,) int32
// (0 = x row, 1 = y row); offsets (C+1,) int64 class row ranges; coefs (S,) 1/(2 s^2) per bandwidth.
// fwd -> (R, 2) [sum over x columns, sum over y columns]; bwd(grad (R, 2)) -> grad_z (R, D).
// CPU kernel here: row blocks in parallel (each owns its output rows: no atomics), column blocks
// of the rows' classes only, distances recomputed per pair (sum of squared differences: no
// cancellation); half inputs run in fp32.
// The CUDA kernels live in cuda/mmd.cu.
#include "ddfast_common.h"

#ifdef DDFAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/mmd.h"
#endif

#include <algorithm>
#include <cmath>
#include <vector>

namespace ddfast {
namespace {

constexpr int64_t kRowBlock = 16;
constexpr int64_t kColBlock = 64;

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int kLanes = 16;  // independent partial sums so the compiler vectorises the loop
  T lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[k + l] * b[k + l];
  T s = 0;
  for (; k < n; ++k) s += a[k] * b[k];
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// |a - b|^2 summed directly: on the CPU this costs what the dot product does and, unlike
// |a|^2 + |b|^2 - 2<a, b>, does not cancel when a and b are close relative to their norms.
template <typename T>
inline T sq_dist(const T* a, const T* b, int64_t n) {
  constexpr int kLanes = 16;
  T lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const T diff = a[k + l] - b[k + l];
      lanes[l] += diff * diff;
    }
  T s = 0;
  for (; k < n; ++k) s += (a[k] - b[k]) * (a[k] - b[k]);
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

void check_inputs(const at::Tensor& z, const at::Tensor& cls, const at::Tensor& side, const at::Tensor& offsets,
                  const at::Tensor& coefs, bool linear) {
  DDFAST_CHECK_CONTIGUOUS(z); DDFAST_CHECK_CONTIGUOUS(cls); DDFAST_CHECK_CONTIGUOUS(side);
  DDFAST_CHECK_CONTIGUOUS(offsets); DDFAST_CHECK_CONTIGUOUS(coefs);
  TORCH_CHECK(z.dim() == 2, "mmd: z must be (R, D)");
  TORCH_CHECK(cls.scalar_type() == at::kLong && cls.numel() == z.size(0), "mmd: cls must be int64 of length R");
  TORCH_CHECK(side.scalar_type() == at::kInt && side.numel() == z.size(0), "mmd: side must be int32 of length R");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.numel() >= 2, "mmd: offsets must be int64 (C+1,)");
  TORCH_CHECK(coefs.scalar_type() == acc_type(z.scalar_type()), "mmd: coefs must be in the accumulation dtype");
  TORCH_CHECK(linear || coefs.numel() > 0, "mmd: the gaussian kernel needs at least one bandwidth");
  DDFAST_CHECK_SAME_DEVICE(z, cls); DDFAST_CHECK_SAME_DEVICE(z, side);
  DDFAST_CHECK_SAME_DEVICE(z, offsets); DDFAST_CHECK_SAME_DEVICE(z, coefs);
}

// Everything one CPU pass needs, in the accumulation type T (float or double).
template <typename T>
struct Problem {
  const T* z;
  const int64_t* cls;
  const int32_t* side;
  const int64_t* offsets;
  const T* coefs;
  int64_t num_bw, rows, dim;
  bool linear, unbiased;

  // column range [lo, hi) of the classes of rows [r0, r1) (rows are sorted by class)
  std::pair<int64_t, int64_t> columns(int64_t r0, int64_t r1) const {
    return {offsets[cls[r0]], offsets[cls[r1 - 1] + 1]};
  }
  bool pair_used(int64_t i, int64_t j) const { return cls[i] == cls[j] && !(unbiased && i == j); }
};

template <typename T>
Problem<T> make_problem(const at::Tensor& z, const at::Tensor& cls, const at::Tensor& side, const at::Tensor& offsets,
                        const at::Tensor& coefs, bool linear, bool unbiased) {
  Problem<T> p{z.data_ptr<T>(), cls.data_ptr<int64_t>(), side.data_ptr<int32_t>(), offsets.data_ptr<int64_t>(),
               coefs.data_ptr<T>(), coefs.numel(), z.size(0), z.size(1), linear, unbiased};
  return p;
}

template <typename T>
void forward_rows(const Problem<T>& p, T* out) {
  const int64_t blocks = (p.rows + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, r1 = std::min(p.rows, r0 + kRowBlock);
      T sums[kRowBlock][2] = {};
      const auto [lo, hi] = p.columns(r0, r1);
      for (int64_t c0 = lo; c0 < hi; c0 += kColBlock) {  // column block stays in cache across the rows
        const int64_t c1 = std::min(hi, c0 + kColBlock);
        for (int64_t i = r0; i < r1; ++i) {
          const T* zi = p.z + i * p.dim;
          for (int64_t j = c0; j < c1; ++j) {
            if (!p.pair_used(i, j)) continue;
            const T* zj = p.z + j * p.dim;
            T k;
            if (p.linear) {
              k = dot(zi, zj, p.dim);
            } else {
              const T d = sq_dist(zi, zj, p.dim);
              k = 0;
              for (int64_t s = 0; s < p.num_bw; ++s) k += std::exp(-p.coefs[s] * d);
            }
            sums[i - r0][p.side[j] != 0] += k;
          }
        }
      }
      for (int64_t i = r0; i < r1; ++i) {
        out[2 * i] = sums[i - r0][0];
        out[2 * i + 1] = sums[i - r0][1];
      }
    }
  });
}

template <typename T>
void backward_rows(const Problem<T>& p, const T* grad, T* out) {
  const int64_t blocks = (p.rows + kRowBlock - 1) / kRowBlock;
  const int64_t dim = p.dim;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> acc(kRowBlock * dim);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, r1 = std::min(p.rows, r0 + kRowBlock);
      std::fill(acc.begin(), acc.end(), T(0));
      const auto [lo, hi] = p.columns(r0, r1);
      for (int64_t c0 = lo; c0 < hi; c0 += kColBlock) {
        const int64_t c1 = std::min(hi, c0 + kColBlock);
        for (int64_t i = r0; i < r1; ++i) {
          const T* zi = p.z + i * dim;
          T* gi = acc.data() + (i - r0) * dim;
          for (int64_t j = c0; j < c1; ++j) {
            if (!p.pair_used(i, j)) continue;
            // k(z_i, z_j) is in row i's sum (weight by j's side) and in row j's (weight by i's side)
            const T w = grad[2 * i + (p.side[j] != 0)] + grad[2 * j + (p.side[i] != 0)];
            const T* zj = p.z + j * dim;
            if (p.linear) {  // d k / d z_i = z_j
              for (int64_t k = 0; k < dim; ++k) gi[k] += w * zj[k];
            } else {  // d k / d z_i = g (z_i - z_j), g = -2 sum_s c_s exp(-c_s d); the difference
                      // taken per element does not cancel like g z_i - g z_j would
              const T d = sq_dist(zi, zj, dim);
              T g = 0;
              for (int64_t s = 0; s < p.num_bw; ++s) g -= T(2) * p.coefs[s] * std::exp(-p.coefs[s] * d);
              const T coef = w * g;
              for (int64_t k = 0; k < dim; ++k) gi[k] += coef * (zi[k] - zj[k]);
            }
          }
        }
      }
      std::copy(acc.begin(), acc.begin() + (r1 - r0) * dim, out + r0 * dim);
    }
  });
}

at::Tensor mmd_fwd_cpu(const at::Tensor& z_in, const at::Tensor& cls, const at::Tensor& side, const at::Tensor& offsets,
                       const at::Tensor& coefs, bool linear, bool unbiased) {
  check_inputs(z_in, cls, side, offsets, coefs, linear);
  const at::Tensor z = z_in.to(acc_type(z_in.scalar_type()));
  at::Tensor out = at::empty({z.size(0), 2}, z.options());
  if (z.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mmd_fwd_cpu", [&] {
    forward_rows(make_problem<scalar_t>(z, cls, side, offsets, coefs, linear, unbiased), out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor mmd_bwd_cpu(const at::Tensor& grad, const at::Tensor& z_in, const at::Tensor& cls, const at::Tensor& side,
                       const at::Tensor& offsets, const at::Tensor& coefs, bool linear, bool unbiased) {
  check_inputs(z_in, cls, side, offsets, coefs, linear);
  const at::Tensor z = z_in.to(acc_type(z_in.scalar_type()));
  const at::Tensor g = grad.to(z.scalar_type()).contiguous();
  TORCH_CHECK(g.numel() == 2 * z.size(0), "mmd: grad must be (R, 2)");
  at::Tensor out = at::empty_like(z);
  if (z.size(0) == 0) return out.to(z_in.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mmd_bwd_cpu", [&] {
    backward_rows(make_problem<scalar_t>(z, cls, side, offsets, coefs, linear, unbiased), g.data_ptr<scalar_t>(),
                  out.data_ptr<scalar_t>());
  });
  return out.to(z_in.scalar_type());
}

#ifdef DDFAST_WITH_CUDA
at::Tensor row_sq_norms(const at::Tensor& z) { return z.to(acc_type(z.scalar_type())).pow(2).sum(1).contiguous(); }

at::Tensor mmd_fwd_cuda(const at::Tensor& z, const at::Tensor& cls, const at::Tensor& side, const at::Tensor& offsets,
                        const at::Tensor& coefs, bool linear, bool unbiased) {
  check_inputs(z, cls, side, offsets, coefs, linear);
  c10::cuda::CUDAGuard guard(z.device());
  at::Tensor out = at::empty({z.size(0), 2}, z.options().dtype(acc_type(z.scalar_type())));
  if (z.size(0) == 0) return out;
  const at::Tensor sq = row_sq_norms(z);
  mmd_forward_cuda(z.data_ptr(), sq.data_ptr(), cls.data_ptr<int64_t>(), side.data_ptr<int32_t>(),
                   offsets.data_ptr<int64_t>(), coefs.data_ptr(), linear ? 0 : coefs.numel(), z.size(0), z.size(1),
                   linear, unbiased, dtype_code(z), out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor mmd_bwd_cuda(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& cls, const at::Tensor& side,
                        const at::Tensor& offsets, const at::Tensor& coefs, bool linear, bool unbiased) {
  check_inputs(z, cls, side, offsets, coefs, linear);
  c10::cuda::CUDAGuard guard(z.device());
  const auto acc = acc_type(z.scalar_type());
  const at::Tensor g = grad.to(acc).contiguous();
  TORCH_CHECK(g.numel() == 2 * z.size(0), "mmd: grad must be (R, 2)");
  // accumulation-dtype workspace: each row block's program read-modify-writes only its own rows
  at::Tensor ws = at::zeros(z.sizes(), z.options().dtype(acc));
  if (z.size(0) == 0) return ws.to(z.scalar_type());
  const at::Tensor sq = row_sq_norms(z);
  mmd_backward_cuda(g.data_ptr(), z.data_ptr(), sq.data_ptr(), cls.data_ptr<int64_t>(), side.data_ptr<int32_t>(),
                    offsets.data_ptr<int64_t>(), coefs.data_ptr(), linear ? 0 : coefs.numel(), z.size(0), z.size(1),
                    linear, unbiased, dtype_code(z), ws.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ws.to(z.scalar_type());
}
#endif

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_FRAGMENT(ddfast, m) {
  m.def("mmd_fwd(Tensor z, Tensor cls, Tensor side, Tensor offsets, Tensor coefs, bool linear, bool unbiased) -> Tensor");
  m.def("mmd_bwd(Tensor grad, Tensor z, Tensor cls, Tensor side, Tensor offsets, Tensor coefs, bool linear, "
        "bool unbiased) -> Tensor");
}

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("mmd_fwd", &ddfast::mmd_fwd_cpu);
  m.impl("mmd_bwd", &ddfast::mmd_bwd_cpu);
}

#ifdef DDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("mmd_fwd", &ddfast::mmd_fwd_cuda);
  m.impl("mmd_bwd", &ddfast::mmd_bwd_cuda);
}
#endif
