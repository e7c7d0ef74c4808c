// CPU building blocks shared by class_means.cpp and class_mean_loss.cpp (each its own library).
// Segmented sums: threads own disjoint column slices and stream every row once, adding it into its
// class row of an accumulator (no atomics, deterministic). The accumulator is the input's opmath
// type (fp32 for fp32/half: vectorises like the reference's index_add) and each class is flushed
// into fp64 totals every kFlushRows of its rows, so long classes do not lose precision.
// Gather: grad[i] = coef[y_i] * G[y_i].
#pragma once
#include "ddfast_common.h"

#include <algorithm>
#include <vector>

namespace ddfast {
namespace segment_cpu {

constexpr int64_t kMinCols = 256;  // narrower slices would make row reads short
constexpr int64_t kFlushRows = 1024;

inline void check_labels_in_range(const at::Tensor& labels, int64_t num_classes) {
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64");
  DDFAST_CHECK_CONTIGUOUS(labels);
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i)
    TORCH_CHECK(lab[i] >= 0 && lab[i] < num_classes, "labels must lie in [0, ", num_classes, "), got ", lab[i]);
}

// sums (C*D, fp64) = Σ of the x rows of each class; counts (C) = rows per class.
// Threads own wide column slices (one per thread, so each row read is a long contiguous run the
// prefetcher follows); a class's opmath accumulator is flushed into fp64 after kFlushRows rows.
inline void segment_sums(const at::Tensor& x, const at::Tensor& labels, int64_t num_classes, std::vector<double>& sums,
                         std::vector<int64_t>& counts) {
  DDFAST_CHECK_CONTIGUOUS(x);
  check_labels_in_range(labels, num_classes);
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t* lab = labels.data_ptr<int64_t>();
  sums.assign(num_classes * d, 0.0);
  counts.assign(num_classes, 0);
  for (int64_t i = 0; i < n; ++i) ++counts[lab[i]];
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t width = std::max<int64_t>(kMinCols, ((d + threads - 1) / threads + 15) / 16 * 16);
  const int64_t blocks = (d + width - 1) / width;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_sums_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    double* sp = sums.data();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> part(num_classes * width);
      std::vector<int64_t> pending(num_classes);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t lo = b * width, w = std::min(d, lo + width) - lo;
        std::fill(part.begin(), part.end(), acc_t(0));
        std::fill(pending.begin(), pending.end(), 0);
        auto flush = [&](int64_t c) {
          acc_t* acc = part.data() + c * width;
          double* tot = sp + c * d + lo;
          for (int64_t j = 0; j < w; ++j) { tot[j] += static_cast<double>(acc[j]); acc[j] = acc_t(0); }
          pending[c] = 0;
        };
        for (int64_t i = 0; i < n; ++i) {
          const int64_t c = lab[i];
          const scalar_t* __restrict__ row = xp + i * d + lo;
          acc_t* __restrict__ acc = part.data() + c * width;
          for (int64_t j = 0; j < w; ++j) acc[j] += static_cast<acc_t>(row[j]);
          if (++pending[c] == kFlushRows) flush(c);
        }
        for (int64_t c = 0; c < num_classes; ++c)
          if (pending[c]) flush(c);
      }
    });
  });
}

// out (N, D): out[i] = coef[y_i] * g[y_i] with g (C*D) and coef (C) of type acc_t.
template <typename acc_t>
at::Tensor gather_scale(const acc_t* g, const acc_t* coef, const at::Tensor& labels, int64_t d,
                        const at::TensorOptions& opts) {
  const int64_t n = labels.numel();
  const int64_t* lab = labels.data_ptr<int64_t>();
  at::Tensor out = at::empty({n, d}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gather_scale_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(d, 1));
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const acc_t s = coef[lab[i]];
        const acc_t* __restrict__ gr = g + lab[i] * d;
        scalar_t* __restrict__ orow = op + i * d;
        for (int64_t j = 0; j < d; ++j) orow[j] = static_cast<scalar_t>(s * gr[j]);
      }
    });
  });
  return out;
}

}  // namespace segment_cpu

// Rows grouped by class for the CUDA kernels, with no host sync: a stable sort of the labels gives
// the row permutation, a search of the class ids 0..C in the sorted labels the class offsets (C+1,)
// and their differences the counts (C,). (at::bincount reads max(labels) on the host first.)
struct SortedSegments {
  at::Tensor perm, offsets, counts;
};

inline SortedSegments sorted_segments(const at::Tensor& labels, int64_t num_classes) {
  auto sorted = at::sort(labels, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor ids = at::arange(num_classes + 1, labels.options());
  at::Tensor offsets = at::searchsorted(std::get<0>(sorted), ids);
  at::Tensor counts = offsets.slice(0, 1) - offsets.slice(0, 0, num_classes);
  return {std::get<1>(sorted), offsets, counts};
}
}  // namespace ddfast
