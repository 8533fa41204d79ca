#pragma once
// Validation of fusedtrain::adam_'s tensor lists, shared by the CPU and CUDA bodies: every
// tensor is checked before anything is written, and an error names the list, the index and
// what was expected (fusedtrain/ops/adam.py leaves these checks to the op, where they cost
// nanoseconds per tensor, and repeats them in Python only for the Triton and reference ops).
#include <ATen/core/ATen_fwd.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "fusedtrain/adam_math.h"
#include "fusedtrain/versions.h"

#define FT_ADAM_CHECK(cond, ...) TORCH_CHECK(cond, "fusedtrain adam: ", __VA_ARGS__)

namespace fusedtrain {
namespace adam {

// The lists as the op takes them. Returns the state dtype of the call (uint8: 8-bit blockwise
// states, with one fp32 absmax tensor of Q8 blocks per state in the absmax lists).
inline at::ScalarType check_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                                  at::TensorList master_params, at::TensorList exp_avg_absmax,
                                  at::TensorList exp_avg_sq_absmax, at::TensorList max_exp_avg_sq_absmax,
                                  bool amsgrad) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
                    "fusedtrain adam: params, grads, exp_avgs, exp_avg_sqs, steps differ in length (", n, ", ",
                    grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size(), ")");
  TORCH_CHECK_VALUE(!amsgrad || max_exp_avg_sqs.size() == n, "fusedtrain adam: amsgrad needs one max_exp_avg_sq "
                    "per param (", max_exp_avg_sqs.size(), " for ", n, ")");
  TORCH_CHECK_VALUE(master_params.empty() || master_params.size() == n, "fusedtrain adam: master_params: ",
                    master_params.size(), " for ", n, " params");
  const bool q8 = n > 0 && exp_avgs[0].scalar_type() == at::kByte;
  const size_t na = q8 ? n : 0;  // absmax lists: one per param for 8-bit states, else empty
  TORCH_CHECK_VALUE(exp_avg_absmax.size() == na && exp_avg_sq_absmax.size() == na &&
                        max_exp_avg_sq_absmax.size() == (amsgrad ? na : 0),
                    "fusedtrain adam: exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax have lengths (",
                    exp_avg_absmax.size(), ", ", exp_avg_sq_absmax.size(), ", ", max_exp_avg_sq_absmax.size(),
                    "); expected ", na, " each", amsgrad ? "" : " (the last 0 without amsgrad)",
                    q8 ? " for 8-bit states" : ": they are for 8-bit (uint8) states only");
  if (n == 0) return at::kFloat;
  const auto dev = params[0].device();
  const auto pdt = params[0].scalar_type();
  const auto sdt = exp_avgs[0].scalar_type();
  const auto absmax = [&](const char* name, const at::Tensor& a, const at::Tensor& p, size_t i) {
    const int64_t blocks = (p.numel() + Q8_BLOCK - 1) / Q8_BLOCK;
    FT_ADAM_CHECK(a.layout() == at::kStrided && a.device() == dev && a.scalar_type() == at::kFloat &&
                      a.dim() == 1 && a.size(0) == blocks && a.is_contiguous(),
                  name, " of param ", i, " is ", a.scalar_type(), " ", a.sizes(), " on ", a.device(),
                  "; expected a contiguous float32 [", blocks, "] on ", dev, " (one per block of ", Q8_BLOCK,
                  " elements)");
  };
  const auto state = [&](const char* name, const at::Tensor& s, const at::Tensor& p, size_t i, at::ScalarType dt) {
    FT_ADAM_CHECK(s.layout() == at::kStrided && s.device() == dev && s.scalar_type() == dt && s.sizes() == p.sizes(),
                  name, " of param ", i, " is ", s.scalar_type(), " ", s.sizes(), " on ", s.device(), "; expected ",
                  dt, " ", p.sizes(), " on ", dev);
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    FT_ADAM_CHECK(p.device() == dev, "param ", i, " is on ", p.device(), ", param 0 on ", dev,
                  ": one call takes one device");
    TORCH_CHECK_TYPE(p.scalar_type() == pdt, "fusedtrain adam: param ", i, " is ", p.scalar_type(), ", param 0 ",
                     pdt, ": one call takes one dtype");
    FT_ADAM_CHECK(g.layout() == at::kStrided, "Adam does not support sparse gradients, please consider SparseAdam "
                  "instead (param ", i, " has a ", g.layout(), " grad)");
    FT_ADAM_CHECK(g.device() == dev, "grad of param ", i, " is on ", g.device(), " but the param is on ", dev);
    FT_ADAM_CHECK(g.scalar_type() == pdt, "grad of param ", i, " is ", g.scalar_type(), " but the param is ", pdt);
    FT_ADAM_CHECK(g.sizes() == p.sizes(), "grad of param ", i, " has shape ", g.sizes(), " but the param ",
                  p.sizes());
    FT_ADAM_CHECK(steps[i].device() == dev && steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1,
                  "step of param ", i, " must be a one-element fp32 tensor on ", dev, ", got ",
                  steps[i].scalar_type(), " on ", steps[i].device());
    state("exp_avg", exp_avgs[i], p, i, sdt);
    state("exp_avg_sq", exp_avg_sqs[i], p, i, sdt);
    if (amsgrad) state("max_exp_avg_sq", max_exp_avg_sqs[i], p, i, sdt);
    if (!master_params.empty()) state("master param", master_params[i], p, i, at::kFloat);
    if (q8) {
      absmax("exp_avg_absmax", exp_avg_absmax[i], p, i);
      absmax("exp_avg_sq_absmax", exp_avg_sq_absmax[i], p, i);
      if (amsgrad) absmax("max_exp_avg_sq_absmax", max_exp_avg_sq_absmax[i], p, i);
    }
  }
  const bool low = pdt == at::kHalf || pdt == at::kBFloat16;
  // bf16 or 8-bit states for any param dtype: the optimizers' state_format="bf16"/"8bit" (lean state)
  TORCH_CHECK_TYPE(sdt == pdt || (sdt == at::kFloat && low) || sdt == at::kBFloat16 || sdt == at::kByte,
                   "fusedtrain adam: states must be in the param dtype, fp32, bf16 or uint8 (8-bit) (params ", pdt,
                   ", states ", sdt, ")");
  TORCH_CHECK_TYPE(master_params.empty() || (low && sdt != at::kHalf),
                   "fusedtrain adam: master_params are for fp16/bf16 params with fp32, bf16 or 8-bit states");
  return sdt;
}

