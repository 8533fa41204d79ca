"""BCE with logits: validation, backend dispatch, fake kernels and autograd.

    binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None)

matches torch.nn.functional.binary_cross_entropy_with_logits in signature, broadcasting,
output dtype and values. Three ops share one contract (csrc/ops.cpp, `// ---- bce`):

    fusedtrain::bce_with_logits            native (C++ CPU + CUDA kernels, csrc/{cpu,cuda}/bce.*)
    fusedtrain_triton::bce_with_logits     triton (torch.library.triton_op, fusedtrain/triton/bce.py)
    fusedtrain_ref::bce_with_logits        reference (torch.library.custom_op, fusedtrain/reference.py)

each with a `..._target_grad` companion. All three get the same fake kernel and the same
autograd formula (registered here), so autograd and torch.compile treat them alike.

What this module does before an op runs (the kernels never validate):
- types, devices, shapes, broadcastability and the reduction name are checked;
- output dtype: torch gives the dtype of `target` (its loss is `(1 - target).mul_(input)...`, an
  in-place chain on a target-typed tensor; weight and pos_weight never promote); under
  torch.autocast for the input's device type, float32 (float64 when target is float64), as
  torch's autocast fp32 policy gives;
- input is made contiguous and viewed as (R, C) = (numel / last dim, last dim). The kernels read
  it in its own dtype: no fp32 copy of a low-precision input is ever made;
- target is read in input's dtype or in opmath (float32; float64 for a float64 input); a target of
  any other floating dtype is converted to opmath first (a target-sized copy);
- weight and pos_weight are converted to opmath (on their own, usually small, shape), broadcast
  to input's shape as stride-0 views and viewed as (R, C) with stride(1) in {0, 1} (made
  contiguous otherwise). When every present weight is a scalar or laid out like input, (R, C)
  collapses to (1, N) so the kernels run one flat loop;
- the loss is converted to out_dtype when that is neither input's dtype nor opmath (rare).

Autograd: the forward writes d loss / d input (1/N of mean folded in) in the same pass when
input requires grad. Backward for mean/sum scales that buffer in place by grad_output (one
elementwise pass, no second input-sized buffer); a second backward through the same graph
(retain_graph=True) then fails loudly with autograd's "modified by an inplace operation" error
instead of silently double-scaling. When grad_output is a CPU scalar equal to 1 (plain
loss.backward() on CPU, outside torch.compile) the saved buffer is returned as it is: no pass
at all. Under torch.compile the backward graph is functional (`mul`), and the saved buffer is
donated to it, so Inductor can reuse its memory. For 'none' it is `saved * grad_output` out of place (the
grad_output is input-sized anyway), so retain_graph works there. d loss / d target comes from the
`_target_grad` op (one pass) times grad_output. backward(create_graph=True) (double backward,
gradient penalties) computes both gradients with differentiable torch ops instead
(reference.bce_grads_differentiable), as torch's own BCE does.
"""
import torch

from fusedtrain import _backend, _ext, reference

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OP = "bce_with_logits"


# ---- fake kernels and autograd, shared by the three ops -------------------------------------

def _fake_forward(input, target, weight, pos_weight, reduction, compute_grad, out_dtype):
    R, C = input.shape
    loss = input.new_empty((R, C) if reduction == 0 else (), dtype=out_dtype)
    grad = input.new_empty((R, C) if compute_grad else (0, 0))
    return loss, grad


def _fake_target_grad(input, target, weight, pos_weight, reduction):
    return input.new_empty(input.shape, dtype=target.dtype)


