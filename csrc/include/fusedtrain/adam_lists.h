#pragma once
// The checks the CPU and CUDA Adam bodies share. Not user-input validation
// (fusedtrain/ops/adam.py does that); only what keeps a kernel from reading or writing out
// of bounds. L: at::TensorList or any list type with size()/empty() and [i] -> Tensor.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fusedtrain {
namespace adam {

template <typename L>
inline void check_list_lengths(const L& params, const L& grads, const L& exp_avgs, const L& exp_avg_sqs,
                               const L& max_exp_avg_sqs, const L& steps, const L& master_params, bool amsgrad) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "adam_: tensor lists of different lengths");
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n, "adam_: amsgrad needs max_exp_avg_sqs");
  TORCH_CHECK(master_params.empty() || master_params.size() == n, "adam_: master_params length");
}

// Tensor i of every list: contiguous, the call's dtypes (pdt params/grads, sdt states),
// one size, an fp32 one-element step. Devices are the CUDA body's own check.
template <typename L>
inline void check_tensor(size_t i, const L& params, const L& grads, const L& exp_avgs, const L& exp_avg_sqs,
                         const L& max_exp_avg_sqs, const L& steps, const L& master_params, at::ScalarType pdt,
                         at::ScalarType sdt, bool amsgrad) {
  const int64_t numel = params[i].numel();
  TORCH_CHECK(params[i].is_contiguous() && grads[i].is_contiguous() && exp_avgs[i].is_contiguous() &&
                  exp_avg_sqs[i].is_contiguous(), "adam_: tensors must be contiguous");
  TORCH_CHECK(params[i].scalar_type() == pdt && grads[i].scalar_type() == pdt &&
                  exp_avgs[i].scalar_type() == sdt && exp_avg_sqs[i].scalar_type() == sdt,
              "adam_: mixed dtypes in one call");
  TORCH_CHECK(grads[i].numel() == numel && exp_avgs[i].numel() == numel && exp_avg_sqs[i].numel() == numel,
              "adam_: sizes differ");
  TORCH_CHECK(steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1, "adam_: step must be fp32 scalar");
  if (amsgrad)
    TORCH_CHECK(max_exp_avg_sqs[i].is_contiguous() && max_exp_avg_sqs[i].numel() == numel &&
                    max_exp_avg_sqs[i].scalar_type() == sdt, "adam_: max_exp_avg_sq mismatch");
  if (!master_params.empty())
    TORCH_CHECK(master_params[i].scalar_type() == at::kFloat && master_params[i].is_contiguous() &&
                    master_params[i].numel() == numel, "adam_: master param mismatch");
}

// After the per-tensor checks: the state dtype the kernels accept for this call.
inline void check_state_dtype(at::ScalarType pdt, at::ScalarType sdt, bool master) {
  TORCH_CHECK(!master || sdt == at::kFloat, "adam_: master weights need fp32 states");
  TORCH_CHECK(sdt == pdt || sdt == at::kFloat, "adam_: states must be in the param dtype or fp32");
}

}  // namespace adam
}  // namespace fusedtrain
