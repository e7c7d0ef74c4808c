// mmd: per-row kernel sums over same-class columns and their gradient (ops ddfast::mmd_fwd/_bwd).
// Contract (see ddfast/ops/mmd.py): z (R, D) rows sorted by class; cls (R,) int64; side (R,) int32
// (0 = x row, 1 = y row); offsets (C+1,) int64 class row ranges; coefs (S,) 1/(2 s^2) per bandwidth.
// fwd -> (R, 2) [sum over x columns, sum over y columns]; bwd(grad (R, 2)) -> grad_z (R, D).
// CPU kernel here: per class, the upper-triangle tiles of its kernel matrix (the x-x and y-y
// blocks symmetric), each a BLAS matmul (at::addmm: |a|^2 + |b|^2 - 2<a, b>) with the exp per
// bandwidth, the side sums and the backward's P Z products as vectorised ATen ops on the tile,
// tiles in parallel; memory O(threads x (R + tile^2)) besides the output. Half inputs run in fp32.
// The CUDA kernels live in cuda/mmd.cu.
#include "ddfast_common.h"

#ifdef DDFAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/mmd.h"
#endif

#include <algorithm>
#include <array>
#include <vector>

namespace ddfast {
namespace {

// Tiles of 128 rows: small enough that the symmetric saving shows at a few hundred rows, large
// enough that each tile's BLAS call and ATen ops amortise their overhead; 256 above 4096 rows.
int64_t tile_rows(int64_t rows) { return rows <= 4096 ? 128 : 256; }

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


// Every tile (i0, i1, j0, j1) on or above the diagonal of each class's rows [lo, hi).
std::vector<std::array<int64_t, 4>> upper_tiles(const at::Tensor& offsets, int64_t rows) {
  const at::Tensor off = offsets.to(at::kLong).contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t t = tile_rows(rows);
  std::vector<std::array<int64_t, 4>> tiles;
  for (int64_t c = 0; c + 1 < off.numel(); ++c)
    for (int64_t i0 = o[c]; i0 < o[c + 1]; i0 += t)
      for (int64_t j0 = i0; j0 < o[c + 1]; j0 += t)
        tiles.push_back({i0, std::min(o[c + 1], i0 + t), j0, std::min(o[c + 1], j0 + t)});
  return tiles;
}

// f(acc, i0, i1, j0, j1) over the upper tiles in parallel; a tile adds to rows of two blocks, so
// each thread accumulates into its own zero-initialised copy of the output and the copies are
// summed at the end (memory O(threads x output), no atomics).
template <typename F>
at::Tensor sum_over_upper_tiles(const at::Tensor& offsets, at::IntArrayRef out_shape, const at::TensorOptions& opts,
                                F&& f) {
  const auto tiles = upper_tiles(offsets, out_shape[0]);
  std::vector<at::Tensor> partial(at::get_num_threads());
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t b, int64_t e) {
    at::Tensor& acc = partial[at::get_thread_num()];
    if (!acc.defined()) acc = at::zeros(out_shape, opts);
    for (int64_t k = b; k < e; ++k) f(acc, tiles[k][0], tiles[k][1], tiles[k][2], tiles[k][3]);
  });
  at::Tensor out;
  for (const auto& p : partial)
    if (p.defined()) out = out.defined() ? out.add_(p) : p;
  return out.defined() ? out : at::zeros(out_shape, opts);
}

struct Tiles {
  at::Tensor z, sq, side_onehot;  // (R, D), (R,), (R, 2) [is x, is y] in the accumulation dtype
  std::vector<double> coefs;
  bool linear, unbiased;

