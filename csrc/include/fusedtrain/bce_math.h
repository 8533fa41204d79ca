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
// sigmoid(x) comes from the same e (see input_grad_e()): never log(sigmoid(x)), never exp of a
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
FT_HD float ft_log(float v) { return ::logf(v); }
FT_HD double ft_log(double v) { return ::log(v); }
FT_HD float ft_pow(float v, float g) { return ::powf(v, g); }
FT_HD double ft_pow(double v, double g) { return ::pow(v, g); }
// x >= 0 ? a : b
template <typename T>
FT_HD T ft_select_nonneg(T x, T a, T b) { return x >= T(0) ? a : b; }
// x > 0 ? a : b
template <typename T>
FT_HD T ft_select_pos(T x, T a, T b) { return x > T(0) ? a : b; }
// v^k for a small integer k >= 0 by multiplication (exact where pow is ~1 ulp; several times
// cheaper than a vector pow): the usual focusing exponents (2; ASL's 1 and 4)
template <typename T>
FT_HD T ft_ipow(T v, int k) {
  T r(1);
  for (int i = 0; i < k; ++i) r = r * v;
  return r;
}
// every label is 0 or 1 (ASL's per-element exponent is then one of the two integers)
FT_HD bool all_hard(float y) { return y == 0.0f || y == 1.0f; }
FT_HD bool all_hard(double y) { return y == 0.0 || y == 1.0; }
// u == v ? a : b
template <typename T>
FT_HD T ft_select_eq(T u, T v, T a, T b) { return u == v ? a : b; }

#if !defined(__CUDACC__) && !defined(__HIPCC__)
template <typename S>
inline at::vec::Vectorized<S> ft_exp(const at::vec::Vectorized<S>& v) { return v.exp(); }
template <typename S>
inline at::vec::Vectorized<S> ft_log1p(const at::vec::Vectorized<S>& v) { return v.log1p(); }
template <typename S>
inline at::vec::Vectorized<S> ft_abs(const at::vec::Vectorized<S>& v) { return v.abs(); }
template <typename S>
inline at::vec::Vectorized<S> ft_log(const at::vec::Vectorized<S>& v) { return v.log(); }
template <typename S>
inline at::vec::Vectorized<S> ft_pow(const at::vec::Vectorized<S>& v, const at::vec::Vectorized<S>& g) {
  return v.pow(g);
}
template <typename S>
inline at::vec::Vectorized<S> ft_select_pos(const at::vec::Vectorized<S>& x, const at::vec::Vectorized<S>& a,
                                            const at::vec::Vectorized<S>& b) {
  return at::vec::Vectorized<S>::blendv(b, a, x > at::vec::Vectorized<S>(S(0)));
}
template <typename S>
inline bool all_hard(const at::vec::Vectorized<S>& y) {
  using V = at::vec::Vectorized<S>;
  // zero_mask: a bit per lane that is 0; (y == 0) | (y == 1) is all-ones in the hard lanes
  return ((y == V(S(0))) | (y == V(S(1)))).zero_mask() == 0;
}
template <typename S>
inline at::vec::Vectorized<S> ft_select_eq(const at::vec::Vectorized<S>& u, const at::vec::Vectorized<S>& v,
                                           const at::vec::Vectorized<S>& a, const at::vec::Vectorized<S>& b) {
  return at::vec::Vectorized<S>::blendv(b, a, u == v);
}
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
FT_HD T log1p_series_poly(T s2) {
  T p = T(1.0f / 15.0f);
  p = p * s2 + T(1.0f / 13.0f);
  p = p * s2 + T(1.0f / 11.0f);
  p = p * s2 + T(1.0f / 9.0f);
  p = p * s2 + T(1.0f / 7.0f);
  p = p * s2 + T(1.0f / 5.0f);
  p = p * s2 + T(1.0f / 3.0f);
  p = p * s2 + T(1.0f);
  return p;
}
template <typename T>
FT_HD T log1p_unit_series(T e) {
  const T s = e / (T(2) + e);
  return (s + s) * log1p_series_poly(s * s);
}
FT_HD float log1p_unit(float e) { return log1p_unit_series(e); }
FT_HD double log1p_unit(double e) { return ft_log1p(e); }
#if !defined(__CUDACC__) && !defined(__HIPCC__)
inline at::vec::Vectorized<float> log1p_unit(const at::vec::Vectorized<float>& e) { return log1p_unit_series(e); }
inline at::vec::Vectorized<double> log1p_unit(const at::vec::Vectorized<double>& e) { return e.log1p(); }
#endif

