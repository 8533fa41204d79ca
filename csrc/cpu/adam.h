#pragma once
// fusedtrain::adam_'s CPU body (csrc/cpu/adam.cpp), also bound as fusedtrain._C.adam_cpu_
// (csrc/module.cpp).
#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedtrain {

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
              at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList master_params, double lr,
              const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
              double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
              const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf);

}  // namespace fusedtrain
