#pragma once
// FT_HD marks per-element math that both the C++ CPU kernels and the CUDA kernels run.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FT_HD __host__ __device__ __forceinline__
#else
#define FT_HD inline
#endif
