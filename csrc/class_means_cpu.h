// CPU building blocks shared by class_means.cpp and class_mean_loss.cpp (each its own library).
// Segmented sums: threads own disjoint column blocks and stream every row once, adding it into its
// class row of an fp64 accumulator (no atomics, deterministic). Gather: grad[i] = coef[y_i] * G[y_i].
#pragma once
#include "ddfast_common.h"

#include <algorithm>
#include <vector>

namespace ddfast {
namespace segment_cpu {

constexpr int64_t kCols = 256;

inline void check_labels_in_range(const at::Tensor& labels, int64_t num_classes) {
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64");
  DDFAST_CHECK_CONTIGUOUS(labels);
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i)
    TORCH_CHECK(lab[i] >= 0 && lab[i] < num_classes, "labels must lie in [0, ", num_classes, "), got ", lab[i]);
}

// sums (C*D, zeroed) += x rows by label; counts (C) = rows per class.
inline void segment_sums(const at::Tensor& x, const at::Tensor& labels, int64_t num_classes, std::vector<double>& sums,
                         std::vector<int64_t>& counts) {
  DDFAST_CHECK_CONTIGUOUS(x);
  check_labels_in_range(labels, num_classes);
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t* lab = labels.data_ptr<int64_t>();
  sums.assign(num_classes * d, 0.0);
  counts.assign(num_classes, 0);
  for (int64_t i = 0; i < n; ++i) ++counts[lab[i]];
  const int64_t blocks = (d + kCols - 1) / kCols;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_sums_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    double* sp = sums.data();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t lo = b * kCols, hi = std::min(d, lo + kCols);
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* row = xp + i * d;
          double* acc = sp + lab[i] * d;
          for (int64_t j = lo; j < hi; ++j) acc[j] += static_cast<double>(row[j]);
        }
      }
    });
  });
}

// out (N, D) of dtype `dtype`: out[i] = coef[y_i] * g[y_i] with g (C*D) and coef (C) in fp64.
inline at::Tensor gather_scale(const double* g, const double* coef, const at::Tensor& labels, int64_t d,
                               const at::TensorOptions& opts) {
  const int64_t n = labels.numel();
  const int64_t* lab = labels.data_ptr<int64_t>();
  at::Tensor out = at::empty({n, d}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gather_scale_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(d, 1));
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const double s = coef[lab[i]];
        const double* gr = g + lab[i] * d;
        scalar_t* orow = op + i * d;
        for (int64_t j = 0; j < d; ++j) orow[j] = static_cast<scalar_t>(s * gr[j]);
      }
    });
  });
  return out;
}

}  // namespace segment_cpu
}  // namespace ddfast
