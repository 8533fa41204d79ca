// mta::upload_words (declared in fusedtrain/multi_tensor_tables.h): the one way the
// multi-tensor tables reach the device, for the CUDA kernels and the Triton ones
// (fusedtrain/triton/multi_tensor.py calls it through fusedtrain._C.upload_words).
//
// Eager: one non_blocking copy from pinned memory (the caching host allocator keeps the
// buffer until the copy is done). During CUDA-graph capture a copy from host memory would be
// captured with the host address and read it again at every replay, when the buffer may hold
// something else; instead the words travel in the parameters of small kernels, which the
// graph keeps, into memory of the graph's pool, which lives as long as the graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstring>

#include "fusedtrain/multi_tensor_tables.h"

namespace fusedtrain {
namespace mta {
namespace {

// Kernel parameters may take 32764 bytes since CUDA 12.1 on sm_70 and later (4 KB before);
// this build needs CUDA 13 and sm_80. 1000 params of Adam (8 words each, plus their blocks)
// fit three launches.
constexpr int kFillWords = 4000;

struct Words {
  int64_t w[kFillWords];
};

__global__ void fill_words(int64_t* dst, const __grid_constant__ Words words, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = words.w[i];
}

}  // namespace

at::Tensor upload_words(const int64_t* words, int64_t n, const at::Device& device) {
  TORCH_CHECK(device.is_cuda(), "upload_words: expected a CUDA device, got ", device);
  const c10::cuda::CUDAGuard guard(device);
  if (at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None) {
    at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(host.data_ptr<int64_t>(), words, static_cast<size_t>(n) * sizeof(int64_t));
    return host.to(device, /*non_blocking=*/true);
  }
  at::Tensor dev = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Words piece{};  // zeros past the words (the graph keeps all of it)
  for (int64_t start = 0; start < n; start += kFillWords) {
    const int k = static_cast<int>(std::min<int64_t>(kFillWords, n - start));
    std::memcpy(piece.w, words + start, static_cast<size_t>(k) * sizeof(int64_t));
    fill_words<<<1, 256, 0, stream>>>(dev.data_ptr<int64_t>() + start, piece, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return dev;
}

}  // namespace mta
}  // namespace fusedtrain