// r = 1 / (1 + e), er = e / (1 + e) and l = log1p(e) of one e = exp(-|x|), for the family
// (sig_terms), from one division: d = 1 / ((1 + e)(2 + e)) gives r = (2 + e) d and the series'
// s = e / (2 + e) = e (1 + e) d. Up to 3 ulp in r and er and 5 in l (fp32, e in [0, 1]) where
// separate divisions give 1.5 and 3: within the gradients' error bound (fusedtrain/_compare.py).
// vdivps zmm issues once per 2.6 ns on the AVX-512 VM (five FMAs' time) and the family took
// three per element: in registers, focal with its target gradient 1.35 -> 1.20 ns per element.
// Plain BCE keeps its own divisions: its forward's unit gradient must be the backward's bits.
// double: the library log1p (r and er as for float).
template <typename T>
struct UnitTerms {
  T r, er, l;
};
template <typename T>
FT_HD T log1p_from_s(T s, T) { return (s + s) * log1p_series_poly(s * s); }
FT_HD double log1p_from_s(double, double e) { return ft_log1p(e); }
#if !defined(__CUDACC__) && !defined(__HIPCC__)
inline at::vec::Vectorized<double> log1p_from_s(const at::vec::Vectorized<double>&,
                                                 const at::vec::Vectorized<double>& e) {
  return e.log1p();
}
#endif
template <typename T>
FT_HD UnitTerms<T> unit_terms(T e) {
  const T one(1), a = one + e, b = T(2) + e;
  const T d = one / (a * b);
  const T r = b * d;
  return {r, e * r, log1p_from_s(e * a * d, e)};
}

// ---- the formulas ----

// Each formula takes e = exp(-|x|) from its caller, so that one exp serves both the loss and
// the input gradient where a kernel computes both (the CPU forward with a unit gradient).

