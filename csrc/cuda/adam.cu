// fusedtrain::adam_ on CUDA: one launch of the multi-tensor engine for every tensor of the
// call (multi_tensor_apply.cuh: device-resident address/size tables, one block per chunk of
// a tensor) with AdamOp as its functor. Per element: adam_math.h, the code the CPU kernel
// runs. Four elements per thread per iteration, 16-byte (fp32) / 8-byte (fp16, bf16) loads
// (vec_io.cuh) where every pointer of the block is aligned for them.
//
// The step: every block reads the tensor's step, then (after __syncthreads) bumps the
// tensor's counter; the last block of the tensor writes step + 1 and resets the counter.
// found_inf nonzero: every block returns before it writes anything.
//
// 8-bit blockwise states (uint8 codes, adam_math.h q8_*): AdamQ8Op, the same launch with the
// three absmax lists as extra table columns. A chunk (kChunk, a multiple of Q8_BLOCK) holds
// whole 256-element blocks; one warp per block: lane l holds elements 4l..4l+3 and
// 128+4l..128+4l+3 of it (4 codes = one 32-bit access, params/grads/masters one 16-byte (fp32)
// or 8-byte (fp16, bf16) access, every access of a warp one contiguous span), decodes with
// the old absmax, updates in registers, and the warp's max (NaN-propagating, adam::ft_max)
// gives the new absmax that lane 0 stores and every lane encodes its values with.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "fusedtrain/adam_lists.h"
#include "fusedtrain/adam_math.h"
#include "multi_tensor_apply.cuh"
#include "vec_io.cuh"

namespace fusedtrain {
namespace {

constexpr int kThreads = 256;  // __launch_bounds__: up to 255 registers (the double-precision pow of make_coef)
constexpr int kIlp = 4;
constexpr int64_t kChunk = 16384;  // elements per block; an empty tensor has a block too (its step)

// columns of the tables
// (8-bit states only: the absmax of exp_avg, exp_avg_sq, max_exp_avg_sq)
enum : int { kP = 0, kG, kM, kV, kVmax, kMaster, kStep, kAbsM, kAbsV, kAbsVmax, kLists };

struct Hyper {
  double lr, beta1, beta2, eps, wd;
  const float* lr_ptr;   // lr tensor or null
  const float* gm_ptr;   // grad_mult or null
  const float* fi_ptr;   // found_inf or null
  bool maximize, decoupled;
  uint32_t sr_seed;      // stochastic rounding (SR kernels only): the call's seed,
  bool sr_params, sr_exp_avg_sq;  // and what it rounds
};

// The coefficients of a tensor's step (step: its count after this step's increment).
__device__ __forceinline__ adam::CoefV<float> coef_of(const Hyper& h, float step) {
  const double lr = h.lr_ptr != nullptr ? static_cast<double>(*h.lr_ptr) : h.lr;
  const float mult = h.gm_ptr != nullptr ? *h.gm_ptr : 1.f;
  return adam::CoefV<float>(adam::make_coef(lr, h.beta1, h.beta2, h.eps, h.wd, h.decoupled, static_cast<double>(step),
                                            mult, h.maximize));
}

// After a block's elements: every thread of it has read the step; the last block of the
// tensor (counted in the launch's own counters) writes the new one.
__device__ __forceinline__ void finish_step(const mta::Chunk& ch, int32_t* counters, float* step_ptr, float step) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const int64_t nb = (ch.numel + ch.chunk - 1) / ch.chunk;
    const int32_t nblocks = static_cast<int32_t>(nb > 0 ? nb : 1);  // an empty tensor has one block
    if (atomicAdd(&counters[ch.tensor], 1) == nblocks - 1) {
      *step_ptr = step;
      counters[ch.tensor] = 0;
    }
  }
}

template <typename T>
__device__ __forceinline__ bool aligned4(const void* p) {
  return vec_io::aligned<T, kIlp>(p);
}

