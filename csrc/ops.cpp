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
  // Returns (loss, unit_grad): the loss, (R, C) for none and 0-d otherwise, in out_dtype
  // (reductions deterministic: fixed chunks); with unit_grad, d loss / d input for a
  // grad_output of exactly 1 (the 1/N of mean folded in, rounded once to input's dtype), else
  // an empty (0,) tensor. ops/bce.py asks for it on CPU, where a grad_output of 1 is read for
  // free and the backward then returns it as it is.
  // kind: 0 BCE, 1 sigmoid focal loss, 2 asymmetric loss; params: [label_smoothing,
  // has_ignore (0/1), ignore_value, a, b, c] with (a, b) = (alpha, gamma) for focal and
  // (a, b, c) = (gamma_neg, gamma_pos, clip) for asl (formulas: bce_math.h). unit_grad only
  // for plain BCE (kind 0, no smoothing, no ignore value).
  m.def("bce_with_logits(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
        "int reduction, ScalarType out_dtype, bool unit_grad, int kind, float[] params) -> (Tensor, Tensor)");
  // The gradients of that loss, times grad_output (opmath; 0-d for mean/sum, contiguous (R, C)
  // for none), each computed in opmath and rounded once: grad_input (input's dtype) when
  // input_grad, grad_target (target's dtype) when target_grad, else an empty (0,) tensor.
  // For mean the factor is grad_output / N.
  m.def("bce_with_logits_backward(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, "
        "Tensor? pos_weight, int reduction, bool input_grad, bool target_grad, int kind, float[] params) "
        "-> (Tensor, Tensor)");

  // ---- adam (fusedtrain/ops/adam.py) ----
  // One Adam/AdamW step over every tensor of the lists, one kernel launch (one parallel
  // region on CPU) for all of them. All tensors on one device (a strided one is updated in a
  // contiguous copy that is copied back); params and grads
  // of one dtype (fp32/bf16/fp16); states in the param dtype or fp32; max_exp_avg_sqs empty
  // unless amsgrad; master_params empty or fp32 copies of the params (the update then runs
  // on them and params receive their rounding; states must be fp32). steps: one fp32
  // one-element tensor per param on its device, incremented by the kernel.
  // lr: the float lr, unless lr_tensor (one-element fp32 on the device) is given.
  // grad_mult: one-element fp32 on the device; every grad element is multiplied by it as it
  // is read (grads are never written). found_inf: one-element fp32 on the device; nonzero ->
  // nothing at all is written (params, states, masters, steps untouched).
  // sr_params: bf16 params (without master_params) are rounded stochastically; sr_exp_avg_sq:
  // a bf16 exp_avg_sq is; the random bits from (sr_seed (32-bit), the new step, the tensor's
  // index in the lists, the element's index) (adam_math.h sr_*). Every other store rounds to
  // nearest even.
  // 8-bit blockwise states (adam_math.h q8_*): exp_avgs, exp_avg_sqs (and max_exp_avg_sqs) uint8
  // codes, and per param one contiguous fp32 absmax tensor of ceil(numel / 256) blocks in each of
  // exp_avg_absmax, exp_avg_sq_absmax (and max_exp_avg_sq_absmax with amsgrad); the lists are
  // empty for any other state dtype. Every block is decoded, updated and encoded again with the
  // new absmax of its values.
  m.def("adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor(f!)[] master_params, "
        "Tensor(g!)[] exp_avg_absmax, Tensor(h!)[] exp_avg_sq_absmax, Tensor(i!)[] max_exp_avg_sq_absmax, float lr, "
        "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
        "bool maximize, bool decoupled_weight_decay, Tensor? grad_mult, Tensor? found_inf, int sr_seed=0, "
        "bool sr_params=False, bool sr_exp_avg_sq=False) -> ()");

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

  // ---- head (fusedtrain/ops/head.py) ----
  // The loss epilogue of one chunk of the many-label head (linear + BCE with logits).
  // logits: contiguous (R, C) float32/float16/bfloat16, the chunk's h @ W.T without bias.
  // target: (R, C) with unit column stride (a slice of the user's B x L target), float32,
  // float16 or bfloat16. bias, pos_weight, label_weight: contiguous float32 (C,) or None.
  // unknown: bool (R, C) with unit column stride or None; true marks an unknown label (no
  // loss, no gradient). Per element, on z = logit + bias in fp32, the BCE formulas (bce_math.h) with
  // label_weight as weight. With write_grad, logits is overwritten by d loss / d z (a sum
  // reduction with grad_output 1, rounded once to logits' dtype). Returns the loss summed per
  // row, float32 (R,), each row in a fixed order (deterministic).
  m.def("linear_bce_epilogue_(Tensor(a!) logits, Tensor? bias, Tensor target, Tensor? pos_weight, "
        "Tensor? label_weight, Tensor? unknown, bool write_grad) -> Tensor");
}
