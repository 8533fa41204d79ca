// The Python module fusedtrain._C: importing it loads the TORCH_LIBRARY registrations
// (csrc/ops.cpp and the kernel files), and it says how the extension was built.
#include <torch/extension.h>

#include <vector>

#include "cpu/adam.h"
#include "fusedtrain/adam_lists.h"

namespace {

using Tensors = std::vector<at::Tensor>;

// Whether the dispatcher would only call the kernel: no tensor routes through Python (a
// subclass, a fake or functional tensor).
bool plain(const Tensors& l) {
  for (const auto& t : l) {
    const auto keys = t.key_set();
    if (keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::Functionalize)) return false;
  }
  return true;
}

// fusedtrain::adam_ on CPU tensors without the dispatcher: fusedtrain/ops/adam.py calls it
// for plain CPU tensors outside torch.compile. Boxing seven lists of 1000 tensors through the
// dispatcher costs about 0.3 ms more per step than pybind's list conversion, a sixth of a
// 1000x4096 fp32 step (benchmark row "host: kernel call, 1000 params of 4",
// fusedtrain/benchmarks/adam.py).
// Returns false, having done nothing, when some tensor needs the dispatcher.
bool adam_cpu_(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs, const Tensors& exp_avg_sqs,
               const Tensors& max_exp_avg_sqs, const Tensors& steps, const Tensors& master_params, double lr,
               const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
               double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
               const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf) {
  for (const Tensors* l : {&params, &grads, &exp_avgs, &exp_avg_sqs, &max_exp_avg_sqs, &steps, &master_params})
    if (!plain(*l)) return false;
  TORCH_CHECK(params.empty() || params[0].device().is_cpu(), "fusedtrain._C.adam_cpu_ takes CPU tensors");
  pybind11::gil_scoped_release no_gil;
  fusedtrain::adam_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, lr, lr_tensor,
                       beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_mult,
                       found_inf);
  return true;
}

// fusedtrain::adam_'s list checks without running anything, for any device: the Python checks
// cost about 3 ms per step at 1000 params, this about 0.2 ms (fusedtrain/ops/adam.py calls it
// for the Triton and reference calls, and for every native call of a step after the first).
void adam_check_(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs, const Tensors& exp_avg_sqs,
                 const Tensors& max_exp_avg_sqs, const Tensors& steps, const Tensors& master_params, bool amsgrad) {
  fusedtrain::adam::check_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, amsgrad);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedtrain compiled kernels (ops are under torch.ops.fusedtrain)";
#ifdef FUSEDTRAIN_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
#if defined(CPU_CAPABILITY_AVX2)
  m.attr("cpu_capability") = "AVX2";
#else
  m.attr("cpu_capability") = "DEFAULT";
#endif
  m.def("adam_cpu_", &adam_cpu_);
  m.def("adam_check_", &adam_check_);
}