// The functor of the multi-tensor engine: one chunk of one tensor.
template <typename P, typename S, bool AMS, bool MASTER, bool SR>
struct AdamOp {
  Hyper h;
  int32_t* counters;  // per tensor, a zeroed buffer of this launch

  // found_inf nonzero: write nothing at all
  __device__ __forceinline__ bool skip() const { return h.fi_ptr != nullptr && *h.fi_ptr != 0.f; }

  // The elements of the block. sr: stochastic rounding's seed (low 32 bits) and flags (bit 32
  // the param, bit 33 exp_avg_sq) in one value: reading them from `this` copied the functor to
  // an 88-byte local frame.
  __device__ __forceinline__ void elements_body(const mta::Chunk ch, const adam::CoefV<float> c,
                                                const uint64_t sr) const {
    const bool sr_params = SR && ((sr >> 32) & 1U), sr_exp_avg_sq = SR && ((sr >> 33) & 1U);
    // the step read again here: no block writes it before every block of the tensor is past this
    const uint32_t sr_key =
        SR ? adam::sr_key(static_cast<uint32_t>(sr), *ch.ptr<float>(kStep) + 1.f, static_cast<uint32_t>(ch.tensor))
           : 0U;

    P* p = ch.ptr<P>(kP);
    const P* g = ch.ptr<const P>(kG);
    S* m = ch.ptr<S>(kM);
    S* v = ch.ptr<S>(kV);
    S* vm = ch.ptr<S>(kVmax);
    float* w = ch.ptr<float>(kMaster);
    // [lo, hi): this block's elements. When p + lo is off a vector boundary (a view into a
    // bucket) the elements up to it are a scalar head; vector steps of kIlp follow when every
    // list is aligned there (lists at different offsets in their buffers are not: all
    // scalar), then a scalar tail of fewer than kIlp.
    const int64_t lo = ch.lo();
    const int64_t hi = ch.hi();
    const int64_t v0 = lo + min(vec_io::head<P, kIlp>(p + lo), hi - lo);
    const bool vec = aligned4<P>(p + v0) && aligned4<P>(g + v0) && aligned4<S>(m + v0) && aligned4<S>(v + v0) &&
                     (!AMS || aligned4<S>(vm + v0)) && (!MASTER || aligned4<float>(w + v0));
    const auto scalar = [&](int64_t i) {
      float rp = MASTER ? w[i] : static_cast<float>(p[i]);
      float rm = static_cast<float>(m[i]), rv = static_cast<float>(v[i]);
      float rx = AMS ? static_cast<float>(vm[i]) : 0.f;
      adam::update<AMS>(rp, static_cast<float>(g[i]), rm, rv, rx, c);
      if (MASTER) w[i] = rp;
      if (SR) {
        if (sr_params) rp = adam::sr_round(rp, adam::sr_bits(sr_key, i, adam::SR_P));
        if (sr_exp_avg_sq) rv = adam::sr_round(rv, adam::sr_bits(sr_key, i, adam::SR_V));
      }
      p[i] = static_cast<P>(rp);
      m[i] = static_cast<S>(rm);
      v[i] = static_cast<S>(rv);
      if (AMS) vm[i] = static_cast<S>(rx);
    };
    if (vec) {
      for (int64_t i = v0 + static_cast<int64_t>(threadIdx.x) * kIlp; i + kIlp <= hi;
           i += static_cast<int64_t>(kThreads) * kIlp) {
        float rp[kIlp], rg[kIlp], rm[kIlp], rv[kIlp], rx[kIlp];
        if (MASTER) vec_io::load_vec(w + i, rp); else vec_io::load_vec(p + i, rp);
        vec_io::load_vec(g + i, rg);
        vec_io::load_vec(m + i, rm);
        vec_io::load_vec(v + i, rv);
        if (AMS) vec_io::load_vec(vm + i, rx);
#pragma unroll
        for (int k = 0; k < kIlp; ++k) adam::update<AMS>(rp[k], rg[k], rm[k], rv[k], rx[k], c);
        if (MASTER) vec_io::store_vec(w + i, rp);
        if (SR) {
#pragma unroll
          for (int k = 0; k < kIlp; ++k) {
            if (sr_params) rp[k] = adam::sr_round(rp[k], adam::sr_bits(sr_key, i + k, adam::SR_P));
            if (sr_exp_avg_sq) rv[k] = adam::sr_round(rv[k], adam::sr_bits(sr_key, i + k, adam::SR_V));
          }
        }
        vec_io::store_vec(p + i, rp);
        vec_io::store_vec(m + i, rm);
        vec_io::store_vec(v + i, rv);
        if (AMS) vec_io::store_vec(vm + i, rx);
      }
      // the head [lo, v0) and the tail [tail, hi), fewer than kIlp elements each: threads
      // 0..kIlp-1 take the head, kIlp..2kIlp-1 the tail
      const int64_t tail = v0 + ((hi - v0) / kIlp) * kIlp;
      const int k = static_cast<int>(threadIdx.x);
      const int64_t i = k < kIlp ? lo + k : tail + (k - kIlp);
      if (k < 2 * kIlp && i < (k < kIlp ? v0 : hi)) scalar(i);
    } else {
      for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) scalar(i);
    }
  }

  // elements_body as a function of its own (one call per block), so that the values its loops
  // keep are not live across make_coef's call of pow (inlined, the peeled head spilled
  // registers there); operator() inlines it for the combinations whose call spills instead.
  __device__ __noinline__ void elements(const mta::Chunk ch, const adam::CoefV<float> c, const uint64_t sr) const {
    elements_body(ch, c, sr);
  }

  __device__ __forceinline__ void operator()(const mta::Chunk& ch) const {
    float* step_ptr = ch.ptr<float>(kStep);
    const float step = *step_ptr + 1.f;  // torch: step_t += 1 (fp32)
    const adam::CoefV<float> c = coef_of(h, step);
    // a call (see elements), except for bf16 moments with fp32 masters and for stochastic
    // rounding, whose calls spilled 8 bytes around them (sm_80; sm_90) and which inlined do not
    const uint64_t sr = SR ? (uint64_t(h.sr_seed) | (uint64_t(h.sr_params) << 32) | (uint64_t(h.sr_exp_avg_sq) << 33)) : 0;
    if constexpr ((MASTER && !std::is_same_v<S, float>) || SR)
      elements_body(ch, c, sr);
    else
      elements(ch, c, sr);
    finish_step(ch, counters, step_ptr, step);
  }
};

