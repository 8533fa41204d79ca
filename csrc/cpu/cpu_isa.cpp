// Which copy of the CPU kernels runs (cpu_isa.h).
#include "cpu_isa.h"

#include <ATen/Version.h>

#include <string>

namespace fusedtrain {
namespace cpu_isa {

bool use_avx512() {
  // torch's choice, not the CPU's flags: ATEN_CPU_CAPABILITY=avx2 runs the AVX2 copy here too
  // (how the tests reach it on an AVX-512 machine)
  static const bool avx512 = FT_CPU_AVX512_BUILT && at::get_cpu_capability() == "AVX512";
  return avx512;
}

const char* name() {
#if defined(CPU_CAPABILITY_AVX2)
  return use_avx512() ? "AVX512" : "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace cpu_isa
}  // namespace fusedtrain
