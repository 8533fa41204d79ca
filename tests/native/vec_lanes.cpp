// adam_math.h's vector helpers against its scalar functions, lane by lane, bit for bit, built as
// one copy of the CPU kernels is (tests/test_vec_lanes.py: DEFAULT under UBSan, AVX2, AVX-512):
// the stochastic rounding bits at element indices around 2^31, 2^32 and beyond (the vector
// indices are a broadcast plus 0, 1, ...), the hash, the rounding of NaN payloads, and the 8-bit
// codes of every kind of fp32 bit pattern. Prints "ok <lanes> <specialized|generic>" or the
// first mismatches.
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#define FT_ADAM_WITH_ATEN_VEC 1
#include "fusedtrain/adam_math.h"

using namespace fusedtrain::adam;
using FV = at::vec::Vectorized<float>;
using IV = at::vec::Vectorized<int32_t>;
constexpr int W = IV::size();
static int bad = 0;

static void check(const char* what, uint64_t a, uint64_t b, uint64_t arg) {
  if (a != b && bad++ < 10)
    std::printf("%s(%#llx): vector %#llx, scalar %#llx\n", what, (unsigned long long)arg, (unsigned long long)a,
                (unsigned long long)b);
}

static uint32_t lcg(uint64_t& s) {
  s = s * 6364136223846793005ULL + 1442695040888963407ULL;
  return static_cast<uint32_t>(s >> 32);
}

int main() {
  uint64_t seed = 1;
  // fp32 bit patterns of every kind: zeros, subnormals, normals, the largest, infs, NaNs with
  // the highest payloads (the sums of sr_round and q8_round3 come closest to overflow there)
  std::vector<uint32_t> pats = {0u, 0x80000000u, 1u, 0x807FFFFFu, 0x00800000u, 0x3F800000u, 0x3F7FFFFFu,
                                0x7F7FFFFFu, 0xFF7FFFFFu, 0x7F800000u, 0xFF800000u, 0x7FC00000u,
                                0xFFC00000u, 0x7FFFFFFFu, 0xFFFFFFFFu, 0x7F800001u, 0x7FFF0000u, 0x4F000000u};
  while (pats.size() % W != 0 || pats.size() < 4096) pats.push_back(lcg(seed));
  alignas(64) int32_t iv[W];
  alignas(64) float fv[W];

  const uint32_t keys[] = {0u, 0xFFFFFFFFu, 0x9E3779B9u, 0x12345678u};
  const uint64_t starts[] = {0,          64,          (1ull << 31) - 64, (1ull << 31) - W, 1ull << 31,
                             (1ull << 32) - 64, (1ull << 32) - W, 1ull << 32, (1ull << 33) + 64,
                             (1ull << 40) - W, (1ull << 62) - W};
  for (uint32_t key : keys) {
    for (uint32_t mult : {SR_V, SR_P}) {
      for (uint64_t i0 : starts) {
        for (uint64_t k0 = 0; k0 < 4 * W; k0 += W) {
          sr_bits_vec(key, static_cast<int64_t>(i0 + k0), mult).store(iv);
          for (int k = 0; k < W; ++k)
            check("sr_bits", static_cast<uint32_t>(iv[k]), sr_bits(key, static_cast<int64_t>(i0 + k0 + k), mult),
                  i0 + k0 + k);
        }
      }
    }
  }
  for (size_t b = 0; b < pats.size(); b += W) {
    sr_mix(IV::loadu(pats.data() + b)).store(iv);
    for (int k = 0; k < W; ++k) check("sr_mix", static_cast<uint32_t>(iv[k]), sr_mix(pats[b + k]), pats[b + k]);
    for (uint32_t bits : {0u, 1u, 0x7FFFu, 0xFFFFu}) {
      const FV x = FV::loadu(reinterpret_cast<const float*>(pats.data() + b));
      sr_round(x, IV(static_cast<int32_t>(bits))).store(fv);
      for (int k = 0; k < W; ++k)
        check("sr_round", float_bits(fv[k]), float_bits(sr_round(bits_float(pats[b + k]), bits)), pats[b + k]);
    }
    for (float inv : {1.f, 0.f, 3.7e-3f, 2.5e9f, 3.4028234663852886e38f}) {
      const FV x = FV::loadu(reinterpret_cast<const float*>(pats.data() + b));
      q8_encode_signed(x, inv).store(iv);
      for (int k = 0; k < W; ++k)
        check("q8_encode_signed", static_cast<uint32_t>(iv[k]), q8_encode_signed(bits_float(pats[b + k]), inv),
              pats[b + k]);
      q8_encode_unsigned(x, inv).store(iv);
      for (int k = 0; k < W; ++k)
        check("q8_encode_unsigned", static_cast<uint32_t>(iv[k]), q8_encode_unsigned(bits_float(pats[b + k]), inv),
              pats[b + k]);
    }
  }
  for (int c0 = 0; c0 < 256; c0 += W) {
    for (int k = 0; k < W; ++k) iv[k] = c0 + k;
    for (float scale : {1.f, 2.5e-19f, 7.3e20f}) {
      q8_decode_unsigned(IV::loadu(iv), scale).store(fv);
      for (int k = 0; k < W; ++k)
        check("q8_decode_unsigned", float_bits(fv[k]), float_bits(q8_decode_unsigned(c0 + k, scale)), c0 + k);
    }
  }
  if (bad) return 1;
  // the lane count, and whether at::vec has int32 instructions here or its generic C++ lanes
  std::printf("ok %d %s\n", W, at::vec::is_vec_specialized_for_v<int32_t> ? "specialized" : "generic");
  return 0;
}
