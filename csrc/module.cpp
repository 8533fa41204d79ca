// The Python module fusedtrain._C: importing it loads the TORCH_LIBRARY registrations.
#include <torch/extension.h>

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
}
