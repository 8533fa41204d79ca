// CPU body of fusedtrain::unscale_and_check_ (schema in csrc/ops.cpp; Python entry in
// fusedtrain/ops/unscale.py, which validates and groups by dtype before calling this).
//
// The whole list is cut into fixed chunks of kChunk elements (multi_tensor.h: a tensor's
// last chunk may be shorter) that at::parallel_for hands to the threads; each chunk records
// its own fp32 sum of squares and whether it saw an inf/NaN, and the chunk sums are combined
// in chunk order in double. The chunking depends on the tensor sizes only, never on the
// thread count, so the norm is bit-identical from run to run and across thread counts. The
// per-element math is csrc/include/fusedtrain/unscale_math.h, instantiated here for
// at::vec::Vectorized<float> (the main loop) and float (the tails).
#include "cpu_isa.h"  // first: it sets CPU_CAPABILITY, which the ATen vector headers read
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "fusedtrain/unscale_math.h"
#include "fusedtrain/versions.h"
#include "multi_tensor.h"
#include "vec_io.h"

namespace fusedtrain {
namespace {

using Vec = at::vec::Vectorized<float>;
using vec_io::load2;
using vec_io::store2;

constexpr int64_t kChunk = 1 << 15;
// Below this many elements in all (16 MiB of fp32, within a typical L3) one core finishes
// the pass from cache, and waking a second thread costs more than it saves (a busy sibling
// can make a parallel region wait for a scheduler slice). The chunking, and so the norm,
// does not depend on this choice.
constexpr int64_t kParallelMin = int64_t(1) << 22;

struct ChunkResult {
  float sumsq;
  bool found;
};

inline float hsum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.f;
  for (int i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

// Unscale one 2*Vec::size() block of floats held in a, b (in registers).
template <bool NORM>
inline void body(Vec& a, Vec& b, const Vec& inv, Vec& sq0, Vec& sq1, Vec& pr0, Vec& pr1) {
  pr0 = unscale::probe_add(pr0, a);
  pr1 = unscale::probe_add(pr1, b);
  a = unscale::unscaled(a, inv);
  b = unscale::unscaled(b, inv);
  if (NORM) {
    sq0 = unscale::square_add(sq0, a);
    sq1 = unscale::square_add(sq1, b);
  }
}

template <typename scalar_t, bool WRITE, bool NORM>
ChunkResult run_chunk(scalar_t* p, int64_t n, float inv_s) {
  const Vec inv(inv_s);
  Vec sq0(0.f), sq1(0.f), pr0(0.f), pr1(0.f);
  Vec sq2(0.f), sq3(0.f), pr2(0.f), pr3(0.f);
  constexpr int64_t H = 2 * Vec::size();
  int64_t i = 0;
  // two independent halves per step: more work in flight per loop-carried accumulator
  for (; i + 2 * H <= n; i += 2 * H) {
    Vec a, b, c, d;
    load2(p + i, a, b);
    load2(p + i + H, c, d);
    body<NORM>(a, b, inv, sq0, sq1, pr0, pr1);
    body<NORM>(c, d, inv, sq2, sq3, pr2, pr3);
    if (WRITE) {
      store2(p + i, a, b);
      store2(p + i + H, c, d);
    }
  }
  for (; i + H <= n; i += H) {
    Vec a, b;
    load2(p + i, a, b);
    body<NORM>(a, b, inv, sq0, sq1, pr0, pr1);
    if (WRITE) store2(p + i, a, b);
  }
  sq0 = (sq0 + sq1) + (sq2 + sq3);
  pr0 = (pr0 + pr1) + (pr2 + pr3);
  float sq = NORM ? hsum(sq0) : 0.f;
  float pr = hsum(pr0);
  for (; i < n; ++i) {
    float x = static_cast<float>(p[i]);
    pr = unscale::probe_add(pr, x);
    float y = unscale::unscaled(x, inv_s);
    if (NORM) sq = unscale::square_add(sq, y);
    if (WRITE) p[i] = static_cast<scalar_t>(y);
  }
  return {sq, unscale::probe_found(pr)};
}

// res[u]: the result of unit (chunk) u of `units`; data[t]: tensor t's first element.
template <typename scalar_t, bool WRITE, bool NORM>
void run_all(const mta::Units& units, const std::vector<void*>& data, bool serial, float inv,
             std::vector<ChunkResult>& res) {
  // grain 1: a chunk (up to kChunk elements) is already worth a thread.
  units.parallel(1, serial, [&](int64_t t, int64_t lo, int64_t hi, bool) {
    scalar_t* p = static_cast<scalar_t*>(data[t]);
    for (int64_t s = lo; s < hi; s += kChunk)
      res[units.first(t) + s / kChunk] = run_chunk<scalar_t, WRITE, NORM>(p + s, std::min(kChunk, hi - s), inv);
  });
}

template <typename scalar_t>
void dispatch(const mta::Units& units, const std::vector<void*>& data, bool serial, float inv, bool write, bool norm,
              std::vector<ChunkResult>& res) {
  if (write && norm) run_all<scalar_t, true, true>(units, data, serial, inv, res);
  else if (write) run_all<scalar_t, true, false>(units, data, serial, inv, res);
  else if (norm) run_all<scalar_t, false, true>(units, data, serial, inv, res);
  else run_all<scalar_t, false, false>(units, data, serial, inv, res);
}

}  // namespace

namespace CPU_CAPABILITY {

// tensors: one dtype (fp32, fp16 or bf16), each non-overlapping and dense (its numel elements
// are one span starting at data_ptr); inv_scale, found_inf: one-element fp32 CPU tensors.
at::Tensor unscale_and_check_cpu(at::TensorList tensors, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                                 bool compute_norm, bool write) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  std::vector<void*> data(n);
  int64_t total = 0;
  for (int64_t t = 0; t < n; ++t) {
    data[t] = tensors[t].data_ptr();
    total += tensors[t].numel();
  }
  const mta::Units units(n, kChunk, [&](int64_t t) { return tensors[t].numel(); });
  std::vector<ChunkResult> res(units.count());
  const float inv = inv_scale.data_ptr<float>()[0];
  if (units.count() != 0) {
    const bool serial = total < kParallelMin || at::get_num_threads() == 1;
    const auto dtype = tensors[0].scalar_type();
    switch (dtype) {
      case at::kFloat: dispatch<float>(units, data, serial, inv, write, compute_norm, res); break;
      case at::kHalf: dispatch<at::Half>(units, data, serial, inv, write, compute_norm, res); break;
      case at::kBFloat16: dispatch<at::BFloat16>(units, data, serial, inv, write, compute_norm, res); break;
      default: TORCH_CHECK(false, "fusedtrain::unscale_and_check_: unsupported dtype ", dtype);
    }
  }
  bool found = false;
  double sumsq = 0.0;
  for (const auto& r : res) {  // fixed order: chunk order
    found = found || r.found;
    sumsq += static_cast<double>(r.sumsq);
  }
  if (found) found_inf.data_ptr<float>()[0] = 1.f;
  if (write) bump_versions(tensors);
  bump_versions(found_inf);
  if (!compute_norm) return at::empty({0}, inv_scale.options());
  return at::scalar_tensor(static_cast<float>(sumsq), inv_scale.options());
}

}  // namespace CPU_CAPABILITY
}  // namespace fusedtrain

#if !FT_CPU_AVX512_COPY
FT_DECLARE_AVX512_COPY(fusedtrain, unscale_and_check_cpu)
TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("unscale_and_check_", FT_CPU_KERNEL(fusedtrain, unscale_and_check_cpu));
}
#endif
