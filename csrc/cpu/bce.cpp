// BCE with logits, CPU bodies of fusedtrain::bce_with_logits and
// fusedtrain::bce_with_logits_backward (schemas and contract in csrc/ops.cpp).
//
// The flat index space [0, R*C) is cut into fixed chunks of kChunk elements (independent of
// the thread count); at::parallel_for hands out whole chunks, each chunk writes its loss
// partial to its own slot, and the partials are summed in chunk order: the result is the
// same bit for bit for every thread count. Inside a chunk, each row segment runs at::vec
// steps of 2 * Vectorized<opmath>::size() elements (vec_io.h) and a scalar tail; both call
// the same formulas (fusedtrain/bce_math.h).
#include "cpu_isa.h"  // first: it sets CPU_CAPABILITY, which the ATen vector headers read
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "fusedtrain/bce_dispatch.h"
#include "fusedtrain/bce_math.h"
#include "prefault.h"
#include "vec_io.h"

namespace fusedtrain {
namespace bce {
namespace {

using at::vec::Vectorized;
using vec_io::load2;
using vec_io::store2;

constexpr int64_t kChunk = 4096;  // elements per reduction chunk (fixed: determinism)
constexpr int64_t kGrain = 8;     // chunks: below 8 * 4096 elements run on the calling thread

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
      vec_io::load2<op_t>(rp + c, a, b);
    }
  }
  inline op_t at(const op_t* rp, int64_t c) const { return rp[c * s1]; }
};

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

// KIND of a kernel: kPlainBCE (BCE without label smoothing or ignore value: the formulas
// without a Spec), or the loss kind elem() is instantiated for (kAnyKind with pos_weight, which
// only BCE takes: fewer instantiations)
constexpr int kPlainBCE = -2;

// f(std::integral_constant<int, KIND>) for the kernel that computes spec
template <bool PW, typename S, typename F>
void with_kind(const Spec<S>& spec, F&& f) {
  if (!is_generic(spec)) return f(std::integral_constant<int, kPlainBCE>{});
  if constexpr (PW) {
    f(std::integral_constant<int, kAnyKind>{});
  } else {
    switch (spec.kind) {
      case kFocal: return f(std::integral_constant<int, kFocal>{});
      case kASL: return f(std::integral_constant<int, kASL>{});
      default: return f(std::integral_constant<int, kBCE>{});
    }
  }
}

