#pragma once
// Vector loads and stores of the CPU kernels (adam.cpp, unscale.cpp, bce.cpp): 2 * W
// elements of storage type T as two at::vec::Vectorized<op_t> of W lanes each, op_t the
// math type (float; double for fp64). fp32 / fp64 storage is two plain vector loads;
// bf16 / fp16 storage is one Vectorized<T> (2 * W elements) widened to fp32, and narrowed
// again (rounded once) by the store. Compiled for AVX2 and AVX-512 (cpu_isa.h); the
// hand-written paths below have one branch per instruction set.
#include <ATen/cpu/vec/functional.h>  // convert_to_float / convert_from_float of bf16 and fp16
#include <ATen/cpu/vec/vec.h>

#include "fusedtrain/adam_math.h"

#include <tuple>
#include <type_traits>

namespace fusedtrain {
namespace vec_io {

template <typename op_t, typename T>
inline void load2(const T* p, at::vec::Vectorized<op_t>& a, at::vec::Vectorized<op_t>& b) {
  using V = at::vec::Vectorized<op_t>;
  if constexpr (std::is_same_v<T, op_t>) {
    a = V::loadu(p);
    b = V::loadu(p + V::size());
  } else {
    static_assert(at::vec::Vectorized<T>::size() == 2 * V::size(), "Vectorized<T> must hold 2 opmath vectors");
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename op_t, typename T>
inline void store2(T* p, const at::vec::Vectorized<op_t>& a, const at::vec::Vectorized<op_t>& b) {
  using V = at::vec::Vectorized<op_t>;
  if constexpr (std::is_same_v<T, op_t>) {
    a.store(p);
    b.store(p + V::size());
  } else {
    static_assert(at::vec::Vectorized<T>::size() == 2 * V::size(), "Vectorized<T> must hold 2 opmath vectors");
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// 8-bit codes (adam_math.h q8_*): 2 * Vectorized<float>::size() bytes as two int32 vectors.
inline void load_codes(const uint8_t* p, at::vec::Vectorized<int32_t>& a, at::vec::Vectorized<int32_t>& b) {
  constexpr int h = at::vec::Vectorized<int32_t>::size();
  a = at::vec::convert_to_int32<uint8_t>(p);
  b = at::vec::convert_to_int32<uint8_t>(p + h);
}

// exp_avg's 8-bit codes decoded (adam_math.h q8_decode_signed): their sign and magnitude bits
// are an fp16's (times 2^14), which F16C converts, so the values are those of q8_decode_signed
// bit for bit (mag * 2^-14 * (scale * 2^14) is the same single rounding of mag * scale).
inline void load_signed_codes(const uint8_t* p, float scale, at::vec::Vectorized<float>& a,
                              at::vec::Vectorized<float>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i c = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i h = _mm512_or_si512(_mm512_slli_epi16(_mm512_and_si512(c, _mm512_set1_epi16(0x7F)), 7),
                                    _mm512_slli_epi16(_mm512_and_si512(c, _mm512_set1_epi16(0x80)), 8));
  const __m512 s = _mm512_set1_ps(scale * 16384.f);
  a = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), s);
  b = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), s);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x7F)), 7),
                                    _mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x80)), 8));
  const __m256 s = _mm256_set1_ps(scale * 16384.f);
  a = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), s);
  b = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), s);
#else
  constexpr int h = at::vec::Vectorized<float>::size();
  alignas(64) float tmp[2 * h];
  for (int k = 0; k < 2 * h; ++k) tmp[k] = adam::q8_decode_signed(p[k], scale);
  a = at::vec::Vectorized<float>::loadu(tmp);
  b = at::vec::Vectorized<float>::loadu(tmp + h);
#endif
}

// Codes in [0, 255] in int32 lanes, stored as bytes.
inline void store_codes(uint8_t* p, const at::vec::Vectorized<int32_t>& a, const at::vec::Vectorized<int32_t>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(a));  // truncation: the codes fit
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 16), _mm512_cvtepi32_epi8(b));
#elif defined(CPU_CAPABILITY_AVX2)
  __m256i w = _mm256_packus_epi32(a, b);  // 16-bit: a0..3 b0..3 | a4..7 b4..7
  w = _mm256_permute4x64_epi64(w, 0xD8);  // a0..7 | b0..7
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
#else
  constexpr int h = at::vec::Vectorized<int32_t>::size();
  alignas(64) int32_t tmp[2 * h];
  a.store(tmp);
  b.store(tmp + h);
  for (int k = 0; k < 2 * h; ++k) p[k] = static_cast<uint8_t>(tmp[k]);
#endif
}

}  // namespace vec_io
}  // namespace fusedtrain
