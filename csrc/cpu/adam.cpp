// fusedtrain::adam_ on CPU: one at::parallel_for over all elements of all tensors of the
// call. The element space is cut into units of kUnit elements per tensor (a prefix sum of
// unit counts maps a unit to its tensor), each thread takes a contiguous run of units, and
// within a tensor the loop is vectorized with at::vec (16 elements at a time, fp32 math for
// fp32 / bf16 / fp16 storage). Per-tensor scalars (bias corrections, step size) are computed
// once per call in double from the per-tensor step (adam_math.h make_coef).
//
// found_inf (nonzero) -> nothing at all is written. The step increment happens here too.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#define FT_ADAM_WITH_ATEN_VEC 1
#include "fusedtrain/adam_math.h"
#include "fusedtrain/adam_direct.h"
#include "fusedtrain/adam_lists.h"

namespace fusedtrain {
namespace {

using at::vec::Vectorized;
using fVec = Vectorized<float>;
using adam::Coef;
using adam::CoefV;

constexpr int64_t kVec = 2 * fVec::size();  // elements per vector iteration (16 on AVX2)
constexpr int64_t kUnit = 64 * kVec;         // elements per scheduling unit (1024)
constexpr int64_t kPrefetch = 256;           // software prefetch distance, elements

template <typename T>
struct Io {
  static_assert(Vectorized<T>::size() == kVec, "Vectorized<half type> must hold 2 float vectors");
  static void load(const T* p, fVec& a, fVec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  }
  static void store(T* p, const fVec& a, const fVec& b) { at::vec::convert_from_float<T>(a, b).store(p); }
};
template <>
struct Io<float> {
  static void load(const float* p, fVec& a, fVec& b) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + fVec::size());
  }
  static void store(float* p, const fVec& a, const fVec& b) {
    a.store(p);
    b.store(p + fVec::size());
  }
};

struct TensorJob {
  void* p;          // param (P)
  const void* g;    // grad (P)
  void* m;          // exp_avg (S)
  void* v;          // exp_avg_sq (S)
  void* vmax;       // max_exp_avg_sq (S) or null
  float* master;    // fp32 master copy or null
  int64_t numel;
  Coef coef;
};

// Prefetch the cache line holding element i of every stream of one tensor.
template <typename P, typename S, bool AMS, bool MASTER>
inline void prefetch_at(const TensorJob& j, int64_t i) {
  __builtin_prefetch(MASTER ? static_cast<const void*>(j.master + i) : static_cast<const void*>(static_cast<const P*>(j.p) + i), 1);
  __builtin_prefetch(static_cast<const P*>(j.g) + i, 0);
  __builtin_prefetch(static_cast<const S*>(j.m) + i, 1);
  __builtin_prefetch(static_cast<const S*>(j.v) + i, 1);
  if constexpr (AMS) __builtin_prefetch(static_cast<const S*>(j.vmax) + i, 1);
}

