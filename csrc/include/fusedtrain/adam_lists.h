#pragma once
// The list-length checks the CPU and CUDA Adam bodies share. Not user-input validation
// (fusedtrain/ops/adam.py does that); only what keeps a kernel from reading or writing out
// of bounds. L: at::TensorList or any list type with size()/empty().
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

}  // namespace adam
}  // namespace fusedtrain
