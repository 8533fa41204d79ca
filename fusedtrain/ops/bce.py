"""BCE with logits and its multi-label family (focal loss, ASL, label smoothing, ignore_index):
argument checks, kernel layout, backend dispatch, and the fake kernels and autograd shared by
every backend's `bce_with_logits` / `bce_with_logits_backward` ops. The op contract and the
layout are in docs/design.md §2; why the backward recomputes the gradient and rounds it once,
and the CPU shortcut for a grad_output of 1, in §4.
"""
import torch

from fusedtrain import _backend, _ext, reference

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OP = "bce_with_logits"


# ---- fake kernels and autograd, shared by the three backends --------------------------------

def _fake_forward(input, target, weight, pos_weight, reduction, out_dtype, unit_grad, kind, params):
    return (input.new_empty(input.shape if reduction == 0 else (), dtype=out_dtype),
            input.new_empty(input.shape if unit_grad else (0,)))


def _fake_backward(grad_output, input, target, weight, pos_weight, reduction, input_grad, target_grad, kind, params):
    return (input.new_empty(input.shape if input_grad else (0,)),
            target.new_empty(input.shape if target_grad else (0,)))


def _opmath(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _is_host_one(t):
    """grad_output is a real CPU scalar equal to 1 (reading it costs nothing there); never under
    torch.compile tracing (fake tensors) and never for CUDA (that read would synchronize)."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.numel() == 1
            and not torch.compiler.is_compiling() and t.item() == 1.0)


# Whether the forward's unit gradient was used by the last CPU backward that could have used
# it, for plain BCE (False) and the loss family (True): a loop that backpropagates something
# else than loss (loss / k of gradient accumulation, a weighted sum of losses) stops paying
# for a gradient it throws away (the family's costs half a forward) from its second step on.
_UNIT_GRAD_USED = {False: True, True: True}


def _make_autograd(forward_op, backward_op):
    def setup_context(ctx, inputs, output):
        input, target, weight, pos_weight, reduction, out_dtype, unit_grad, kind, params = inputs
        ctx.out_dtype, ctx.had_unit_grad = out_dtype, unit_grad
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no input-sized zeros for the non-differentiable output
        ctx.reduction, ctx.kind, ctx.params = reduction, kind, params
        ctx.save_for_backward(input, target, weight, pos_weight)
        # handed out once (autograd may make it x.grad and accumulate into it in place), so kept
        # outside the saved tensors' version checks; a second backward recomputes
        ctx.unit_grad = output[1] if unit_grad else None

    def backward(ctx, grad_loss, _grad_unit_grad):
        input, target, weight, pos_weight = ctx.saved_tensors
        unit_grad, ctx.unit_grad = ctx.unit_grad, None
        want_x, want_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nones = (None,) * 7
        if grad_loss is None:  # the loss took no part in what was differentiated
            return None, None, *nones
        if torch.is_grad_enabled():
            # backward(create_graph=True): the gradients as differentiable torch expressions of
            # the inputs, so that a gradient penalty differentiates through them
            if reference.is_generic(ctx.kind, ctx.params):
                raise NotImplementedError(
                    "backward(create_graph=True) is implemented for plain BCE only (no focal/asymmetric loss, "
                    "label_smoothing or ignore_index)")
            dx, dy = reference.bce_grads_differentiable(input, target, weight, pos_weight, ctx.reduction,
                                                        want_dx=want_x, want_dy=want_y)
            gi = None if dx is None else (dx * grad_loss).to(input.dtype)
            gt = None if dy is None else (dy * grad_loss).to(target.dtype)
            return gi, gt, *nones
        gi = None
        could = want_x and ctx.reduction != 0 and input.device.type == "cpu" and not torch.compiler.is_compiling()
        one = could and _is_host_one(grad_loss)
        if could:
            _UNIT_GRAD_USED[reference.is_generic(ctx.kind, ctx.params)] = one
        if one and ctx.had_unit_grad:
            # loss.backward() of an unscaled loss: computed in the forward; a second backward
            # through the same graph asks the forward's kernel again, whose bits are the first
            # one's (the backward kernel's may differ in the last bit: FMA contraction)
            if unit_grad is None:
                unit_grad = forward_op(input, target, weight, pos_weight, ctx.reduction, ctx.out_dtype, True,
                                       ctx.kind, ctx.params)[1]
            gi, want_x = unit_grad, False
        unit_grad = None  # freed before the backward allocates its own gradient
        if want_x or want_y:
            go = grad_loss.to(_opmath(input))
            if ctx.reduction == 0:
                go = go.contiguous()
            gx, gt = backward_op(go, input, target, weight, pos_weight, ctx.reduction, want_x, want_y,
                                 ctx.kind, ctx.params)
            gi = gx if want_x else gi
        return gi, gt if want_y else None, *nones

    return setup_context, backward


def _register(fwd_pkt, bwd_pkt, *, fake=True):
    fwd_op, bwd_op = fwd_pkt.default, bwd_pkt.default
    if fake:
        torch.library.register_fake(fwd_op)(_fake_forward)
        torch.library.register_fake(bwd_op)(_fake_backward)
    setup_context, backward = _make_autograd(fwd_op, bwd_op)
    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


# ---- reference backend: the PyTorch formulas of fusedtrain/reference.py as ops -------------

@torch.library.custom_op("fusedtrain_ref::bce_with_logits", mutates_args=())
def _ref_forward(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                 pos_weight: torch.Tensor | None, reduction: int, out_dtype: torch.dtype,
                 unit_grad: bool, kind: int, params: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = reference.bce_with_logits(input, target, weight, pos_weight, reduction, out_dtype, unit_grad,
                                           kind, params)
    return loss.contiguous(), grad


@torch.library.custom_op("fusedtrain_ref::bce_with_logits_backward", mutates_args=())
def _ref_backward(grad_output: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                  weight: torch.Tensor | None, pos_weight: torch.Tensor | None, reduction: int,
                  input_grad: bool, target_grad: bool, kind: int,
                  params: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.bce_with_logits_backward(grad_output, input, target, weight, pos_weight, reduction,
                                              input_grad, target_grad, kind, params)


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

def _check_tensor(fn, name, t, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        what = ("input holds logits and must be a floating tensor" if name == "input"
                else f"{name} must be a floating tensor (soft labels allowed)" if name == "target"
                else f"{name} must be a floating tensor")
        raise TypeError(f"{fn}: {what}; got dtype {t.dtype}")


def _check_broadcast(fn, name, t, shape, device):
    if t is None:
        return
    if t.device != device:
        raise RuntimeError(f"{fn}: {name} is on {t.device} but input is on {device}; "
                           f"expected all tensors on one device")
    try:
        ok = torch.broadcast_shapes(t.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{fn}: {name} of shape {tuple(t.shape)} is not broadcastable "
                         f"to the input shape {tuple(shape)}")
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{fn}: not differentiable with respect to {name}; "
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


def _check_number(fn, name, v, low=None, high=None, optional=False):
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number, got {type(v).__name__}")
    if v != v or (low is not None and v < low) or (high is not None and v > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{fn}: {name} must be {bounds}, got {v}")


def _fused_loss(fn, input, target, weight, pos_weight, reduction, kind, label_smoothing, ignore_index, abc,
                out_dtype_rule):
    """Validation, layout and dispatch shared by the family; abc: the kind's parameters."""
    _check_tensor(fn, "input", input)
    _check_tensor(fn, "target", target)
    _check_tensor(fn, "weight", weight, optional=True)
    _check_tensor(fn, "pos_weight", pos_weight, optional=True)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of 'none', 'mean', 'sum'; got {reduction!r}")
    _check_number(fn, "label_smoothing", label_smoothing, 0.0, 1.0)
    _check_number(fn, "ignore_index", ignore_index, optional=True)
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{fn}: input dtype {input.dtype} is not supported; "
                        f"expected float32, float16, bfloat16 or float64")
    device = input.device
    if target.device != device:
        raise RuntimeError(f"{fn}: target is on {target.device} but input is on "
                           f"{device}; expected all tensors on one device")
    shape = input.shape
    if target.shape != shape:
        raise ValueError(f"{fn}: target size ({target.shape}) must be the same as "
                         f"input size ({shape})")
    _check_broadcast(fn, "weight", weight, shape, device)
    _check_broadcast(fn, "pos_weight", pos_weight, shape, device)

    red = _REDUCTIONS[reduction]
    op_dtype = _opmath(input)
    out_dtype = out_dtype_rule(input, target)
    if torch.is_autocast_enabled(device.type):  # autocast's fp32 policy (float64 stays float64)
        out_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    kernel_out = out_dtype if out_dtype in (input.dtype, op_dtype) else op_dtype
    params = [float(label_smoothing), 0.0 if ignore_index is None else 1.0,
              0.0 if ignore_index is None else float(ignore_index), *(float(v) for v in abc)]
    params += [0.0] * (6 - len(params))
    # mean over the known elements only: the kernels sum, the division is an op autograd sees
    count = None
    if ignore_index is not None and red == 1:
        count = (target != ignore_index).sum()
        red = 2

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
    # for mean/sum ('none' is backpropagated with a tensor; a mean over the known elements is
    # a sum divided by an op), and not under fp16 autocast, whose loss is scaled by a
    # GradScaler (the forward's gradient would be thrown away)
    unit_grad = (input.requires_grad and torch.is_grad_enabled() and red != 0 and device.type == "cpu"
                 and count is None and _UNIT_GRAD_USED[reference.is_generic(kind, params)]
                 and not torch.compiler.is_compiling()
                 and not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16))
    fwd_op, _ = _OPS[_backend.select(device, OP)]
    loss, _ = fwd_op(x, t, w, pw, red, kernel_out, unit_grad, kind, params)
    if count is not None:  # all unknown: a mean of 0 with zero gradient, not NaN
        loss = loss / count.clamp_min(1).to(loss.dtype)
    if kernel_out != out_dtype:
        loss = loss.to(out_dtype)
    return loss.view(shape) if red == 0 else loss


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None, *,
                                     label_smoothing=0.0, ignore_index=None):
    """Same as torch.nn.functional.binary_cross_entropy_with_logits, fused: one pass forward,
    one pass backward that writes each gradient once, rounded once.

    Args:
        input: logits, float32/float16/bfloat16/float64, any shape.
        target: same shape as input, floating (soft labels allowed).
        weight: optional, broadcastable to input's shape.
        reduction: "none", "mean" or "sum".
        pos_weight: optional, broadcastable to input's shape (usually (C,)).
        label_smoothing: eps in [0, 1]; targets become y (1 - eps) + eps / 2.
        ignore_index: a target value (float) marking unknown labels: no loss, no gradient, and
            "mean" divides by the number of known elements (0, not NaN, when there are none).
    """
    return _fused_loss("binary_cross_entropy_with_logits", input, target, weight, pos_weight, reduction, 0,
                       label_smoothing, ignore_index, (), lambda i, t: t.dtype)


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none", *, weight=None,
                       label_smoothing=0.0, ignore_index=None):
    """torchvision.ops.sigmoid_focal_loss, fused and exact for every finite logit:
    alpha_t * BCE(x, y) * (1 - p_t)^gamma with 1 - p_t = p (1 - y) + (1 - p) y.

    Args:
        inputs, targets: logits and (soft) labels of one shape.
        alpha: weight of the positives in [0, 1]; a negative value disables the weighting.
        gamma: focusing exponent >= 0 (0 gives BCE).
        reduction: "none" (torchvision's default), "mean" or "sum".
        weight: optional per-element weight, broadcastable (fusedtrain's extension).
        label_smoothing, ignore_index: as in binary_cross_entropy_with_logits.
    """
    fn = "sigmoid_focal_loss"
    _check_number(fn, "alpha", alpha)
    _check_number(fn, "gamma", gamma, 0.0)
    return _fused_loss(fn, inputs, targets, weight, None, reduction, 1, label_smoothing, ignore_index,
                       (alpha, gamma), lambda i, t: torch.promote_types(i.dtype, t.dtype))