// Elements [lo, hi) of one tensor. P: param/grad storage, S: state storage. With MASTER the
// update reads and writes the fp32 master and stores its rounding into the param. next: the
// tensor this thread goes on with (or null); near the end of this one, the prefetch runs on
// into its first elements, so that many small tensors read as one continuous stream.
template <typename P, typename S, bool AMS, bool MASTER>
void run_range(const TensorJob& j, int64_t lo, int64_t hi, const TensorJob* next = nullptr) {
  P* p = static_cast<P*>(j.p);
  const P* g = static_cast<const P*>(j.g);
  S* m = static_cast<S*>(j.m);
  S* v = static_cast<S*>(j.v);
  S* vm = static_cast<S*>(j.vmax);
  float* w = j.master;
  const CoefV<fVec> cv(j.coef);
  int64_t i = lo;
  for (; i + kVec <= hi; i += kVec) {
    // software prefetch a few cache lines ahead in every stream: small tensors are many short
    // streams (each a few 4 KiB pages) that the hardware prefetchers pick up late
    const int64_t ahead = i + kPrefetch;
    if (ahead < hi) {
      prefetch_at<P, S, AMS, MASTER>(j, ahead);
    } else if (next != nullptr && ahead - hi < next->numel) {
      prefetch_at<P, S, AMS, MASTER>(*next, ahead - hi);
    }
    fVec p0, p1, g0, g1, m0, m1, v0, v1, x0, x1;
    if constexpr (MASTER) Io<float>::load(w + i, p0, p1); else Io<P>::load(p + i, p0, p1);
    Io<P>::load(g + i, g0, g1);
    Io<S>::load(m + i, m0, m1);
    Io<S>::load(v + i, v0, v1);
    if constexpr (AMS) Io<S>::load(vm + i, x0, x1);
    adam::update<AMS>(p0, g0, m0, v0, x0, cv);
    adam::update<AMS>(p1, g1, m1, v1, x1, cv);
    if constexpr (MASTER) Io<float>::store(w + i, p0, p1);
    Io<P>::store(p + i, p0, p1);
    Io<S>::store(m + i, m0, m1);
    Io<S>::store(v + i, v0, v1);
    if constexpr (AMS) Io<S>::store(vm + i, x0, x1);
  }
  if (i < hi) {
    const CoefV<float> cs(j.coef);
    for (; i < hi; ++i) {
      float pv = MASTER ? w[i] : static_cast<float>(p[i]);
      float mv = static_cast<float>(m[i]), vv = static_cast<float>(v[i]);
      float xv = AMS ? static_cast<float>(vm[i]) : 0.f;
      adam::update<AMS>(pv, static_cast<float>(g[i]), mv, vv, xv, cs);
      if constexpr (MASTER) w[i] = pv;
      p[i] = static_cast<P>(pv);
      m[i] = static_cast<S>(mv);
      v[i] = static_cast<S>(vv);
      if constexpr (AMS) vm[i] = static_cast<S>(xv);
    }
  }
}

template <typename P, typename S, bool AMS, bool MASTER>
void run_all(const std::vector<TensorJob>& jobs) {
  const int64_t n = static_cast<int64_t>(jobs.size());
  std::vector<int64_t> start(n + 1, 0);  // prefix sum of units per tensor
  for (int64_t t = 0; t < n; ++t) start[t + 1] = start[t] + (jobs[t].numel + kUnit - 1) / kUnit;
  const int64_t units = start[n];
  if (units == 0) return;
  // about 32K elements (~1 MB of traffic) per thread at least
  const int64_t grain = 32;
  at::parallel_for(0, units, grain, [&](int64_t ub, int64_t ue) {
    int64_t t = std::upper_bound(start.begin(), start.end(), ub) - start.begin() - 1;
    for (; t < n && start[t] < ue; ++t) {
      const TensorJob& j = jobs[t];
      const int64_t lo = std::max<int64_t>(ub - start[t], 0) * kUnit;
      const int64_t hi = std::min<int64_t>((ue - start[t]) * kUnit, j.numel);
      const TensorJob* next = (t + 1 < n && start[t + 1] < ue) ? &jobs[t + 1] : nullptr;
      if (lo < hi) run_range<P, S, AMS, MASTER>(j, lo, hi, next);
    }
  });
}

template <typename P, typename S, bool MASTER>
void run_ams(const std::vector<TensorJob>& jobs, bool amsgrad) {
  if (amsgrad) run_all<P, S, true, MASTER>(jobs);
  else run_all<P, S, false, MASTER>(jobs);
}

template <typename P>
void run_param(const std::vector<TensorJob>& jobs, bool amsgrad, bool fp32_state, bool master) {
  if constexpr (std::is_same_v<P, float>) {
    run_ams<float, float, false>(jobs, amsgrad);
  } else {
    if (master) run_ams<P, float, true>(jobs, amsgrad);
    else if (fp32_state) run_ams<P, float, false>(jobs, amsgrad);
    else run_ams<P, P, false>(jobs, amsgrad);
  }
}

float read_scalar(const at::Tensor& t) { return t.to(at::kFloat).item<float>(); }

