// Schemas of every fusedtrain op. The CPU bodies live in csrc/cpu/<family>.cpp and the
// CUDA bodies in csrc/cuda/<family>.cu (TORCH_LIBRARY_IMPL); fake kernels and autograd
// are registered from Python in fusedtrain/ops/<family>.py.
//
// Ops never validate user input: fusedtrain/ops/ does that before calling them.
#include <torch/library.h>

TORCH_LIBRARY(fusedtrain, m) {
  // ---- bce (fusedtrain/ops/bce.py) ----
  // input, target: contiguous (R, C); weight, pos_weight: (R, C) views whose stride(1) is 0
  // or 1 (broadcast rows/columns are stride 0), in opmath (float32; float64 for a float64
  // input). input: float32/float16/bfloat16/float64; target and out_dtype: input's dtype or
  // opmath (ops/bce.py converts anything else). reduction: 0 none, 1 mean, 2 sum.
  // Returns (loss, grad_input): loss is (R, C) for none and 0-d otherwise, in out_dtype;
  // grad_input is d loss / d input (the 1/N of mean folded in), in input's dtype, and a
  // (0, 0) tensor when compute_grad is false. Reductions are deterministic (fixed chunks).
  m.def("bce_with_logits(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
        "int reduction, bool compute_grad, ScalarType out_dtype) -> (Tensor, Tensor)");
  // d loss / d target (the 1/N of mean folded in), in target's dtype, (R, C).
  m.def("bce_with_logits_target_grad(Tensor input, Tensor target, Tensor? weight, "
        "Tensor? pos_weight, int reduction) -> Tensor");

  // ---- adam (fusedtrain/ops/adam.py) ----

  // ---- unscale (fusedtrain/ops/unscale.py) ----
  // tensors: one device and one dtype (fp32, fp16 or bf16), each non-overlapping and dense;
  // inv_scale, found_inf: one-element fp32 tensors on that device. One pass over all the
  // tensors (one kernel launch on CUDA): every element x is checked, found_inf is set to 1.0
  // when any x is inf or NaN (never read on the host, never cleared), and with write the
  // tensors are overwritten by x * inv_scale (fp32 multiply, rounded once to the dtype).
  // write=false is a read-only pass (check and norm only). Returns the fp32 sum of squares of
  // the unscaled values x * inv_scale as a 0-d tensor when compute_norm (deterministic: fixed
  // chunking, fixed-order combine; nonfinite when some x is), else an empty tensor.
  m.def("unscale_and_check_(Tensor(a!)[] tensors, Tensor inv_scale, Tensor(b!) found_inf, "
        "bool compute_norm, bool write) -> Tensor");
}
