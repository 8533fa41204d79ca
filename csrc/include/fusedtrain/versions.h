#pragma once
// In-place ops bump the version counter of what they write, so that autograd refuses a
// backward through a graph that saved a tensor since written (torch's optimizers do: a
// backward after optimizer.step() through the old graph raises instead of silently using the
// new params). The ops' C++ bodies call this for every tensor they mutate: they are
// registered without an ADInplaceOrView kernel, and an AdamPlan calls them below it.
#include <ATen/core/Tensor.h>

namespace fusedtrain {

inline void bump_versions(at::TensorList tensors) {
  // inference tensors track no version (torch's in-place ops skip them too); a normal tensor
  // written inside inference_mode is bumped, as torch's in-place ops do
  for (const at::Tensor& t : tensors)
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace fusedtrain
