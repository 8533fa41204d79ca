// The many-label head's loss epilogue, CUDA body of fusedtrain::linear_bce_epilogue_ (schema and
// contract in csrc/ops.cpp `// ---- head`; the chunk loop and the cuBLAS matmuls are in
// fusedtrain/ops/head.py). Block (s, r) owns the segment [s * kSegment, (s + 1) * kSegment) of
// row r: its threads stride over the segment's columns (coalesced), turn each logit into
// d loss / d logit in place and reduce the segment's loss with cub::BlockReduce into
// partials[r, s]; the row's loss is their sum (at::sum: a fixed order, deterministic whatever
// the grid). Segments keep a chunk of few rows and many labels (B = 16) spread over the GPU.
// Per element: the BCE formulas of bce_math.h on z = logit + bias, label_weight as weight;
// unknown labels give 0.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "fusedtrain/bce_math.h"
#include "fusedtrain/head_dispatch.h"

namespace fusedtrain {
namespace head {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSegment = int64_t(kThreads) * 8;  // columns per block
constexpr int64_t kMaxRowBlocks = 65535;              // gridDim.y's limit; rows beyond it loop

template <typename logit_t, typename target_t, bool PW>
__global__ void __launch_bounds__(kThreads)
    epilogue_kernel(logit_t* __restrict__ z, const float* __restrict__ bias, const target_t* __restrict__ y,
                    int64_t ys0, const float* __restrict__ pw, const float* __restrict__ lw,
                    const bool* __restrict__ unknown, int64_t ms0, bool write_grad, float* __restrict__ partials,
                    int64_t R, int64_t C, int64_t S) {
  using BlockReduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  const int64_t s = blockIdx.x, c0 = s * kSegment, c1 = c0 + kSegment < C ? c0 + kSegment : C;
  for (int64_t r = blockIdx.y; r < R; r += gridDim.y) {
    logit_t* zr = z + r * C;
    const target_t* yr = y + r * ys0;
    const bool* mr = unknown ? unknown + r * ms0 : nullptr;
    float acc = 0.0f;
    for (int64_t c = c0 + threadIdx.x; c < c1; c += kThreads) {
      const float zv = static_cast<float>(zr[c]) + (bias ? __ldg(bias + c) : 0.0f);
      const float yv = static_cast<float>(yr[c]);
      const float wv = lw ? __ldg(lw + c) : 1.0f, pv = PW ? __ldg(pw + c) : 1.0f;
      const float ev = bce::exp_neg_abs(zv);
      const bool known = mr == nullptr || !mr[c];
      if (known) acc += bce::loss_e<PW>(zv, yv, wv, pv, ev);
      if (write_grad) zr[c] = static_cast<logit_t>(known ? bce::input_grad_e<PW>(zv, yv, wv, pv, ev) : 0.0f);
    }
    const float sum = BlockReduce(tmp).Sum(acc);
    if (threadIdx.x == 0) partials[r * S + s] = sum;
    __syncthreads();  // tmp is reused by the next row
  }
}

at::Tensor linear_bce_epilogue_cuda(at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                    const at::Tensor& target, const std::optional<at::Tensor>& pos_weight,
                                    const std::optional<at::Tensor>& label_weight,
                                    const std::optional<at::Tensor>& unknown, bool write_grad) {
  const c10::cuda::CUDAGuard guard(logits.device());
  check_epilogue(logits, bias, target, pos_weight, label_weight, unknown);
  const int64_t R = logits.size(0), C = logits.size(1);
  if (logits.numel() == 0) return at::zeros({R}, logits.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t S = (C + kSegment - 1) / kSegment;
  TORCH_CHECK(S < (int64_t(1) << 31), "linear_bce_epilogue_: too many columns");
  at::Tensor partials = at::empty({R, S}, logits.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(std::min(R, kMaxRowBlocks)));
  dispatch(logits.scalar_type(), target.scalar_type(), pos_weight.has_value(), [&](auto l, auto t, auto pwc) {
    using logit_t = typename decltype(l)::type;
    using target_t = typename decltype(t)::type;
    epilogue_kernel<logit_t, target_t, decltype(pwc)::value><<<grid, kThreads, 0, stream>>>(
        logits.data_ptr<logit_t>(), ptr_or_null<float>(bias), target.data_ptr<target_t>(), target.stride(0),
        ptr_or_null<float>(pos_weight), ptr_or_null<float>(label_weight), ptr_or_null<bool>(unknown),
        unknown.has_value() ? unknown->stride(0) : 0, write_grad, partials.data_ptr<float>(), R, C, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return S == 1 ? partials.view({R}) : partials.sum(1);
}

}  // namespace
}  // namespace head
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("linear_bce_epilogue_", &fusedtrain::head::linear_bce_epilogue_cuda);
}