// The loss, and with a unit_grad tensor d loss / d input for grad_output = 1 from the same
// exp(-|x|) (rounded once; the 1/N of mean folded in). Plain BCE's unit gradient takes
// e / (1 + e) as the backward kernel does, so that the two give the same bits. The loss
// family (KIND not kPlainBCE: focal, asl, smoothing, ignore value): every term from elem(),
// the unit gradient its d/dx, so that their backward is not a second pass (focal fwd+bwd at
// 8192x1024 fp32: 37.5 -> 22.0 ms, ASL 47.4 -> 25.0 ms).
template <typename scalar_t, typename target_t, typename out_t, bool PW, int KIND>
void forward_kernel(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& pos_weight, int64_t reduction, at::Tensor& out,
                    at::Tensor& unit_grad, const Spec<opmath_t<scalar_t>>& spec) {
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
  out_t* loss_p = reduction == 0 ? out.data_ptr<out_t>() : nullptr;
  scalar_t* g_p = unit_grad.numel() ? unit_grad.data_ptr<scalar_t>() : nullptr;
  const op_t gscale = reduction == 1 ? one / static_cast<op_t>(N) : one;
  const bool reduce = reduction != 0;
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  std::vector<double> partials(reduce ? nchunks : 0);

  at::parallel_for(0, nchunks, kGrain, [&](int64_t kb, int64_t ke) {
    // each thread faults in the part of the fresh outputs it writes (prefault.h)
    const int64_t eb = kb * kChunk, ee = std::min(N, ke * kChunk);
    cpu::prefault_for_write(g_p, eb, ee, sizeof(scalar_t));
    cpu::prefault_for_write(loss_p, eb, ee, sizeof(out_t));
    for (int64_t k = kb; k < ke; ++k) {
      Vec acc0(op_t(0)), acc1(op_t(0));
      op_t acc_tail = 0;
      for_segments(k, N, C, [&](int64_t r, int64_t c0, int64_t c1) {
        const int64_t base = r * C;
        const op_t* wr = w.row(r);
        const op_t* pwr = pw.row(r);
        int64_t c = c0;
        for (; c + K <= c1; c += K) {
          Vec xa, xb, ya, yb, wa, wb, pa, pb;
          load2<op_t>(x + base + c, xa, xb);
          load2<op_t>(y + base + c, ya, yb);
          w.load2(wr, c, wa, wb);
          if (PW) pw.load2(pwr, c, pa, pb);
          const Vec ea = exp_neg_abs(xa), eb = exp_neg_abs(xb);
          Vec la, lb;
          if constexpr (KIND != kPlainBCE) {
            Vec da, db, unused;
            elem<PW, KIND>(spec, xa, ya, wa, pa, ea, la, da, unused, false);
            elem<PW, KIND>(spec, xb, yb, wb, pb, eb, lb, db, unused, false);
            if (g_p) store2<op_t>(g_p + base + c, da * Vec(gscale), db * Vec(gscale));
          } else {
            la = loss_e<PW>(xa, ya, wa, pa, ea);
            lb = loss_e<PW>(xb, yb, wb, pb, eb);
            if (g_p)
              store2<op_t>(g_p + base + c, input_grad_e<PW>(xa, ya, wa, pa, ea) * Vec(gscale),
                           input_grad_e<PW>(xb, yb, wb, pb, eb) * Vec(gscale));
          }
          if (reduce) {
            acc0 = acc0 + la;
            acc1 = acc1 + lb;
          } else {
            store2<op_t>(loss_p + base + c, la, lb);
          }
        }
        for (; c < c1; ++c) {
          const op_t xv = static_cast<op_t>(x[base + c]), yv = static_cast<op_t>(y[base + c]), ev = exp_neg_abs(xv);
          const op_t wv = w.at(wr, c), pv = PW ? pw.at(pwr, c) : one;
          op_t l;
          if constexpr (KIND != kPlainBCE) {
            op_t d, unused;
            elem<PW, KIND>(spec, xv, yv, wv, pv, ev, l, d, unused, false);
            if (g_p) g_p[base + c] = static_cast<scalar_t>(d * gscale);
          } else {
            l = loss_e<PW>(xv, yv, wv, pv, ev);
            if (g_p) g_p[base + c] = static_cast<scalar_t>(input_grad_e<PW>(xv, yv, wv, pv, ev) * gscale);
          }
          if (reduce)
            acc_tail += l;
          else
            loss_p[base + c] = static_cast<out_t>(l);
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
    *out.data_ptr<out_t>() = static_cast<out_t>(total);
  }
}

// grad_input and/or grad_target in one pass over input (and target for grad_input). Each is
// the fp32 (fp64) derivative times the fp32 (fp64) factor grad_output[i] ('none') or
// grad_output / N ('mean') or grad_output ('sum'), rounded once at the store.
template <typename scalar_t, typename target_t, bool PW, int KIND>
void backward_kernel(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                     int64_t reduction, at::Tensor& gi, at::Tensor& gt, const Spec<opmath_t<scalar_t>>& spec) {
  using op_t = opmath_t<scalar_t>;
  using Vec = Vectorized<op_t>;
  constexpr int64_t K = 2 * Vec::size();
  const int64_t R = input.size(0), C = input.size(1), N = R * C;
  const op_t one = 1;
  const auto w = bcast_of<op_t>(weight, &one);
  const auto pw = bcast_of<op_t>(pos_weight, &one);
  const scalar_t* x = input.data_ptr<scalar_t>();
  const target_t* y = target.data_ptr<target_t>();
  const op_t* go = grad_output.data_ptr<op_t>();
  const bool per_elem = reduction == 0;
  const op_t factor = per_elem ? one : reduction == 1 ? go[0] / static_cast<op_t>(N) : go[0];
  scalar_t* gi_p = gi.numel() ? gi.data_ptr<scalar_t>() : nullptr;
  target_t* gt_p = gt.numel() ? gt.data_ptr<target_t>() : nullptr;
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, kGrain, [&](int64_t kb, int64_t ke) {
    const int64_t eb = kb * kChunk, ee = std::min(N, ke * kChunk);
    cpu::prefault_for_write(gi_p, eb, ee, sizeof(scalar_t));
    cpu::prefault_for_write(gt_p, eb, ee, sizeof(target_t));
    for (int64_t k = kb; k < ke; ++k) {
      for_segments(k, N, C, [&](int64_t r, int64_t c0, int64_t c1) {
        const int64_t base = r * C;
        const op_t* wr = w.row(r);
        const op_t* pwr = pw.row(r);
        int64_t c = c0;
        for (; c + K <= c1; c += K) {
          Vec xa, xb, wa, wb, pa, pb, fa(factor), fb(factor);
          load2<op_t>(x + base + c, xa, xb);
          w.load2(wr, c, wa, wb);
          if (PW) pw.load2(pwr, c, pa, pb);
          if (per_elem) load2<op_t>(go + base + c, fa, fb);
          if constexpr (KIND != kPlainBCE) {
            Vec ya, yb, la, lb, dxa, dxb, dya, dyb;
            load2<op_t>(y + base + c, ya, yb);
            elem<PW, KIND>(spec, xa, ya, wa, pa, exp_neg_abs(xa), la, dxa, dya, gt_p != nullptr);
            elem<PW, KIND>(spec, xb, yb, wb, pb, exp_neg_abs(xb), lb, dxb, dyb, gt_p != nullptr);
            if (gi_p) store2<op_t>(gi_p + base + c, dxa * fa, dxb * fb);
            if (gt_p) store2<op_t>(gt_p + base + c, dya * fa, dyb * fb);
            continue;
          }
          // one exp for both gradients; none for a target gradient without pos_weight
          const bool need_e = gi_p || PW;
          const Vec ea = need_e ? exp_neg_abs(xa) : Vec(op_t(0)), eb = need_e ? exp_neg_abs(xb) : Vec(op_t(0));
          if (gi_p) {
            Vec ya, yb;
            load2<op_t>(y + base + c, ya, yb);
            store2<op_t>(gi_p + base + c, input_grad_e<PW>(xa, ya, wa, pa, ea) * fa,
                         input_grad_e<PW>(xb, yb, wb, pb, eb) * fb);
          }
          if (gt_p)
            store2<op_t>(gt_p + base + c, target_grad_e<PW>(xa, wa, pa, ea) * fa, target_grad_e<PW>(xb, wb, pb, eb) * fb);
        }
        for (; c < c1; ++c) {
          const op_t xv = static_cast<op_t>(x[base + c]), wv = w.at(wr, c), pv = PW ? pw.at(pwr, c) : one;
          const op_t f = per_elem ? go[base + c] : factor;
          if constexpr (KIND != kPlainBCE) {
            op_t l, dx, dy;
            elem<PW, KIND>(spec, xv, static_cast<op_t>(y[base + c]), wv, pv, exp_neg_abs(xv), l, dx, dy,
                           gt_p != nullptr);
            if (gi_p) gi_p[base + c] = static_cast<scalar_t>(dx * f);
            if (gt_p) gt_p[base + c] = static_cast<target_t>(dy * f);
            continue;
          }
          const op_t ev = (gi_p || PW) ? exp_neg_abs(xv) : op_t(0);
          if (gi_p) gi_p[base + c] = static_cast<scalar_t>(input_grad_e<PW>(xv, static_cast<op_t>(y[base + c]), wv, pv, ev) * f);
          if (gt_p) gt_p[base + c] = static_cast<target_t>(target_grad_e<PW>(xv, wv, pv, ev) * f);
        }
      });
    }
  });
}

}  // namespace

namespace CPU_CAPABILITY {

std::tuple<at::Tensor, at::Tensor> bce_with_logits_cpu(const at::Tensor& input, const at::Tensor& target,
                                                       const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& pos_weight, int64_t reduction,
                                                       at::ScalarType out_dtype, bool unit_grad, int64_t kind,
                                                       at::ArrayRef<double> params) {
  const int64_t R = input.size(0), C = input.size(1);
  check_layout(input, target, weight, pos_weight, "bce_with_logits");
  at::Tensor loss = reduction == 0 ? at::empty({R, C}, input.options().dtype(out_dtype))
                                   : at::empty({}, input.options().dtype(out_dtype));
  at::Tensor grad = unit_grad ? at::empty({R, C}, input.options()) : at::empty({0}, input.options());
  if (R * C == 0) {
    if (reduction != 0) loss.fill_(reduction == 1 ? std::numeric_limits<double>::quiet_NaN() : 0.0);
    return {loss, grad};
  }
  dispatch(input.scalar_type(), target.scalar_type(), out_dtype, pos_weight.has_value(), "bce_with_logits",
           [&](auto s, auto t, auto o, auto pw) {
             using scalar_t = typename decltype(s)::type;
             const auto spec = spec_of<opmath_t<scalar_t>>(kind, params, "bce_with_logits");
             using target_t = typename decltype(t)::type;
             using out_t = typename decltype(o)::type;
             constexpr bool PW = decltype(pw)::value;
             with_kind<PW>(spec, [&](auto k) {
               forward_kernel<scalar_t, target_t, out_t, PW, decltype(k)::value>(input, target, weight, pos_weight,
                                                                                 reduction, loss, grad, spec);
             });
           });
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight, int64_t reduction,
    bool input_grad, bool target_grad, int64_t kind, at::ArrayRef<double> params) {
  const int64_t R = input.size(0), C = input.size(1);
  check_layout(input, target, weight, pos_weight, "bce_with_logits_backward");
  check_grad_output(grad_output, input, reduction, "bce_with_logits_backward");
  at::Tensor gi = input_grad ? at::empty({R, C}, input.options()) : at::empty({0}, input.options());
  at::Tensor gt = target_grad ? at::empty({R, C}, target.options()) : at::empty({0}, target.options());
  if (R * C == 0 || !(input_grad || target_grad)) return {gi, gt};
  dispatch(input.scalar_type(), target.scalar_type(), input.scalar_type(), pos_weight.has_value(),
           "bce_with_logits_backward", [&](auto s, auto t, auto, auto pw) {
             using scalar_t = typename decltype(s)::type;
             constexpr bool PW = decltype(pw)::value;
             const auto spec = spec_of<opmath_t<scalar_t>>(kind, params, "bce_with_logits_backward");
             with_kind<PW>(spec, [&](auto k) {
               backward_kernel<scalar_t, typename decltype(t)::type, PW, decltype(k)::value>(
                   grad_output, input, target, weight, pos_weight, reduction, gi, gt, spec);
             });
           });
  return {gi, gt};
}

}  // namespace CPU_CAPABILITY
}  // namespace bce
}  // namespace fusedtrain

#if !FT_CPU_AVX512_COPY
FT_DECLARE_AVX512_COPY(fusedtrain::bce, bce_with_logits_cpu)
FT_DECLARE_AVX512_COPY(fusedtrain::bce, bce_with_logits_backward_cpu)
TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("bce_with_logits", FT_CPU_KERNEL(fusedtrain::bce, bce_with_logits_cpu));
  m.impl("bce_with_logits_backward", FT_CPU_KERNEL(fusedtrain::bce, bce_with_logits_backward_cpu));
}
#endif
