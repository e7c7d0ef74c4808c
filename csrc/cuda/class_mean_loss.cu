// class_mean_loss: syn-side segmented means fused with the difference to the real means
// (kernels in class_means.cuh, shared with class_means).
#include "class_mean_loss.h"
#include "class_means.cuh"

namespace ddfast {

int64_t class_mean_loss_num_dblocks(int64_t d) { return segment_cuda::dblocks_for(d); }

void class_mean_loss_forward_cuda(const void* f_syn, const int64_t* perm, const int64_t* offsets, int64_t num_classes,
                                  int64_t d, int dtype, const void* mean_real, const int64_t* count_real,
                                  void* diff_out, void* partial_out, cudaStream_t stream) {
  using namespace segment_cuda;
  switch (dtype) {
    case 0: launch_segment<float, float, true, float>(f_syn, perm, offsets, num_classes, d, diff_out, mean_real, count_real, partial_out, stream); break;
    case 1: launch_segment<double, double, true, double>(f_syn, perm, offsets, num_classes, d, diff_out, mean_real, count_real, partial_out, stream); break;
    case 2: launch_segment<__half, float, true, float>(f_syn, perm, offsets, num_classes, d, diff_out, mean_real, count_real, partial_out, stream); break;
    case 3: launch_segment<__nv_bfloat16, float, true, float>(f_syn, perm, offsets, num_classes, d, diff_out, mean_real, count_real, partial_out, stream); break;
  }
}

void class_mean_loss_backward_cuda(const void* diff, const void* coef, const int64_t* labels, int64_t num_classes,
                                   int64_t n, int64_t d, int dtype, void* grad_syn, cudaStream_t stream) {
  using namespace segment_cuda;
  switch (dtype) {
    case 0: launch_gather<float, float>(diff, coef, labels, num_classes, n, d, grad_syn, stream); break;
    case 1: launch_gather<double, double>(diff, coef, labels, num_classes, n, d, grad_syn, stream); break;
    case 2: launch_gather<__half, float>(diff, coef, labels, num_classes, n, d, grad_syn, stream); break;
    case 3: launch_gather<__nv_bfloat16, float>(diff, coef, labels, num_classes, n, d, grad_syn, stream); break;
  }
}

}  // namespace ddfast
