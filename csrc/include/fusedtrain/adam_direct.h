#pragma once
// fusedtrain::adam_'s CPU body reached without the dispatcher (csrc/module.cpp): the tensor
// lists as borrowed pointers (no per-tensor refcounting or list boxing per call).
#include <ATen/ATen.h>

#include <vector>

namespace fusedtrain {

struct PtrList {
  std::vector<const at::Tensor*> v;
  size_t size() const { return v.size(); }
  bool empty() const { return v.empty(); }
  const at::Tensor& operator[](size_t i) const { return *v[i]; }
};

void adam_cpu_direct(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
                     const PtrList& exp_avg_sqs, const PtrList& max_exp_avg_sqs, const PtrList& steps,
                     const PtrList& master_params, double lr, const at::Tensor* lr_tensor, double beta1,
                     double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                     bool decoupled_weight_decay, const at::Tensor* grad_mult, const at::Tensor* found_inf);

}  // namespace fusedtrain
