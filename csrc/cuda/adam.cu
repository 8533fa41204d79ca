// fusedtrain::adam_ on CUDA: one launch of a multi-tensor-apply kernel for every tensor of
// the call (multi_tensor_apply.cuh: device-resident address/size tables, one block per
// chunk of a tensor). Per element: adam_math.h, the code the CPU kernel runs. Four
// elements per thread per iteration, 16-byte (fp32) / 8-byte (fp16, bf16) loads where every
// pointer of the block is aligned for them.
//
// The step: every block reads the tensor's step, then (after __syncthreads) bumps the
// tensor's counter; the last block of the tensor writes step + 1 and resets the counter.
// found_inf nonzero: every block returns before it writes anything.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "fusedtrain/adam_lists.h"
#include "fusedtrain/adam_math.h"
#include "multi_tensor_apply.cuh"

namespace fusedtrain {
namespace {

constexpr int kThreads = 256;  // __launch_bounds__: up to 255 registers (the double-precision pow of make_coef)
constexpr int kIlp = 4;
constexpr int64_t kChunk = 16384;  // elements per block

// columns of the tables
enum : int { kP = 0, kG, kM, kV, kVmax, kMaster, kStep, kLists };

struct Hyper {
  double lr, beta1, beta2, eps, wd;
  const float* lr_ptr;   // lr tensor or null
  const float* gm_ptr;   // grad_mult or null
  const float* fi_ptr;   // found_inf or null
  bool maximize, decoupled;
};

template <typename T>
struct alignas(sizeof(T) * kIlp) Pack {
  T v[kIlp];
};

template <typename T>
__device__ __forceinline__ void load4(const T* p, int64_t i, float (&out)[kIlp]) {
  const Pack<T> x = *reinterpret_cast<const Pack<T>*>(p + i);
#pragma unroll
  for (int k = 0; k < kIlp; ++k) out[k] = static_cast<float>(x.v[k]);
}
template <typename T>
__device__ __forceinline__ void store4(T* p, int64_t i, const float (&in)[kIlp]) {
  Pack<T> x;
#pragma unroll
  for (int k = 0; k < kIlp; ++k) x.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Pack<T>*>(p + i) = x;
}

template <typename T>
__device__ __forceinline__ bool aligned4(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kIlp)) == 0;
}

template <typename P, typename S, bool AMS, bool MASTER>
__global__ void __launch_bounds__(kThreads) adam_kernel(mta::Tables tab, int32_t* counters, Hyper h) {
  if (h.fi_ptr != nullptr && *h.fi_ptr != 0.f) return;  // skip: write nothing at all
  const int64_t t = tab.blocks[2 * blockIdx.x];
  const int64_t chunk_idx = tab.blocks[2 * blockIdx.x + 1];
  const int64_t* row = mta::row_of(tab, t);
  const int64_t numel = row[tab.nlists];
  P* p = reinterpret_cast<P*>(row[kP]);
  const P* g = reinterpret_cast<const P*>(row[kG]);
  S* m = reinterpret_cast<S*>(row[kM]);
  S* v = reinterpret_cast<S*>(row[kV]);
  S* vm = reinterpret_cast<S*>(row[kVmax]);
  float* w = reinterpret_cast<float*>(row[kMaster]);
  float* step_ptr = reinterpret_cast<float*>(row[kStep]);

  const float step = *step_ptr + 1.f;  // torch: step_t += 1 (fp32)
  const double lr = h.lr_ptr != nullptr ? static_cast<double>(*h.lr_ptr) : h.lr;
  const float mult = h.gm_ptr != nullptr ? *h.gm_ptr : 1.f;
  const adam::CoefV<float> c(adam::make_coef(lr, h.beta1, h.beta2, h.eps, h.wd, h.decoupled,
                                             static_cast<double>(step), mult, h.maximize));

  const int64_t lo = chunk_idx * tab.chunk;
  const int64_t hi = lo + tab.chunk < numel ? lo + tab.chunk : numel;
  const bool vec = aligned4<P>(p) && aligned4<P>(g) && aligned4<S>(m) && aligned4<S>(v) &&
                   (!AMS || aligned4<S>(vm)) && (!MASTER || aligned4<float>(w)) && (lo % kIlp) == 0;
  if (vec) {
    for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * kIlp; i + kIlp <= hi;
         i += static_cast<int64_t>(kThreads) * kIlp) {
      float rp[kIlp], rg[kIlp], rm[kIlp], rv[kIlp], rx[kIlp];
      if (MASTER) load4<float>(w, i, rp); else load4<P>(p, i, rp);
      load4<P>(g, i, rg);
      load4<S>(m, i, rm);
      load4<S>(v, i, rv);
      if (AMS) load4<S>(vm, i, rx);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) adam::update<AMS>(rp[k], rg[k], rm[k], rv[k], rx[k], c);
      if (MASTER) store4<float>(w, i, rp);
      store4<P>(p, i, rp);
      store4<S>(m, i, rm);
      store4<S>(v, i, rv);
      if (AMS) store4<S>(vm, i, rx);
    }
  }
  // scalar path: the whole range when unaligned, else the tail of fewer than kIlp elements
  const int64_t tail = vec ? lo + ((hi - lo) / kIlp) * kIlp : lo;
  for (int64_t i = tail + threadIdx.x; i < hi; i += kThreads) {
    float rp = MASTER ? w[i] : static_cast<float>(p[i]);
    float rm = static_cast<float>(m[i]), rv = static_cast<float>(v[i]);
    float rx = AMS ? static_cast<float>(vm[i]) : 0.f;
    adam::update<AMS>(rp, static_cast<float>(g[i]), rm, rv, rx, c);
    if (MASTER) w[i] = rp;
    p[i] = static_cast<P>(rp);
    m[i] = static_cast<S>(rm);
    v[i] = static_cast<S>(rv);
    if (AMS) vm[i] = static_cast<S>(rx);
  }

  // every thread of this block has read the step; the last block of the tensor writes it
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const int64_t nb = (numel + tab.chunk - 1) / tab.chunk;
    const int32_t nblocks = static_cast<int32_t>(nb > 0 ? nb : 1);  // an empty tensor has one block
    if (atomicAdd(&counters[t], 1) == nblocks - 1) {
      *step_ptr = step;
      counters[t] = 0;
    }
  }
}