// L: at::TensorList (the op) or PtrList (the direct entry below): size(), empty(), [i].
template <typename L>
void adam_impl(const L& params, const L& grads, const L& exp_avgs, const L& exp_avg_sqs,
               const L& max_exp_avg_sqs, const L& steps, const L& master_params, double lr,
               const at::Tensor* lr_tensor, double beta1, double beta2, double eps, double weight_decay,
               bool amsgrad, bool maximize, bool decoupled_weight_decay, const at::Tensor* grad_mult,
               const at::Tensor* found_inf) {
  const size_t n = params.size();
  adam::check_list_lengths(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, amsgrad);
  if (n == 0) return;
  if (found_inf && read_scalar(*found_inf) != 0.f) return;  // skip: write nothing
  const float mult = grad_mult ? read_scalar(*grad_mult) : 1.f;
  const double lr_v = lr_tensor ? lr_tensor->to(at::kDouble).item<double>() : lr;
  const bool master = !master_params.empty();
  const auto pdt = params[0].scalar_type();
  const auto sdt = exp_avgs[0].scalar_type();

  std::vector<TensorJob> jobs(n);
  std::vector<float> new_steps(n);
  adam::Coef coef{};
  for (size_t i = 0; i < n; ++i) {
    adam::check_tensor(i, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, pdt, sdt,
                       amsgrad);
    TensorJob& j = jobs[i];
    j.p = params[i].data_ptr();
    j.g = grads[i].data_ptr();
    j.m = exp_avgs[i].data_ptr();
    j.v = exp_avg_sqs[i].data_ptr();
    j.vmax = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    j.master = master ? master_params[i].template data_ptr<float>() : nullptr;
    j.numel = params[i].numel();
    const float s = *steps[i].template data_ptr<float>() + 1.f;  // torch: step_t += 1 (fp32)
    new_steps[i] = s;
    // the tensors of a group share their step almost always: two pow() per distinct step,
    // not per tensor (they were most of the per-tensor cost of 1000 small tensors)
    if (i == 0 || s != new_steps[i - 1]) {
      coef = adam::make_coef(lr_v, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                             static_cast<double>(s), mult, maximize);
    }
    j.coef = coef;
  }
  adam::check_state_dtype(pdt, sdt, master);
  const bool fp32_state = sdt == at::kFloat;
  switch (pdt) {
    case at::kFloat: run_param<float>(jobs, amsgrad, fp32_state, master); break;
    case at::kBFloat16: run_param<at::BFloat16>(jobs, amsgrad, fp32_state, master); break;
    case at::kHalf: run_param<at::Half>(jobs, amsgrad, fp32_state, master); break;
    default: TORCH_CHECK(false, "adam_: unsupported param dtype ", pdt);
  }
  for (size_t i = 0; i < n; ++i) *steps[i].template data_ptr<float>() = new_steps[i];
}

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
              at::TensorList master_params, double lr, const std::optional<at::Tensor>& lr_tensor,
              double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
              bool maximize, bool decoupled_weight_decay,
              const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf) {
  adam_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, lr,
            lr_tensor ? &*lr_tensor : nullptr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
            decoupled_weight_decay, grad_mult ? &*grad_mult : nullptr, found_inf ? &*found_inf : nullptr);
}

}  // namespace

// The same kernel without the dispatcher's list boxing (csrc/module.cpp, used by
// fusedtrain/ops/adam.py for plain CPU tensors outside tracing).
void adam_cpu_direct(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
                     const PtrList& exp_avg_sqs, const PtrList& max_exp_avg_sqs, const PtrList& steps,
                     const PtrList& master_params, double lr, const at::Tensor* lr_tensor, double beta1,
                     double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                     bool decoupled_weight_decay, const at::Tensor* grad_mult, const at::Tensor* found_inf) {
  adam_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, lr, lr_tensor, beta1,
            beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_mult, found_inf);
}

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) { m.impl("adam_", &adam_cpu); }

}  // namespace fusedtrain