// 8-bit blockwise states (adam_math.h q8_*; the CPU twin: csrc/cpu/adam.cpp run_range_q8).
// P: param/grad storage; MASTER: the update runs on the fp32 master, the param gets its
// rounding; SR: bf16 params rounded stochastically (check_sr: never exp_avg_sq, 8-bit).
template <typename P, bool AMS, bool MASTER, bool SR>
struct AdamQ8Op {
  Hyper h;
  int32_t* counters;  // per tensor, a zeroed buffer of this launch

  static constexpr int kWarps = kThreads / 32;
  static constexpr int kHalf = static_cast<int>(adam::Q8_BLOCK) / 2;  // a warp's 32 lanes x kIlp
  static_assert(kHalf == 32 * kIlp && kChunk % adam::Q8_BLOCK == 0, "a chunk holds whole blocks");

  // found_inf nonzero: write nothing at all (absmax included)
  __device__ __forceinline__ bool skip() const { return h.fi_ptr != nullptr && *h.fi_ptr != 0.f; }

  // The blocks of the chunk, block b by warp b % kWarps. sr_key: the tensor's stochastic
  // rounding key (SR only).
  __device__ __forceinline__ void elements_body(const mta::Chunk ch, const adam::CoefV<float> c,
                                                const uint32_t sr_key) const {
    using adam::Q8_BLOCK;
    using adam::Q8_SIGNED_MAX;
    using adam::Q8_UNSIGNED_MAX;
    P* p = ch.ptr<P>(kP);
    const P* g = ch.ptr<const P>(kG);
    uint8_t* m = ch.ptr<uint8_t>(kM);
    uint8_t* v = ch.ptr<uint8_t>(kV);
    uint8_t* vm = ch.ptr<uint8_t>(kVmax);
    float* w = ch.ptr<float>(kMaster);
    float* am = ch.ptr<float>(kAbsM);
    float* av = ch.ptr<float>(kAbsV);
    float* ax = ch.ptr<float>(kAbsVmax);
    const int64_t lo = ch.lo();
    const int64_t hi = ch.hi();
    // every lane's group of kIlp starts at a multiple of kIlp elements of the tensor: aligned
    // for vector accesses there when every list's base is (a view off its buffer's alignment:
    // scalar accesses throughout the tensor); the last group of a partial block is scalar
    const bool vec = aligned4<P>(p) && aligned4<P>(g) && (!MASTER || aligned4<float>(w)) &&
                     vec_io::aligned<uint8_t, kIlp>(m) && vec_io::aligned<uint8_t, kIlp>(v) &&
                     (!AMS || vec_io::aligned<uint8_t, kIlp>(vm));
    const int lane = static_cast<int>(threadIdx.x) & 31;
    const int nblk = static_cast<int>((hi - lo + Q8_BLOCK - 1) / Q8_BLOCK);
    for (int b = static_cast<int>(threadIdx.x) >> 5; b < nblk; b += kWarps) {
      const int64_t b0 = lo + static_cast<int64_t>(b) * Q8_BLOCK;
      const int64_t blk = b0 / Q8_BLOCK;
      const int len = static_cast<int>(hi - b0 < Q8_BLOCK ? hi - b0 : Q8_BLOCK);
      // the old absmax, read by every lane before lane 0 writes the new one (after the
      // shuffles, which need every lane's decoded values)
      const float sm = adam::q8_scale(am[blk], Q8_SIGNED_MAX);
      const float sv = adam::q8_scale(av[blk], Q8_UNSIGNED_MAX);
      const float sx = AMS ? adam::q8_scale(ax[blk], Q8_UNSIGNED_MAX) : 0.f;
      float rm[2][kIlp], rv[2][kIlp], rx[2][kIlp];
      float mmx = 0.f, vmx = 0.f, xmx = 0.f;  // as the CPU's: max(0, |values|), NaN propagating
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int off = half * kHalf + lane * kIlp;
        const int n = len - off < 0 ? 0 : (len - off < kIlp ? len - off : kIlp);  // elements of this group
        const bool full = vec && n == kIlp;
        const int64_t i = b0 + off;
        float rp[kIlp], rg[kIlp];
        uint32_t cm = 0, cv = 0, cx = 0;
        if (full) {
          if (MASTER) vec_io::load_vec(w + i, rp); else vec_io::load_vec(p + i, rp);
          vec_io::load_vec(g + i, rg);
          cm = *reinterpret_cast<const uint32_t*>(m + i);
          cv = *reinterpret_cast<const uint32_t*>(v + i);
          if (AMS) cx = *reinterpret_cast<const uint32_t*>(vm + i);
        } else {
#pragma unroll
          for (int k = 0; k < kIlp; ++k) {
            rp[k] = 0.f;
            rg[k] = 0.f;
            if (k < n) {
              rp[k] = MASTER ? w[i + k] : static_cast<float>(p[i + k]);
              rg[k] = static_cast<float>(g[i + k]);
              cm |= static_cast<uint32_t>(m[i + k]) << (8 * k);
              cv |= static_cast<uint32_t>(v[i + k]) << (8 * k);
              if (AMS) cx |= static_cast<uint32_t>(vm[i + k]) << (8 * k);
            }
          }
        }
#pragma unroll
        for (int k = 0; k < kIlp; ++k) {
          rm[half][k] = adam::q8_decode_signed((cm >> (8 * k)) & 0xFFu, sm);
          rv[half][k] = adam::q8_decode_unsigned((cv >> (8 * k)) & 0xFFu, sv);
          rx[half][k] = AMS ? adam::q8_decode_unsigned((cx >> (8 * k)) & 0xFFu, sx) : 0.f;
          adam::update<AMS>(rp[k], rg[k], rm[half][k], rv[half][k], rx[half][k], c);
          // elements past the block's end count as 0 (a NaN scale decodes them as NaN)
          mmx = adam::ft_max(mmx, k < n ? fabsf(rm[half][k]) : 0.f);
          vmx = adam::ft_max(vmx, k < n ? rv[half][k] : 0.f);
          if (AMS) xmx = adam::ft_max(xmx, k < n ? rx[half][k] : 0.f);
        }
        if (full) {
          if (MASTER) vec_io::store_vec(w + i, rp);
          if (SR) {
#pragma unroll
            for (int k = 0; k < kIlp; ++k) rp[k] = adam::sr_round(rp[k], adam::sr_bits(sr_key, i + k, adam::SR_P));
          }
          vec_io::store_vec(p + i, rp);
        } else {
#pragma unroll
          for (int k = 0; k < kIlp; ++k) {
            if (k < n) {
              if (MASTER) w[i + k] = rp[k];
              const float r = SR ? adam::sr_round(rp[k], adam::sr_bits(sr_key, i + k, adam::SR_P)) : rp[k];
              p[i + k] = static_cast<P>(r);
            }
          }
        }
      }
      // the block's new absmax: the max over the warp (exact in any order; NaN if any is NaN)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        mmx = adam::ft_max(mmx, __shfl_xor_sync(0xFFFFFFFFu, mmx, o));
        vmx = adam::ft_max(vmx, __shfl_xor_sync(0xFFFFFFFFu, vmx, o));
        if (AMS) xmx = adam::ft_max(xmx, __shfl_xor_sync(0xFFFFFFFFu, xmx, o));
      }
      if (lane == 0) {
        am[blk] = mmx;
        av[blk] = vmx;
        if (AMS) ax[blk] = xmx;
      }
      const float im = adam::q8_inv(mmx, Q8_SIGNED_MAX), iv = adam::q8_inv(vmx, Q8_UNSIGNED_MAX);
      const float ix = AMS ? adam::q8_inv(xmx, Q8_UNSIGNED_MAX) : 0.f;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int off = half * kHalf + lane * kIlp;
        const int n = len - off < 0 ? 0 : (len - off < kIlp ? len - off : kIlp);
        const int64_t i = b0 + off;
        uint32_t cm = 0, cv = 0, cx = 0;
#pragma unroll
        for (int k = 0; k < kIlp; ++k) {
          cm |= adam::q8_encode_signed(rm[half][k], im) << (8 * k);
          cv |= adam::q8_encode_unsigned(rv[half][k], iv) << (8 * k);
          if (AMS) cx |= adam::q8_encode_unsigned(rx[half][k], ix) << (8 * k);
        }
        if (vec && n == kIlp) {
          *reinterpret_cast<uint32_t*>(m + i) = cm;
          *reinterpret_cast<uint32_t*>(v + i) = cv;
          if (AMS) *reinterpret_cast<uint32_t*>(vm + i) = cx;
        } else {
#pragma unroll
          for (int k = 0; k < kIlp; ++k) {
            if (k < n) {
              m[i + k] = static_cast<uint8_t>(cm >> (8 * k));
              v[i + k] = static_cast<uint8_t>(cv >> (8 * k));
              if (AMS) vm[i + k] = static_cast<uint8_t>(cx >> (8 * k));
            }
          }
        }
      }
    }
  }

  // a call of its own, as AdamOp::elements: its loop's values are not live across make_coef's pow
  __device__ __noinline__ void elements(const mta::Chunk ch, const adam::CoefV<float> c, const uint32_t sr_key) const {
    elements_body(ch, c, sr_key);
  }

  __device__ __forceinline__ void operator()(const mta::Chunk& ch) const {
    float* step_ptr = ch.ptr<float>(kStep);
    const float step = *step_ptr + 1.f;  // torch: step_t += 1 (fp32)
    const adam::CoefV<float> c = coef_of(h, step);
    const uint32_t sr_key = SR ? adam::sr_key(h.sr_seed, step, static_cast<uint32_t>(ch.tensor)) : 0U;
    elements(ch, c, sr_key);
    finish_step(ch, counters, step_ptr, step);
  }
};