def asymmetric_loss(inputs, targets, gamma_neg=4.0, gamma_pos=1.0, clip=0.05, reduction="mean", *, weight=None,
                    label_smoothing=0.0, ignore_index=None):
    """The asymmetric loss (ASL, Ridnik et al., ICCV 2021) in logit space, per element
    A * B^gamma with A = -(y log p + (1 - y) log p_m), B = y (1 - p) + (1 - y) p_m,
    p_m = max(p - clip, 0) (the shifted probability of the negatives) and
    gamma = gamma_pos y + gamma_neg (1 - y). No eps clamp is needed: the logs are softplus forms.

    The paper's reference implementation returns -sum(y log p + ...) * w, which is this loss with
    reduction="sum" (it clamps probabilities at eps = 1e-8, so it differs where |x| > 18, where
    it caps the loss at 18.4). Its gradient is the full derivative (the reference's
    disable_torch_grad_focal_loss option treats the focusing weight as a constant instead).

    Args:
        inputs, targets: logits and (soft) labels of one shape.
        gamma_neg, gamma_pos: focusing exponents >= 0 of negatives and positives.
        clip: probability margin >= 0 of the negatives (0 or None disables it).
        reduction: "mean" (default), "sum" (the reference's value) or "none".
        weight: optional per-element weight, broadcastable.
        label_smoothing, ignore_index: as in binary_cross_entropy_with_logits.
    """
    fn = "asymmetric_loss"
    clip = 0.0 if clip is None else clip
    _check_number(fn, "gamma_neg", gamma_neg, 0.0)
    _check_number(fn, "gamma_pos", gamma_pos, 0.0)
    _check_number(fn, "clip", clip, 0.0, 1.0)
    return _fused_loss(fn, inputs, targets, weight, None, reduction, 2, label_smoothing, ignore_index,
                       (gamma_neg, gamma_pos, clip), lambda i, t: torch.promote_types(i.dtype, t.dtype))
