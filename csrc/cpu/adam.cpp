// fusedtrain::adam_ on CPU: one at::parallel_for over all elements of all tensors of the
// call (multi_tensor.h: units of kUnit elements per tensor, each thread a contiguous run of
// units), and within a tensor the loop is vectorized with at::vec (16 elements at a time on
// AVX2, 32 on AVX-512 (cpu_isa.h), fp32 math for fp32 / bf16 / fp16 storage, vec_io.h).
// Per-tensor scalars (bias corrections, step size) are computed once per call in double from
// the per-tensor step (adam_math.h make_coef).
//
// found_inf (nonzero) -> nothing at all is written. The step increment happens here too.
#include "cpu_isa.h"  // first: it sets CPU_CAPABILITY, which the ATen vector headers read
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#define FT_ADAM_WITH_ATEN_VEC 1
#include "fusedtrain/adam_lists.h"
#include "fusedtrain/adam_math.h"
#include "multi_tensor.h"
#include "vec_io.h"

namespace fusedtrain {
namespace {

using at::vec::Vectorized;
using fVec = Vectorized<float>;
using adam::Coef;
using adam::CoefV;
using vec_io::load2;
using vec_io::store2;

constexpr int64_t kVec = 2 * fVec::size();  // elements per vector iteration (16 on AVX2)
constexpr int64_t kUnit = 64 * kVec;         // elements per scheduling unit (1024)
constexpr int64_t kGrain = 32;               // units per thread at least: ~1 MB of traffic
constexpr int64_t kPrefetch = 256;           // software prefetch distance, elements

struct TensorJob {
  void* p;          // param (P)
  const void* g;    // grad (P)
  void* m;          // exp_avg (S)
  void* v;          // exp_avg_sq (S)
  void* vmax;       // max_exp_avg_sq (S) or null
  float* master;    // fp32 master copy or null
  // 8-bit states (m, v, vmax uint8 codes): their blocks' absmax (vmax's null without amsgrad)
  float *am_m, *am_v, *am_vmax;
  int64_t numel;
  Coef coef;
  // stochastic rounding (adam_math.h sr_*): of the param, of exp_avg_sq; the tensor's key
  bool sr_param, sr_exp_avg_sq;
  uint32_t sr_key;
};

// Prefetch the cache lines holding elements [i, i + kVec) of every stream of one tensor: one
// line per stream and iteration covers fp32 only at the AVX2 width (64 bytes); on AVX-512 an
// fp32 stream moves two lines per iteration, and the second was left to the hardware.
// (The addresses are computed as integers: near a tensor's end they may lie past it, where a
// pointer may not point; a prefetch never faults.)
template <typename T>
inline void prefetch_lines(const T* x, int rw) {
  constexpr int64_t kBytes = kVec * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < kBytes; b += 64) {
    const void* line = reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(x) + b);
    if (rw) __builtin_prefetch(line, 1);
    else __builtin_prefetch(line, 0);
  }
}
template <typename P, typename S, bool AMS, bool MASTER>
inline void prefetch_at(const TensorJob& j, int64_t i) {
  if constexpr (MASTER) prefetch_lines(j.master + i, 1); else prefetch_lines(static_cast<const P*>(j.p) + i, 1);
  prefetch_lines(static_cast<const P*>(j.g) + i, 0);
  prefetch_lines(static_cast<const S*>(j.m) + i, 1);
  prefetch_lines(static_cast<const S*>(j.v) + i, 1);
  if constexpr (AMS) prefetch_lines(static_cast<const S*>(j.vmax) + i, 1);
}

