#pragma once
// Host-side checks and type dispatch of the many-label head's loss epilogue
// (fusedtrain::linear_bce_epilogue_, contract in csrc/ops.cpp `// ---- head`), shared by the
// CPU (csrc/cpu/head.cpp) and CUDA (csrc/cuda/head.cu) bodies. The per-element math is the
// BCE formulas of bce_math.h.
#include <optional>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "fusedtrain/bce_dispatch.h"

namespace fusedtrain {
namespace head {

using bce::Tag;

// The layouts the kernels read; fusedtrain/ops/head.py produces them, these checks keep a direct
// call of the public op from reading out of bounds.
inline void check_epilogue(const at::Tensor& logits, const std::optional<at::Tensor>& bias, const at::Tensor& target,
                           const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& label_weight,
                           const std::optional<at::Tensor>& unknown) {
  const char* op = "linear_bce_epilogue_";
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), op, ": logits must be a contiguous 2-D tensor, got shape ",
              logits.sizes(), " strides ", logits.strides());
  const int64_t C = logits.size(1);
  TORCH_CHECK(target.sizes() == logits.sizes() && (C <= 1 || target.stride(1) == 1), op,
              ": target must have logits' shape ", logits.sizes(), " and unit column stride, got ", target.sizes(),
              " strides ", target.strides());
  for (const auto* v : {&bias, &pos_weight, &label_weight}) {
    if (!v->has_value()) continue;
    const at::Tensor& t = **v;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.is_contiguous() && t.scalar_type() == c10::ScalarType::Float, op,
                ": bias, pos_weight and label_weight must be contiguous float32 of shape (", C, "), got ",
                t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(t.device() == logits.device(), op, ": every tensor must be on ", logits.device());
  }
  if (unknown.has_value()) {
    TORCH_CHECK(unknown->scalar_type() == c10::ScalarType::Bool && unknown->sizes() == logits.sizes() &&
                    (C <= 1 || unknown->stride(1) == 1),
                op, ": unknown must be bool with logits' shape and unit column stride, got ", unknown->scalar_type(), " ",
                unknown->sizes());
    TORCH_CHECK(unknown->device() == logits.device(), op, ": every tensor must be on ", logits.device());
  }
  TORCH_CHECK(target.device() == logits.device(), op, ": every tensor must be on ", logits.device());
}

template <typename F>
void dispatch_16(c10::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case c10::ScalarType::Float: return f(Tag<float>{});
    case c10::ScalarType::Half: return f(Tag<c10::Half>{});
    case c10::ScalarType::BFloat16: return f(Tag<c10::BFloat16>{});
    default: TORCH_CHECK(false, "linear_bce_epilogue_: ", what, " dtype ", t, " is not supported (float32, float16, bfloat16)");
  }
}

// f(Tag<logit_t>, Tag<target_t>, std::integral_constant<bool, HasPosWeight>)
template <typename F>
void dispatch(c10::ScalarType logits, c10::ScalarType target, bool has_pw, F&& f) {
  dispatch_16(logits, "logits", [&](auto l) {
    dispatch_16(target, "target", [&](auto t) {
      if (has_pw)
        f(l, t, std::true_type{});
      else
        f(l, t, std::false_type{});
    });
  });
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace head
}  // namespace fusedtrain
