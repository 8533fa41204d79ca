#pragma once
// Host-side type dispatch for the BCE kernels (CPU and CUDA): the storage dtype of input
// (scalar_t), of target and of the 'none' loss, each either scalar_t or its opmath type
// (float for fp16/bf16/fp32, double for fp64), and whether pos_weight is present.
// fusedtrain/ops/bce.py converts anything else before calling the op.
#include <type_traits>

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Half.h>

#include "fusedtrain/bce_math.h"

namespace fusedtrain {
namespace bce {

template <typename T>
struct Tag {
  using type = T;
};

template <typename T>
struct Opmath {
  using type = float;
};
template <>
struct Opmath<double> {
  using type = double;
};
template <typename T>
using opmath_t = typename Opmath<T>::type;

// f(Tag<scalar_t>, Tag<target_t>, Tag<out_t>, std::integral_constant<bool, HasPosWeight>)
template <typename scalar_t, typename F>
void dispatch_for(c10::ScalarType tgt, c10::ScalarType out, bool has_pw, const char* op, F&& f) {
  using op_t = opmath_t<scalar_t>;
  constexpr c10::ScalarType S = c10::CppTypeToScalarType<scalar_t>::value;
  constexpr c10::ScalarType O = c10::CppTypeToScalarType<op_t>::value;
  TORCH_CHECK(tgt == S || tgt == O, op, ": target dtype ", tgt, " must be ", S, " or ", O);
  TORCH_CHECK(out == S || out == O, op, ": out_dtype ", out, " must be ", S, " or ", O);
  auto go = [&](auto t, auto o) {
    if (has_pw)
      f(Tag<scalar_t>{}, t, o, std::true_type{});
    else
      f(Tag<scalar_t>{}, t, o, std::false_type{});
  };
  if constexpr (std::is_same_v<scalar_t, op_t>) {
    go(Tag<scalar_t>{}, Tag<scalar_t>{});
  } else {
    if (tgt == S && out == S)
      go(Tag<scalar_t>{}, Tag<scalar_t>{});
    else if (tgt == S)
      go(Tag<scalar_t>{}, Tag<op_t>{});
    else if (out == S)
      go(Tag<op_t>{}, Tag<scalar_t>{});
    else
      go(Tag<op_t>{}, Tag<op_t>{});
  }
}

template <typename F>
void dispatch(c10::ScalarType in, c10::ScalarType tgt, c10::ScalarType out, bool has_pw, const char* op, F&& f) {
  switch (in) {
    case c10::ScalarType::Float: return dispatch_for<float>(tgt, out, has_pw, op, f);
    case c10::ScalarType::Double: return dispatch_for<double>(tgt, out, has_pw, op, f);
    case c10::ScalarType::Half: return dispatch_for<c10::Half>(tgt, out, has_pw, op, f);
    case c10::ScalarType::BFloat16: return dispatch_for<c10::BFloat16>(tgt, out, has_pw, op, f);
    default: TORCH_CHECK(false, op, ": input dtype ", in, " is not supported (float32, float16, bfloat16, float64)");
  }
}

// The loss spec of an op call: kind and params = [label_smoothing, has_ignore, ignore_value,
// a, b, c] (csrc/ops.cpp). `generic` is false for plain BCE, whose kernels take the shorter
// path of the BCE formulas alone.
template <typename S>
Spec<S> spec_of(int64_t kind, c10::ArrayRef<double> params, const char* op) {
  TORCH_CHECK(kind >= kBCE && kind <= kASL, op, ": unknown loss kind ", kind);
  TORCH_CHECK(params.size() == 6, op, ": params must have 6 values, got ", params.size());
  auto small_int = [](double v) { return v >= 0 && v <= 8 && v == static_cast<int>(v) ? static_cast<int>(v) : -1; };
  return {static_cast<int>(kind), S(1 - params[0]), S(params[0] / 2), params[1] != 0, S(params[2]),
          S(params[3]),           S(params[4]),     S(params[5]),      small_int(params[3]),
          small_int(params[4])};
}

template <typename S>
bool is_generic(const Spec<S>& s) {
  return s.kind != kBCE || s.half_eps != S(0) || s.has_ignore;
}

// The layouts the kernels read (csrc/ops.cpp); ops/bce.py produces them, and these checks keep a
// direct call of the public op from reading out of bounds or a wrong element.
inline void check_layout(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& pos_weight, const char* op) {
  TORCH_CHECK(input.dim() == 2 && input.is_contiguous(), op, ": input must be a contiguous 2-D tensor, got shape ",
              input.sizes(), " strides ", input.strides());
  TORCH_CHECK(target.sizes() == input.sizes() && target.is_contiguous(), op,
              ": target must be contiguous with input's shape ", input.sizes(), ", got ", target.sizes());
  for (const auto* w : {&weight, &pos_weight}) {
    if (!w->has_value()) continue;
    const at::Tensor& t = **w;
    TORCH_CHECK(t.dim() == 2 && (t.size(0) == input.size(0) || t.size(0) == 1) &&
                    (t.size(1) == input.size(1) || t.size(1) == 1) && (t.size(1) == 1 || t.stride(1) <= 1),
                op, ": weight and pos_weight must be (R, C)-broadcastable views with stride(1) 0 or 1, got shape ",
                t.sizes(), " strides ", t.strides());
    TORCH_CHECK(t.scalar_type() == (input.scalar_type() == c10::ScalarType::Double ? c10::ScalarType::Double
                                                                                     : c10::ScalarType::Float),
                op, ": weight and pos_weight must be in opmath (float32; float64 for a float64 input), got ",
                t.scalar_type());
  }
}

inline void check_grad_output(const at::Tensor& go, const at::Tensor& input, int64_t reduction, const char* op) {
  const auto opmath = input.scalar_type() == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
  TORCH_CHECK(go.scalar_type() == opmath && go.is_contiguous(), op, ": grad_output must be contiguous ", opmath,
              ", got ", go.scalar_type());
  TORCH_CHECK(go.numel() == (reduction == 0 ? input.numel() : 1), op, ": grad_output must have ",
              reduction == 0 ? input.numel() : 1, " elements for reduction ", reduction, ", got ", go.numel());
}

}  // namespace bce
}  // namespace fusedtrain