// kVec elements of one tensor from element i (the stochastic roundings' index), at p, g, m, v,
// vm (AMS) and w (MASTER): the tensor's own memory, or the padded copies of its last elements.
// Inlined at both (always: an out-of-line copy for the tail could be contracted differently).
template <typename P, typename S, bool AMS, bool MASTER, bool SR>
C10_ALWAYS_INLINE void step_vec(const TensorJob& j, const CoefV<fVec>& cv, int64_t i, P* p, const P* g, S* m, S* v, S* vm,
                     float* w) {
  fVec p0, p1, g0, g1, m0, m1, v0, v1, x0, x1;
  if constexpr (MASTER) load2(w, p0, p1); else load2(p, p0, p1);
  load2(g, g0, g1);
  load2(m, m0, m1);
  load2(v, v0, v1);
  if constexpr (AMS) load2(vm, x0, x1);
  adam::update<AMS>(p0, g0, m0, v0, x0, cv);
  adam::update<AMS>(p1, g1, m1, v1, x1, cv);
  if constexpr (MASTER) store2(w, p0, p1);
  if constexpr (SR) {
    constexpr int64_t h = fVec::size();
    if (j.sr_param) {
      p0 = adam::sr_round(p0, adam::sr_bits_vec(j.sr_key, i, adam::SR_P));
      p1 = adam::sr_round(p1, adam::sr_bits_vec(j.sr_key, i + h, adam::SR_P));
    }
    if (j.sr_exp_avg_sq) {  // after the update, which read it unrounded
      v0 = adam::sr_round(v0, adam::sr_bits_vec(j.sr_key, i, adam::SR_V));
      v1 = adam::sr_round(v1, adam::sr_bits_vec(j.sr_key, i + h, adam::SR_V));
    }
  }
  vec_io::store2_rounded(p, p0, p1, SR && j.sr_param);
  store2(m, m0, m1);
  vec_io::store2_rounded(v, v0, v1, SR && j.sr_exp_avg_sq);
  if constexpr (AMS) store2(vm, x0, x1);
}

// Elements [lo, hi) of one tensor. P: param/grad storage, S: state storage. With MASTER the
// update reads and writes the fp32 master and stores its rounding into the param; with SR
// the job's stochastic roundings (of a bf16 param, of a bf16 exp_avg_sq) apply. next: the
// tensor this thread goes on with (or null); near the end of this one, the prefetch runs on
// into its first elements, so that many small tensors read as one continuous stream.
template <typename P, typename S, bool AMS, bool MASTER, bool SR>
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
    step_vec<P, S, AMS, MASTER, SR>(j, cv, i, p + i, g + i, m + i, v + i, AMS ? vm + i : nullptr,
                                    MASTER ? w + i : nullptr);
  }
  if (i < hi) {
    // The last hi - i < kVec elements go through zero-padded copies and the same vector code:
    // a scalar loop's FMA contraction can differ in the last bit, which gave an element other
    // bits where another sharding (FSDP2, a DCP reshard) moved it out of the tail.
    const int64_t n = hi - i;
    P pb[kVec] = {}, gb[kVec] = {};
    S mb[kVec] = {}, vb[kVec] = {}, xb[kVec] = {};
    float wb[kVec] = {};
    std::copy_n(p + i, n, pb);
    std::copy_n(g + i, n, gb);
    std::copy_n(m + i, n, mb);
    std::copy_n(v + i, n, vb);
    if constexpr (AMS) std::copy_n(vm + i, n, xb);
    if constexpr (MASTER) std::copy_n(w + i, n, wb);
    step_vec<P, S, AMS, MASTER, SR>(j, cv, i, pb, gb, mb, vb, xb, wb);
    std::copy_n(pb, n, p + i);
    std::copy_n(mb, n, m + i);
    std::copy_n(vb, n, v + i);
    if constexpr (AMS) std::copy_n(xb, n, vm + i);
    if constexpr (MASTER) std::copy_n(wb, n, w + i);
  }
}