  Tiles(const at::Tensor& z_acc, const at::Tensor& side, const at::Tensor& coefs_t, bool linear_, bool unbiased_)
      : z(z_acc), linear(linear_), unbiased(unbiased_) {
    sq = z.pow(2).sum(1);
    const at::Tensor is_y = side.to(z.scalar_type()).unsqueeze(1);
    side_onehot = at::cat({1 - is_y, is_y}, 1);
    const at::Tensor c = coefs_t.to(at::kDouble).contiguous();
    coefs.assign(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
  }

  // squared distances of rows [i0, i1) to rows [j0, j1), clamped at 0 (NaN survives clamp_min)
  at::Tensor sq_dist(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    const at::Tensor base = sq.slice(0, i0, i1).unsqueeze(1) + sq.slice(0, j0, j1).unsqueeze(0);
    return at::addmm(base, z.slice(0, i0, i1), z.slice(0, j0, j1).t(), 1, -2).clamp_min_(0);
  }

  // kernel values of the tile; `deriv`: instead the factor g = -2 sum_s c_s exp(-c_s d) of dk/dz_i
  at::Tensor values(int64_t i0, int64_t i1, int64_t j0, int64_t j1, bool deriv) const {
    if (linear) return deriv ? at::Tensor() : at::mm(z.slice(0, i0, i1), z.slice(0, j0, j1).t());
    const at::Tensor d = sq_dist(i0, i1, j0, j1);
    at::Tensor out;
    for (double c : coefs) {
      at::Tensor e = at::mul(d, -c).exp_();
      const double w = deriv ? -2 * c : 1.0;
      if (!out.defined()) out = w == 1.0 ? e : e.mul_(w);
      else out.add_(e, w);
    }
    return out;
  }

  void drop_diagonal(at::Tensor& tile, int64_t i0, int64_t j0) const {
    if (unbiased && i0 == j0) tile.fill_diagonal_(0);
  }
};

at::Tensor mmd_fwd_cpu(const at::Tensor& z_in, const at::Tensor& cls, const at::Tensor& side, const at::Tensor& offsets,
                       const at::Tensor& coefs, bool linear, bool unbiased) {
  check_inputs(z_in, cls, side, offsets, coefs, linear);
  const Tiles t(z_in.to(acc_type(z_in.scalar_type())), side, coefs, linear, unbiased);
  return sum_over_upper_tiles(offsets, {t.z.size(0), 2}, t.z.options(),
                              [&](at::Tensor& out, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    at::Tensor k = t.values(i0, i1, j0, j1, false);
    t.drop_diagonal(k, i0, j0);
    out.slice(0, i0, i1).addmm_(k, t.side_onehot.slice(0, j0, j1));
    if (j0 != i0) out.slice(0, j0, j1).addmm_(k.t(), t.side_onehot.slice(0, i0, i1));  // mirrored pairs
  });
}

at::Tensor mmd_bwd_cpu(const at::Tensor& grad, const at::Tensor& z_in, const at::Tensor& cls, const at::Tensor& side,
                       const at::Tensor& offsets, const at::Tensor& coefs, bool linear, bool unbiased) {
  check_inputs(z_in, cls, side, offsets, coefs, linear);
  const Tiles t(z_in.to(acc_type(z_in.scalar_type())), side, coefs, linear, unbiased);
  const at::Tensor g = grad.to(t.z.scalar_type()).contiguous();
  TORCH_CHECK(g.numel() == 2 * t.z.size(0), "mmd: grad must be (R, 2)");
  const at::Tensor grad_z = sum_over_upper_tiles(offsets, t.z.sizes(), t.z.options(),
                                                 [&](at::Tensor& out, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    // k(z_i, z_j) is in row i's sum (weight by j's side) and in row j's (weight by i's side)
    const at::Tensor gi = g.slice(0, i0, i1), gj = g.slice(0, j0, j1);
    const at::Tensor si = t.side_onehot.slice(0, i0, i1), sj = t.side_onehot.slice(0, j0, j1);
    at::Tensor p = at::mm(gi, sj.t()).addmm_(si, gj.t());
    if (!linear) p.mul_(t.values(i0, i1, j0, j1, true));  // P = W g: grad_i = sum_j P_ij (z_i - z_j)
    t.drop_diagonal(p, i0, j0);
    const at::Tensor zi = t.z.slice(0, i0, i1), zj = t.z.slice(0, j0, j1);
    const double sign = linear ? 1.0 : -1.0;  // linear: grad_i = sum_j W_ij z_j
    at::Tensor oi = out.slice(0, i0, i1);
    oi.addmm_(p, zj, 1, sign);
    if (!linear) oi.add_(zi * p.sum(1, true));
    if (j0 != i0) {  // P is symmetric: the mirrored pairs give row j its share
      at::Tensor oj = out.slice(0, j0, j1);
      oj.addmm_(p.t(), zi, 1, sign);
      if (!linear) oj.add_(zj * p.sum(0).unsqueeze(1));
    }
  });
  return grad_z.to(z_in.scalar_type());
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