template <typename P, bool MASTER, bool SR>
void launch_q8_ams(bool amsgrad, const mta::Tables& tab, int32_t* counters, const Hyper& h, cudaStream_t stream) {
  if (amsgrad) mta::launch<kThreads>(tab, AdamQ8Op<P, true, MASTER, SR>{h, counters}, stream);
  else mta::launch<kThreads>(tab, AdamQ8Op<P, false, MASTER, SR>{h, counters}, stream);
}

// The 8-bit combinations (as csrc/cpu/adam.cpp run_q8): MASTER for fp16/bf16 params, SR (of
// the params) for bf16 params without masters.
template <typename P>
void launch_q8(bool amsgrad, bool master, bool sr, const mta::Tables& tab, int32_t* counters, const Hyper& h,
               cudaStream_t stream) {
  if constexpr (!std::is_same_v<P, float>) {
    if (master) return launch_q8_ams<P, true, false>(amsgrad, tab, counters, h, stream);
  }
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    if (sr) return launch_q8_ams<P, false, true>(amsgrad, tab, counters, h, stream);
  }
  launch_q8_ams<P, false, false>(amsgrad, tab, counters, h, stream);
}

template <typename P, typename S, bool MASTER, bool SR = false>
void launch_ams(bool amsgrad, const mta::Tables& tab, int32_t* counters, const Hyper& h, cudaStream_t stream) {
  if (amsgrad) mta::launch<kThreads>(tab, AdamOp<P, S, true, MASTER, SR>{h, counters}, stream);
  else mta::launch<kThreads>(tab, AdamOp<P, S, false, MASTER, SR>{h, counters}, stream);
}

