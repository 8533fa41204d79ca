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

// As store2, for values the caller rounded to T already when rounded is true (adam_math.h
// sr_round: bf16 values held in fp32, low 16 bits zero): those are stored by truncation, since
// the round to nearest would change nothing and costs about 6 more operations a vector (row
// "AdamW step 1.2M mix (quick), bf16 moments", in cache: 0.75 -> 0.57 ms, medians of 5 paired
// runs; 22M within noise). A NaN stays one: it comes from arithmetic, whose NaNs are quiet
// (bit 22, in the kept half).
template <typename T>
inline void store2_rounded(T* p, const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b,
                           bool rounded) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (rounded) {
#if defined(CPU_CAPABILITY_AVX512)
      // packus interleaves 128-bit lanes (a0..3 b0..3 a4..7 ...); the permute puts a, then b
      const __m512i ab = _mm512_packus_epi32(_mm512_srli_epi32(_mm512_castps_si512(a), 16),
                                             _mm512_srli_epi32(_mm512_castps_si512(b), 16));
      _mm512_storeu_si512(p, _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), ab));
      return;
#elif defined(CPU_CAPABILITY_AVX2)
      const __m256i ab = _mm256_packus_epi32(_mm256_srli_epi32(_mm256_castps_si256(a), 16),
                                             _mm256_srli_epi32(_mm256_castps_si256(b), 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(ab, 0xD8));
      return;
#endif
    }
  }
  store2(p, a, b);
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

// exp_avg's 8-bit codes encoded (adam_math.h q8_encode_signed), the inverse of
// load_signed_codes: x = |value| * inv is rounded to its code's precision in fp32 (x + c - c
// with c = 1.5 * 2^(20 + max(exponent of x, 0)): the sum's ulp is the code's step there, 1/8
// below 1, and ties go to even as in q8_round3 / q8_round8x, in the default rounding mode that
// torch keeps), after which the conversion of x * 2^-14 to fp16 is exact (FTZ does not apply to
// it) and its bits are the code's, shifted left by 7. As in q8_encode_signed: NaN gives 0 (maxps
// returns its second operand), x past the largest code (not made by an absmax of the same
// values: x < 30720.002 then) gives it, and the sign bit is set where value < 0 (not for -0 or
// NaN). About 16 vector operations per 16 codes on AVX-512, against about 23
// for q8_encode_signed on at::vec (the fallback here): in cache, where the 8-bit step is
// compute-bound, 5% off the step (row "AdamW step 1.2M mix (quick), 8bit moments", 2 threads:
// 0.92 -> 0.87 ms, medians of 5 paired old/new runs); at 22M, within noise.
inline void store_signed_codes(uint8_t* p, const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b,
                               float inv) {
#if defined(CPU_CAPABILITY_AVX512)
  const auto half = [inv](__m512 value) {
    const __m512 x = _mm512_mul_ps(_mm512_abs_ps(value), _mm512_set1_ps(inv));
    const __m512i e = _mm512_max_epi32(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7F800000)),
                                       _mm512_set1_epi32(127 << 23));
    const __m512 c = _mm512_castsi512_ps(_mm512_add_epi32(e, _mm512_set1_epi32((20 << 23) + 0x400000)));
    __m512 r = _mm512_max_ps(_mm512_sub_ps(_mm512_add_ps(x, c), c), _mm512_setzero_ps());
    r = _mm512_min_ps(r, _mm512_set1_ps(adam::Q8_SIGNED_MAX));
    r = _mm512_mul_ps(r, _mm512_set1_ps(1.f / 16384.f));
    r = _mm512_mask_or_ps(r, _mm512_cmp_ps_mask(value, _mm512_setzero_ps(), _CMP_LT_OQ), r, _mm512_set1_ps(-0.f));
    return _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  };
  const __m512i h = _mm512_inserti64x4(_mm512_castsi256_si512(half(a)), half(b), 1);
  // (h >> 7) & 0x7F | (h >> 8) & 0x80: a bitwise select (ternary logic 0xD8: C ? B : A)
  const __m512i code = _mm512_ternarylogic_epi32(_mm512_srli_epi16(h, 7), _mm512_srli_epi16(h, 8),
                                                 _mm512_set1_epi16(0x80), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi16_epi8(code));
#elif defined(CPU_CAPABILITY_AVX2)
  const auto half = [inv](__m256 value) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256 x = _mm256_mul_ps(_mm256_andnot_ps(sign, value), _mm256_set1_ps(inv));
    const __m256i e = _mm256_max_epi32(_mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7F800000)),
                                       _mm256_set1_epi32(127 << 23));
    const __m256 c = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_set1_epi32((20 << 23) + 0x400000)));
    __m256 r = _mm256_max_ps(_mm256_sub_ps(_mm256_add_ps(x, c), c), _mm256_setzero_ps());
    r = _mm256_min_ps(r, _mm256_set1_ps(adam::Q8_SIGNED_MAX));
    r = _mm256_mul_ps(r, _mm256_set1_ps(1.f / 16384.f));
    r = _mm256_or_ps(r, _mm256_and_ps(_mm256_cmp_ps(value, _mm256_setzero_ps(), _CMP_LT_OQ), sign));
    return _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  };
  const __m256i h = _mm256_set_m128i(half(b), half(a));
  const __m256i code = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(h, 7), _mm256_set1_epi16(0x7F)),
                                       _mm256_and_si256(_mm256_srli_epi16(h, 8), _mm256_set1_epi16(0x80)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi16(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1)));
#else
  store_codes(p, adam::q8_encode_signed(a, inv), adam::q8_encode_signed(b, inv));
#endif
}

}  // namespace vec_io
}  // namespace fusedtrain
