// csrc/cpu/unscale.cpp compiled for AVX-512 (csrc/cpu/cpu_isa.h).
#define FT_CPU_AVX512_COPY 1
#include "../cpu/cpu_isa.h"
#if FT_CPU_AVX512_BUILT
#include "../cpu/unscale.cpp"
#endif