// 8-bit states (adam_math.h q8_*), elements [lo, hi) of one tensor (lo a multiple of the unit,
// hence of Q8_BLOCK): block by block, the codes decoded with the block's absmax, the updated
// moments kept in fp32 buffers until the block's new absmax is known, then encoded with it.
template <typename P, bool AMS, bool MASTER, bool SR>
void run_range_q8(const TensorJob& j, int64_t lo, int64_t hi) {
  using IV = Vectorized<int32_t>;
  using adam::Q8_BLOCK;
  using adam::Q8_SIGNED_MAX;
  using adam::Q8_UNSIGNED_MAX;
  constexpr int64_t h = fVec::size();
  P* p = static_cast<P*>(j.p);
  const P* g = static_cast<const P*>(j.g);
  uint8_t* m = static_cast<uint8_t*>(j.m);
  uint8_t* v = static_cast<uint8_t*>(j.v);
  uint8_t* vm = static_cast<uint8_t*>(j.vmax);
  float* w = j.master;
  const CoefV<fVec> cv(j.coef);
  const CoefV<float> cs(j.coef);
  alignas(64) float mb[Q8_BLOCK], vb[Q8_BLOCK], xb[Q8_BLOCK];
  alignas(64) int32_t fold[h];
  // A block's largest |value| is kept as fp32 bit patterns: their integer max is the float max
  // (sign bits cleared), and a NaN's pattern lies above every number's, so it propagates as
  // torch.amax's NaN does; one instruction per vector where at::vec::maximum's NaN care takes
  // four on AVX-512 (the quick 1.2M row's 8-bit step 0.81 -> 0.79 ms, medians of 4 paired runs).
  const auto bits_of_abs = [](const fVec& x) { return at::vec::cast<int32_t>(x.abs()); };
  const auto max_of = [&](const IV& x) {
    x.store(fold);
    int32_t r = fold[0];
    for (int64_t k = 1; k < h; ++k) r = std::max(r, fold[k]);
    return adam::bits_float(static_cast<uint32_t>(r));
  };
  for (int64_t b0 = lo; b0 < hi; b0 += Q8_BLOCK) {
    const int64_t blk = b0 / Q8_BLOCK, len = std::min(Q8_BLOCK, hi - b0);
    const float sm = adam::q8_scale(j.am_m[blk], Q8_SIGNED_MAX), sv = adam::q8_scale(j.am_v[blk], Q8_UNSIGNED_MAX);
    const float sx = AMS ? adam::q8_scale(j.am_vmax[blk], Q8_UNSIGNED_MAX) : 0.f;
    IV mmax(0), vmax(0), xmax(0);
    int64_t k = 0;
    for (; k + kVec <= len; k += kVec) {
      const int64_t i = b0 + k;
      // software prefetch, as run_range, twice as far: a block's compute is long enough for the
      // hardware prefetchers to fall behind on five streams (22M mix 20.5 -> 11.2 ms)
      if (i + 2 * kPrefetch < hi) prefetch_at<P, uint8_t, AMS, MASTER>(j, i + 2 * kPrefetch);
      fVec p0, p1, g0, g1, x0, x1;
      IV c0, c1;
      if constexpr (MASTER) load2(w + i, p0, p1); else load2(p + i, p0, p1);
      load2(g + i, g0, g1);
      fVec m0, m1;
      vec_io::load_signed_codes(m + i, sm, m0, m1);
      vec_io::load_codes(v + i, c0, c1);
      fVec v0 = adam::q8_decode_unsigned(c0, sv), v1 = adam::q8_decode_unsigned(c1, sv);
      if constexpr (AMS) {
        vec_io::load_codes(vm + i, c0, c1);
        x0 = adam::q8_decode_unsigned(c0, sx);
        x1 = adam::q8_decode_unsigned(c1, sx);
      }
      adam::update<AMS>(p0, g0, m0, v0, x0, cv);
      adam::update<AMS>(p1, g1, m1, v1, x1, cv);
      if constexpr (MASTER) store2(w + i, p0, p1);
      if constexpr (SR) {
        p0 = adam::sr_round(p0, adam::sr_bits_vec(j.sr_key, i, adam::SR_P));
        p1 = adam::sr_round(p1, adam::sr_bits_vec(j.sr_key, i + h, adam::SR_P));
      }
      vec_io::store2_rounded(p + i, p0, p1, SR);
      m0.store(mb + k);
      m1.store(mb + k + h);
      v0.store(vb + k);
      v1.store(vb + k + h);
      mmax = at::vec::maximum(mmax, at::vec::maximum(bits_of_abs(m0), bits_of_abs(m1)));
      vmax = at::vec::maximum(vmax, at::vec::maximum(bits_of_abs(v0), bits_of_abs(v1)));
      if constexpr (AMS) {
        x0.store(xb + k);
        x1.store(xb + k + h);
        xmax = at::vec::maximum(xmax, at::vec::maximum(bits_of_abs(x0), bits_of_abs(x1)));
      }
    }
    float mmx = max_of(mmax), vmx = max_of(vmax), xmx = AMS ? max_of(xmax) : 0.f;
    for (; k < len; ++k) {
      const int64_t i = b0 + k;
      float pv = MASTER ? w[i] : static_cast<float>(p[i]);
      float mv = adam::q8_decode_signed(m[i], sm), vv = adam::q8_decode_unsigned(v[i], sv);
      float xv = AMS ? adam::q8_decode_unsigned(vm[i], sx) : 0.f;
      adam::update<AMS>(pv, static_cast<float>(g[i]), mv, vv, xv, cs);
      if constexpr (MASTER) w[i] = pv;
      if constexpr (SR) pv = adam::sr_round(pv, adam::sr_bits(j.sr_key, i, adam::SR_P));
      p[i] = static_cast<P>(pv);
      mb[k] = mv;
      vb[k] = vv;
      xb[k] = xv;
      mmx = adam::ft_max(mmx, fabsf(mv));
      vmx = adam::ft_max(vmx, vv);
      xmx = adam::ft_max(xmx, xv);
    }
    j.am_m[blk] = mmx;
    j.am_v[blk] = vmx;
    if constexpr (AMS) j.am_vmax[blk] = xmx;
    const float im = adam::q8_inv(mmx, Q8_SIGNED_MAX), iv = adam::q8_inv(vmx, Q8_UNSIGNED_MAX);
    const float ix = adam::q8_inv(xmx, Q8_UNSIGNED_MAX);
    for (k = 0; k + kVec <= len; k += kVec) {
      const int64_t i = b0 + k;
      vec_io::store_signed_codes(m + i, fVec::loadu(mb + k), fVec::loadu(mb + k + h), im);
      vec_io::store_codes(v + i, adam::q8_encode_unsigned(fVec::loadu(vb + k), iv),
                          adam::q8_encode_unsigned(fVec::loadu(vb + k + h), iv));
      if constexpr (AMS)
        vec_io::store_codes(vm + i, adam::q8_encode_unsigned(fVec::loadu(xb + k), ix),
                            adam::q8_encode_unsigned(fVec::loadu(xb + k + h), ix));
    }
    for (; k < len; ++k) {
      m[b0 + k] = static_cast<uint8_t>(adam::q8_encode_signed(mb[k], im));
      v[b0 + k] = static_cast<uint8_t>(adam::q8_encode_unsigned(vb[k], iv));
      if constexpr (AMS) vm[b0 + k] = static_cast<uint8_t>(adam::q8_encode_unsigned(xb[k], ix));
    }
  }
}

