"""The PyTorch reference implementations: the spec every other backend is tested against.

Plain PyTorch ops, any device. Each section follows the contract of its op family's kernels
(the same arguments and results), computed in opmath: float32 for fp32/fp16/bf16 storage,
float64 for float64 storage. Tests call them on float64 tensors to get the float64 truth.
"""
import math

import torch
import torch.nn.functional as F

# ---- bce ----------------------------------------------------------------------------------
# BCE with logits (docs/design.md §4), per element, with e = exp(-|x|), softplus(-x) = log1p(e) + max(-x, 0):
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


# The multi-label family (bce_math.h "the multi-label family"): kind 0 BCE, 1 focal, 2 asl;
# params = [label_smoothing, has_ignore, ignore_value, a, b, c].
PLAIN = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def is_generic(kind, params) -> bool:
    return kind != 0 or params[0] != 0 or params[1] != 0


def _sig_terms(x):
    e = torch.exp(-x.abs())
    r = 1 / (1 + e)
    er = e * r
    pos = x >= 0
    l1p = torch.log1p(e)
    return torch.where(pos, r, er), torch.where(pos, er, r), l1p + torch.clamp_min(-x, 0), l1p + torch.clamp_min(x, 0)


def _safe_ratio(num, den):
    """num / den where den > 0, else 0 (den is a power's base: B^g / B for B^(g - 1))."""
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(num))


def _focal(x, y, alpha, gamma):
    p, q, _, _ = _sig_terms(x)
    t = bce_terms(x, y, want=("loss", "dx"))
    ce, dce = t["loss"], t["dx"]
    m = p * (1 - y) + q * y
    mg = m.pow(gamma)
    mg1 = _safe_ratio(mg, m)
    at = alpha * y + (1 - alpha) * (1 - y) if alpha >= 0 else torch.ones_like(y)
    dat = 2 * alpha - 1 if alpha >= 0 else 0.0
    loss = at * ce * mg
    dx = at * (dce * mg + ce * gamma * mg1 * (p * q) * (1 - 2 * y))
    dy = dat * ce * mg + at * (-x * mg + ce * gamma * mg1 * (q - p))
    return loss, dx, dy


def _asl(x, y, gamma_neg, gamma_pos, clip):
    p, q, spn, spp = _sig_terms(x)
    pq = p * q
    zero = torch.zeros_like(x)
    if clip > 0:
        over = p - clip
        neg_log = torch.where(over > 0, -torch.log(q + clip), zero)
        dneg = torch.where(over > 0, pq / (q + clip), zero)
        pm = torch.where(over > 0, over, zero)
        dpm = torch.where(over > 0, pq, zero)
    else:
        neg_log, dneg, pm, dpm = spp, p, p, pq
    gam = gamma_pos * y + gamma_neg * (1 - y)
    A = y * spn + (1 - y) * neg_log
    B = y * q + (1 - y) * pm
    Bg = B.pow(gam)
    loss = A * Bg
    dx = ((1 - y) * dneg - y * q) * Bg + A * gam * _safe_ratio(Bg, B) * ((1 - y) * dpm - y * pq)
    logB = torch.log(torch.where(B > 0, B, torch.ones_like(B)))
    dBg_dy = torch.where(B > 0, Bg * (logB * (gamma_pos - gamma_neg)) + gam * _safe_ratio(Bg, B) * (q - pm), zero)
    dy = (spn - neg_log) * Bg + A * dBg_dy
    return loss, dx, dy


