// CUDA body of fusedtrain::unscale_and_check_ (schema in csrc/ops.cpp; Python entry in
// fusedtrain/ops/unscale.py, which validates and groups by device and dtype first).
//
// One kernel launch per call, whatever the number of tensors. The host cuts every tensor
// into chunks of kChunk elements and uploads one int64 table (pinned memory, async copy):
//   meta[0]                  a zero counter (for the last-block combine below)
//   meta[1 .. 1+C)           the address of each chunk's first element
//   meta[1+C .. 1+2C)        the length of each chunk (<= kChunk)
// Block c handles chunk c: it reads each element once (16-byte vector loads when aligned),
// checks it, writes x * inv_scale back when WRITE (one write), and sums squares when NORM.
// found_inf is set with a plain store of 1.0f by any block that saw an inf/NaN (all writers
// store the same value, nothing reads it on the host). With NORM each block stores its
// partial sum; the last block to finish (atomic counter) adds the partials in chunk order, in
// double, and stores the fp32 total: a deterministic result from the same single launch.
//
// This is a small self-contained multi-tensor launcher; the lead will unify it with
// csrc/cuda/multi_tensor_apply.cuh after merging.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "fusedtrain/unscale_math.h"

namespace fusedtrain {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per block
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(scalar_t);
  scalar_t v[N];
};

template <typename scalar_t, bool WRITE, bool NORM>
__device__ __forceinline__ void visit(scalar_t& e, float inv, float& sq, float& pr) {
  const float x = static_cast<float>(e);
  pr = unscale::probe_add(pr, x);
  const float y = unscale::unscaled(x, inv);
  if (NORM) sq = unscale::square_add(sq, y);
  if (WRITE) e = static_cast<scalar_t>(y);
}

// Block-wide sum in a fixed order (warp shuffle tree, then warp 0 over the warp sums).
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = (threadIdx.x < kWarps) ? smem[threadIdx.x] : T(0);
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;  // valid in thread 0
}

template <typename scalar_t, bool WRITE, bool NORM>
__global__ void __launch_bounds__(kThreads) unscale_kernel(const int64_t* meta, int64_t n_chunks,
                                                           const float* __restrict__ inv_scale,
                                                           float* __restrict__ found_inf, float* __restrict__ partials,
                                                           float* __restrict__ out, unsigned long long* counter) {
  using P = Pack<scalar_t>;
  constexpr int N = P::N;
  const int64_t c = blockIdx.x;
  scalar_t* p = reinterpret_cast<scalar_t*>(meta[1 + c]);
  const int64_t n = meta[1 + n_chunks + c];
  const float inv = *inv_scale;
  float sq = 0.f, pr = 0.f;

  int64_t done = 0;
  if ((reinterpret_cast<uintptr_t>(p) % 16) == 0) {
    const int64_t n_packs = n / N;
    P* pp = reinterpret_cast<P*>(p);
    for (int64_t i = threadIdx.x; i < n_packs; i += kThreads) {
      P pk = pp[i];
#pragma unroll
      for (int k = 0; k < N; ++k) visit<scalar_t, WRITE, NORM>(pk.v[k], inv, sq, pr);
      if (WRITE) pp[i] = pk;
    }
    done = n_packs * N;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    scalar_t e = p[i];
    visit<scalar_t, WRITE, NORM>(e, inv, sq, pr);
    if (WRITE) p[i] = e;
  }

  if (__syncthreads_or(unscale::probe_found(pr)) && threadIdx.x == 0) *found_inf = 1.f;

  if (NORM) {
    __shared__ float fsm[kWarps];
    __shared__ double dsm[kWarps];
    __shared__ bool is_last;
    const float block = block_sum(sq, fsm);
    if (threadIdx.x == 0) {
      partials[c] = block;
      __threadfence();
      is_last = atomicAdd(counter, 1ull) == static_cast<unsigned long long>(n_chunks - 1);
    }
    __syncthreads();
    if (is_last) {
      __threadfence();
      double s = 0.0;
      for (int64_t i = threadIdx.x; i < n_chunks; i += kThreads) s += static_cast<double>(__ldcg(partials + i));
      s = block_sum(s, dsm);
      if (threadIdx.x == 0) *out = static_cast<float>(s);
    }
  }
}

