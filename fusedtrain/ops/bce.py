"""BCE with logits: validation, backend dispatch, fake kernels and autograd.

    binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None)

matches torch.nn.functional.binary_cross_entropy_with_logits in signature, broadcasting,
output dtype and values. Each backend registers two ops with one contract (csrc/ops.cpp,
`// ---- bce`): `bce_with_logits` (the loss) and `bce_with_logits_backward` (the gradients of
input and/or target times grad_output), as `fusedtrain::` (native), `fusedtrain_triton::` and
`fusedtrain_ref::` (reference). All get the same fake kernels and autograd formula (registered
here), so autograd and torch.compile treat them alike.

Before an op runs, this module checks types, devices, shapes, broadcastability and the
reduction name, and lays the tensors out for the kernels: input contiguous as (R, C) in its
own dtype (no fp32 copy of a low-precision input); target in input's dtype or opmath (fp32;
fp64 for fp64 input); weight and pos_weight in opmath as stride-0-broadcast (R, C) views,
collapsed to (1, N) when all are scalars or laid out like input. The loss dtype is torch's:
target's dtype, or fp32 (fp64 for an fp64 target) under autocast.

Gradients are computed in the backward from the saved inputs: grad_output (a loss scale of
2^16, a tensor for 'none') multiplies the fp32 derivative before the one rounding to the
storage dtype. Storing d loss / d input in fp16 and scaling it later rounds twice, and for
'mean' over millions of elements the first rounding lands in fp16's subnormals and destroys
the value (docs/design.md, "Gradients are rounded once"). One exception keeps plain CPU
training as fast as a fused forward: on CPU tensors outside torch.compile the forward also
writes the gradient for a grad_output of exactly 1 (from the same exp), and a backward whose
grad_output is a CPU 1 (loss.backward(), read for free) returns it without a pass.
backward(create_graph=True) computes the gradients with differentiable torch ops instead
(reference.bce_grads_differentiable), as torch's own BCE does.
"""
import torch

from fusedtrain import _backend, _ext, reference

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OP = "bce_with_logits"


# ---- fake kernels and autograd, shared by the three backends --------------------------------

def _fake_forward(input, target, weight, pos_weight, reduction, out_dtype, unit_grad):
    return (input.new_empty(input.shape if reduction == 0 else (), dtype=out_dtype),
            input.new_empty(input.shape if unit_grad else (0,)))


def _fake_backward(grad_output, input, target, weight, pos_weight, reduction, input_grad, target_grad):
    return (input.new_empty(input.shape if input_grad else (0,)),
            target.new_empty(input.shape if target_grad else (0,)))