// The (P, S, MASTER, SR) combinations check_lists admits: S in {P, fp32, bf16}; MASTER for
// fp16/bf16 params with fp32 or bf16 states; SR (some stochastic rounding) with bf16 states.
template <typename P, typename S>
void launch_state(bool amsgrad, bool master, bool sr, const mta::Tables& tab, int32_t* counters, const Hyper& h,
                  cudaStream_t stream) {
  constexpr bool can_master = !std::is_same_v<P, float> && !std::is_same_v<S, c10::Half>;
  constexpr bool can_sr = std::is_same_v<S, c10::BFloat16>;
  if constexpr (can_master) {
    if (master) {
      if constexpr (can_sr) {
        if (sr) return launch_ams<P, S, true, true>(amsgrad, tab, counters, h, stream);
      }
      return launch_ams<P, S, true>(amsgrad, tab, counters, h, stream);
    }
  }
  if constexpr (can_sr) {
    if (sr) return launch_ams<P, S, false, true>(amsgrad, tab, counters, h, stream);
  }
  launch_ams<P, S, false>(amsgrad, tab, counters, h, stream);
}

template <typename P>
void launch_param(bool amsgrad, at::ScalarType sdt, bool master, bool sr, const mta::Tables& tab, int32_t* counters,
                  const Hyper& h, cudaStream_t stream) {
  if (sdt == at::kByte) return launch_q8<P>(amsgrad, master, sr, tab, counters, h, stream);
  if (sdt == at::kFloat) return launch_state<P, float>(amsgrad, master, sr, tab, counters, h, stream);
  if (sdt == at::kBFloat16) return launch_state<P, c10::BFloat16>(amsgrad, master, sr, tab, counters, h, stream);
  if constexpr (std::is_same_v<P, c10::Half>)
    return launch_state<P, c10::Half>(amsgrad, master, sr, tab, counters, h, stream);
  TORCH_CHECK(false, "adam_: unsupported state dtype ", sdt);
}