def loss_terms(x, y_raw, w, pw, kind, params):
    """(loss, d/dx, d/dy) per element of any kind (label smoothing and the ignore value applied,
    weights multiplied), in the dtype of x, broadcast to x's shape."""
    eps, has_ignore, ignore, a, b, c = params
    y = y_raw * (1 - eps) + eps / 2 if eps else y_raw
    if kind == 1:
        loss, dx, dy = _focal(x, y, a, b)
    elif kind == 2:
        loss, dx, dy = _asl(x, y, a, b, c)
    else:
        t = bce_terms(x, y, None, pw, want=("loss", "dx", "dy"))
        loss, dx, dy = t["loss"], t["dx"], t["dy"]
    loss, dx, dy = (torch.broadcast_to(v, x.shape) for v in (loss, dx, dy))
    if w is not None:
        loss, dx, dy = loss * w, dx * w, dy * w
    if eps:
        dy = dy * (1 - eps)
    if has_ignore:
        known = torch.broadcast_to(y_raw != ignore, x.shape)
        loss, dx, dy = (torch.where(known, v, torch.zeros_like(v)) for v in (loss, dx, dy))
    return loss, dx, dy


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


def bce_with_logits(input, target, weight, pos_weight, reduction: int, out_dtype, unit_grad: bool,
                    kind: int = 0, params=PLAIN):
    """The contract of the fusedtrain::bce_with_logits op: (loss, unit_grad).

    input, target: (R, C); weight, pos_weight: None or broadcastable to (R, C). reduction 0 none,
    1 mean, 2 sum. loss: (R, C) for none, 0-d otherwise, in out_dtype. unit_grad: d loss / d input
    for grad_output = 1 (1/N of mean folded in) in input's dtype when asked, else empty (0,).
    kind/params: the multi-label family (loss_terms)."""
    op = _bce_opmath(input)
    x, y = input.to(op), target.to(op)
    w = None if weight is None else weight.to(op)
    pw = None if pos_weight is None else pos_weight.to(op)
    if is_generic(kind, params):
        loss, dx, _ = loss_terms(x, y, w, pw, kind, params)
    else:
        terms = bce_terms(x, y, w, pw, want=("loss", "dx") if unit_grad else ("loss",))
        loss, dx = terms["loss"], terms.get("dx")
    loss = torch.broadcast_to(loss, input.shape)
    n = loss.numel()
    if reduction == 1:
        loss = loss.sum() / n if n else loss.new_tensor(float("nan"))
    elif reduction == 2:
        loss = loss.sum()
    if unit_grad:
        dx = torch.broadcast_to(dx, input.shape)
        grad = (dx * (1 / torch.tensor(n, dtype=op)) if reduction == 1 else dx).to(input.dtype).contiguous()
    else:
        grad = input.new_empty((0,))
    return loss.to(out_dtype), grad


def bce_with_logits_backward(grad_output, input, target, weight, pos_weight, reduction: int,
                             input_grad: bool, target_grad: bool, kind: int = 0, params=PLAIN):
    """The contract of fusedtrain::bce_with_logits_backward: (grad_input, grad_target), each the
    opmath derivative times grad_output (grad_output / N for mean), rounded once to input's /
    target's dtype; an empty (0,) tensor where not wanted."""
    op = _bce_opmath(input)
    x = input.to(op)
    w = None if weight is None else weight.to(op)
    pw = None if pos_weight is None else pos_weight.to(op)
    go = grad_output.to(op)
    factor = go / input.numel() if reduction == 1 else go
    if is_generic(kind, params):
        _, dx, dy = loss_terms(x, target.to(op), w, pw, kind, params)
        terms = {"dx": dx, "dy": dy}
    else:
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
# adam (fusedtrain/ops/adam.py): one Adam/AdamW step, torch.optim's update (docs/design.md §4)
# ---------------------------------------------------------------------------------------


# Stochastic rounding (csrc/include/fusedtrain/adam_math.h sr_*), uint32 arithmetic on int64
# tensors (products wrap in int64; their low 32 bits are uint32's) and on Python ints.
_U32 = 0xFFFFFFFF


def _sr_mix(x):
    x = x ^ (x >> 16)
    x = (x * 0x7feb352d) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846ca68b) & _U32
    return x ^ (x >> 16)


def sr_group_seed(seed: int, index: int) -> int:
    """The seed of param group `index` of an optimizer whose group seed is `seed` (fusedtrain/optim.py)."""
    return _sr_mix(seed ^ _sr_mix((index + 0x7F4A7C15) & _U32))


