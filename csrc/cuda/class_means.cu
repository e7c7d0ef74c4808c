// class_means: segmented per-class means (kernels in class_means.cuh, shared with class_mean_loss).
#include "class_means.h"
#include "class_means.cuh"

namespace ddfast {

void class_means_forward_cuda(const void* x, const int64_t* perm, const int64_t* offsets, int64_t num_classes,
                              int64_t d, int dtype, void* means_out, cudaStream_t stream) {
  using namespace segment_cuda;
  switch (dtype) {
    case 0: launch_segment<float, float, false, float>(x, perm, offsets, num_classes, d, means_out, nullptr, nullptr, nullptr, stream); break;
    case 1: launch_segment<double, double, false, double>(x, perm, offsets, num_classes, d, means_out, nullptr, nullptr, nullptr, stream); break;
    case 2: launch_segment<__half, float, false, __half>(x, perm, offsets, num_classes, d, means_out, nullptr, nullptr, nullptr, stream); break;
    case 3: launch_segment<__nv_bfloat16, float, false, __nv_bfloat16>(x, perm, offsets, num_classes, d, means_out, nullptr, nullptr, nullptr, stream); break;
  }
}

void class_means_backward_cuda(const void* grad_means, const void* coef, const int64_t* labels, int64_t num_classes,
                               int64_t n, int64_t d, int dtype, void* grad_x, cudaStream_t stream) {
  using namespace segment_cuda;
  switch (dtype) {
    case 0: launch_gather<float, float>(grad_means, coef, labels, num_classes, n, d, grad_x, stream); break;
    case 1: launch_gather<double, double>(grad_means, coef, labels, num_classes, n, d, grad_x, stream); break;
    case 2: launch_gather<__half, float>(grad_means, coef, labels, num_classes, n, d, grad_x, stream); break;
    case 3: launch_gather<__nv_bfloat16, float>(grad_means, coef, labels, num_classes, n, d, grad_x, stream); break;
  }
}

}  // namespace ddfast
