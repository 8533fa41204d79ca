// The Python module fusedtrain._C: importing it loads the TORCH_LIBRARY registrations
// (csrc/ops.cpp and the kernel files), and it says how the extension was built.
#include <torch/extension.h>

#include <vector>

#include "cpu/cpu_isa.h"
#include "fusedtrain/adam_lists.h"
#include "fusedtrain/multi_tensor_tables.h"

// FUSEDTRAIN_BUILD_RECORD, the torch this build compiles against: written into the build's own
// include dir by fusedtrain/_build_spec.py (setup.py and `fusedtrain build` both go through it).
#if !__has_include("fusedtrain_build_record.h")
#error "fusedtrain_build_record.h is missing: build fusedtrain._C with setup.py (pip install --no-build-isolation .) or `fusedtrain build`, which generate it"
#endif
#include "fusedtrain_build_record.h"

namespace {

#ifdef FUSEDTRAIN_WITH_CUDA
#define FUSEDTRAIN_RECORD_CUDA_KERNELS "1"
#else
#define FUSEDTRAIN_RECORD_CUDA_KERNELS "0"
#endif
#if defined(CPU_CAPABILITY_AVX2) && FT_CPU_AVX512_BUILT
#define FUSEDTRAIN_RECORD_CPU "AVX2+AVX512"  // csrc/cpu/cpu_isa.h: a copy of the kernels for each
#elif defined(CPU_CAPABILITY_AVX2)
#define FUSEDTRAIN_RECORD_CPU "AVX2"
#else
#define FUSEDTRAIN_RECORD_CPU "DEFAULT"
#endif
// One string, magic prefix included, so that fusedtrain/_ext.py can read the record from the .so
// file before loading it (fusedtrain/_build_spec.py read_record): a build for another torch must
// be refused before its TORCH_LIBRARY registrations run. `used`: kept even if unreferenced.
#define FUSEDTRAIN_RECORD_MAGIC "fusedtrain-build-record:v1:"  // _build_spec.RECORD_MAGIC
__attribute__((used)) const char kBuildRecord[] =
    FUSEDTRAIN_RECORD_MAGIC FUSEDTRAIN_BUILD_RECORD ";cpu_capability=" FUSEDTRAIN_RECORD_CPU
    ";cuda_kernels=" FUSEDTRAIN_RECORD_CUDA_KERNELS;
constexpr size_t kRecordMagicLength = sizeof(FUSEDTRAIN_RECORD_MAGIC) - 1;

using Tensors = std::vector<at::Tensor>;

// fusedtrain::adam_'s list checks without running anything, for any device: the Python checks
// cost about 3 ms per step at 1000 params, this about 0.2 ms (fusedtrain/ops/adam.py calls it
// for the Triton and reference calls, and for every native call of a step after the first).
void adam_check_(const Tensors& params, const Tensors& grads, const Tensors& exp_avgs, const Tensors& exp_avg_sqs,
                 const Tensors& max_exp_avg_sqs, const Tensors& steps, const Tensors& master_params,
                 const Tensors& exp_avg_absmax, const Tensors& exp_avg_sq_absmax,
                 const Tensors& max_exp_avg_sq_absmax, bool amsgrad) {
  fusedtrain::adam::check_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params,
                                exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax, amsgrad);
}

// The rows table of lists (multi_tensor_tables.h) as an (n, len(lists) + 1) int64 tensor: the
// Triton kernels' (fusedtrain/triton/multi_tensor.py), without a Python call per tensor.
at::Tensor addresses(const std::vector<Tensors>& lists) {
  TORCH_CHECK(!lists.empty() && !lists[0].empty(), "addresses: no tensors");
  return fusedtrain::mta::rows_tensor(std::vector<at::TensorList>(lists.begin(), lists.end()));
}

// fusedtrain._C.TableOwner: Python code's owner of CUDA kernels' tables (fusedtrain/_tables.py):
// the calls made between __enter__ and __exit__ use tables it keeps (multi_tensor_tables.h).
struct TableOwner {
  fusedtrain::mta::KeptTables tables;
  std::vector<fusedtrain::mta::KeptTables*> previous;
};

#ifdef FUSEDTRAIN_WITH_CUDA
// The Triton kernels' tables reach the device the way the CUDA kernels' do (a CUDA graph
// being captured gets them in kernel parameters): fusedtrain/triton/multi_tensor.py.
at::Tensor upload_words(const at::Tensor& words, const at::Device& device) {
  TORCH_CHECK(words.device().is_cpu() && words.scalar_type() == at::kLong && words.dim() == 1 && words.is_contiguous(),
              "upload_words: words must be a contiguous 1-D int64 CPU tensor");
  return fusedtrain::mta::upload_words(words.data_ptr<int64_t>(), words.numel(), device);
}
#endif

}  // namespace

namespace fusedtrain {
void bind_adam_plan(pybind11::module_& m);  // csrc/adam_plan.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedtrain compiled kernels (ops are under torch.ops.fusedtrain)";
#ifdef FUSEDTRAIN_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.attr("cpu_capability") = FUSEDTRAIN_RECORD_CPU;  // the copies built
  // the copy the CPU ops run (torch's capability decides, csrc/cpu/cpu_isa.h)
  m.def("cpu_kernels", &fusedtrain::cpu_isa::name);
  m.attr("build_record") = kBuildRecord + kRecordMagicLength;  // "torch=...;cuda=...;..."
  m.def("adam_check_", &adam_check_);
  m.def("addresses", &addresses);
#ifdef FUSEDTRAIN_WITH_CUDA
  m.def("upload_words", &upload_words);
#endif
  fusedtrain::bind_adam_plan(m);
  pybind11::class_<TableOwner>(m, "TableOwner")
      .def(pybind11::init<>())
      .def("__enter__",
           [](TableOwner& o) {
             o.previous.push_back(fusedtrain::mta::current_owner());
             fusedtrain::mta::current_owner() = &o.tables;
           })
      .def("__exit__", [](TableOwner& o, const pybind11::args&) {
        TORCH_CHECK(!o.previous.empty(), "TableOwner.__exit__ without __enter__");
        fusedtrain::mta::current_owner() = o.previous.back();
        o.previous.pop_back();
      });
}