template <typename P, bool MASTER, bool SR>
void run_q8_all(const std::vector<TensorJob>& jobs, const mta::Units& units, bool amsgrad) {
  units.parallel(kGrain, /*serial=*/false, [&](int64_t t, int64_t lo, int64_t hi, bool) {
    if (amsgrad) run_range_q8<P, true, MASTER, SR>(jobs[t], lo, hi);
    else run_range_q8<P, false, MASTER, SR>(jobs[t], lo, hi);
  });
}

// 8-bit states: MASTER for fp16/bf16 params, SR (of the params) for bf16 params.
template <typename P>
void run_q8(const std::vector<TensorJob>& jobs, const mta::Units& units, bool amsgrad, bool master, bool sr) {
  if constexpr (!std::is_same_v<P, float>) {
    if (master) return run_q8_all<P, true, false>(jobs, units, amsgrad);
  }
  if constexpr (std::is_same_v<P, at::BFloat16>) {
    if (sr) return run_q8_all<P, false, true>(jobs, units, amsgrad);
  }
  run_q8_all<P, false, false>(jobs, units, amsgrad);
}

template <typename P, typename S, bool AMS, bool MASTER, bool SR>
void run_all(const std::vector<TensorJob>& jobs, const mta::Units& units) {
  units.parallel(kGrain, /*serial=*/false, [&](int64_t t, int64_t lo, int64_t hi, bool next) {
    run_range<P, S, AMS, MASTER, SR>(jobs[t], lo, hi, next ? &jobs[t + 1] : nullptr);
  });
}