// The one-element fp32 scalars (lr_tensor, grad_mult, found_inf) on the call's device.
inline void check_scalar(const char* name, const std::optional<at::Tensor>& t, c10::Device dev) {
  if (!t) return;
  FT_ADAM_CHECK(t->device() == dev && t->scalar_type() == at::kFloat && t->numel() == 1, name,
                " must be a one-element fp32 tensor on ", dev, ", got ", t->scalar_type(), " ", t->sizes(), " on ",
                t->device());
}

// The kernels take contiguous tensors. A strided view (the functional adam_ accepts one) is
// updated in a contiguous copy that write_back() copies into it after the kernel.
class Contiguous {
 public:
  // `l` itself when every tensor is contiguous, else a list with copies for the others.
  at::TensorList operator()(at::TensorList l, bool written) {
    bool all = true;
    for (const auto& t : l) all = all && t.is_contiguous();
    if (all) return l;
    std::vector<at::Tensor>& v = owned_.emplace_back();
    for (const auto& t : l) {
      v.push_back(t.contiguous());
      if (written && !t.is_contiguous()) back_.emplace_back(t, v.back());
    }
    return v;  // the vector's buffer outlives this object's moves of owned_
  }
  void write_back() {
    const at::NoGradGuard no_grad;  // an update in place of a leaf, as the kernel's own writes
    for (auto& [t, c] : back_) t.copy_(c);
  }

 private:
  std::vector<std::vector<at::Tensor>> owned_;
  std::vector<std::pair<at::Tensor, at::Tensor>> back_;
};

// After a step: the version counters of what it wrote (versions.h), the op's mutated lists.
inline void bump_written(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                         at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList master_params,
                         at::TensorList exp_avg_absmax = {}, at::TensorList exp_avg_sq_absmax = {},
                         at::TensorList max_exp_avg_sq_absmax = {}) {
  for (at::TensorList l : {params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, exp_avg_absmax,
                           exp_avg_sq_absmax, max_exp_avg_sq_absmax})
    bump_versions(l);
}

// Stochastic rounding of the params (bf16 params without master copies) and/or of exp_avg_sq
// (bf16 states); sr_seed is a 32-bit seed.
inline void check_sr(int64_t sr_seed, bool sr_params, bool sr_exp_avg_sq, at::TensorList params,
                     at::TensorList exp_avgs, at::TensorList master_params) {
  if (!(sr_params || sr_exp_avg_sq) || params.empty()) return;
  TORCH_CHECK_VALUE(sr_seed >= 0 && sr_seed <= 0xFFFFFFFFLL, "fusedtrain adam: sr_seed must be in [0, 2**32), got ",
                    sr_seed);
  TORCH_CHECK_VALUE(!sr_params || (params[0].scalar_type() == at::kBFloat16 && master_params.empty() &&
                                     (exp_avgs[0].scalar_type() == at::kBFloat16 ||
                                      exp_avgs[0].scalar_type() == at::kByte)),
                    "fusedtrain adam: stochastic rounding of the params is for bf16 params with bf16 or 8-bit states "
                    "and without master weights, got ", params[0].scalar_type(), " params, ",
                    exp_avgs[0].scalar_type(), " states", master_params.empty() ? "" : ", master weights");
  TORCH_CHECK_VALUE(!sr_exp_avg_sq || exp_avgs[0].scalar_type() == at::kBFloat16,
                    "fusedtrain adam: stochastic rounding of exp_avg_sq is for bf16 states, got ",
                    exp_avgs[0].scalar_type());
}

}  // namespace adam
}  // namespace fusedtrain
