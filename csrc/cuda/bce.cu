// BCE with logits, CUDA bodies of fusedtrain::bce_with_logits and
// fusedtrain::bce_with_logits_backward (schemas and contract in csrc/ops.cpp).
//
// The forward reads input and target once (and writes the loss for 'none'); the backward reads
// them again and writes each wanted gradient once, times grad_output, rounded once. Each thread
// moves VEC = 16 / sizeof(input) elements per step with 16-byte loads and stores of input and
// gradient (target/loss in fp32 with a 2-byte input: two 16-byte accesses; vec_io.cuh);
// weight and pos_weight are read through the read-only cache (they are broadcast, usually tiny).
// Pointers that are not aligned for the vector width fall back to scalar accesses.
//
// Reduction (deterministic, independent of the grid): block b owns the fixed tile
// [b * kTile, (b + 1) * kTile), reduces it with cub::BlockReduce and writes partials[b]; one block
// then sums the partials in a fixed order. Per-element math: fusedtrain/bce_math.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "fusedtrain/bce_dispatch.h"
#include "fusedtrain/bce_math.h"
#include "vec_io.cuh"

namespace fusedtrain {
namespace bce {
namespace {

constexpr int kThreads = 256;
constexpr int kIters = 4;  // vector steps per thread per tile

using vec_io::load_vec;
using vec_io::store_vec;

template <typename scalar_t>
struct Tile {
  static constexpr int VEC = 16 / sizeof(scalar_t);
  static constexpr int64_t kTile = int64_t(kThreads) * VEC * kIters;
};

template <typename op_t>
struct BcastArg {
  const op_t* p;
  int64_t s0, s1;  // element (r, c) at p[r * s0 + c * s1]
  __device__ __forceinline__ op_t at(int64_t r, int64_t c) const { return __ldg(p + r * s0 + c * s1); }
};

template <typename scalar_t, typename target_t, typename out_t, bool PW, bool REDUCE>
__global__ void __launch_bounds__(kThreads)
    bce_fwd_kernel(const scalar_t* __restrict__ x, const target_t* __restrict__ y, BcastArg<opmath_t<scalar_t>> w,
                   BcastArg<opmath_t<scalar_t>> pw, out_t* __restrict__ loss_out, scalar_t* __restrict__ grad,
                   opmath_t<scalar_t>* __restrict__ partials, int64_t N, int64_t C, opmath_t<scalar_t> gscale,
                   Spec<opmath_t<scalar_t>> spec, bool generic, bool aligned) {
  using op_t = opmath_t<scalar_t>;
  constexpr int VEC = Tile<scalar_t>::VEC;
  const int64_t tile0 = int64_t(blockIdx.x) * Tile<scalar_t>::kTile;
  op_t acc = 0;
#pragma unroll 1
  for (int it = 0; it < kIters; ++it) {
    const int64_t i0 = tile0 + (int64_t(it) * kThreads + threadIdx.x) * VEC;
    if (i0 >= N) break;
    const int n = static_cast<int>(N - i0 < VEC ? N - i0 : VEC);
    const bool vec = aligned && n == VEC;
    scalar_t xs[VEC];
    target_t ys[VEC];
    load_vec(x + i0, vec, n, xs);
    load_vec(y + i0, vec, n, ys);
    int64_t r = i0 / C, c = i0 - r * C;
    out_t ls[VEC];
    scalar_t gs[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      op_t l = 0;
      gs[j] = scalar_t(0);
      if (j < n) {  // the weights are read only inside the tensor
        const op_t xv = static_cast<op_t>(xs[j]), yv = static_cast<op_t>(ys[j]), ev = exp_neg_abs(xv);
        const op_t wv = w.at(r, c), pv = PW ? pw.at(r, c) : op_t(1);
        if (generic) {
          op_t d;
          elem<PW>(spec, xv, yv, wv, pv, ev, l, d, d, false);
        } else {
          l = loss_e<PW>(xv, yv, wv, pv, ev);
        }
        if (grad != nullptr) gs[j] = static_cast<scalar_t>(input_grad_e<PW>(xv, yv, wv, pv, ev) * gscale);
      }
      if (REDUCE)
        acc += l;
      else
        ls[j] = static_cast<out_t>(l);
      if (++c == C) {
        c = 0;
        ++r;
      }
    }
    if (!REDUCE) store_vec(loss_out + i0, vec, n, ls);
    if (grad != nullptr) store_vec(grad + i0, vec, n, gs);
  }
  if (REDUCE) {
    using BlockReduce = cub::BlockReduce<op_t, kThreads>;
    __shared__ typename BlockReduce::TempStorage tmp;
    const op_t s = BlockReduce(tmp).Sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
  }
}

template <typename op_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    bce_sum_kernel(const op_t* __restrict__ partials, int64_t P, double divisor, out_t* __restrict__ out) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < P; i += kThreads) acc += static_cast<double>(partials[i]);
  using BlockReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  const double s = BlockReduce(tmp).Sum(acc);
  if (threadIdx.x == 0) *out = static_cast<out_t>(s / divisor);
}

// grad_input (gi != nullptr) and/or grad_target (gt != nullptr): the opmath derivative times
// grad_output[i] (PER_ELEM, 'none') or grad_output[0] / divisor, rounded once at the store.
// GENERIC (focal, asl, smoothing, ignore value: elem()) takes one element per step: eight
// unrolled elem() calls of a 16-bit input spill registers, and these losses are compute-bound.
template <typename scalar_t, bool GENERIC>
constexpr int bwd_vec() { return GENERIC ? 1 : Tile<scalar_t>::VEC; }
template <typename scalar_t, bool GENERIC>
constexpr int64_t bwd_tile() { return int64_t(kThreads) * bwd_vec<scalar_t, GENERIC>() * kIters; }

template <typename scalar_t, typename target_t, bool PW, bool PER_ELEM, bool GENERIC>
__global__ void __launch_bounds__(kThreads)
    bce_bwd_kernel(const opmath_t<scalar_t>* __restrict__ go, const scalar_t* __restrict__ x,
                   const target_t* __restrict__ y, BcastArg<opmath_t<scalar_t>> w, BcastArg<opmath_t<scalar_t>> pw,
                   scalar_t* __restrict__ gi, target_t* __restrict__ gt, int64_t N, int64_t C,
                   opmath_t<scalar_t> divisor, Spec<opmath_t<scalar_t>> spec, bool aligned) {
  using op_t = opmath_t<scalar_t>;
  constexpr int VEC = bwd_vec<scalar_t, GENERIC>();
  const int64_t tile0 = int64_t(blockIdx.x) * bwd_tile<scalar_t, GENERIC>();
  const op_t factor = PER_ELEM ? op_t(1) : go[0] / divisor;
#pragma unroll 1
  for (int it = 0; it < kIters; ++it) {
    const int64_t i0 = tile0 + (int64_t(it) * kThreads + threadIdx.x) * VEC;
    if (i0 >= N) break;
    const int n = static_cast<int>(N - i0 < VEC ? N - i0 : VEC);
    const bool vec = aligned && n == VEC;
    scalar_t xs[VEC];
    target_t ys[VEC];
    op_t fs[VEC];
    load_vec(x + i0, vec, n, xs);
    if (gi != nullptr || GENERIC) load_vec(y + i0, vec, n, ys);
    if (PER_ELEM) load_vec(go + i0, vec, n, fs);
    int64_t r = i0 / C, c = i0 - r * C;
    scalar_t gis[VEC];
    target_t gts[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      gis[j] = scalar_t(0);
      gts[j] = target_t(0);
      if (j < n) {  // the weights are read only inside the tensor
        const op_t xv = static_cast<op_t>(xs[j]), wv = w.at(r, c), pv = PW ? pw.at(r, c) : op_t(1);
        const op_t f = PER_ELEM ? fs[j] : factor;
        if (GENERIC) {
          op_t l, dx, dy;
          elem<PW>(spec, xv, static_cast<op_t>(ys[j]), wv, pv, exp_neg_abs(xv), l, dx, dy, gt != nullptr);
          gis[j] = static_cast<scalar_t>(dx * f);
          gts[j] = static_cast<target_t>(dy * f);
        } else {
          const op_t ev = (gi != nullptr || PW) ? exp_neg_abs(xv) : op_t(0);  // one exp for both gradients
          if (gi != nullptr) gis[j] = static_cast<scalar_t>(input_grad_e<PW>(xv, static_cast<op_t>(ys[j]), wv, pv, ev) * f);
          if (gt != nullptr) gts[j] = static_cast<target_t>(target_grad_e<PW>(xv, wv, pv, ev) * f);
        }
      }
      if (++c == C) {
        c = 0;
        ++r;
      }
    }
    if (gi != nullptr) store_vec(gi + i0, vec, n, gis);
    if (gt != nullptr) store_vec(gt + i0, vec, n, gts);
  }
}

template <typename op_t>
BcastArg<op_t> bcast_of(const std::optional<at::Tensor>& t, const op_t* one) {
  if (!t.has_value()) return {one, 0, 0};
  const auto& v = *t;
  return {v.data_ptr<op_t>(), v.size(0) == 1 ? 0 : v.stride(0), v.size(1) == 1 ? 0 : v.stride(1)};
}

// A device-resident 1 for absent weights (stride 0): a __device__ constant per opmath type.
__device__ float kOneF = 1.0f;
__device__ double kOneD = 1.0;
template <typename op_t>
const op_t* device_one() {
  void* p = nullptr;
  if constexpr (std::is_same_v<op_t, double>)
    C10_CUDA_CHECK(cudaGetSymbolAddress(&p, kOneD));
  else
    C10_CUDA_CHECK(cudaGetSymbolAddress(&p, kOneF));
  return static_cast<const op_t*>(p);
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_cuda(const at::Tensor& input, const at::Tensor& target,
                                                        const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& pos_weight,
                                                        int64_t reduction, at::ScalarType out_dtype, bool unit_grad,
                                                        int64_t kind, at::ArrayRef<double> params) {
  const c10::cuda::CUDAGuard guard(input.device());
  check_layout(input, target, weight, pos_weight, "bce_with_logits");
  const int64_t R = input.size(0), C = input.size(1), N = R * C;
  at::Tensor loss = reduction == 0 ? at::empty({R, C}, input.options().dtype(out_dtype))
                                   : at::empty({}, input.options().dtype(out_dtype));
  at::Tensor grad = unit_grad ? at::empty({R, C}, input.options()) : at::empty({0}, input.options());
  if (N == 0) {
    if (reduction != 0) loss.fill_(reduction == 1 ? std::numeric_limits<double>::quiet_NaN() : 0.0);
    return {loss, grad};
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(input.scalar_type(), target.scalar_type(), out_dtype, pos_weight.has_value(), "bce_with_logits",
           [&](auto s, auto t, auto o, auto pwc) {
             using scalar_t = typename decltype(s)::type;
             using target_t = typename decltype(t)::type;
             using out_t = typename decltype(o)::type;
             using op_t = opmath_t<scalar_t>;
             constexpr bool PW = decltype(pwc)::value;
             constexpr int VEC = Tile<scalar_t>::VEC;
             const op_t* one = device_one<op_t>();
             const auto w = bcast_of<op_t>(weight, one);
             const auto pw = bcast_of<op_t>(pos_weight, one);
             const int64_t blocks = (N + Tile<scalar_t>::kTile - 1) / Tile<scalar_t>::kTile;
             TORCH_CHECK(blocks < (int64_t(1) << 31), "bce_with_logits: tensor too large");
             const scalar_t* xp = input.data_ptr<scalar_t>();
             const target_t* yp = target.data_ptr<target_t>();
             const auto spec = spec_of<op_t>(kind, params, "bce_with_logits");
             const bool generic = is_generic(spec);
             TORCH_CHECK(!(unit_grad && generic), "bce_with_logits: unit_grad is for plain BCE only");
             scalar_t* gp = unit_grad ? grad.data_ptr<scalar_t>() : nullptr;
             const op_t gscale = reduction == 1 ? op_t(1) / op_t(N) : op_t(1);
             bool aligned = vec_io::aligned<scalar_t, VEC>(xp) && vec_io::aligned<target_t, VEC>(yp) &&
                            (gp == nullptr || vec_io::aligned<scalar_t, VEC>(gp));
             if (reduction == 0) {
               out_t* lp = loss.data_ptr<out_t>();
               aligned = aligned && vec_io::aligned<out_t, VEC>(lp);
               bce_fwd_kernel<scalar_t, target_t, out_t, PW, false><<<blocks, kThreads, 0, stream>>>(
                   xp, yp, w, pw, lp, gp, nullptr, N, C, gscale, spec, generic, aligned);
               C10_CUDA_KERNEL_LAUNCH_CHECK();
             } else {
               at::Tensor partials = at::empty({blocks}, input.options().dtype(c10::CppTypeToScalarType<op_t>::value));
               bce_fwd_kernel<scalar_t, target_t, out_t, PW, true><<<blocks, kThreads, 0, stream>>>(
                   xp, yp, w, pw, nullptr, gp, partials.data_ptr<op_t>(), N, C, gscale, spec, generic, aligned);
               C10_CUDA_KERNEL_LAUNCH_CHECK();
               bce_sum_kernel<op_t, out_t><<<1, kThreads, 0, stream>>>(
                   partials.data_ptr<op_t>(), blocks, reduction == 1 ? double(N) : 1.0, loss.data_ptr<out_t>());
               C10_CUDA_KERNEL_LAUNCH_CHECK();
             }
           });
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight, int64_t reduction,
    bool input_grad, bool target_grad, int64_t kind, at::ArrayRef<double> params) {
  const c10::cuda::CUDAGuard guard(input.device());
  check_layout(input, target, weight, pos_weight, "bce_with_logits_backward");
  check_grad_output(grad_output, input, reduction, "bce_with_logits_backward");
  const int64_t R = input.size(0), C = input.size(1), N = R * C;
  at::Tensor gi = input_grad ? at::empty({R, C}, input.options()) : at::empty({0}, input.options());
  at::Tensor gt = target_grad ? at::empty({R, C}, target.options()) : at::empty({0}, target.options());
  if (N == 0 || !(input_grad || target_grad)) return {gi, gt};
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(input.scalar_type(), target.scalar_type(), input.scalar_type(), pos_weight.has_value(),
           "bce_with_logits_backward", [&](auto s, auto t, auto, auto pwc) {
             using scalar_t = typename decltype(s)::type;
             using target_t = typename decltype(t)::type;
             using op_t = opmath_t<scalar_t>;
             constexpr bool PW = decltype(pwc)::value;
             const op_t* one = device_one<op_t>();
             const auto w = bcast_of<op_t>(weight, one);
             const auto pw = bcast_of<op_t>(pos_weight, one);
             const auto spec = spec_of<op_t>(kind, params, "bce_with_logits_backward");
             const op_t* gop = grad_output.data_ptr<op_t>();
             const scalar_t* xp = input.data_ptr<scalar_t>();
             const target_t* yp = target.data_ptr<target_t>();
             scalar_t* gip = input_grad ? gi.data_ptr<scalar_t>() : nullptr;
             target_t* gtp = target_grad ? gt.data_ptr<target_t>() : nullptr;
             const op_t divisor = reduction == 1 ? op_t(N) : op_t(1);
             auto launch = [&](auto per_elem, auto generic) {
               constexpr bool PER_ELEM = decltype(per_elem)::value, GENERIC = decltype(generic)::value;
               constexpr int VEC = bwd_vec<scalar_t, GENERIC>();
               constexpr int64_t kTileB = bwd_tile<scalar_t, GENERIC>();
               const int64_t blocks = (N + kTileB - 1) / kTileB;
               TORCH_CHECK(blocks < (int64_t(1) << 31), "bce_with_logits_backward: tensor too large");
               const bool aligned = vec_io::aligned<scalar_t, VEC>(xp) &&
                                    vec_io::aligned<target_t, VEC>(yp) &&
                                    (gip == nullptr || vec_io::aligned<scalar_t, VEC>(gip)) &&
                                    (gtp == nullptr || vec_io::aligned<target_t, VEC>(gtp)) &&
                                    (!PER_ELEM || vec_io::aligned<op_t, VEC>(gop));
               bce_bwd_kernel<scalar_t, target_t, PW, PER_ELEM, GENERIC><<<blocks, kThreads, 0, stream>>>(
                   gop, xp, yp, w, pw, gip, gtp, N, C, divisor, spec, aligned);
             };
             using T_ = std::true_type;
             using F_ = std::false_type;
             const bool generic = is_generic(spec);
             if (reduction == 0)
               generic ? launch(T_{}, T_{}) : launch(T_{}, F_{});
             else
               generic ? launch(F_{}, T_{}) : launch(F_{}, F_{});
             C10_CUDA_KERNEL_LAUNCH_CHECK();
           });
  return {gi, gt};
}

}  // namespace
}  // namespace bce
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("bce_with_logits", &fusedtrain::bce::bce_with_logits_cuda);
  m.impl("bce_with_logits_backward", &fusedtrain::bce::bce_with_logits_backward_cuda);
}