template <typename scalar_t, bool WRITE, bool NORM>
void launch(const at::Tensor& meta, int64_t n_chunks, const at::Tensor& inv_scale, const at::Tensor& found_inf,
            const at::Tensor& partials, const at::Tensor& out, cudaStream_t stream) {
  int64_t* m = meta.data_ptr<int64_t>();
  unscale_kernel<scalar_t, WRITE, NORM><<<static_cast<unsigned int>(n_chunks), kThreads, 0, stream>>>(
      m, n_chunks, inv_scale.data_ptr<float>(), found_inf.data_ptr<float>(),
      NORM ? partials.data_ptr<float>() : nullptr, NORM ? out.data_ptr<float>() : nullptr,
      reinterpret_cast<unsigned long long*>(m));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void dispatch(bool write, bool norm, const at::Tensor& meta, int64_t n_chunks, const at::Tensor& inv_scale,
              const at::Tensor& found_inf, const at::Tensor& partials, const at::Tensor& out, cudaStream_t stream) {
  if (write && norm) launch<scalar_t, true, true>(meta, n_chunks, inv_scale, found_inf, partials, out, stream);
  else if (write) launch<scalar_t, true, false>(meta, n_chunks, inv_scale, found_inf, partials, out, stream);
  else if (norm) launch<scalar_t, false, true>(meta, n_chunks, inv_scale, found_inf, partials, out, stream);
  else launch<scalar_t, false, false>(meta, n_chunks, inv_scale, found_inf, partials, out, stream);
}

at::Tensor unscale_and_check_cuda(at::TensorList tensors, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                                  bool compute_norm, bool write) {
  const c10::cuda::CUDAGuard guard(inv_scale.device());
  std::vector<int64_t> addrs, lens;
  for (const auto& t : tensors) {
    const int64_t n = t.numel();
    char* base = static_cast<char*>(t.data_ptr());
    const int64_t es = t.element_size();
    for (int64_t s = 0; s < n; s += kChunk) {
      addrs.push_back(reinterpret_cast<int64_t>(base + s * es));
      lens.push_back(std::min(kChunk, n - s));
    }
  }
  const int64_t n_chunks = static_cast<int64_t>(addrs.size());
  const auto fopts = inv_scale.options();
  if (n_chunks == 0) {
    return compute_norm ? at::zeros({}, fopts) : at::empty({0}, fopts);
  }
  TORCH_CHECK(n_chunks < (int64_t(1) << 31), "fusedtrain::unscale_and_check_: too many chunks");
  auto host = at::empty({1 + 2 * n_chunks}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  h[0] = 0;
  std::copy(addrs.begin(), addrs.end(), h + 1);
  std::copy(lens.begin(), lens.end(), h + 1 + n_chunks);
  const at::Tensor meta = host.to(inv_scale.device(), /*non_blocking=*/true);
  at::Tensor partials, out;
  if (compute_norm) {
    partials = at::empty({n_chunks}, fopts);
    out = at::empty({}, fopts);
  } else {
    out = at::empty({0}, fopts);
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (tensors[0].scalar_type()) {
    case at::kFloat:
      dispatch<float>(write, compute_norm, meta, n_chunks, inv_scale, found_inf, partials, out, stream);
      break;
    case at::kHalf:
      dispatch<at::Half>(write, compute_norm, meta, n_chunks, inv_scale, found_inf, partials, out, stream);
      break;
    case at::kBFloat16:
      dispatch<at::BFloat16>(write, compute_norm, meta, n_chunks, inv_scale, found_inf, partials, out, stream);
      break;
    default:
      TORCH_CHECK(false, "fusedtrain::unscale_and_check_: unsupported dtype ", tensors[0].scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("unscale_and_check_", &unscale_and_check_cuda);
}

}  // namespace fusedtrain