// loss of one element (before the 1/N of 'mean'), from l = log1p(exp(-|x|)).
template <bool HasPosWeight, typename T>
FT_HD T loss_l(T x, T y, T w, T pw, T l) {
  const T one(1);
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

template <bool HasPosWeight, typename T>
FT_HD T loss_e(T x, T y, T w, T pw, T e) { return loss_l<HasPosWeight>(x, y, w, pw, log1p_unit(e)); }

// d loss / d x of one element (before the 1/N of 'mean' and grad_output).
// lw * sigmoid(x) - pos_weight * y with sigmoid(x) = 1 - e r (x >= 0) or e r (x < 0),
// r = 1 / (1 + e), regrouped as (1 - y) - lw e r (x >= 0) and lw e r - pos_weight y (x < 0):
// no cancellation for hard labels (sigmoid(x) - 1 for y = 1 and large x is -e r, exactly the
// small number it should be, where the plain form loses every digit).
// From er = e / (1 + e):
template <bool HasPosWeight, typename T>
FT_HD T input_grad_er(T x, T y, T w, T pw, T er) {
  const T one(1);
  if (HasPosWeight) {
    const T lwer = (one + (pw - one) * y) * er;
    return w * ft_select_nonneg(x, (one - y) - lwer, lwer - pw * y);
  }
  return w * ft_select_nonneg(x, (one - y) - er, er - y);
}
template <bool HasPosWeight, typename T>
FT_HD T input_grad_e(T x, T y, T w, T pw, T e) { return input_grad_er<HasPosWeight>(x, y, w, pw, e / (T(1) + e)); }

template <typename T>
FT_HD T exp_neg_abs(T x) { return ft_exp(T(0) - ft_abs(x)); }

// d loss / d target of one element (before the 1/N of 'mean' and grad_output):
// pos_weight * softplus(-x) - softplus(x) = (pos_weight - 1) L - (x >= 0 ? x : pos_weight x),
// exactly -x for pos_weight = 1 (the two L terms of the plain form would not cancel exactly).
// e is read only with pos_weight (callers without one may pass anything).
template <bool HasPosWeight, typename T>
FT_HD T target_grad_e(T x, T w, T pw, T e) {
  if (HasPosWeight) return w * ((pw - T(1)) * log1p_unit(e) - ft_select_nonneg(x, x, pw * x));
  return w * (T(0) - x);
}

// ---- the multi-label family: one element's loss and derivatives for every kind ----
//
// Spec describes the loss: kind, label smoothing (targets y become y (1 - eps) + eps / 2, the
// multi-label convention), an optional ignore value (targets equal to it give no loss and no
// gradient), and the kind's parameters. Per element, with p = sigmoid(x), q = sigmoid(-x),
// both from e = exp(-|x|) without cancellation, and sp(t) = softplus(t):
//   kBCE:   the formulas above (weight and pos_weight);
//   kFocal: torchvision's sigmoid_focal_loss, alpha_t * ce * m^gamma with ce = BCE(x, y),
//           m = 1 - p_t = p (1 - y) + q y (a sum of non-negative terms),
//           alpha_t = alpha y + (1 - alpha)(1 - y) (1 when alpha < 0);
//   kASL:   the asymmetric loss (Ridnik et al. 2021), A * B^gamma with
//           A = y sp(-x) + (1 - y) * (-log(min(q + clip, 1)))   (sp(x) when clip = 0),
//           B = y q + (1 - y) max(p - clip, 0),  gamma = gamma_pos y + gamma_neg (1 - y);
//           the paper's log(clamp(p, eps)) is replaced by the exact logit-space forms.
// B^gamma / B and m^gamma / m stand for B^(gamma - 1) and m^(gamma - 1), taken as 0 where the
// base is 0 (the derivative's other factor is 0 there); focal multiplies m^(gamma - 1) out for
// an integer gamma instead (0 for gamma = 0, and 1 at m = 0 for gamma = 1, where p q = 0 makes
// the term 0 for targets in [0, 1]). weight multiplies every kind.
enum Kind : int { kBCE = 0, kFocal = 1, kASL = 2 };

template <typename S>  // S: the opmath scalar (float or double)
struct Spec {
  int kind;
  S keep;      // 1 - label_smoothing
  S half_eps;  // label_smoothing / 2
  bool has_ignore;
  S ignore;
  S a, b, c;   // focal: alpha, gamma; asl: gamma_neg, gamma_pos, clip
  int a_int, b_int;  // a and b when they are integers in [0, 8], else -1 (ft_ipow)
};

// p, q, sp(-x), sp(x) of x from e = exp(-|x|), and for focal's BCE terms l = log1p(e) and
// er = e / (1 + e), all from unit_terms (focal with gamma = 0 is BCE within BCE's error bound,
// not to the bit)
template <typename T>
struct Sig {
  T p, q, spn, spp, er, l;
};
template <typename T>
FT_HD Sig<T> sig_terms(T x, T e) {
  const UnitTerms<T> u = unit_terms(e);
  return {ft_select_nonneg(x, u.r, u.er), ft_select_nonneg(x, u.er, u.r), u.l + ft_relu(T(0) - x),
          u.l + ft_relu(x), u.er, u.l};
}

// loss, d/dx, d/dy of the focal loss (before weight); ce, dce/dx from the BCE formulas
template <typename T, typename S>
FT_HD void focal(const Spec<S>& s, T x, T y, T e, T& loss_out, T& dx, T& dy, bool want_dy) {
  const T one(1), zero(0);
  const Sig<T> g = sig_terms(x, e);
  const T ce = loss_l<false>(x, y, one, one, g.l);
  const T dce = input_grad_er<false>(x, y, one, one, g.er);
  const T m = g.p * (one - y) + g.q * y;
  const T mg = s.b_int >= 0 ? ft_ipow(m, s.b_int) : ft_pow(m, T(s.b));
  // m^(gamma-1): multiplied out for an integer gamma (no division; gamma = 0 multiplies it by 0),
  // else m^gamma / m, 0 at m = 0. With the BCE terms taken from sig_terms instead of computing
  // their log1p and e / (1 + e) again: focal fwd+bwd 8192x1024 fp32 (AVX-512) 17.2-18.1 -> 15.4-15.9 ms.
  const T mg1 = s.b_int >= 1 ? ft_ipow(m, s.b_int - 1)
                : s.b_int == 0 ? zero
                               : ft_select_pos(m, mg / ft_select_pos(m, m, one), zero);
  const T at = s.a >= S(0) ? T(s.a) * y + T(S(1) - s.a) * (one - y) : one;
  const T dat = s.a >= S(0) ? T(S(2) * s.a - S(1)) : zero;
  loss_out = at * ce * mg;
  dx = at * (dce * mg + ce * T(s.b) * mg1 * (g.p * g.q) * (one - y - y));
  if (want_dy) dy = dat * ce * mg + at * ((T(0) - x) * mg + ce * T(s.b) * mg1 * (g.q - g.p));
}

// loss, d/dx, d/dy of the asymmetric loss (before weight)
template <typename T, typename S>
FT_HD void asl(const Spec<S>& s, T x, T y, T e, T& loss_out, T& dx, T& dy, bool want_dy) {
  const T one(1), zero(0);
  const Sig<T> g = sig_terms(x, e);
  const T clip(s.c);
  const T pq = g.p * g.q;
  T neg_log, dneg, pm, dpm;  // -log(min(q + clip, 1)) and its d/dx; max(p - clip, 0) and its d/dx
  if (s.c > S(0)) {
    const T over = g.p - clip;  // > 0 where q + clip < 1
    neg_log = ft_select_pos(over, zero - ft_log(g.q + clip), zero);
    dneg = ft_select_pos(over, pq / (g.q + clip), zero);
    pm = ft_select_pos(over, over, zero);
    dpm = ft_select_pos(over, pq, zero);
  } else {
    neg_log = g.spp;
    dneg = g.p;
    pm = g.p;
    dpm = pq;
  }
  const T gam = T(s.b) * y + T(s.a) * (one - y);
  const T A = y * g.spn + (one - y) * neg_log;
  const T B = y * g.q + (one - y) * pm;
  const T Bg = (s.a_int >= 0 && s.b_int >= 0 && all_hard(y))
                   ? ft_select_pos(y, ft_ipow(B, s.b_int), ft_ipow(B, s.a_int))
                   : ft_pow(B, gam);
  const T Bsafe = ft_select_pos(B, B, one);
  const T Bg1 = ft_select_pos(B, Bg / Bsafe, zero);  // B^(gamma-1), 0 at B = 0
  const T dA = (one - y) * dneg - y * g.q;
  const T dB = (one - y) * dpm - y * pq;
  loss_out = A * Bg;
  dx = dA * Bg + A * gam * Bg1 * dB;
  if (!want_dy) return;
  // d/dy: gamma, A and B depend on y
  const T dAy = g.spn - neg_log;
  const T dBy = g.q - pm;
  const T dBgy = ft_select_pos(B, Bg * (ft_log(Bsafe) * T(s.b - s.a) + gam * dBy / Bsafe), zero);
  dy = dAy * Bg + A * dBgy;
}

// elem's KIND when the kind is read from the Spec at run time
constexpr int kAnyKind = -1;

// One element of any kind, label smoothing and ignore value applied: loss, d loss / d x and
// d loss / d y (the derivative with respect to the raw target), each times the weight.
// want_dy: also d loss / d y (ASL's needs one more log; the forward and a backward without a
// target gradient skip it and leave dy 0).
// KIND: s.kind fixed at compile time (the CPU loops, one instantiation per kind: no branch on
// the kind per element and no other kind's registers; focal's backward at 8192x1024 bf16
// 6.2 -> 5.4 ms), or kAnyKind (read at run time).
template <bool HasPosWeight, int KIND = kAnyKind, typename T, typename S>
FT_HD void elem(const Spec<S>& s, T x, T y_raw, T w, T pw, T e, T& l, T& dx, T& dy, bool want_dy) {
  const int kind = KIND == kAnyKind ? s.kind : KIND;
  const T y = y_raw * T(s.keep) + T(s.half_eps);
  dy = T(0);
  if (kind == kFocal) {
    focal(s, x, y, e, l, dx, dy, want_dy);
  } else if (kind == kASL) {
    asl(s, x, y, e, l, dx, dy, want_dy);
  } else {
    l = loss_e<HasPosWeight>(x, y, T(1), pw, e);
    dx = input_grad_e<HasPosWeight>(x, y, T(1), pw, e);
    if (want_dy) dy = target_grad_e<HasPosWeight>(x, T(1), pw, e);
  }
  l = l * w;
  dx = dx * w;
  dy = dy * w * T(s.keep);
  if (s.has_ignore) {
    const T zero(0);
    l = ft_select_eq(y_raw, T(s.ignore), zero, l);
    dx = ft_select_eq(y_raw, T(s.ignore), zero, dx);
    dy = ft_select_eq(y_raw, T(s.ignore), zero, dy);
  }
}

}  // namespace bce
}  // namespace fusedtrain
