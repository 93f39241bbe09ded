// The CUDA backend compiled as plain C++ against the emulated CUDA headers in include/ (tests only).
#include "cuda/cuda_backend.cu"
