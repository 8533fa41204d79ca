// The many-label head's loss epilogue, CUDA body of fusedtrain::linear_bce_epilogue_ (schema and
// contract in csrc/ops.cpp `// ---- head`; the chunk loop and the cuBLAS matmuls are in
// fusedtrain/ops/head.py). A block owns whole rows: its threads stride over a row's columns
// (coalesced), turn each logit into d loss / d logit in place and reduce the row's loss with
// cub::BlockReduce in a fixed order (deterministic, whatever the grid). Per element: the BCE
// formulas of bce_math.h on z = logit + bias, label_weight as weight; unknown labels give 0.
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
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // rows beyond this loop (grid-stride over rows)

template <typename logit_t, typename target_t, bool PW>
__global__ void __launch_bounds__(kThreads)
    epilogue_kernel(logit_t* __restrict__ z, const float* __restrict__ bias, const target_t* __restrict__ y,
                    int64_t ys0, const float* __restrict__ pw, const float* __restrict__ lw,
                    const bool* __restrict__ unknown, int64_t ms0, bool write_grad, float* __restrict__ row_loss, int64_t R,
                    int64_t C) {
  using BlockReduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    logit_t* zr = z + r * C;
    const target_t* yr = y + r * ys0;
    const bool* mr = unknown ? unknown + r * ms0 : nullptr;
    float acc = 0.0f;
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const float zv = static_cast<float>(zr[c]) + (bias ? __ldg(bias + c) : 0.0f);
      const float yv = static_cast<float>(yr[c]);
      const float wv = lw ? __ldg(lw + c) : 1.0f, pv = PW ? __ldg(pw + c) : 1.0f;
      const float ev = bce::exp_neg_abs(zv);
      const bool known = mr == nullptr || !mr[c];
      if (known) acc += bce::loss_e<PW>(zv, yv, wv, pv, ev);
      if (write_grad) zr[c] = static_cast<logit_t>(known ? bce::input_grad_e<PW>(zv, yv, wv, pv, ev) : 0.0f);
    }
    const float s = BlockReduce(tmp).Sum(acc);
    if (threadIdx.x == 0) row_loss[r] = s;
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
  at::Tensor row_loss = at::empty({R}, logits.options().dtype(at::kFloat));
  if (logits.numel() == 0) return row_loss.zero_();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min(R, kMaxBlocks);
  dispatch(logits.scalar_type(), target.scalar_type(), pos_weight.has_value(), [&](auto l, auto t, auto pwc) {
    using logit_t = typename decltype(l)::type;
    using target_t = typename decltype(t)::type;
    epilogue_kernel<logit_t, target_t, decltype(pwc)::value><<<blocks, kThreads, 0, stream>>>(
        logits.data_ptr<logit_t>(), ptr_or_null<float>(bias), target.data_ptr<target_t>(), target.stride(0),
        ptr_or_null<float>(pos_weight), ptr_or_null<float>(label_weight), ptr_or_null<bool>(unknown),
        unknown.has_value() ? unknown->stride(0) : 0, write_grad, row_loss.data_ptr<float>(), R, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return row_loss;
}

}  // namespace
}  // namespace head
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CUDA, m) {
  m.impl("linear_bce_epilogue_", &fusedtrain::head::linear_bce_epilogue_cuda);
}