def sr_call_seed(seed: int, k: int) -> int:
    """adam_math.h sr_call_seed: the seed of call k of a group."""
    return _sr_mix(seed ^ _sr_mix((k + 0x2545F491) & _U32))


def sr_key(seed, step, tensor):
    """adam_math.h sr_key: step is the new count (a one-element tensor)."""
    s = step.reshape(()).to(torch.int64) & _U32
    return _sr_mix(_sr_mix(seed ^ _sr_mix(s)) ^ ((tensor * 0x9E3779B9) & _U32))


SR_V, SR_P = 0x9E3779B1, 0x6A09E667  # adam_math.h: the multipliers of exp_avg_sq's and the param's bits


def sr_bits(key, shape, mult, device=None):
    """adam_math.h sr_bits: the 16 random bits (int64) of every element of a tensor of `shape`."""
    idx = torch.arange(math.prod(shape), device=device, dtype=torch.int64).view(shape)
    x = key ^ (idx & _U32) ^ (((idx >> 32) * 0xC2B2AE35) & _U32)
    return ((x * mult) & _U32) >> 16


def _f32_bits(x):
    """The bit patterns of fp32 x as int64 (uint32 values)."""
    return x.view(torch.int32).to(torch.int64) & _U32


def _bits_f32(u):
    """The fp32 values of the low 32 bits of int64 u."""
    return u.to(torch.int32).view(torch.float32)  # int64 -> int32 keeps the low 32 bits


def sr_round(x, bits16):
    """adam_math.h sr_round: fp32 x rounded stochastically to bf16 values (as fp32)."""
    return torch.where(x != x, x, _bits_f32((_f32_bits(x) + bits16) & 0xFFFF0000))


# 8-bit blockwise states (adam_math.h q8_*): uint8 codes, one fp32 absmax per Q8_BLOCK elements.
Q8_BLOCK = 256
Q8_SIGNED_MAX = 30720.0         # exp_avg: sign + e4m3 with subnormals, 2^14 * 1.875
Q8_UNSIGNED_MAX = 4026531840.0  # exp_avg_sq, max_exp_avg_sq: e5m3, no zero, 2^31 * 1.875
_FLT_MAX = 3.4028234663852886e38


def q8_num_blocks(numel: int) -> int:
    """The number of absmax entries of an 8-bit state of numel elements."""
    return (numel + Q8_BLOCK - 1) // Q8_BLOCK


def _q8_round3(b):
    return (b + 0x7FFFF + ((b >> 20) & 1)) >> 20