template <typename P, typename S, bool MASTER>
void launch_ams(bool amsgrad, const mta::Tables& tab, int32_t* counters, const Hyper& h, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tab.nblocks));
  if (amsgrad) adam_kernel<P, S, true, MASTER><<<grid, kThreads, 0, stream>>>(tab, counters, h);
  else adam_kernel<P, S, false, MASTER><<<grid, kThreads, 0, stream>>>(tab, counters, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename P>
void launch_param(bool amsgrad, bool fp32_state, bool master, const mta::Tables& tab, int32_t* counters,
                  const Hyper& h, cudaStream_t stream) {
  if constexpr (std::is_same_v<P, float>) {
    launch_ams<float, float, false>(amsgrad, tab, counters, h, stream);
  } else {
    if (master) launch_ams<P, float, true>(amsgrad, tab, counters, h, stream);
    else if (fp32_state) launch_ams<P, float, false>(amsgrad, tab, counters, h, stream);
    else launch_ams<P, P, false>(amsgrad, tab, counters, h, stream);
  }
}

const float* opt_ptr(const std::optional<at::Tensor>& t, const at::Device& dev, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == dev && t->scalar_type() == at::kFloat && t->numel() == 1,
              "adam_: ", what, " must be a one-element fp32 tensor on ", dev);
  return t->data_ptr<float>();
}

void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList master_params, double lr,
               const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
               double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
               const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  adam::check_list_lengths(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, amsgrad);
  if (n == 0) return;
  const at::Device dev = params[0].device();
  const auto pdt = params[0].scalar_type();
  const auto sdt = exp_avgs[0].scalar_type();
  const bool master = !master_params.empty();
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(params[i].device() == dev && grads[i].device() == dev && exp_avgs[i].device() == dev &&
                    exp_avg_sqs[i].device() == dev && steps[i].device() == dev,
                "adam_: every tensor must be on ", dev);
    if (amsgrad) TORCH_CHECK(max_exp_avg_sqs[i].device() == dev, "adam_: every tensor must be on ", dev);
    if (master) TORCH_CHECK(master_params[i].device() == dev, "adam_: every tensor must be on ", dev);
    adam::check_tensor(i, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, pdt, sdt,
                       amsgrad);
  }
  adam::check_state_dtype(pdt, sdt, master);
  const c10::cuda::CUDAGuard guard(dev);
  Hyper h{lr, beta1, beta2, eps, weight_decay, opt_ptr(lr_tensor, dev, "lr_tensor"),
          opt_ptr(grad_mult, dev, "grad_mult"), opt_ptr(found_inf, dev, "found_inf"), maximize,
          decoupled_weight_decay};
  const at::TensorList none;
  const std::vector<at::TensorList> lists{params, grads, exp_avgs, exp_avg_sqs,
                                          amsgrad ? max_exp_avg_sqs : none, master ? master_params : none, steps};
  const mta::Tables tab = mta::tables_for(lists, kChunk, dev);
  int32_t* counters = mta::zeroed_counters(static_cast<int64_t>(n), dev);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool fp32_state = sdt == at::kFloat;
  switch (pdt) {
    case at::kFloat: launch_param<float>(amsgrad, fp32_state, master, tab, counters, h, stream); break;
    case at::kBFloat16: launch_param<c10::BFloat16>(amsgrad, fp32_state, master, tab, counters, h, stream); break;
    case at::kHalf: launch_param<c10::Half>(amsgrad, fp32_state, master, tab, counters, h, stream); break;
    default: TORCH_CHECK(false, "adam_: unsupported param dtype ", pdt);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) { m.impl("adam_", &adam_cuda); }

}  // namespace fusedtrain
