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
// The same math on at::vec::Vectorized<float> (the CPU kernels define FT_ADAM_WITH_ATEN_VEC
// and include ATen/cpu/vec/vec.h first).
inline at::vec::Vectorized<float> ft_sqrt(const at::vec::Vectorized<float>& x) { return x.sqrt(); }
inline at::vec::Vectorized<float> ft_max(const at::vec::Vectorized<float>& a,
                                         const at::vec::Vectorized<float>& b) {
  return at::vec::maximum(a, b);
}
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

}  // namespace adam
}  // namespace fusedtrain
