#pragma once
// BCE with logits, per element: the one source of truth for the C++ CPU kernel (scalar and
// at::vec::Vectorized<float/double>) and the CUDA kernel (float/double scalars).
// fusedtrain/triton/bce.py spells out the same formulas in Triton, and
// fusedtrain/reference.py in PyTorch ops.
//
// With e = exp(-|x|), L = log1p(e) (log1p_unit below), softplus(-x) = L + max(-x, 0) = -log sigmoid(x):
//   lw   = 1 + (pos_weight - 1) * y                       (lw = 1 without pos_weight)
//   loss = w * ((1 - y) * x + lw * softplus(-x))  (evaluated regrouped: see loss())
//   dx   = w * (lw * sigmoid(x) - pos_weight * y)          (w * (sigmoid(x) - y) without)
//   dy   = w * (pos_weight * softplus(-x) - softplus(x))   (w * -x without)
// The gradients are evaluated in the backward from the saved inputs, multiplied there by
// grad_output (times 1/N for 'mean') in opmath and rounded once to the storage dtype: a
// gradient stored in fp16 and scaled afterwards would round twice (see docs/design.md).
// sigmoid(x) comes from the same e (see input_grad()): never log(sigmoid(x)), never exp of a
// positive number, so every finite x gives a finite result (fp16 +-65504 included). For +-inf
// the formulas give torch's values (e.g. x = +inf, y = 1: (1 - y) * x = 0 * inf = NaN, as
// torch gives); NaN in -> NaN out.
//
// Callers pass opmath values (float for fp32/fp16/bf16 storage, double for fp64) and round once
// when they store.
#include <cmath>

#include "fusedtrain/macros.h"

#if !defined(__CUDACC__) && !defined(__HIPCC__)
#include <ATen/cpu/vec/vec.h>
#endif

