// BCE with logits, CPU bodies of fusedtrain::bce_with_logits and
// fusedtrain::bce_with_logits_target_grad (schemas and contract in csrc/ops.cpp).
//
// The flat index space [0, R*C) is cut into fixed chunks of kChunk elements (independent of
// the thread count); at::parallel_for hands out whole chunks, each chunk writes its loss
// partial to its own slot, and the partials are summed in chunk order: the result is the
// same bit for bit for every thread count. Inside a chunk, each row segment runs at::vec
// steps of 2 * Vectorized<opmath>::size() elements and a scalar tail; both call the same
// formulas (fusedtrain/bce_math.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "fusedtrain/bce_dispatch.h"
#include "fusedtrain/bce_math.h"

namespace fusedtrain {
namespace bce {
namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 4096;  // elements per reduction chunk (fixed: determinism)
constexpr int64_t kGrain = 8;     // chunks: below 8 * 4096 elements run on the calling thread

// Two opmath vectors (2 * W elements) from storage type T.
template <typename op_t, typename T>
inline void load2(const T* p, Vectorized<op_t>& a, Vectorized<op_t>& b) {
  if constexpr (std::is_same_v<T, op_t>) {
    a = Vectorized<op_t>::loadu(p);
    b = Vectorized<op_t>::loadu(p + Vectorized<op_t>::size());
  } else {
    static_assert(Vectorized<T>::size() == 2 * Vectorized<op_t>::size());
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  }
}

template <typename op_t, typename T>
inline void store2(T* p, const Vectorized<op_t>& a, const Vectorized<op_t>& b) {
  if constexpr (std::is_same_v<T, op_t>) {
    a.store(p);
    b.store(p + Vectorized<op_t>::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// A broadcast (R, C) operand in opmath: element (r, c) at p[r * s0 + c * s1], s1 in {0, 1}.
template <typename op_t>
struct Bcast {
  const op_t* p;
  int64_t s0, s1;
  inline const op_t* row(int64_t r) const { return p + r * s0; }
  inline void load2(const op_t* rp, int64_t c, Vectorized<op_t>& a, Vectorized<op_t>& b) const {
    if (s1 == 0) {
      a = b = Vectorized<op_t>(rp[0]);
    } else {
      bce::load2<op_t>(rp + c, a, b);
    }
  }
  inline op_t at(const op_t* rp, int64_t c) const { return rp[c * s1]; }
};

// A fresh output of many MiB is mmap'ed memory that page-faults on first touch, 4 KiB at a
// time; on small VMs the faults cost more than the whole kernel. Ask for transparent huge
// pages before the kernel writes it (what torch's own THP_MEM_ALLOC_ENABLE=1 does for every
// allocation). Advisory only: a no-op where THP is off or the memory is already mapped.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.numel() * t.element_size();
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

template <typename op_t>
Bcast<op_t> bcast_of(const std::optional<at::Tensor>& t, const op_t* one) {
  if (!t.has_value()) return {one, 0, 0};
  const auto& v = *t;
  return {v.data_ptr<op_t>(), v.size(0) == 1 ? 0 : v.stride(0), v.size(1) == 1 ? 0 : v.stride(1)};
}

// Calls seg(r, c0, c1) for every row segment of flat chunk k of an (R, C) tensor.
template <typename Seg>
inline void for_segments(int64_t k, int64_t N, int64_t C, Seg&& seg) {
  int64_t start = k * kChunk;
  const int64_t end = std::min(N, start + kChunk);
  int64_t r = start / C, c = start % C;
  while (start < end) {
    const int64_t c1 = std::min(C, c + (end - start));
    seg(r, c, c1);
    start += c1 - c;
    ++r;
    c = 0;
  }
}

template <typename scalar_t, typename target_t, typename out_t, bool PW>
void forward_kernel(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& pos_weight, int64_t reduction, bool compute_grad,
                    at::Tensor& loss, at::Tensor& grad) {
  using op_t = opmath_t<scalar_t>;
  using Vec = Vectorized<op_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t K = 2 * W;
  const int64_t R = input.size(0), C = input.size(1), N = R * C;
  const op_t one = 1;
  const auto w = bcast_of<op_t>(weight, &one);
  const auto pw = bcast_of<op_t>(pos_weight, &one);
  const scalar_t* x = input.data_ptr<scalar_t>();
  const target_t* y = target.data_ptr<target_t>();
  out_t* loss_p = reduction == 0 ? loss.data_ptr<out_t>() : nullptr;
  scalar_t* grad_p = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
  const bool reduce = reduction != 0;
  const op_t scale = reduction == 1 ? op_t(1) / op_t(N) : op_t(1);  // 1/N of mean, on the gradient
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  std::vector<double> partials(reduce ? nchunks : 0);

  at::parallel_for(0, nchunks, kGrain, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      Vec acc0(op_t(0)), acc1(op_t(0));
      op_t acc_tail = 0;
      for_segments(k, N, C, [&](int64_t r, int64_t c0, int64_t c1) {
        const int64_t base = r * C;
        const op_t* wr = w.row(r);
        const op_t* pwr = pw.row(r);
        int64_t c = c0;
        for (; c + K <= c1; c += K) {
          Vec xa, xb, ya, yb, wa, wb, pa, pb, la, lb, ga, gb;
          load2<op_t>(x + base + c, xa, xb);
          load2<op_t>(y + base + c, ya, yb);
          w.load2(wr, c, wa, wb);
          if (PW) pw.load2(pwr, c, pa, pb);
          forward<PW>(xa, ya, wa, pa, la, ga);
          forward<PW>(xb, yb, wb, pb, lb, gb);
          if (reduce) {
            acc0 = acc0 + la;
            acc1 = acc1 + lb;
          } else {
            store2<op_t>(loss_p + base + c, la, lb);
          }
          if (grad_p) store2<op_t>(grad_p + base + c, ga * Vec(scale), gb * Vec(scale));
        }
        for (; c < c1; ++c) {
          op_t l, g;
          forward<PW>(static_cast<op_t>(x[base + c]), static_cast<op_t>(y[base + c]), w.at(wr, c),
                      PW ? pw.at(pwr, c) : one, l, g);
          if (reduce)
            acc_tail += l;
          else
            loss_p[base + c] = static_cast<out_t>(l);
          if (grad_p) grad_p[base + c] = static_cast<scalar_t>(g * scale);
        }
      });
      if (reduce) {
        op_t lanes[W];
        (acc0 + acc1).store(lanes);
        double s = 0;
        for (int64_t i = 0; i < W; ++i) s += lanes[i];
        partials[k] = s + acc_tail;
      }
    }
  });

  if (reduce) {
    double total = 0;
    for (int64_t k = 0; k < nchunks; ++k) total += partials[k];
    if (reduction == 1) total /= static_cast<double>(N);  // N == 0: NaN, as torch's mean
    *loss.data_ptr<out_t>() = static_cast<out_t>(total);
  }
}

template <typename scalar_t, typename target_t, bool PW>
void target_grad_kernel(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& pos_weight, int64_t reduction, at::Tensor& out) {
  using op_t = opmath_t<scalar_t>;
  using Vec = Vectorized<op_t>;
  constexpr int64_t K = 2 * Vec::size();
  const int64_t R = input.size(0), C = input.size(1), N = R * C;
  const op_t one = 1;
  const auto w = bcast_of<op_t>(weight, &one);
  const auto pw = bcast_of<op_t>(pos_weight, &one);
  const scalar_t* x = input.data_ptr<scalar_t>();
  target_t* o = out.data_ptr<target_t>();
  const op_t scale = reduction == 1 ? op_t(1) / op_t(N) : op_t(1);
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, kGrain, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      for_segments(k, N, C, [&](int64_t r, int64_t c0, int64_t c1) {
        const int64_t base = r * C;
        const op_t* wr = w.row(r);
        const op_t* pwr = pw.row(r);
        int64_t c = c0;
        for (; c + K <= c1; c += K) {
          Vec xa, xb, wa, wb, pa, pb;
          load2<op_t>(x + base + c, xa, xb);
          w.load2(wr, c, wa, wb);
          if (PW) pw.load2(pwr, c, pa, pb);
          store2<op_t>(o + base + c, target_grad<PW>(xa, wa, pa) * Vec(scale),
                       target_grad<PW>(xb, wb, pb) * Vec(scale));
        }
        for (; c < c1; ++c)
          o[base + c] = static_cast<target_t>(
              target_grad<PW>(static_cast<op_t>(x[base + c]), w.at(wr, c), PW ? pw.at(pwr, c) : one) * scale);
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_cpu(const at::Tensor& input, const at::Tensor& target,
                                                       const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& pos_weight,
                                                       int64_t reduction, bool compute_grad,
                                                       at::ScalarType out_dtype) {
  const int64_t R = input.size(0), C = input.size(1);
  at::Tensor loss = reduction == 0 ? at::empty({R, C}, input.options().dtype(out_dtype))
                                   : at::empty({}, input.options().dtype(out_dtype));
  at::Tensor grad = at::empty({compute_grad ? R : 0, compute_grad ? C : 0}, input.options());
  if (R * C == 0) {
    if (reduction != 0) loss.fill_(reduction == 1 ? std::numeric_limits<double>::quiet_NaN() : 0.0);
    return {loss, grad};
  }
  advise_huge_pages(grad);
  if (reduction == 0) advise_huge_pages(loss);
  dispatch(input.scalar_type(), target.scalar_type(), out_dtype, pos_weight.has_value(), "bce_with_logits",
           [&](auto s, auto t, auto o, auto pw) {
             forward_kernel<typename decltype(s)::type, typename decltype(t)::type, typename decltype(o)::type,
                            decltype(pw)::value>(input, target, weight, pos_weight, reduction, compute_grad, loss,
                                                 grad);
           });
  return {loss, grad};
}

at::Tensor bce_with_logits_target_grad_cpu(const at::Tensor& input, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  at::Tensor out = at::empty({input.size(0), input.size(1)}, target.options());
  if (out.numel() == 0) return out;
  advise_huge_pages(out);
  dispatch(input.scalar_type(), target.scalar_type(), input.scalar_type(), pos_weight.has_value(),
           "bce_with_logits_target_grad", [&](auto s, auto t, auto, auto pw) {
             target_grad_kernel<typename decltype(s)::type, typename decltype(t)::type, decltype(pw)::value>(
                 input, weight, pos_weight, reduction, out);
           });
  return out;
}

}  // namespace
}  // namespace bce
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("bce_with_logits", &fusedtrain::bce::bce_with_logits_cpu);
  m.impl("bce_with_logits_target_grad", &fusedtrain::bce::bce_with_logits_target_grad_cpu);
}