def _q8_blocks(x):
    """fp32 x flattened into (blocks, Q8_BLOCK), the last block padded with zeros."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % Q8_BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, Q8_BLOCK)


def q8_encode(x, signed: bool):
    """adam_math.h q8_*: (uint8 codes of x's shape, fp32 absmax per block) of a float tensor."""
    blocks = _q8_blocks(x)
    absmax = blocks.abs().amax(dim=1) if blocks.numel() else blocks.new_zeros(0)  # NaN propagates
    qmax = Q8_SIGNED_MAX if signed else Q8_UNSIGNED_MAX
    inv = torch.where(absmax > 0, torch.clamp(qmax / absmax, max=_FLT_MAX), 0.0).unsqueeze(1)
    if signed:
        xs = blocks.abs() * inv
        sub = _f32_bits(xs * 8.0 + 12582912.0) - 0x4B400000  # 8x rounded to an integer (adam_math.h q8_round8x)
        norm = torch.clamp(_q8_round3(_f32_bits(xs)) - (126 << 3), max=127)
        mag = torch.where(xs != xs, 0, torch.where(xs < 1.0, sub, norm))
        code = mag | torch.where(blocks < 0, 0x80, 0)
    else:
        xs = blocks * inv
        code = torch.where(xs > 1.0, torch.clamp(_q8_round3(_f32_bits(xs)) - (127 << 3), max=255), 0)
    return code.reshape(-1)[:x.numel()].to(torch.uint8).view(x.shape), absmax


def q8_decode(codes, absmax, signed: bool):
    """adam_math.h q8_decode_*: the fp32 values of uint8 codes with their blocks' absmax."""
    c = codes.reshape(-1).to(torch.int64)
    scale = (absmax / (Q8_SIGNED_MAX if signed else Q8_UNSIGNED_MAX)).repeat_interleave(Q8_BLOCK)[:c.numel()]
    if signed:
        m = _bits_f32(((c & 0x7F) << 20) + (126 << 23))
        mag = torch.where((c & 0x7F) < 8, m * 2.0 - 1.0, m)
        val = torch.where((c & 0x80) != 0, -mag, mag) * scale
    else:
        val = _bits_f32((c << 20) + (127 << 23)) * scale
    return val.view(codes.shape)


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params,
          exp_avg_absmax=(), exp_avg_sq_absmax=(), max_exp_avg_sq_absmax=(), *,
          lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
          grad_mult=None, found_inf=None, sr_seed=0, sr_params=False, sr_exp_avg_sq=False):
    """Plain torch ops, one tensor at a time, in fp32 (float64 for float64 params); the
    per-tensor scalars (bias corrections, step size) in float64 from the per-tensor step.
    With found_inf nonzero nothing changes (a device-side select, no host read). uint8
    states are 8-bit blockwise (q8_decode before the update, q8_encode after it; their
    absmax lists hold one fp32 tensor per param)."""
    keep = None if found_inf is None else (found_inf.reshape(()) != 0)
    for i, param in enumerate(params):
        master = master_params[i] if master_params else None
        src = master if master is not None else param
        ct = torch.float64 if src.dtype == torch.float64 else torch.float32
        q8 = exp_avgs[i].dtype == torch.uint8
        p = src.to(ct)
        g = grads[i].to(ct)
        if q8:
            m = q8_decode(exp_avgs[i], exp_avg_absmax[i], True)
            v = q8_decode(exp_avg_sqs[i], exp_avg_sq_absmax[i], False)
        else:
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
            old_max = q8_decode(max_exp_avg_sqs[i], max_exp_avg_sq_absmax[i], False) if q8 else \
                max_exp_avg_sqs[i].to(ct)
            vmax = torch.maximum(old_max, v)
            denom = vmax.sqrt() / bc2_sqrt + eps
        else:
            denom = v.sqrt() / bc2_sqrt + eps
        p = p - step_size * m / denom
        if sr_params or sr_exp_avg_sq:
            key = sr_key(sr_seed, step, i)
            if sr_params:  # the ops checked: bf16 params without master copies
                p = sr_round(p.float(), sr_bits(key, p.shape, SR_P, p.device))
            if sr_exp_avg_sq:  # bf16 states; after the param's update, which read it unrounded
                v = sr_round(v.float(), sr_bits(key, p.shape, SR_V, p.device))
        states = [(exp_avgs[i], m), (exp_avg_sqs[i], v)] + ([(max_exp_avg_sqs[i], vmax)] if amsgrad else [])
        if q8:
            absmaxes = (exp_avg_absmax[i], exp_avg_sq_absmax[i]) + ((max_exp_avg_sq_absmax[i],) if amsgrad else ())
            coded = [q8_encode(x, k == 0) for k, (_, x) in enumerate(states)]
            states = [(dst, c) for (dst, _), (c, _) in zip(states, coded)] + \
                [(a, am) for a, (_, am) in zip(absmaxes, coded)]
        outs = [(src, p)] + states
        if master is not None:
            outs.append((param, p))
        if keep is None:
            for dst, new in outs:
                dst.copy_(new)
            steps[i].copy_(step)
        else:
            for dst, new in outs:
                dst.copy_(torch.where(keep, dst, new.to(dst.dtype)))
            steps[i].copy_(torch.where(keep, steps[i], step))
