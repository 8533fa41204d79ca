// The many-label head's loss epilogue, CPU body of fusedtrain::linear_bce_epilogue_ (schema and
// contract in csrc/ops.cpp `// ---- head`). fusedtrain/ops/head.py runs the chunk loop: a matmul
// (at::matmul, oneDNN) writes a chunk's logits, this pass turns them, in place, into
// d loss / d logit and returns the chunk's loss per row, so a chunk's logits are read once and
// never exist beside their gradient.
//
// Rows are independent (each row's sum is accumulated in its own fixed order), so the result
// is the same bit for bit for every thread count. Per element: the BCE formulas of bce_math.h
// on z = logit + bias, with label_weight as weight; unknown labels give exactly 0.
#include "cpu_isa.h"  // first: it sets CPU_CAPABILITY, which the ATen vector headers read
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "fusedtrain/bce_math.h"
#include "fusedtrain/head_dispatch.h"
#include "vec_io.h"

namespace fusedtrain {
namespace head {
namespace {

using at::vec::Vectorized;
using bce::exp_neg_abs;
using bce::input_grad_e;
using bce::loss_e;
using vec_io::load2;
using vec_io::store2;

constexpr int64_t kGrainElems = 32768;  // a task below this many elements runs on the calling thread

template <typename logit_t, typename target_t, bool PW>
void epilogue_kernel(at::Tensor& logits, const float* bias, const at::Tensor& target, const float* pw,
                     const float* lw, const bool* unknown, int64_t unknown_s0, bool write_grad, float* row_loss) {
  using Vec = Vectorized<float>;
  constexpr int64_t K = 2 * Vec::size();
  const int64_t R = logits.size(0), C = logits.size(1), ys0 = target.stride(0);
  logit_t* z = logits.data_ptr<logit_t>();
  const target_t* y = target.data_ptr<target_t>();
  const Vec zero(0.0f), one(1.0f);
  at::parallel_for(0, R, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      logit_t* zr = z + r * C;
      const target_t* yr = y + r * ys0;
      const bool* mr = unknown ? unknown + r * unknown_s0 : nullptr;
      Vec acc0(0.0f), acc1(0.0f);
      double tail = 0;
      int64_t c = 0;
      for (; c + K <= C; c += K) {
        Vec za, zb, ya, yb, wa = one, wb = one, pa = one, pb = one;
        load2<float>(zr + c, za, zb);
        load2<float>(yr + c, ya, yb);
        if (bias) {
          Vec ba, bb;
          load2<float>(bias + c, ba, bb);
          za = za + ba;
          zb = zb + bb;
        }
        if (lw) load2<float>(lw + c, wa, wb);
        if (PW) load2<float>(pw + c, pa, pb);
        const Vec ea = exp_neg_abs(za), eb = exp_neg_abs(zb);
        Vec la = loss_e<PW>(za, ya, wa, pa, ea), lb = loss_e<PW>(zb, yb, wb, pb, eb);
        Vec ga = zero, gb = zero;
        if (write_grad) {
          ga = input_grad_e<PW>(za, ya, wa, pa, ea);
          gb = input_grad_e<PW>(zb, yb, wb, pb, eb);
        }
        if (mr) {  // an unknown label gives exactly 0 (a select: 0 * a NaN logit would be NaN)
          float m[K];
          for (int64_t j = 0; j < K; ++j) m[j] = mr[c + j] ? 0.0f : 1.0f;
          const Vec ka = Vec::loadu(m) != zero, kb = Vec::loadu(m + Vec::size()) != zero;
          la = Vec::blendv(zero, la, ka);
          lb = Vec::blendv(zero, lb, kb);
          ga = Vec::blendv(zero, ga, ka);
          gb = Vec::blendv(zero, gb, kb);
        }
        acc0 = acc0 + la;
        acc1 = acc1 + lb;
        if (write_grad) store2<float>(zr + c, ga, gb);
      }
      for (; c < C; ++c) {
        const float zv = static_cast<float>(zr[c]) + (bias ? bias[c] : 0.0f);
        const float yv = static_cast<float>(yr[c]), wv = lw ? lw[c] : 1.0f, pv = PW ? pw[c] : 1.0f;
        const float ev = exp_neg_abs(zv);
        const bool known = mr == nullptr || !mr[c];
        if (known) tail += loss_e<PW>(zv, yv, wv, pv, ev);
        if (write_grad) zr[c] = static_cast<logit_t>(known ? input_grad_e<PW>(zv, yv, wv, pv, ev) : 0.0f);
      }
      float lanes[Vec::size()];
      (acc0 + acc1).store(lanes);
      double s = 0;
      for (int64_t i = 0; i < Vec::size(); ++i) s += lanes[i];
      row_loss[r] = static_cast<float>(s + tail);
    }
  });
}

}  // namespace

namespace CPU_CAPABILITY {

at::Tensor linear_bce_epilogue_cpu(at::Tensor& logits, const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                   const std::optional<at::Tensor>& pos_weight,
                                   const std::optional<at::Tensor>& label_weight,
                                   const std::optional<at::Tensor>& unknown, bool write_grad) {
  check_epilogue(logits, bias, target, pos_weight, label_weight, unknown);
  const int64_t R = logits.size(0);
  at::Tensor row_loss = at::empty({R}, logits.options().dtype(at::kFloat));
  if (logits.numel() == 0) return row_loss.zero_();
  dispatch(logits.scalar_type(), target.scalar_type(), pos_weight.has_value(), [&](auto l, auto t, auto pwc) {
    epilogue_kernel<typename decltype(l)::type, typename decltype(t)::type, decltype(pwc)::value>(
        logits, ptr_or_null<float>(bias), target, ptr_or_null<float>(pos_weight), ptr_or_null<float>(label_weight),
        ptr_or_null<bool>(unknown), unknown.has_value() ? unknown->stride(0) : 0, write_grad, row_loss.data_ptr<float>());
  });
  return row_loss;
}

}  // namespace CPU_CAPABILITY
}  // namespace head
}  // namespace fusedtrain

#if !FT_CPU_AVX512_COPY
FT_DECLARE_AVX512_COPY(fusedtrain::head, linear_bce_epilogue_cpu)
TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("linear_bce_epilogue_", FT_CPU_KERNEL(fusedtrain::head, linear_bce_epilogue_cpu));
}
#endif
