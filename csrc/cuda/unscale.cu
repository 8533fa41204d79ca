// CUDA body of fusedtrain::unscale_and_check_ (schema in csrc/ops.cpp; Python entry in
// fusedtrain/ops/unscale.py, which validates and groups by device and dtype first).
//
// One launch of the multi-tensor engine per call, whatever the number of tensors
// (multi_tensor_apply.cuh: every tensor cut into chunks of kChunk elements, one block per
// chunk, empty tensors none) with UnscaleOp as its functor. Block b handles chunk b: it
// reads each element once (16-byte vector loads after a scalar head up to the first 16-byte
// boundary, vec_io.cuh), checks it, writes x * inv_scale back when WRITE (one write), and
// sums squares when NORM. found_inf is set with a plain store of 1.0f by any block that saw
// an inf/NaN (all writers store the same value, nothing reads it on the host). With NORM each
// block stores its partial sum; the last block to finish (atomic counter, zeroed per call)
// adds the partials in chunk order, in double, and stores the fp32 total: a deterministic
// result from the same single launch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "fusedtrain/unscale_math.h"
#include "fusedtrain/versions.h"
#include "multi_tensor_apply.cuh"
#include "vec_io.cuh"

namespace fusedtrain {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per block
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

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

struct UnscaleArgs {
  const float* inv_scale;
  float* found_inf;
  float* partials;               // NORM: one per block
  float* out;                    // NORM: the 0-d result
  unsigned long long* counter;   // NORM: zero at launch
};

// The functor of the multi-tensor engine: one chunk of one tensor.
template <typename scalar_t, bool WRITE, bool NORM>
struct UnscaleOp : UnscaleArgs {
  __device__ __forceinline__ bool skip() const { return false; }

  __device__ __forceinline__ void operator()(const mta::Chunk& ch) const {
    constexpr int N = 16 / sizeof(scalar_t);
    using P = vec_io::Pack<scalar_t, N>;
    const int64_t c = blockIdx.x;
    const int64_t n_chunks = gridDim.x;
    const int64_t lo = ch.lo();
    scalar_t* p = ch.ptr<scalar_t>(0) + lo;
    const int64_t n = ch.hi() - lo;
    const float inv = *inv_scale;
    float sq = 0.f, pr = 0.f;

    // a scalar head up to the first 16-byte boundary (a view into a bucket), vector steps,
    // a scalar tail
    const int64_t h = min(vec_io::head<scalar_t, N>(p), n);
    const int64_t n_packs = (n - h) / N;
    for (int64_t i = threadIdx.x; i < n_packs; i += kThreads) {
      P pk = vec_io::load_pack<N>(p + h + i * N);
#pragma unroll
      for (int k = 0; k < N; ++k) visit<scalar_t, WRITE, NORM>(pk.v[k], inv, sq, pr);
      if (WRITE) vec_io::store_pack<N>(p + h + i * N, pk);
    }
    const auto scalar = [&](int64_t i) {
      scalar_t e = p[i];
      visit<scalar_t, WRITE, NORM>(e, inv, sq, pr);
      if (WRITE) p[i] = e;
    };
    for (int64_t i = threadIdx.x; i < h; i += kThreads) scalar(i);
    for (int64_t i = h + n_packs * N + threadIdx.x; i < n; i += kThreads) scalar(i);

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
};

template <typename scalar_t>
void dispatch(bool write, bool norm, const mta::Tables& tab, const UnscaleArgs& a, cudaStream_t stream) {
  auto run = [&](auto w, auto nm) {
    mta::launch<kThreads>(tab, UnscaleOp<scalar_t, decltype(w)::value, decltype(nm)::value>{a}, stream);
  };
  using T_ = std::true_type;
  using F_ = std::false_type;
  if (write && norm) run(T_{}, T_{});
  else if (write) run(T_{}, F_{});
  else if (norm) run(F_{}, T_{});
  else run(F_{}, F_{});
}

at::Tensor unscale_and_check_cuda(at::TensorList tensors, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                                  bool compute_norm, bool write) {
  const c10::cuda::CUDAGuard guard(inv_scale.device());
  const auto fopts = inv_scale.options();
  int64_t total = 0;
  for (const auto& t : tensors) total += t.numel();
  if (total == 0) {  // no chunk at all
    return compute_norm ? at::zeros({}, fopts) : at::empty({0}, fopts);
  }
  const mta::DeviceTables tables = mta::tables_of({tensors}, mta::Layout{kChunk, /*empty_block=*/false}, inv_scale.device());
  const mta::Tables& tab = tables.tables;
  const int64_t n_chunks = tab.nblocks;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  UnscaleArgs a{inv_scale.data_ptr<float>(), found_inf.data_ptr<float>(), nullptr, nullptr, nullptr};
  at::Tensor work, out;
  if (compute_norm) {
    // the counter (8 bytes, zeroed here), then one partial per chunk
    work = at::empty({2 + n_chunks}, fopts);
    a.counter = reinterpret_cast<unsigned long long*>(work.data_ptr<float>());
    a.partials = work.data_ptr<float>() + 2;
    C10_CUDA_CHECK(cudaMemsetAsync(a.counter, 0, sizeof(unsigned long long), stream));
    out = at::empty({}, fopts);
    a.out = out.data_ptr<float>();
  } else {
    out = at::empty({0}, fopts);
  }
  switch (tensors[0].scalar_type()) {
    case at::kFloat: dispatch<float>(write, compute_norm, tab, a, stream); break;
    case at::kHalf: dispatch<at::Half>(write, compute_norm, tab, a, stream); break;
    case at::kBFloat16: dispatch<at::BFloat16>(write, compute_norm, tab, a, stream); break;
    default: TORCH_CHECK(false, "fusedtrain::unscale_and_check_: unsupported dtype ", tensors[0].scalar_type());
  }
  if (write) bump_versions(tensors);
  bump_versions(found_inf);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("unscale_and_check_", &unscale_and_check_cuda);
}

}  // namespace fusedtrain
