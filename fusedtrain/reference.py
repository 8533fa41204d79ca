"""The PyTorch reference implementations: the spec every other backend is tested against.

Plain PyTorch ops, any device. Each section follows the contract of its op family's kernels
(the same arguments and results), computed in opmath: float32 for fp32/fp16/bf16 storage,
float64 for float64 storage. Tests call them on float64 tensors to get the float64 truth.
"""
import torch
import torch.nn.functional as F

# ---- bce ----------------------------------------------------------------------------------
# BCE with logits (DESIGN §4), per element, with e = exp(-|x|), softplus(-x) = log1p(e) + max(-x, 0):
#   lw   = 1 + (pos_weight - 1) * y                        (1 without pos_weight)
#   loss = w * ((1 - y) * x + lw * softplus(-x))
#   dx   = w * (lw * sigmoid(x) - pos_weight * y)           (w * (sigmoid(x) - y) without)
#   dy   = w * (pos_weight * softplus(-x) - softplus(x))    (w * -x without)
# Same formulas as csrc/include/fusedtrain/bce_math.h and fusedtrain/triton/bce.py.

BCE_REDUCTIONS = ("none", "mean", "sum")  # reduction codes 0, 1, 2 of the ops


def _bce_opmath(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def bce_terms(x, y=None, w=None, pw=None, *, want=("loss", "dx")):
    """Per-element BCE terms in the dtype of `x` (callers upcast): a dict with the requested
    of "loss", "dx", "dy", each grouped as in bce_math.h."""
    e = torch.exp(-x.abs())
    out = {}
    lw = None if pw is None or y is None else 1 + (pw - 1) * y
    if "loss" in want:
        # regrouped as in bce_math.h loss(): no cancelling large terms; (x - x) keeps torch's
        # NaN at x = -inf
        tail = torch.where(x >= 0, (1 - y) * x, (x - x) - (y if pw is None else pw * y) * x)
        l1p = torch.log1p(e)
        out["loss"] = (l1p if lw is None else lw * l1p) + tail
    if "dx" in want:
        # as bce_math.h input_grad(): sigmoid(x) = 1 - e/(1+e) or e/(1+e), no cancellation
        lwer = e / (1 + e) if lw is None else lw * (e / (1 + e))
        out["dx"] = torch.where(x >= 0, (1 - y) - lwer, lwer - (y if pw is None else pw * y))
    if "dy" in want:
        out["dy"] = -x if pw is None else (pw - 1) * torch.log1p(e) - torch.where(x >= 0, x, pw * x)
    if w is not None:
        out = {k: v * w for k, v in out.items()}
    return out


def bce_grads_differentiable(input, target, weight, pos_weight, reduction: int, want_dx=True, want_dy=True):
    """(d loss / d input, d loss / d target) of the (R, C) op inputs, 1/N of mean folded in,
    in opmath, as autograd-differentiable expressions (None where not wanted): the dx and dy
    of bce_terms, written with torch.sigmoid and softplus, whose derivatives are right at
    x = 0 (bce_terms' exp(-|x|) form has a zero derivative there)."""
    op = _bce_opmath(input)
    x, y = input.to(op), target.to(op)
    w = None if weight is None else weight.to(op)
    pw = None if pos_weight is None else pos_weight.to(op)
    n = max(x.numel(), 1) if reduction == 1 else 1
    dx = dy = None
    if want_dx:
        sig = torch.sigmoid(x)
        dx = sig - y if pw is None else (1 + (pw - 1) * y) * sig - pw * y
    if want_dy:
        dy = -x if pw is None else pw * F.softplus(-x) - F.softplus(x)
    if w is not None:
        dx, dy = (None if d is None else d * w for d in (dx, dy))
    return tuple(None if d is None else d / n for d in (dx, dy))


def bce_with_logits(input, target, weight, pos_weight, reduction: int, out_dtype, unit_grad: bool):
    """The contract of the fusedtrain::bce_with_logits op: (loss, unit_grad).

    input, target: (R, C); weight, pos_weight: None or broadcastable to (R, C). reduction 0 none,
    1 mean, 2 sum. loss: (R, C) for none, 0-d otherwise, in out_dtype. unit_grad: d loss / d input
    for grad_output = 1 (1/N of mean folded in) in input's dtype when asked, else empty (0,)."""
    op = _bce_opmath(input)
    x, y = input.to(op), target.to(op)
    w = None if weight is None else weight.to(op)
    pw = None if pos_weight is None else pos_weight.to(op)
    terms = bce_terms(x, y, w, pw, want=("loss", "dx") if unit_grad else ("loss",))
    loss = torch.broadcast_to(terms["loss"], input.shape)
    n = loss.numel()
    if reduction == 1:
        loss = loss.sum() / n if n else loss.new_tensor(float("nan"))
    elif reduction == 2:
        loss = loss.sum()
    if unit_grad:
        dx = torch.broadcast_to(terms["dx"], input.shape)
        grad = (dx * (1 / torch.tensor(n, dtype=op)) if reduction == 1 else dx).to(input.dtype).contiguous()
    else:
        grad = input.new_empty((0,))
    return loss.to(out_dtype), grad


def bce_with_logits_backward(grad_output, input, target, weight, pos_weight, reduction: int,
                             input_grad: bool, target_grad: bool):
    """The contract of fusedtrain::bce_with_logits_backward: (grad_input, grad_target), each the
    opmath derivative times grad_output (grad_output / N for mean), rounded once to input's /
    target's dtype; an empty (0,) tensor where not wanted."""
    op = _bce_opmath(input)
    x = input.to(op)
    w = None if weight is None else weight.to(op)
    pw = None if pos_weight is None else pos_weight.to(op)
    go = grad_output.to(op)
    factor = go / input.numel() if reduction == 1 else go
    want = (("dx",) if input_grad else ()) + (("dy",) if target_grad else ())
    terms = bce_terms(x, target.to(op), w, pw, want=want)
    gi = (torch.broadcast_to(terms["dx"] * factor, input.shape).to(input.dtype).contiguous() if input_grad
          else input.new_empty((0,)))
    gt = (torch.broadcast_to(terms["dy"] * factor, input.shape).to(target.dtype).contiguous() if target_grad
          else target.new_empty((0,)))
    return gi, gt


# ---------------------------------------------------------------------------------------
# unscale (fusedtrain/ops/unscale.py)
# ---------------------------------------------------------------------------------------


def unscale_and_check_(tensors, inv_scale, found_inf, compute_norm, write):
    """Reference of torch.ops.fusedtrain.unscale_and_check_ for one (device, dtype) group.

    The unscaled value of x is the fp32 product x * inv_scale (what
    torch._amp_foreach_non_finite_check_and_unscale_ computes), rounded once to the storage
    dtype when written back. found_inf is set to 1.0 when any x is inf or NaN (with device
    ops: no host sync). Returns the sum of squares of the unscaled fp32 values, accumulated in
    float64 and rounded to a 0-d fp32 tensor, when compute_norm; else an empty fp32 tensor.
    """
    inv = inv_scale.reshape(()).float()
    sumsq = torch.zeros((), dtype=torch.float64, device=inv.device)
    bad = torch.zeros((), dtype=torch.bool, device=inv.device)
    with torch.no_grad():
        for t in tensors:
            if t.numel() == 0:
                continue
            x = t.float()
            y = x * inv
            bad |= ~torch.isfinite(x).all()
            if compute_norm:
                sumsq += y.double().square().sum()
            if write:
                t.copy_(y)
        found_inf.masked_fill_(bad, 1.0)
    if not compute_norm:
        return torch.empty((0,), dtype=torch.float32, device=inv.device)
    return sumsq.float()


def unscale_and_check_float64(tensors, inv_scale):
    """Float64 expectation for tests: (unscaled values in float64 per tensor, found_inf as a
    bool, the L2 norm of the unscaled values in float64)."""
    inv = float(inv_scale.reshape(()).float().item())
    outs, bad, sq = [], False, 0.0
    for t in tensors:
        x = t.detach().double().cpu()
        y = x * inv
        outs.append(y)
        bad = bad or not bool(torch.isfinite(x).all())
        sq += float(y.square().sum())
    return outs, bad, sq ** 0.5


# ---------------------------------------------------------------------------------------
# adam (fusedtrain/ops/adam.py): one Adam/AdamW step, torch.optim's update (DESIGN §4)
# ---------------------------------------------------------------------------------------


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, *,
          lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
          grad_mult=None, found_inf=None):
    """Plain torch ops, one tensor at a time, in fp32 (float64 for float64 params); the
    per-tensor scalars (bias corrections, step size) in float64 from the per-tensor step.
    With found_inf nonzero nothing changes (a device-side select, no host read)."""
    keep = None if found_inf is None else (found_inf.reshape(()) != 0)
    for i, param in enumerate(params):
        master = master_params[i] if master_params else None
        src = master if master is not None else param
        ct = torch.float64 if src.dtype == torch.float64 else torch.float32
        p = src.to(ct)
        g = grads[i].to(ct)
        m = exp_avgs[i].to(ct)
        v = exp_avg_sqs[i].to(ct)
        step = steps[i] + 1
        if grad_mult is not None:
            g = g * grad_mult.reshape(()).to(ct)
        if maximize:
            g = -g
        lr_d = lr.reshape(()).double() if torch.is_tensor(lr) else lr
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * torch.as_tensor(1 - lr_d * weight_decay, dtype=torch.float64).to(ct)
            else:
                g = g + weight_decay * p
        m = torch.lerp(m, g, 1 - beta1)
        v = v * beta2 + (1 - beta2) * g * g
        s = step.double()
        bc1 = 1 - torch.pow(torch.tensor(beta1, dtype=torch.float64, device=s.device), s)
        bc2 = 1 - torch.pow(torch.tensor(beta2, dtype=torch.float64, device=s.device), s)
        step_size = (lr_d / bc1).to(ct)
        bc2_sqrt = bc2.sqrt().to(ct)
        if amsgrad:
            vmax = torch.maximum(max_exp_avg_sqs[i].to(ct), v)
            denom = vmax.sqrt() / bc2_sqrt + eps
        else:
            denom = v.sqrt() / bc2_sqrt + eps
        p = p - step_size * m / denom
        outs = [(src, p), (exp_avgs[i], m), (exp_avg_sqs[i], v)]
        if master is not None:
            outs.append((param, p))
        if amsgrad:
            outs.append((max_exp_avg_sqs[i], vmax))
        if keep is None:
            for dst, new in outs:
                dst.copy_(new)
            steps[i].copy_(step)
        else:
            for dst, new in outs:
                dst.copy_(torch.where(keep, dst, new.to(dst.dtype)))
            steps[i].copy_(torch.where(keep, steps[i], step))