def _is_host_one(t):
    """grad_output is a real CPU scalar equal to 1 (reading it costs nothing there); never under
    torch.compile tracing (fake tensors) and never for CUDA (that read would synchronize)."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.numel() == 1
            and not torch.compiler.is_compiling() and t.item() == 1.0)


def _make_autograd(target_grad_op):
    def setup_context(ctx, inputs, output):
        input, target, weight, pos_weight, reduction, compute_grad, out_dtype = inputs
        _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)  # no input-sized zeros for the non-differentiable output
        ctx.reduction = reduction
        ctx.has_grad = compute_grad
        ctx.target_grad = target.requires_grad
        # the inputs too (references, as torch's BCE keeps them): the target gradient and a
        # create_graph backward are computed from them
        ctx.save_for_backward(grad if compute_grad else None, input, target, weight, pos_weight)

    def backward(ctx, grad_loss, _grad_grad):
        grad, input, target, weight, pos_weight = ctx.saved_tensors
        gi = gt = None
        if grad_loss is None:  # the loss took no part in what was differentiated
            return None, None, None, None, None, None, None
        if torch.is_grad_enabled():
            # backward(create_graph=True): the gradients as differentiable torch expressions of
            # the inputs, so that a gradient penalty differentiates through them (the fused
            # kernels' outputs carry no graph)
            dx, dy = reference.bce_grads_differentiable(
                input, target, weight, pos_weight, ctx.reduction,
                want_dx=ctx.needs_input_grad[0], want_dy=ctx.needs_input_grad[1] and ctx.target_grad)
            gi = None if dx is None else (dx * grad_loss).to(input.dtype)
            gt = None if dy is None else (dy * grad_loss).to(target.dtype)
            return gi, gt, None, None, None, None, None
        if ctx.needs_input_grad[0]:
            if not ctx.has_grad:
                raise RuntimeError("bce_with_logits: input requires grad but the forward ran with "
                                   "compute_grad=False; call it through fusedtrain.functional")
            if ctx.reduction == 0:
                gi = grad * grad_loss
            elif _is_host_one(grad_loss):
                gi = grad  # loss.backward() of an unscaled loss: the saved gradient is the answer
            else:
                gi = grad.mul_(grad_loss)  # 0-d grad_loss: scale in place (see module docstring)
        if ctx.needs_input_grad[1] and ctx.target_grad:
            gt = target_grad_op(input, target, weight, pos_weight, ctx.reduction)
            gt = gt.mul_(grad_loss)
        return gi, gt, None, None, None, None, None

    return setup_context, backward


def _register(fwd_pkt, tg_pkt, *, fake=True):
    fwd_op, tg_op = fwd_pkt.default, tg_pkt.default
    if fake:
        torch.library.register_fake(fwd_op)(_fake_forward)
        torch.library.register_fake(tg_op)(_fake_target_grad)
    setup_context, backward = _make_autograd(tg_op)
    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


# ---- reference backend: the PyTorch formulas of fusedtrain/reference.py as an op ----------

@torch.library.custom_op("fusedtrain_ref::bce_with_logits", mutates_args=())
def _ref_forward(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                 pos_weight: torch.Tensor | None, reduction: int, compute_grad: bool,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = reference.bce_with_logits(input, target, weight, pos_weight, reduction, compute_grad, out_dtype)
    return loss.contiguous(), grad.contiguous()


@torch.library.custom_op("fusedtrain_ref::bce_with_logits_target_grad", mutates_args=())
def _ref_target_grad(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                     pos_weight: torch.Tensor | None, reduction: int) -> torch.Tensor:
    return reference.bce_with_logits_target_grad(input, target, weight, pos_weight, reduction)


_OPS = {"reference": (torch.ops.fusedtrain_ref.bce_with_logits,
                      torch.ops.fusedtrain_ref.bce_with_logits_target_grad)}
_register(*_OPS["reference"])

if _ext._C is not None:
    _OPS["native"] = (torch.ops.fusedtrain.bce_with_logits, torch.ops.fusedtrain.bce_with_logits_target_grad)
    _register(*_OPS["native"])

try:
    from fusedtrain.triton import bce as _triton_bce
except ImportError:  # no triton: the backend reports itself unavailable
    _triton_bce = None
else:
    # triton_op derives its fake kernel from its own (traceable) body
    _OPS["triton"] = (torch.ops.fusedtrain_triton.bce_with_logits,
                      torch.ops.fusedtrain_triton.bce_with_logits_target_grad)
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
    """Same as torch.nn.functional.binary_cross_entropy_with_logits, fused: one pass forward
    (writing d loss / d input when input requires grad), one elementwise pass backward."""
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
    compute_grad = input.requires_grad and torch.is_grad_enabled()

    fwd_op, _ = _OPS[_backend.select(device, OP)]
    loss, _ = fwd_op(x, t, w, pw, red, compute_grad, kernel_out)
    if kernel_out != out_dtype:
        loss = loss.to(out_dtype)
    return loss.view(shape) if red == 0 else loss
