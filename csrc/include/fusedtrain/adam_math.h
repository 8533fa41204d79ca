#pragma once
// Adam / AdamW: the per-element update, the one source of truth for the C++ CPU kernels
// (scalar float and at::vec::Vectorized<float>) and the CUDA kernels (float).
//
// Order of operations follows torch.optim.Adam(foreach=False) in torch 2.14 (docs/design.md,
// "Numerics"):
//   g  = grad * grad_mult            (grad_mult: AMP unscale; 1 otherwise), negated for maximize
//   Adam:  g += wd * p               AdamW: p *= 1 - lr * wd   (before the update)
//   m  = lerp(m, g, 1 - beta1)       (torch's lerp formula: two branches on the weight)
//   v  = v * beta2 + (1 - beta2) * g * g
//   amsgrad: vmax = max(vmax, v), v' = vmax  (NaN propagates like torch.maximum)
//   p  = p - (lr / (1 - beta1^t)) * m / (sqrt(v') / sqrt(1 - beta2^t) + eps)
// with t the step count after its increment. The per-tensor scalars (bias corrections,
// step size) are computed by make_coef in double from the per-tensor step, like torch's CPU
// fused kernel; every per-element operation is fp32.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fusedtrain/macros.h"

namespace fusedtrain {
namespace adam {

// Scalars of one step of one tensor, in the precision the per-element math uses.
struct Coef {
  float gscale;     // grad multiplier: grad_mult, negated for maximize
  float decay;      // AdamW: 1 - lr*wd; 1 otherwise (an exact no-op)
  float l2;         // Adam: wd; 0 for AdamW
  float w1;         // lerp weight 1 - beta1
  float omw1;       // 1 - w1 (the second branch of torch's lerp)
  float beta2;      // beta2
  float omb2;       // 1 - beta2
  float step_size;  // lr / (1 - beta1^t)
  float bc2_sqrt;   // sqrt(1 - beta2^t)
  float eps;
  bool use_l2;      // Adam with wd != 0
  bool lerp_low;    // |w1| < 0.5: m + w1*(g - m), else g - (g - m)*(1 - w1)
};

// step: the step count after this step's increment. lr, beta1, beta2, eps, wd as torch holds
// them (Python floats = double).
FT_HD Coef make_coef(double lr, double beta1, double beta2, double eps, double wd,
                     bool decoupled, double step, float grad_mult, bool maximize) {
  Coef c;
  c.gscale = maximize ? -grad_mult : grad_mult;
  c.use_l2 = !decoupled && wd != 0.0;
  c.l2 = c.use_l2 ? static_cast<float>(wd) : 0.f;
  c.decay = (decoupled && wd != 0.0) ? static_cast<float>(1.0 - lr * wd) : 1.f;
  const double w1 = 1.0 - beta1;
  c.w1 = static_cast<float>(w1);
  c.lerp_low = fabs(static_cast<double>(c.w1)) < 0.5;
  c.omw1 = 1.f - c.w1;
  c.beta2 = static_cast<float>(beta2);
  c.omb2 = static_cast<float>(1.0 - beta2);
  const double bc1 = 1.0 - pow(beta1, step);
  const double bc2 = 1.0 - pow(beta2, step);
  c.step_size = static_cast<float>(lr / bc1);
  c.bc2_sqrt = static_cast<float>(sqrt(bc2));
  c.eps = static_cast<float>(eps);
  return c;
}

FT_HD float ft_sqrt(float x) { return sqrtf(x); }
// torch.maximum: NaN if either operand is NaN
FT_HD float ft_max(float a, float b) { return (a != a || a > b) ? a : b; }

#if defined(FT_ADAM_WITH_ATEN_VEC) && !defined(__CUDACC__)
// The vector helpers are in a namespace per instruction set (as at::vec is): the AVX2 and
// AVX-512 copies of the CPU kernels (csrc/cpu/cpu_isa.h) each emit their own. One with only
// scalar parameters (sr_bits_vec) would otherwise have one mangled name for both copies' vector
// types, and the linker would keep one of them for both callers.
inline namespace CPU_CAPABILITY {
// The same math on at::vec::Vectorized<float> (the CPU kernels define FT_ADAM_WITH_ATEN_VEC
// and include ATen/cpu/vec/vec.h first).
inline at::vec::Vectorized<float> ft_sqrt(const at::vec::Vectorized<float>& x) { return x.sqrt(); }
inline at::vec::Vectorized<float> ft_max(const at::vec::Vectorized<float>& a,
                                         const at::vec::Vectorized<float>& b) {
  return at::vec::maximum(a, b);
}
}  // namespace CPU_CAPABILITY
#endif

// The coefficients as values of V (float, or Vectorized<float> broadcast once per range).
template <typename V>
struct CoefV {
  V gscale, decay, l2, w1, omw1, beta2, omb2, step_size, bc2_sqrt, eps;
  bool use_l2, lerp_low;
  FT_HD explicit CoefV(const Coef& c)
      : gscale(c.gscale), decay(c.decay), l2(c.l2), w1(c.w1), omw1(c.omw1), beta2(c.beta2),
        omb2(c.omb2), step_size(c.step_size), bc2_sqrt(c.bc2_sqrt), eps(c.eps),
        use_l2(c.use_l2), lerp_low(c.lerp_low) {}
};

// One element (or one vector of elements) of one step. p, m, v, vmax are read and written
// in fp32; the caller rounds them once when it stores them.
template <bool AMSGRAD, typename V>
FT_HD void update(V& p, V g, V& m, V& v, V& vmax, const CoefV<V>& c) {
  g = g * c.gscale;
  if (c.use_l2) g = g + c.l2 * p;
  p = p * c.decay;
  m = c.lerp_low ? m + c.w1 * (g - m) : g - (g - m) * c.omw1;
  v = v * c.beta2 + c.omb2 * g * g;
  V denom;
  if (AMSGRAD) {
    vmax = ft_max(vmax, v);
    denom = ft_sqrt(vmax) / c.bc2_sqrt + c.eps;
  } else {
    denom = ft_sqrt(v) / c.bc2_sqrt + c.eps;
  }
  p = p - c.step_size * m / denom;
}

// ---- stochastic rounding to bf16 (docs/design.md §7) ----
// Of bf16 params ("stochastic_rounding") and of a bf16 exp_avg_sq (state_format="bf16": rounded
// to nearest it would never move by its (1 - beta2) = 1e-3 relative steps, less than half a
// bf16 ulp; exp_avg's 10% steps need no such care). The fp32 value x is rounded to one of its
// two bf16 neighbours, up with probability (distance to the lower one) / (their gap): 16 random
// bits are added to x's fp32 bits and the low 16 bits cleared. The bits are counter-based: a
// key hashed (sr_mix) from (the call's seed, step, the tensor's position in its call) once per
// tensor and step, then per element one multiplicative hash of key ^ index whose high 16 bits
// are taken, one multiplier for exp_avg_sq and one for the param. The key is new every step, so
// each element's bits are uniform and independent from step to step (what unbiased rounding
// needs); within a step the bits along a tensor are a Weyl-like sequence (multipliers with
// small partial quotients: evenly spread from a few elements on). (A full sr_mix per element
// made the lean step compute-bound: 22M mix 11.8 ms against 10.1 ms.) Limits: only 32 bits
// vary per element, so two tensors' keys kA, kB give elements i and i ^ (kA ^ kB) the same
// bits (correlated rounding errors, no bias); FSDP shards hash their local indices (shards of
// one tensor on different ranks share bits); the step is fp32, so past 2^24 steps the keys
// stop changing.
// Nothing depends on chunking, threads or devices, so a run and its resume, and every DDP
// rank, round alike. The call's seed mixes the group's seed with the group's and the call's
// index (sr_call_seed), so that no two tensors of an optimizer draw the same sequence. The same integer
// steps in fusedtrain/triton/adam.py (_sr_*) and fusedtrain/reference.py (sr_*).
FT_HD uint32_t sr_mix(uint32_t x) {  // a 32-bit integer hash (Wellons' lowbias32)
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The seed of call k of a group whose seed (already mixed with the group's index) is seed.
FT_HD uint32_t sr_call_seed(uint32_t seed, uint32_t k) { return sr_mix(seed ^ sr_mix(k + 0x2545F491U)); }

// The key of one tensor's step: step is the count after this step's increment.
FT_HD uint32_t sr_key(uint32_t seed, float step, uint32_t tensor) {
  return sr_mix(sr_mix(seed ^ sr_mix(static_cast<uint32_t>(step))) ^ (tensor * 0x9E3779B9U));
}

// The 16 random bits of element i for exp_avg_sq (SR_V) and for the param (SR_P).
constexpr uint32_t SR_V = 0x9E3779B1U, SR_P = 0x6A09E667U;  // golden ratio, sqrt(2) - 1: even spreads
FT_HD uint32_t sr_bits(uint32_t key, int64_t i, uint32_t mult) {
  const uint64_t u = static_cast<uint64_t>(i);
  return ((key ^ static_cast<uint32_t>(u) ^ (static_cast<uint32_t>(u >> 32) * 0xC2B2AE35U)) * mult) >> 16;
}

FT_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

FT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// x rounded stochastically with 16 random bits to a bf16 value (returned as the fp32 that holds
// it exactly, so the caller's usual store converts it without a second rounding); NaN stays NaN.
FT_HD float sr_round(float x, uint32_t bits16) {
  const float r = bits_float((float_bits(x) + bits16) & 0xFFFF0000U);
  return x != x ? x : r;  // a select (a branch here kept the CUDA kernel's arrays in local memory)
}

#if defined(FT_ADAM_WITH_ATEN_VEC) && !defined(__CUDACC__)
inline namespace CPU_CAPABILITY {
// The same on vectors of the elements i0, i0 + 1, ... (i0 a multiple of the vector width, so
// the vector never straddles a multiple of 2^32).
inline at::vec::Vectorized<int32_t> sr_srl(const at::vec::Vectorized<int32_t>& x, int n) {
  using IV = at::vec::Vectorized<int32_t>;
  return (x >> IV(n)) & IV(static_cast<int32_t>((1U << (32 - n)) - 1));  // logical shift
}
inline at::vec::Vectorized<int32_t> sr_mix(at::vec::Vectorized<int32_t> x) {
  using IV = at::vec::Vectorized<int32_t>;
  x = x ^ sr_srl(x, 16);
  x = x * IV(static_cast<int32_t>(0x7feb352dU));
  x = x ^ sr_srl(x, 15);
  x = x * IV(static_cast<int32_t>(0x846ca68bU));
  return x ^ sr_srl(x, 16);
}
inline at::vec::Vectorized<int32_t> sr_bits_vec(uint32_t key, int64_t i0, uint32_t mult) {
  using IV = at::vec::Vectorized<int32_t>;
  const uint64_t u = static_cast<uint64_t>(i0);
  const uint32_t base = key ^ (static_cast<uint32_t>(u >> 32) * 0xC2B2AE35U);
  // the indices as a broadcast plus the constant 0, 1, ...: arange(i0, 1) is built lane by lane
  // (16 inserts on AVX-512), which made the bf16 step with stochastic rounding ~35% slower in
  // cache (standalone copy of the step, 1M params, 1 thread: 1.05 -> 0.70 ns per element)
  const IV idx = IV(static_cast<int32_t>(static_cast<uint32_t>(u))) + IV::arange(0, 1);
  const IV x = IV(static_cast<int32_t>(base)) ^ idx;
  return sr_srl(x * IV(static_cast<int32_t>(mult)), 16);
}
inline at::vec::Vectorized<float> sr_round(const at::vec::Vectorized<float>& x, const at::vec::Vectorized<int32_t>& bits16) {
  using IV = at::vec::Vectorized<int32_t>;
  const IV r = (at::vec::cast<int32_t>(x) + bits16) & IV(static_cast<int32_t>(0xFFFF0000U));
  return at::vec::Vectorized<float>::blendv(at::vec::cast<float>(r), x, x != x);
}
}  // namespace CPU_CAPABILITY
#endif


// ---- 8-bit blockwise states (state_format="8bit"; docs/design.md §7, "8-bit moments") ----
// A state tensor of n elements is stored as n uint8 codes and one fp32 absmax per block of
// Q8_BLOCK consecutive elements (the block's largest |value|; blocks start at element 0 of the
// tensor, so they never cross tensors or FSDP shards). A code is a small float scaled so that
// the block's absmax is the largest magnitude:
//   exp_avg (signed): sign, 4 exponent and 3 mantissa bits with subnormals (as fp8 e4m3, but
//     every code a number): |code| = e ? 2^(e-1) (1 + f/8) : f/8, from 1/8 to Q8_SIGNED_MAX;
//     value = +-|code| * (absmax / Q8_SIGNED_MAX).
//   exp_avg_sq, max_exp_avg_sq (unsigned): 5 exponent and 3 mantissa bits, no zero:
//     code = 2^e (1 + f/8), from 1 to Q8_UNSIGNED_MAX; value = code * (absmax / Q8_UNSIGNED_MAX),
//     0 only in a block whose absmax is 0.
// Why these maps (bitsandbytes' "dynamic" map is a table of 256 decimal values): equal relative
// precision (3 mantissa bits: at most 1/16 off) over 18 binades for exp_avg and 31 for
// exp_avg_sq (whose values are squares: twice the range in log space), encoded and decoded with
// a few integer operations instead of a search in a table; and no zero code for exp_avg_sq, so
// that a small v never decodes to 0 under a nonzero m (the "zero-point" failure of 4-bit Adam,
// Li et al. 2023: the update m / (sqrt(v) + eps) would explode); 2^-31 of the block's v
// (2^-15.5 of its sqrt) decodes to at least that, which only shortens a tiny element's step.
// Rounding is to the nearest code (ties to even mantissa). exp_avg's magnitude bits are those of
// an fp16 (exponent bias 15, subnormals included) times 2^14: the CPU kernel decodes them with
// F16C's conversion (csrc/cpu/vec_io.h). A block whose absmax is not finite
// decodes as non-finite (NaN, or inf), as an fp32 state holding a NaN would; its codes are 0.
constexpr int64_t Q8_BLOCK = 256;
constexpr float Q8_SIGNED_MAX = 30720.f;          // 2^14 * 1.875
constexpr float Q8_UNSIGNED_MAX = 4026531840.f;   // 2^31 * 1.875

// The multiplier of a block's values before encoding: qmax / absmax, 0 for an absmax of 0 or NaN.
FT_HD float q8_inv(float absmax, float qmax) {
  return absmax > 0.f ? fminf(qmax / absmax, 3.4028234663852886e38f) : 0.f;
}
// The multiplier of a block's decoded magnitudes: absmax / qmax.
FT_HD float q8_scale(float absmax, float qmax) { return absmax / qmax; }

// The top 12 bits of an fp32 bit pattern rounded at its 3rd mantissa bit (to nearest even).
FT_HD uint32_t q8_round3(uint32_t b) { return (b + 0x7FFFFu + ((b >> 20) & 1u)) >> 20; }

// 8x rounded to the nearest integer (ties to even) for 0 <= x < 2^20: added to 1.5 * 2^23,
// whose ulp is 1, it lands on the integer (one rounding: 8x is exact); the low bits are it.
FT_HD uint32_t q8_round8x(float x) { return float_bits(x * 8.f + 12582912.f) - 0x4B400000u; }

// value's exp_avg code with inv = q8_inv(absmax, Q8_SIGNED_MAX).
FT_HD uint32_t q8_encode_signed(float value, float inv) {
  const float x = fabsf(value) * inv;
  // below 1 the codes are f/8: f = 8x rounded (8 is the code of 1)
  uint32_t mag = x < 1.f ? q8_round8x(x) : q8_round3(float_bits(x)) - (126u << 3);
  mag = x != x ? 0u : (mag > 127u ? 127u : mag);
  return mag | (value < 0.f ? 0x80u : 0u);
}
FT_HD float q8_decode_signed(uint32_t code, float scale) {
  const uint32_t c = code & 0x7Fu;
  const float m = bits_float((c << 20) + (126u << 23));  // 2^(e-1) (1 + f/8)
  const float mag = c < 8u ? m * 2.f - 1.f : m;           // e = 0: f/8 = (1 + f/8) - 1, exact
  return (code & 0x80u ? -mag : mag) * scale;
}
// value's exp_avg_sq code with inv = q8_inv(absmax, Q8_UNSIGNED_MAX) (value >= 0).
FT_HD uint32_t q8_encode_unsigned(float value, float inv) {
  const float x = value * inv;
  const uint32_t c = q8_round3(float_bits(x)) - (127u << 3);
  return x > 1.f ? (c > 255u ? 255u : c) : 0u;  // below the smallest code, and NaN: code 0
}
FT_HD float q8_decode_unsigned(uint32_t code, float scale) {
  return bits_float((code << 20) + (127u << 23)) * scale;  // 2^e (1 + f/8)
}

#if defined(FT_ADAM_WITH_ATEN_VEC) && !defined(__CUDACC__)
inline namespace CPU_CAPABILITY {
// The same on vectors (codes as int32 lanes). q8_round3 less (e << 3): for the bit patterns of
// x >= 1 (positive as int32, so the arithmetic shifts are logical ones); others are masked off.
inline at::vec::Vectorized<int32_t> q8_round3_less(const at::vec::Vectorized<int32_t>& b, int32_t e) {
  using IV = at::vec::Vectorized<int32_t>;
  return (b + IV(0x7FFFF - (e << 23)) + ((b >> IV(20)) & IV(1))) >> IV(20);
}
inline at::vec::Vectorized<int32_t> q8_encode_signed(const at::vec::Vectorized<float>& value, float inv) {
  using FV = at::vec::Vectorized<float>;
  using IV = at::vec::Vectorized<int32_t>;
  const FV x = value.abs() * FV(inv);
  const IV sub = at::vec::cast<int32_t>(x * FV(8.f) + FV(12582912.f)) - IV(0x4B400000);
  const IV norm = at::vec::minimum(q8_round3_less(at::vec::cast<int32_t>(x), 126), IV(127));
  IV mag = IV::blendv(norm, sub, at::vec::cast<int32_t>(x < FV(1.f)));
  mag = mag & ~at::vec::cast<int32_t>(x != x);
  return mag | (at::vec::cast<int32_t>(value < FV(0.f)) & IV(0x80));
}
inline at::vec::Vectorized<int32_t> q8_encode_unsigned(const at::vec::Vectorized<float>& value, float inv) {
  using FV = at::vec::Vectorized<float>;
  using IV = at::vec::Vectorized<int32_t>;
  const FV x = value * FV(inv);
  const IV c = at::vec::minimum(q8_round3_less(at::vec::cast<int32_t>(x), 127), IV(255));
  return c & at::vec::cast<int32_t>(x > FV(1.f));
}
inline at::vec::Vectorized<float> q8_decode_unsigned(const at::vec::Vectorized<int32_t>& code, float scale) {
  using FV = at::vec::Vectorized<float>;
  using IV = at::vec::Vectorized<int32_t>;
  return at::vec::cast<float>((code << IV(20)) + IV(127 << 23)) * FV(scale);
}
}  // namespace CPU_CAPABILITY
#endif

}  // namespace adam
}  // namespace fusedtrain