template <typename P, typename S, bool MASTER, bool SR = false>
void run_ams(const std::vector<TensorJob>& jobs, const mta::Units& units, bool amsgrad) {
  if (amsgrad) run_all<P, S, true, MASTER, SR>(jobs, units);
  else run_all<P, S, false, MASTER, SR>(jobs, units);
}

// The (P, S, MASTER, SR) combinations check_lists admits: S in {P, fp32, bf16}; MASTER for
// fp16/bf16 params with fp32 or bf16 states; SR (some stochastic rounding) with bf16 states.
template <typename P, typename S>
void run_state(const std::vector<TensorJob>& jobs, const mta::Units& units, bool amsgrad, bool master, bool sr) {
  constexpr bool can_master = !std::is_same_v<P, float> && !std::is_same_v<S, at::Half>;
  constexpr bool can_sr = std::is_same_v<S, at::BFloat16>;
  if constexpr (can_master) {
    if (master) {
      if constexpr (can_sr) {
        if (sr) return run_ams<P, S, true, true>(jobs, units, amsgrad);
      }
      return run_ams<P, S, true>(jobs, units, amsgrad);
    }
  }
  if constexpr (can_sr) {
    if (sr) return run_ams<P, S, false, true>(jobs, units, amsgrad);
  }
  run_ams<P, S, false>(jobs, units, amsgrad);
}

template <typename P>
void run_param(const std::vector<TensorJob>& jobs, const mta::Units& units, bool amsgrad, at::ScalarType sdt,
               bool master, bool sr) {
  if (sdt == at::kByte) return run_q8<P>(jobs, units, amsgrad, master, sr);
  if (sdt == at::kFloat) return run_state<P, float>(jobs, units, amsgrad, master, sr);
  if (sdt == at::kBFloat16) return run_state<P, at::BFloat16>(jobs, units, amsgrad, master, sr);
  if constexpr (std::is_same_v<P, at::Half>) return run_state<P, at::Half>(jobs, units, amsgrad, master, sr);
  TORCH_CHECK(false, "adam_: unsupported state dtype ", sdt);
}

float read_scalar(const at::Tensor& t) { return t.to(at::kFloat).item<float>(); }

}  // namespace