namespace fusedtrain {
namespace bce {

// ---- primitives, overloaded for every type the formulas run on ----
FT_HD float ft_exp(float v) { return ::expf(v); }
FT_HD double ft_exp(double v) { return ::exp(v); }
FT_HD float ft_log1p(float v) { return ::log1pf(v); }
FT_HD double ft_log1p(double v) { return ::log1p(v); }
FT_HD float ft_abs(float v) { return ::fabsf(v); }
FT_HD double ft_abs(double v) { return ::fabs(v); }
template <typename T>
FT_HD T ft_relu(T v) { return v > T(0) ? v : T(0); }
// x >= 0 ? a : b
template <typename T>
FT_HD T ft_select_nonneg(T x, T a, T b) { return x >= T(0) ? a : b; }

#if !defined(__CUDACC__) && !defined(__HIPCC__)
template <typename S>
inline at::vec::Vectorized<S> ft_exp(const at::vec::Vectorized<S>& v) { return v.exp(); }
template <typename S>
inline at::vec::Vectorized<S> ft_log1p(const at::vec::Vectorized<S>& v) { return v.log1p(); }
template <typename S>
inline at::vec::Vectorized<S> ft_abs(const at::vec::Vectorized<S>& v) { return v.abs(); }
template <typename S>
inline at::vec::Vectorized<S> ft_relu(const at::vec::Vectorized<S>& v) {
  return at::vec::maximum(v, at::vec::Vectorized<S>(S(0)));
}
template <typename S>
inline at::vec::Vectorized<S> ft_select_nonneg(const at::vec::Vectorized<S>& x, const at::vec::Vectorized<S>& a,
                                               const at::vec::Vectorized<S>& b) {
  // blendv takes the second operand where the mask is set
  return at::vec::Vectorized<S>::blendv(b, a, x >= at::vec::Vectorized<S>(S(0)));
}
#endif

// log1p(e) for e = exp(-|x|) in [0, 1]. float: 2 * atanh(s) with s = e / (2 + e) in [0, 1/3],
// the series 2s (1 + s^2/3 + ... + s^14/15) (truncation < 2e-8 relative, about half the cost
// of Sleef's general log1pf on AVX2, same ~1 ulp accuracy). double: the library log1p.
template <typename T>
FT_HD T log1p_unit_series(T e) {
  const T s = e / (T(2) + e);
  const T s2 = s * s;
  T p = T(1.0f / 15.0f);
  p = p * s2 + T(1.0f / 13.0f);
  p = p * s2 + T(1.0f / 11.0f);
  p = p * s2 + T(1.0f / 9.0f);
  p = p * s2 + T(1.0f / 7.0f);
  p = p * s2 + T(1.0f / 5.0f);
  p = p * s2 + T(1.0f / 3.0f);
  p = p * s2 + T(1.0f);
  return (s + s) * p;
}
FT_HD float log1p_unit(float e) { return log1p_unit_series(e); }
FT_HD double log1p_unit(double e) { return ft_log1p(e); }
#if !defined(__CUDACC__) && !defined(__HIPCC__)
inline at::vec::Vectorized<float> log1p_unit(const at::vec::Vectorized<float>& e) { return log1p_unit_series(e); }
inline at::vec::Vectorized<double> log1p_unit(const at::vec::Vectorized<double>& e) { return e.log1p(); }
#endif

// ---- the formulas ----

// Each formula takes e = exp(-|x|) from its caller, so that one exp serves both the loss and
// the input gradient where a kernel computes both (the CPU forward with a unit gradient).

// loss of one element (before the 1/N of 'mean').
template <bool HasPosWeight, typename T>
FT_HD T loss_e(T x, T y, T w, T pw, T e) {
  const T one(1);
  const T l = log1p_unit(e);
  // (1 - y) * x + lw * softplus(-x), regrouped so that no two large terms cancel: for x >= 0
  // it is lw * L + (1 - y) * x, for x < 0 it is lw * L - pos_weight * y * x (both sums of
  // non-negative terms for y in [0, 1]). That keeps fp32 accuracy for large |x| and no
  // intermediate overflows before the result does. (x - x) is 0 for finite x and NaN for
  // x = -inf, where torch's ungrouped formula gives inf - inf = NaN.
  const T ypw = HasPosWeight ? pw * y : y;
  const T tail = ft_select_nonneg(x, (one - y) * x, (x - x) - ypw * x);
  if (HasPosWeight) return w * ((one + (pw - one) * y) * l + tail);
  return w * (l + tail);
}

// d loss / d x of one element (before the 1/N of 'mean' and grad_output).
// lw * sigmoid(x) - pos_weight * y with sigmoid(x) = 1 - e r (x >= 0) or e r (x < 0),
// r = 1 / (1 + e), regrouped as (1 - y) - lw e r (x >= 0) and lw e r - pos_weight y (x < 0):
// no cancellation for hard labels (sigmoid(x) - 1 for y = 1 and large x is -e r, exactly the
// small number it should be, where the plain form loses every digit).
template <bool HasPosWeight, typename T>
FT_HD T input_grad_e(T x, T y, T w, T pw, T e) {
  const T one(1);
  const T er = e / (one + e);
  if (HasPosWeight) {
    const T lwer = (one + (pw - one) * y) * er;
    return w * ft_select_nonneg(x, (one - y) - lwer, lwer - pw * y);
  }
  return w * ft_select_nonneg(x, (one - y) - er, er - y);
}

template <typename T>
FT_HD T exp_neg_abs(T x) { return ft_exp(T(0) - ft_abs(x)); }

template <bool HasPosWeight, typename T>
FT_HD T loss(T x, T y, T w, T pw) { return loss_e<HasPosWeight>(x, y, w, pw, exp_neg_abs(x)); }

template <bool HasPosWeight, typename T>
FT_HD T input_grad(T x, T y, T w, T pw) { return input_grad_e<HasPosWeight>(x, y, w, pw, exp_neg_abs(x)); }

// d loss / d target of one element (before the 1/N of 'mean' and grad_output):
// pos_weight * softplus(-x) - softplus(x) = (pos_weight - 1) L - (x >= 0 ? x : pos_weight x),
// exactly -x for pos_weight = 1 (the two L terms of the plain form would not cancel exactly).
template <bool HasPosWeight, typename T>
FT_HD T target_grad(T x, T w, T pw) {
  if (HasPosWeight) {
    const T l = log1p_unit(ft_exp(T(0) - ft_abs(x)));
    return w * ((pw - T(1)) * l - ft_select_nonneg(x, x, pw * x));
  }
  return w * (T(0) - x);
}

}  // namespace bce
}  // namespace fusedtrain
