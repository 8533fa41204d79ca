#pragma once
// Host-side type dispatch for the BCE kernels (CPU and CUDA): the storage dtype of input
// (scalar_t), of target and of the 'none' loss, each either scalar_t or its opmath type
// (float for fp16/bf16/fp32, double for fp64), and whether pos_weight is present.
// fusedtrain/ops/bce.py converts anything else before calling the op.
#include <type_traits>

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

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

}  // namespace bce
}  // namespace fusedtrain