namespace CPU_CAPABILITY {

void adam_cpu(at::TensorList params_in, at::TensorList grads_in, at::TensorList exp_avgs_in,
              at::TensorList exp_avg_sqs_in, at::TensorList max_exp_avg_sqs_in, at::TensorList steps,
              at::TensorList master_params_in, at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_absmax,
              at::TensorList max_exp_avg_sq_absmax, double lr, const std::optional<at::Tensor>& lr_tensor,
              double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
              bool maximize, bool decoupled_weight_decay,
              const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf,
              int64_t sr_seed, bool sr_params, bool sr_exp_avg_sq) {
  const auto sdt = adam::check_lists(params_in, grads_in, exp_avgs_in, exp_avg_sqs_in, max_exp_avg_sqs_in, steps,
                                     master_params_in, exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax,
                                     amsgrad);
  adam::check_sr(sr_seed, sr_params, sr_exp_avg_sq, params_in, exp_avgs_in, master_params_in);
  const size_t n = params_in.size();
  if (n == 0) return;
  const auto dev = params_in[0].device();
  adam::check_scalar("lr_tensor", lr_tensor, dev);
  adam::check_scalar("grad_mult", grad_mult, dev);
  adam::check_scalar("found_inf", found_inf, dev);
  if (found_inf && read_scalar(*found_inf) != 0.f) return;  // skip: write nothing
  adam::Contiguous contiguous;
  const at::TensorList params = contiguous(params_in, true), grads = contiguous(grads_in, false),
                       exp_avgs = contiguous(exp_avgs_in, true), exp_avg_sqs = contiguous(exp_avg_sqs_in, true),
                       max_exp_avg_sqs = amsgrad ? contiguous(max_exp_avg_sqs_in, true) : at::TensorList(),
                       master_params = contiguous(master_params_in, true);
  const float mult = grad_mult ? read_scalar(*grad_mult) : 1.f;
  const double lr_v = lr_tensor ? lr_tensor->to(at::kDouble).item<double>() : lr;
  const bool master = !master_params.empty();
  const bool sr = sr_params || sr_exp_avg_sq;
  const auto pdt = params[0].scalar_type();

  std::vector<TensorJob> jobs(n);
  std::vector<float> new_steps(n);
  adam::Coef coef{};
  for (size_t i = 0; i < n; ++i) {
    TensorJob& j = jobs[i];
    j.p = params[i].data_ptr();
    j.g = grads[i].data_ptr();
    j.m = exp_avgs[i].data_ptr();
    j.v = exp_avg_sqs[i].data_ptr();
    j.vmax = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    j.master = master ? master_params[i].data_ptr<float>() : nullptr;
    const bool q8 = sdt == at::kByte;  // the absmax tensors are contiguous (check_lists)
    j.am_m = q8 ? exp_avg_absmax[i].data_ptr<float>() : nullptr;
    j.am_v = q8 ? exp_avg_sq_absmax[i].data_ptr<float>() : nullptr;
    j.am_vmax = q8 && amsgrad ? max_exp_avg_sq_absmax[i].data_ptr<float>() : nullptr;
    j.numel = params[i].numel();
    const float s = *steps[i].data_ptr<float>() + 1.f;  // torch: step_t += 1 (fp32)
    new_steps[i] = s;
    // the tensors of a group share their step almost always: two pow() per distinct step,
    // not per tensor (they were most of the per-tensor cost of 1000 small tensors)
    if (i == 0 || s != new_steps[i - 1]) {
      coef = adam::make_coef(lr_v, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                             static_cast<double>(s), mult, maximize);
    }
    j.coef = coef;
    j.sr_param = sr_params;
    j.sr_exp_avg_sq = sr_exp_avg_sq;
    j.sr_key = sr ? adam::sr_key(static_cast<uint32_t>(sr_seed), s, static_cast<uint32_t>(i)) : 0U;
  }
  const mta::Units units(static_cast<int64_t>(n), kUnit, [&](int64_t t) { return jobs[t].numel; });
  switch (pdt) {
    case at::kFloat: run_param<float>(jobs, units, amsgrad, sdt, master, sr); break;
    case at::kBFloat16: run_param<at::BFloat16>(jobs, units, amsgrad, sdt, master, sr); break;
    case at::kHalf: run_param<at::Half>(jobs, units, amsgrad, sdt, master, sr); break;
    default: TORCH_CHECK(false, "adam_: unsupported param dtype ", pdt);
  }
  contiguous.write_back();  // before the steps: a failing copy leaves every count as it was
  for (size_t i = 0; i < n; ++i) *steps[i].data_ptr<float>() = new_steps[i];
  adam::bump_written(params_in, exp_avgs_in, exp_avg_sqs_in, max_exp_avg_sqs_in, steps, master_params_in,
                     exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax);
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedtrain

#if !FT_CPU_AVX512_COPY
FT_DECLARE_AVX512_COPY(fusedtrain, adam_cpu)
TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) { m.impl("adam_", FT_CPU_KERNEL(fusedtrain, adam_cpu)); }
#endif
