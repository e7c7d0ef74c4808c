// Launchers of the class_mean_loss CUDA kernels (pure CUDA: no ATen types cross this boundary).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ddfast {
int64_t class_mean_loss_num_dblocks(int64_t d);
// diff_out (C, D) = mean_syn − mean_real for classes with rows on both sides (else 0), and
// partial_out (C, num_dblocks) = Σ diff² per feature block; all in the accumulation dtype. The
// syn rows arrive grouped by class (perm/offsets).
void class_mean_loss_forward_cuda(const void* f_syn, const int64_t* perm, const int64_t* offsets, int64_t num_classes,
                                  int64_t d, int dtype, const void* mean_real, const int64_t* count_real,
                                  void* diff_out, void* partial_out, cudaStream_t stream);
// grad_syn (N, D, input dtype) = coef[y_i] * diff[y_i] (coef = 2 g_c / n_c, accumulation dtype).
void class_mean_loss_backward_cuda(const void* diff, const void* coef, const int64_t* labels, int64_t num_classes,
                                   int64_t n, int64_t d, int dtype, void* grad_syn, cudaStream_t stream);
}  // namespace ddfast
