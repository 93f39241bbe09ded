// Every matrix product of the model: Y = X W^T through cuBLAS, fp32 accumulation, fp32 output.
#pragma once

#include <cublas_v2.h>

#include "check.cuh"
#include "dtype.cuh"

namespace gpt2s::cuda {

// Y (N, out) fp32 = X (N, in) · W^T, with X and W in W's type and W stored (out, in) row-major
// (model.h). cuBLAS is column-major: row-major W (out, in) is the column-major (in, out) matrix,
// so op(A) = A^T gives (out, in); row-major X (N, in) is column-major (in, N); the column-major
// (out, N) result is row-major Y (N, out). This "TN" GEMM is cuBLAS's best-supported case.
// CUBLAS_COMPUTE_32F accumulates in fp32 and, for fp32 inputs, never uses TF32.
template <typename W>
void gemm_xwt(cublasHandle_t handle, float* Y, const W* X, const W* weight, int N, int out, int in) {
  if (N == 0) return;
  const float alpha = 1.f, beta = 0.f;
  CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, out, N, in, &alpha, weight, cuda_data_type<W>(), in, X,
                            cuda_data_type<W>(), in, &beta, Y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
}

}  // namespace gpt2s::cuda