const float* opt_ptr(const std::optional<at::Tensor>& t, const at::Device& dev, const char* what) {
  adam::check_scalar(what, t, dev);
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void adam_cuda(at::TensorList params_in, at::TensorList grads_in, at::TensorList exp_avgs_in,
               at::TensorList exp_avg_sqs_in, at::TensorList max_exp_avg_sqs_in, at::TensorList steps,
               at::TensorList master_params_in, at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_absmax,
               at::TensorList max_exp_avg_sq_absmax, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
               double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
               bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_mult,
               const std::optional<at::Tensor>& found_inf, int64_t sr_seed, bool sr_params, bool sr_exp_avg_sq) {
  const auto sdt = adam::check_lists(params_in, grads_in, exp_avgs_in, exp_avg_sqs_in, max_exp_avg_sqs_in, steps,
                                     master_params_in, exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax,
                                     amsgrad);
  adam::check_sr(sr_seed, sr_params, sr_exp_avg_sq, params_in, exp_avgs_in, master_params_in);
  const size_t n = params_in.size();
  if (n == 0) return;
  const at::Device dev = params_in[0].device();
  const auto pdt = params_in[0].scalar_type();
  const bool master = !master_params_in.empty();
  const c10::cuda::CUDAGuard guard(dev);
  adam::Contiguous contiguous;
  const at::TensorList params = contiguous(params_in, true), grads = contiguous(grads_in, false),
                       exp_avgs = contiguous(exp_avgs_in, true), exp_avg_sqs = contiguous(exp_avg_sqs_in, true),
                       max_exp_avg_sqs = amsgrad ? contiguous(max_exp_avg_sqs_in, true) : at::TensorList(),
                       master_params = contiguous(master_params_in, true);
  Hyper h{lr, beta1, beta2, eps, weight_decay, opt_ptr(lr_tensor, dev, "lr_tensor"),
          opt_ptr(grad_mult, dev, "grad_mult"), opt_ptr(found_inf, dev, "found_inf"), maximize,
          decoupled_weight_decay, static_cast<uint32_t>(sr_seed), sr_params, sr_exp_avg_sq};
  const bool sr = sr_params || sr_exp_avg_sq;
  const at::TensorList none;
  std::vector<at::TensorList> lists{params, grads, exp_avgs, exp_avg_sqs,
                                    amsgrad ? max_exp_avg_sqs : none, master ? master_params : none, steps};
  if (sdt == at::kByte) {  // the absmax columns (contiguous: check_lists)
    lists.push_back(exp_avg_absmax);
    lists.push_back(exp_avg_sq_absmax);
    lists.push_back(amsgrad ? max_exp_avg_sq_absmax : none);
  }
  const mta::DeviceTables tables = mta::tables_of(lists, mta::Layout{kChunk, /*empty_block=*/true}, dev);
  const mta::Tables& tab = tables.tables;
  // per-launch counters (a stream-ordered memset): launches on two streams never share them
  const at::Tensor counter_buf = at::zeros({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kInt).device(dev));
  int32_t* counters = counter_buf.data_ptr<int32_t>();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (pdt) {
    case at::kFloat: launch_param<float>(amsgrad, sdt, master, sr, tab, counters, h, stream); break;
    case at::kBFloat16: launch_param<c10::BFloat16>(amsgrad, sdt, master, sr, tab, counters, h, stream); break;
    case at::kHalf: launch_param<c10::Half>(amsgrad, sdt, master, sr, tab, counters, h, stream); break;
    default: TORCH_CHECK(false, "adam_: unsupported param dtype ", pdt);
  }
  contiguous.write_back();
  adam::bump_written(params_in, exp_avgs_in, exp_avg_sqs_in, max_exp_avg_sqs_in, steps, master_params_in,
                     exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) { m.impl("adam_", &adam_cuda); }

}  // namespace fusedtrain