def _opmath(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _is_host_one(t):
    """grad_output is a real CPU scalar equal to 1 (reading it costs nothing there); never under
    torch.compile tracing (fake tensors) and never for CUDA (that read would synchronize)."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.numel() == 1
            and not torch.compiler.is_compiling() and t.item() == 1.0)


def _make_autograd(backward_op):
    def setup_context(ctx, inputs, output):
        input, target, weight, pos_weight, reduction, out_dtype, unit_grad = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no input-sized zeros for the non-differentiable output
        ctx.reduction = reduction
        ctx.save_for_backward(input, target, weight, pos_weight)
        # handed out once (autograd may make it x.grad and accumulate into it in place), so kept
        # outside the saved tensors' version checks; a second backward recomputes
        ctx.unit_grad = output[1] if unit_grad else None

    def backward(ctx, grad_loss, _grad_unit_grad):
        input, target, weight, pos_weight = ctx.saved_tensors
        unit_grad, ctx.unit_grad = ctx.unit_grad, None
        want_x, want_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_loss is None:  # the loss took no part in what was differentiated
            return None, None, None, None, None, None, None
        if torch.is_grad_enabled():
            # backward(create_graph=True): the gradients as differentiable torch expressions of
            # the inputs, so that a gradient penalty differentiates through them
            dx, dy = reference.bce_grads_differentiable(input, target, weight, pos_weight, ctx.reduction,
                                                        want_dx=want_x, want_dy=want_y)
            gi = None if dx is None else (dx * grad_loss).to(input.dtype)
            gt = None if dy is None else (dy * grad_loss).to(target.dtype)
            return gi, gt, None, None, None, None, None
        gi = None
        if want_x and unit_grad is not None and ctx.reduction != 0 and _is_host_one(grad_loss):
            gi, want_x = unit_grad, False  # loss.backward() of an unscaled loss: computed in the forward
        unit_grad = None  # freed before the backward allocates its own gradient
        if want_x or want_y:
            go = grad_loss.to(_opmath(input))
            if ctx.reduction == 0:
                go = go.contiguous()
            gx, gt = backward_op(go, input, target, weight, pos_weight, ctx.reduction, want_x, want_y)
            gi = gx if want_x else gi
        return gi, gt if want_y else None, None, None, None, None, None

    return setup_context, backward


def _register(fwd_pkt, bwd_pkt, *, fake=True):
    fwd_op, bwd_op = fwd_pkt.default, bwd_pkt.default
    if fake:
        torch.library.register_fake(fwd_op)(_fake_forward)
        torch.library.register_fake(bwd_op)(_fake_backward)
    setup_context, backward = _make_autograd(bwd_op)
    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


# ---- reference backend: the PyTorch formulas of fusedtrain/reference.py as ops -------------

@torch.library.custom_op("fusedtrain_ref::bce_with_logits", mutates_args=())
def _ref_forward(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                 pos_weight: torch.Tensor | None, reduction: int, out_dtype: torch.dtype,
                 unit_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = reference.bce_with_logits(input, target, weight, pos_weight, reduction, out_dtype, unit_grad)
    return loss.contiguous(), grad


@torch.library.custom_op("fusedtrain_ref::bce_with_logits_backward", mutates_args=())
def _ref_backward(grad_output: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                  weight: torch.Tensor | None, pos_weight: torch.Tensor | None, reduction: int,
                  input_grad: bool, target_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.bce_with_logits_backward(grad_output, input, target, weight, pos_weight, reduction,
                                              input_grad, target_grad)


_OPS = {"reference": (torch.ops.fusedtrain_ref.bce_with_logits, torch.ops.fusedtrain_ref.bce_with_logits_backward)}
_register(*_OPS["reference"])

if _ext._C is not None:
    _OPS["native"] = (torch.ops.fusedtrain.bce_with_logits, torch.ops.fusedtrain.bce_with_logits_backward)
    _register(*_OPS["native"])

try:
    from fusedtrain.triton import bce as _triton_bce
except ImportError:  # no triton: the backend reports itself unavailable
    _triton_bce = None
else:
    # triton_op derives its fake kernel from its own (traceable) body
    _OPS["triton"] = (torch.ops.fusedtrain_triton.bce_with_logits,
                      torch.ops.fusedtrain_triton.bce_with_logits_backward)
    _register(*_OPS["triton"], fake=False)


# ---- validation and layout ---------------------------------------------------------------

def _check_tensor(name, t, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"binary_cross_entropy_with_logits: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        what = ("input holds logits and must be a floating tensor" if name == "input"
                else f"{name} must be a floating tensor (soft labels allowed)" if name == "target"
                else f"{name} must be a floating tensor")
        raise TypeError(f"binary_cross_entropy_with_logits: {what}; got dtype {t.dtype}")


def _check_broadcast(name, t, shape, device):
    if t is None:
        return
    if t.device != device:
        raise RuntimeError(f"binary_cross_entropy_with_logits: {name} is on {t.device} but input is on {device}; "
                           f"expected all tensors on one device")
    try:
        ok = torch.broadcast_shapes(t.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"binary_cross_entropy_with_logits: {name} of shape {tuple(t.shape)} is not broadcastable "
                         f"to the input shape {tuple(shape)}")
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"binary_cross_entropy_with_logits: not differentiable with respect to {name}; "
                           f"it cannot have requires_grad=True (as in torch)")


def _is_scalar_like(t):
    return all(s == 0 or n == 1 for s, n in zip(t.stride(), t.shape))


def _weight_view(w, shape, R, C, flat, op_dtype):
    """w (broadcastable to `shape`) as an (R, C) opmath tensor whose stride(1) is 0 or 1."""
    if w is None:
        return None
    w = w.to(op_dtype).expand(shape)
    if flat:
        if _is_scalar_like(w):
            return w.as_strided((R, C), (0, 0))
        return w.reshape(R, C)
    w = w.reshape(R, C)
    if C > 1 and w.stride(1) not in (0, 1):
        w = w.contiguous()
    return w


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None):
    """Same as torch.nn.functional.binary_cross_entropy_with_logits, fused: one pass forward,
    one pass backward that writes each gradient once, rounded once.

    Args:
        input: logits, float32/float16/bfloat16/float64, any shape.
        target: same shape as input, floating (soft labels allowed).
        weight: optional, broadcastable to input's shape.
        reduction: "none", "mean" or "sum".
        pos_weight: optional, broadcastable to input's shape (usually (C,)).
    """
    _check_tensor("input", input)
    _check_tensor("target", target)
    _check_tensor("weight", weight, optional=True)
    _check_tensor("pos_weight", pos_weight, optional=True)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"binary_cross_entropy_with_logits: reduction must be one of 'none', 'mean', 'sum'; "
                         f"got {reduction!r}")
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(f"binary_cross_entropy_with_logits: input dtype {input.dtype} is not supported; "
                        f"expected float32, float16, bfloat16 or float64")
    device = input.device
    if target.device != device:
        raise RuntimeError(f"binary_cross_entropy_with_logits: target is on {target.device} but input is on "
                           f"{device}; expected all tensors on one device")
    shape = input.shape
    if target.shape != shape:
        raise ValueError(f"binary_cross_entropy_with_logits: target size ({target.shape}) must be the same as "
                         f"input size ({shape})")
    _check_broadcast("weight", weight, shape, device)
    _check_broadcast("pos_weight", pos_weight, shape, device)

    red = _REDUCTIONS[reduction]
    op_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    if torch.is_autocast_enabled(device.type):
        out_dtype = torch.float64 if target.dtype == torch.float64 else torch.float32
    else:
        out_dtype = target.dtype
    kernel_out = out_dtype if out_dtype in (input.dtype, op_dtype) else op_dtype

    n = input.numel()
    flat = all(w is None or _is_scalar_like(w.expand(shape)) or w.expand(shape).is_contiguous()
               for w in (weight, pos_weight))
    if flat or input.dim() == 0:
        R, C = 1, n
    else:
        C = shape[-1]
        R = n // C if C else 0
    x = input.contiguous().view(R, C)
    t = target if target.dtype in (input.dtype, op_dtype) else target.to(op_dtype)
    t = t.contiguous().view(R, C)
    w = _weight_view(weight, shape, R, C, flat, op_dtype)
    pw = _weight_view(pos_weight, shape, R, C, flat, op_dtype)

    # the unit gradient only where a grad_output of 1 can be recognized for free (CPU, eager),
    # for mean/sum ('none' is backpropagated with a tensor), and not under fp16 autocast, whose
    # loss is scaled by a GradScaler (the forward's gradient would be thrown away)
    unit_grad = (input.requires_grad and torch.is_grad_enabled() and red != 0 and device.type == "cpu"
                 and not torch.compiler.is_compiling()
                 and not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16))
    fwd_op, _ = _OPS[_backend.select(device, OP)]
    loss, _ = fwd_op(x, t, w, pw, red, kernel_out, unit_grad)
    if kernel_out != out_dtype:
        loss = loss.to(out_dtype)
    return loss.view(shape) if red == 0 else loss
