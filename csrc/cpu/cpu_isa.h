#pragma once
// The CPU kernels are compiled twice on x86-64: for AVX2 (the build's flags, _build_spec.py) and
// for AVX-512 (csrc/x86_avx512/<kernel>_avx512.cpp: this header first, then the same
// csrc/cpu/<kernel>.cpp). At each call the op runs the copy for the instruction set torch's own
// CPU kernels use (at::get_cpu_capability(): the CPU's best, or what ATEN_CPU_CAPABILITY lowers
// it to), so that we meet torch.compile and torch's fused ops at their own width. One source,
// two copies: at::vec picks its vector width from CPU_CAPABILITY, which this header sets for
// the AVX-512 copy (16 fp32 lanes instead of 8).
//
// The AVX-512 copy is a #pragma GCC target over the whole translation unit, i.e. what
// -mavx512f -mavx512bw -mavx512vl -mavx512dq would do for that one file (torch's flags for its
// AVX-512 kernels; setuptools and torch's JIT build give every source the same flags). Inline
// functions of shared headers that both copies emit are merged by the linker, which keeps the
// first: the x86_avx512/ objects are linked last (fusedtrain/_build_spec.py), so the kept copy
// is an AVX2 one that every CPU this build loads on can run (tests/test_cpu_isa.py checks the
// built library for AVX-512 code in a linker-merged function). A copy's internals are in
// anonymous namespaces (its own); its entry points in <family namespace>::<CPU_CAPABILITY>
// (AVX2, AVX512, or DEFAULT off x86-64), which the primary copy registers through cpu_isa::Pick.

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(CPU_CAPABILITY_AVX2)
#define FT_CPU_AVX512_BUILT 1  // this build has the AVX-512 copies (GCC: the pragma below)
#else
#define FT_CPU_AVX512_BUILT 0
#endif

#if defined(FT_CPU_AVX512_COPY) && FT_CPU_AVX512_BUILT
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12 reports the _mm512_undefined_* of its own AVX-512 intrinsics as uninitialized (`__Y`, in
// avx512fintrin.h) wherever one is inlined: ~2700 false warnings and 57k lines of inlining
// context per build. The AVX2 copy of the same source keeps these warnings for our code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// GCC's target pragma does not define the ISA macros; sleef.h and at::vec test them
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
#ifndef FT_CPU_AVX512_COPY
#define FT_CPU_AVX512_COPY 0
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include <torch/library.h>

#include <utility>

namespace fusedtrain {
namespace cpu_isa {

// Whether the CPU ops run their AVX-512 copies: this build has them and torch's kernels run
// AVX-512 (decided once per process).
bool use_avx512();
// The copy the CPU ops run: "AVX512", "AVX2" or "DEFAULT".
const char* name();

// The kernel a CPU op registers: calls the AVX-512 copy or the primary one.
template <auto Primary, auto Avx512>
struct Pick;
template <typename R, typename... A, R (*Primary)(A...), R (*Avx512)(A...)>
struct Pick<Primary, Avx512> {
  static R call(A... a) { return use_avx512() ? Avx512(std::forward<A>(a)...) : Primary(std::forward<A>(a)...); }
};

}  // namespace cpu_isa
}  // namespace fusedtrain

// In a kernel file whose entry point `fn` is in namespace ns::CPU_CAPABILITY (ns its family's
// namespace): FT_CPU_KERNEL(ns, fn) is what its TORCH_LIBRARY_IMPL registers, in the primary
// copy only (#if !FT_CPU_AVX512_COPY), after FT_DECLARE_AVX512_COPY(ns, fn) at global scope.
#if FT_CPU_AVX512_BUILT
#define FT_DECLARE_AVX512_COPY(ns, fn)                 \
  namespace ns {                                       \
  namespace AVX512 {                                   \
  extern decltype(::ns::CPU_CAPABILITY::fn) fn;        \
  }                                                    \
  }
#define FT_CPU_KERNEL(ns, fn) (&::fusedtrain::cpu_isa::Pick<&::ns::CPU_CAPABILITY::fn, &::ns::AVX512::fn>::call)
#else
#define FT_DECLARE_AVX512_COPY(ns, fn)
#define FT_CPU_KERNEL(ns, fn) (&::ns::CPU_CAPABILITY::fn)
#endif
