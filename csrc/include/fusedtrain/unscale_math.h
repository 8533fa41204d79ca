#pragma once
// Per-element math of the unscale-and-check pass (fusedtrain::unscale_and_check_): the one
// source of truth that the C++ CPU kernels (csrc/cpu/unscale.cpp, instantiated for float and
// for at::vec::Vectorized<float>) and the CUDA kernels (csrc/cuda/unscale.cu, float) run.
// fusedtrain/triton/unscale.py mirrors it line by line.
//
// All arithmetic is fp32 whatever the storage dtype (docs/design.md §4); the
// unscaled value is rounded once, at the store. The unscale is a plain fp32 multiply by
// inv_scale, exactly what torch._amp_foreach_non_finite_check_and_unscale_ computes, so
// unscaled grads are bit-identical to torch's.
#include "fusedtrain/macros.h"

namespace fusedtrain {
namespace unscale {

// The unscaled value of a (scaled) gradient element x (already widened to fp32).
template <typename T>
FT_HD T unscaled(T x, T inv_scale) {
  return x * inv_scale;
}

// Non-finite probe: x * 0 is +-0 for every finite x (fp16's 65504 and fp32's FLT_MAX
// included) and NaN for +-inf and NaN. Summing probes gives a value that is NaN exactly
// when some element was inf or NaN; probe_found() tests it. Branch-free, so it vectorizes.
template <typename T>
FT_HD T probe_add(T acc, T x) {
  return acc + x * T(0.0f);
}

FT_HD bool probe_found(float acc) {
  return acc != acc;
}

// Sum-of-squares accumulation of the unscaled values (the L2 norm is sqrt of the total).
template <typename T>
FT_HD T square_add(T acc, T y) {
  return acc + y * y;
}

}  // namespace unscale
}  // namespace fusedtrain
