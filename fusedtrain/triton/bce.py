"""BCE with logits in Triton: the bodies of fusedtrain_triton::bce_with_logits and
fusedtrain_triton::bce_with_logits_backward (torch.library.triton_op; contract in
csrc/ops.cpp `// ---- bce`, autograd and fake registration in fusedtrain/ops/bce.py).

Per element the formulas of csrc/include/fusedtrain/bce_math.h (docs/design.md §4), in fp32 (fp64 for
fp64 storage), from one exp(-|x|). log1p(e), e in [0, 1], by the same series as bce_math.h's
log1p_unit (Triton has no log1p, libdevice does not run under the interpreter, and the
interpreter must execute the very code the GPU runs; division and FMAs only, no approximate
log).

Reduction (deterministic): program p handles the fixed block [p*BLOCK, (p+1)*BLOCK) and writes
its partial sum to partials[p]; one program then sums the partials in a fixed order.
"""
import torch
import triton
import triton.language as tl

from fusedtrain import reference
from fusedtrain.triton import as_int32, device_guard, f64_bits
from fusedtrain.triton.aot import AotSpec
from fusedtrain.triton.rounding import store_rounded

BLOCK = 1024        # elements per program of the elementwise kernels
# the loss spec's scalars (_spec_args): bit patterns, not to be specialized on their values
_SPEC_WORDS = [f"{n}_{w}" for n in ("keep", "heps", "ign", "a", "b", "c") for w in ("hi", "lo")]
SUM_BLOCK = 1024    # partials per step of the final sum
NUM_WARPS = 4


@triton.jit
def _div(a, b):
    # IEEE division as in the C++ kernels (Triton's fp32 `/` is the approximate div.full)
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _log1p_small(e):
    # log1p(e) for e in [0, 1], as bce_math.h's log1p_unit: 2 atanh(s), s = e / (2 + e) <= 1/3,
    # by its series to s^15 (truncation < 2e-8 relative); fp64 uses the same series to s^31
    s = _div(e, 2.0 + e)
    s2 = s * s
    if e.dtype == tl.float64:
        p = tl.full(e.shape, 1.0 / 31.0, e.dtype)
        for k in tl.static_range(29, 13, -2):
            p = p * s2 + 1.0 / k
    else:
        p = tl.full(e.shape, 1.0 / 15.0, e.dtype)
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return (s + s) * p


@triton.jit
def _tile(pid, N, C, FLAT: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's offsets into the (R, C) tensors, their mask, and their row and column
    (the flat offset for both when FLAT: every weight is then indexed flat). FLAT: BLOCK
    consecutive elements. Otherwise a 2-D tile of BLOCK // BLOCK_C rows by BLOCK_C columns
    (programs in row-major tile order), so no element divides its offset by C. Offsets are
    int32 unless WIDE (N >= 2^31)."""
    # one return statement: the compiler types every return of a function alike
    if FLAT:
        base = pid.to(tl.int64) * BLOCK if WIDE else pid * BLOCK
        offs = base + tl.arange(0, BLOCK)
        mask = offs < N
        rows = offs
        cols = offs
    else:
        BLOCK_R: tl.constexpr = BLOCK // BLOCK_C
        ncol_tiles = tl.cdiv(C, BLOCK_C)
        r0 = (pid // ncol_tiles) * BLOCK_R
        c0 = (pid % ncol_tiles) * BLOCK_C
        rows = (r0.to(tl.int64) if WIDE else r0) + tl.arange(0, BLOCK_R)[:, None]
        cols = c0 + tl.arange(0, BLOCK_C)[None, :]
        mask = (rows < N // C) & (cols < C)
        offs = rows * C + cols
    return offs, mask, rows, cols


@triton.jit
def _total(v, FLAT: tl.constexpr):
    # the sum of a tile, in a fixed order
    if FLAT:
        total = tl.sum(v, axis=0)
    else:
        total = tl.sum(tl.sum(v, axis=1), axis=0)
    return total


@triton.jit
def _load_weight(ptr, offs, rows, cols, s0, s1, mask, HAS: tl.constexpr, FLAT: tl.constexpr, ACC: tl.constexpr):
    if HAS:
        if FLAT:
            idx = offs * s1
        else:
            idx = rows * s0 + cols * s1
        return tl.load(ptr + idx, mask=mask, other=1.0).to(ACC)
    else:
        return tl.full(offs.shape, 1.0, ACC)


@triton.jit
def _bce_loss(x, y, w, pw, HAS_PW: tl.constexpr):
    # bce_math.h loss(): (1 - y) * x + lw * softplus(-x) regrouped, no cancelling large terms;
    # (x - x) makes x = -inf NaN, as torch's formula gives
    l1p = _log1p_small(tl.exp(-tl.abs(x)))
    ypw = pw * y if HAS_PW else y
    tail = tl.where(x >= 0, (1.0 - y) * x, (x - x) - ypw * x)
    if HAS_PW:
        return w * ((1.0 + (pw - 1.0) * y) * l1p + tail)
    else:
        return w * (l1p + tail)


@triton.jit
def _bce_input_grad(x, y, w, pw, HAS_PW: tl.constexpr):
    # bce_math.h input_grad(): lw sigmoid(x) - pos_weight y without cancellation for hard labels
    e = tl.exp(-tl.abs(x))
    er = _div(e, 1.0 + e)
    if HAS_PW:
        lwer = (1.0 + (pw - 1.0) * y) * er
        return w * tl.where(x >= 0, (1.0 - y) - lwer, lwer - pw * y)
    else:
        return w * tl.where(x >= 0, (1.0 - y) - er, er - y)


@triton.jit
def _bce_target_grad(x, w, pw, HAS_PW: tl.constexpr):
    # bce_math.h target_grad(): (pos_weight - 1) L - (x >= 0 ? x : pos_weight x)
    if HAS_PW:
        l1p = _log1p_small(tl.exp(-tl.abs(x)))
        return w * ((pw - 1.0) * l1p - tl.where(x >= 0, x, pw * x))
    else:
        return w * -x


@triton.jit
def _pow(base, g):
    # base^g for base >= 0 (0^0 = 1), as powf gives it
    pos = base > 0
    return tl.where(pos, tl.exp2(g * tl.log2(tl.where(pos, base, 1.0))), tl.where(g == 0, 1.0, 0.0))


@triton.jit
def _ipow(v, k):
    # bce_math.h ft_ipow: v^k for a small integer k >= 0 by multiplication (exact where the
    # exp2/log2 of _pow is approximate; the usual focusing exponents, 2, and ASL's 4 and 1)
    r = tl.full(v.shape, 1.0, v.dtype)
    for _ in range(0, k):
        r = r * v
    return r


@triton.jit
def _small_int(g):
    # bce_math.h spec_of small_int (g: the host's double): g when an integer in [0, 8], else -1
    ok = (g >= 0.0) & (g <= 8.0)
    k = tl.where(ok, g, 0.0).to(tl.int32)
    return tl.where(ok & (k.to(tl.float64) == g), k, -1)


@triton.jit
def _sig_terms(x):
    e = tl.exp(-tl.abs(x))
    r = _div(tl.full(x.shape, 1.0, x.dtype), 1.0 + e)
    er = e * r
    l1p = _log1p_small(e)
    return tl.where(x >= 0, r, er), tl.where(x >= 0, er, r), l1p + tl.maximum(-x, 0.0), l1p + tl.maximum(x, 0.0)


@triton.jit
def _safe_ratio(num, den):
    return tl.where(den > 0, _div(num, tl.where(den > 0, den, 1.0)), 0.0)


@triton.jit
def _f64(hi, lo):
    # a spec scalar, the host's double, from the two int32 words of its bits (see _spec_args)
    return ((hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)).to(tl.float64, bitcast=True)


@triton.jit
def _elem(x, y_raw, w, pw, keep_hi, keep_lo, heps_hi, heps_lo, ign_hi, ign_lo, a_hi, a_lo, b_hi, b_lo, c_hi, c_lo,
          KIND: tl.constexpr, HAS_PW: tl.constexpr, HAS_IGNORE: tl.constexpr):
    """bce_math.h elem(): (loss, d/dx, d/dy) of one element of any kind, weighted, label
    smoothing and the ignore value applied."""
    ACC: tl.constexpr = x.dtype
    # each rounded once from the host's double, as bce_math.h spec_of's S(...)
    keep = _f64(keep_hi, keep_lo).to(ACC)
    half_eps = _f64(heps_hi, heps_lo).to(ACC)
    ignore = _f64(ign_hi, ign_lo).to(ACC)
    a64 = _f64(a_hi, a_lo)
    b64 = _f64(b_hi, b_lo)
    a = a64.to(ACC)
    b = b64.to(ACC)
    c = _f64(c_hi, c_lo).to(ACC)
    y = y_raw * keep + half_eps
    if KIND == 1:  # focal (torchvision)
        p, q, spn, spp = _sig_terms(x)
        ce = _bce_loss(x, y, 1.0, 1.0, False)
        dce = _bce_input_grad(x, y, 1.0, 1.0, False)
        m = p * (1.0 - y) + q * y
        b_int = _small_int(b64)
        if b_int >= 0:
            mg = _ipow(m, b_int)
        else:
            mg = _pow(m, b)
        if b_int >= 1:  # m^(gamma-1) as bce_math.h focal takes it
            mg1 = _ipow(m, b_int - 1)
        elif b_int == 0:
            mg1 = tl.zeros(m.shape, m.dtype)
        else:
            mg1 = _safe_ratio(mg, m)
        at = tl.where(a >= 0, a * y + (1.0 - a) * (1.0 - y), 1.0)  # alpha < 0: no weighting
        dat = tl.where(a >= 0, 2.0 * a - 1.0, 0.0)
        loss = at * ce * mg
        dx = at * (dce * mg + ce * b * mg1 * (p * q) * (1.0 - 2.0 * y))
        dy = dat * ce * mg + at * (-x * mg + ce * b * mg1 * (q - p))
    elif KIND == 2:  # asymmetric loss
        p, q, spn, spp = _sig_terms(x)
        pq = p * q
        over = p - c  # clip > 0: the shifted probability of the negatives; clip = 0: softplus forms
        clipped = c > 0
        neg_log = tl.where(clipped, tl.where(over > 0, -tl.log(q + c), 0.0), spp)
        dneg = tl.where(clipped, tl.where(over > 0, _div(pq, q + c), 0.0), p)
        pm = tl.where(clipped, tl.where(over > 0, over, 0.0), p)
        dpm = tl.where(clipped, tl.where(over > 0, pq, 0.0), pq)
        gam = b * y + a * (1.0 - y)
        A = y * spn + (1.0 - y) * neg_log
        B = y * q + (1.0 - y) * pm
        a_int = _small_int(a64)
        b_int = _small_int(b64)
        if (a_int >= 0) & (b_int >= 0):  # a hard label's exponent is one of the two integers
            hard = (y == 0.0) | (y == 1.0)
            Bi = tl.where(y > 0, _ipow(B, b_int), _ipow(B, a_int))
            if tl.min(hard.to(tl.int32)) == 1:  # the usual tile: no pow at all (min over every axis)
                Bg = Bi
            else:
                Bg = tl.where(hard, Bi, _pow(B, gam))
        else:
            Bg = _pow(B, gam)
        Bg1 = _safe_ratio(Bg, B)
        loss = A * Bg
        dx = ((1.0 - y) * dneg - y * q) * Bg + A * gam * Bg1 * ((1.0 - y) * dpm - y * pq)
        logB = tl.log(tl.where(B > 0, B, 1.0))
        dy = (spn - neg_log) * Bg + A * tl.where(B > 0, Bg * logB * (b - a) + gam * Bg1 * (q - pm), 0.0)
    else:
        loss = _bce_loss(x, y, 1.0, pw, HAS_PW)
        dx = _bce_input_grad(x, y, 1.0, pw, HAS_PW)
        dy = _bce_target_grad(x, 1.0, pw, HAS_PW)
    loss = loss * w
    dx = dx * w
    dy = dy * w * keep
    if HAS_IGNORE:
        known = y_raw != ignore
        loss = tl.where(known, loss, 0.0)
        dx = tl.where(known, dx, 0.0)
        dy = tl.where(known, dy, 0.0)
    return loss, dx, dy


@triton.jit(do_not_specialize=["divisor", *_SPEC_WORDS])
def _bce_fwd_kernel(x_ptr, y_ptr, w_ptr, pw_ptr, loss_ptr, grad_ptr, part_ptr,
                    N, C, ws0, ws1, pws0, pws1, divisor, keep_hi, keep_lo, heps_hi, heps_lo, ign_hi, ign_lo,
                    a_hi, a_lo, b_hi, b_lo, c_hi, c_lo,
                    HAS_W: tl.constexpr, HAS_PW: tl.constexpr, FLAT: tl.constexpr, REDUCE: tl.constexpr,
                    GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                    KIND: tl.constexpr, GENERIC: tl.constexpr, HAS_IGNORE: tl.constexpr, WIDE: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    # the loss; with GRAD, d loss / d input for grad_output = 1 (divided by divisor = N for mean)
    pid = tl.program_id(0)
    offs, mask, rows, cols = _tile(pid, N, C, FLAT, WIDE, BLOCK, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
    w = _load_weight(w_ptr, offs, rows, cols, ws0, ws1, mask, HAS_W, FLAT, ACC)
    pw = _load_weight(pw_ptr, offs, rows, cols, pws0, pws1, mask, HAS_PW, FLAT, ACC)
    # GRAD (the forward's unit gradient) is asked on CPU only: under the interpreter
    if GENERIC:
        loss, gx, _dy = _elem(x, y, w, pw, keep_hi, keep_lo, heps_hi, heps_lo, ign_hi, ign_lo, a_hi, a_lo,
                              b_hi, b_lo, c_hi, c_lo, KIND, HAS_PW, HAS_IGNORE)
    else:
        loss = _bce_loss(x, y, w, pw, HAS_PW)
        if GRAD:
            gx = _bce_input_grad(x, y, w, pw, HAS_PW)
    if GRAD:
        store_rounded(grad_ptr + offs, gx * _div(tl.full((), 1.0, ACC), divisor.to(ACC)), mask)
    if REDUCE:
        tl.store(part_ptr + pid, _total(tl.where(mask, loss, 0.0), FLAT))
    else:
        store_rounded(loss_ptr + offs, loss, mask)


# N of a mean and P (programs of the forward, from N): one compiled variant for every size
@triton.jit(do_not_specialize=["P", "divisor"])
def _bce_sum_kernel(part_ptr, out_ptr, P, divisor, SUM_BLOCK: tl.constexpr):
    # one program: partials summed in a fixed order (lane i takes i, i + SUM_BLOCK, ...; then a
    # tree) in fp64, and the mean's division in fp64, as csrc/cuda/bce.cu bce_sum_kernel
    acc = tl.zeros((SUM_BLOCK,), dtype=tl.float64)
    for start in range(0, P, SUM_BLOCK):
        idx = start + tl.arange(0, SUM_BLOCK)
        acc += tl.load(part_ptr + idx, mask=idx < P, other=0.0).to(tl.float64)
    total = tl.sum(acc, axis=0) / divisor.to(tl.float64)
    if out_ptr.dtype.element_ty != tl.float64:
        total = total.to(tl.float32)  # through fp32, as the C++ kernels' cast of the double (and torch's)
    store_rounded(out_ptr, total, True)


@triton.jit(do_not_specialize=["divisor", *_SPEC_WORDS])
def _bce_bwd_kernel(go_ptr, x_ptr, y_ptr, w_ptr, pw_ptr, gi_ptr, gt_ptr, N, C, ws0, ws1, pws0, pws1, divisor,
                    keep_hi, keep_lo, heps_hi, heps_lo, ign_hi, ign_lo, a_hi, a_lo, b_hi, b_lo, c_hi, c_lo,
                    HAS_W: tl.constexpr, HAS_PW: tl.constexpr, FLAT: tl.constexpr, PER_ELEM: tl.constexpr,
                    GI: tl.constexpr, GT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                    KIND: tl.constexpr, GENERIC: tl.constexpr, HAS_IGNORE: tl.constexpr, WIDE: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    # each gradient: the ACC derivative times grad_output[i] (PER_ELEM) or grad_output / divisor,
    # rounded once at the store
    pid = tl.program_id(0)
    offs, mask, rows, cols = _tile(pid, N, C, FLAT, WIDE, BLOCK, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    w = _load_weight(w_ptr, offs, rows, cols, ws0, ws1, mask, HAS_W, FLAT, ACC)
    pw = _load_weight(pw_ptr, offs, rows, cols, pws0, pws1, mask, HAS_PW, FLAT, ACC)
    if PER_ELEM:
        f = tl.load(go_ptr + offs, mask=mask, other=0.0).to(ACC)
    else:
        f = _div(tl.load(go_ptr).to(ACC), divisor.to(ACC))
    if GENERIC:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
        _l, dx, dy = _elem(x, y, w, pw, keep_hi, keep_lo, heps_hi, heps_lo, ign_hi, ign_lo, a_hi, a_lo,
                           b_hi, b_lo, c_hi, c_lo, KIND, HAS_PW, HAS_IGNORE)
        if GI:
            store_rounded(gi_ptr + offs, dx * f, mask)
        if GT:
            store_rounded(gt_ptr + offs, dy * f, mask)
    else:
        if GI:
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
            gi = _bce_input_grad(x, y, w, pw, HAS_PW) * f
            store_rounded(gi_ptr + offs, gi, mask)
        if GT:
            gt = _bce_target_grad(x, w, pw, HAS_PW) * f
            store_rounded(gt_ptr + offs, gt, mask)


AOT_HELPERS = ("_div", "_log1p_small", "_tile", "_total", "_load_weight", "_bce_loss", "_bce_input_grad", "_bce_target_grad",
               "_pow", "_ipow", "_small_int", "_sig_terms", "_safe_ratio", "_f64", "_elem")


# ---- launchers (the triton_op bodies) --------------------------------------------------

def _strides(t, R, C):
    """Element strides of an (R, C) broadcast operand, 0 for size-1 dims (the FLAT case reads
    element i at i * s1)."""
    if t is None:
        return 0, 0
    return (0 if R == 1 else t.stride(0)), (0 if C == 1 else t.stride(1))


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _spec_args(params):
    """keep, half_eps, ignore, a, b, c of the loss spec (csrc/ops.cpp `// ---- bce`, computed in
    double as bce_math.h spec_of does), each as the two words (high, low) of its fp64 bits in
    int32 arguments: Triton would pass a Python float as fp32 (alpha = 0.6 as 0.6000000238 in
    the fp64 kernels), and types an int argument by its value (bit patterns of any size would
    launch i32 and i64 variants). The kernels rebuild the double (_f64) and round it once."""
    eps, _, ignore, a, b, c = params
    out = []
    for v in (1.0 - eps, eps / 2, ignore, a, b, c):
        bits = f64_bits(v)
        out += [as_int32(bits >> 32), as_int32(bits)]
    return out


def _spec_constexprs(kind, params):
    return {"KIND": kind, "GENERIC": reference.is_generic(kind, params), "HAS_IGNORE": params[1] != 0}


def _grid(R, C):
    """(programs, layout constexprs) of an (R, C) launch: flat blocks when R == 1 (the weights
    are then indexed flat), else 2-D tiles as wide as C allows."""
    N = R * C
    wide = N >= 2 ** 31 - 2 * BLOCK  # int32 offsets, with a tile's overhang past the end, fit below this
    if R == 1:
        return triton.cdiv(N, BLOCK), dict(FLAT=True, WIDE=wide, BLOCK_C=1)
    block_c = min(triton.next_power_of_2(C), BLOCK)
    return triton.cdiv(R, BLOCK // block_c) * triton.cdiv(C, block_c), dict(FLAT=False, WIDE=wide, BLOCK_C=block_c)


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.triton_op("fusedtrain_triton::bce_with_logits", mutates_args=())
def bce_with_logits(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                    pos_weight: torch.Tensor | None, reduction: int, out_dtype: torch.dtype,
                    unit_grad: bool, kind: int, params: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss, and the gradient for a grad_output of 1 when unit_grad (else an empty tensor).

    Args:
        input, target: (R, C) contiguous logits and targets (target in input's dtype or opmath).
        weight, pos_weight: optional (R, C) opmath views with stride(1) 0 or 1.
        reduction: 0 none, 1 mean, 2 sum.
        out_dtype: the loss's dtype.
        unit_grad: also write d loss / d input for a grad_output of 1.
        kind: 0 BCE, 1 focal, 2 ASL.
        params: [label_smoothing, has_ignore, ignore_value, a, b, c] (fusedtrain/reference.py).
    """
    R, C = input.shape
    N = R * C
    loss = input.new_empty((R, C) if reduction == 0 else (), dtype=out_dtype)
    grad = input.new_empty((R, C) if unit_grad else (0,))
    if N == 0:
        if reduction != 0:
            loss.fill_(float("nan") if reduction == 1 else 0.0)
        return loss, grad
    nprog, layout = _grid(R, C)
    partials = input.new_empty((nprog if reduction != 0 else 1,), dtype=_opmath(input.dtype))
    ws0, ws1 = _strides(weight, R, C)
    pws0, pws1 = _strides(pos_weight, R, C)
    with device_guard(input):
        torch.library.wrap_triton(_bce_fwd_kernel)[(nprog,)](
            input, target, input if weight is None else weight, input if pos_weight is None else pos_weight,
            loss, grad if unit_grad else input, partials, N, C, ws0, ws1, pws0, pws1, N if reduction == 1 else 1,
            *_spec_args(params), HAS_W=weight is not None, HAS_PW=pos_weight is not None,
            REDUCE=reduction != 0, GRAD=unit_grad, ACC=_acc(input.dtype), BLOCK=BLOCK, num_warps=NUM_WARPS,
            **layout, **_spec_constexprs(kind, params))
        if reduction != 0:
            torch.library.wrap_triton(_bce_sum_kernel)[(1,)](
                partials, loss, nprog, N if reduction == 1 else 1, SUM_BLOCK=SUM_BLOCK, num_warps=NUM_WARPS)
    return loss, grad


@torch.library.triton_op("fusedtrain_triton::bce_with_logits_backward", mutates_args=())
def bce_with_logits_backward(grad_output: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                             weight: torch.Tensor | None, pos_weight: torch.Tensor | None, reduction: int,
                             input_grad: bool, target_grad: bool, kind: int,
                             params: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/dinput, d/dtarget) times grad_output, each rounded once (an empty tensor when not asked).

    Args:
        grad_output: opmath scalar, or (R, C) contiguous for reduction 0.
        input, target, weight, pos_weight, reduction, kind, params: as bce_with_logits.
        input_grad, target_grad: which gradients to compute.
    """
    R, C = input.shape
    N = R * C
    gi = input.new_empty((R, C) if input_grad else (0,))
    gt = target.new_empty((R, C) if target_grad else (0,))
    if N == 0 or not (input_grad or target_grad):
        return gi, gt
    ws0, ws1 = _strides(weight, R, C)
    pws0, pws1 = _strides(pos_weight, R, C)
    nprog, layout = _grid(R, C)
    with device_guard(input):
        torch.library.wrap_triton(_bce_bwd_kernel)[(nprog,)](
            grad_output, input, target, input if weight is None else weight, input if pos_weight is None else pos_weight,
            gi if input_grad else input, gt if target_grad else target,
            N, C, ws0, ws1, pws0, pws1, N if reduction == 1 else 1, *_spec_args(params),
            HAS_W=weight is not None, HAS_PW=pos_weight is not None, PER_ELEM=reduction == 0,
            GI=input_grad, GT=target_grad, ACC=_acc(input.dtype), BLOCK=BLOCK, num_warps=NUM_WARPS,
            **layout, **_spec_constexprs(kind, params))
    return gi, gt


# ---- ahead-of-time compilation specs (tests/test_gpu_compile.py) -----------------------

def _specs():
    """The launches of bce_with_logits and its backward (tests/test_aot_specs.py captures the
    common ones): for each dtype the plain loss (no weights) and the weighted one, flat, reduced
    and not; broadcast weights and pos_weight of shape (C,) in (R, C) tiles; the generic kinds
    (focal, ASL, BCE with label smoothing) with and without a weight and an ignore_index; the
    sum. All with N and C multiples of 16 and aligned tensors (the vectorized variant), the
    plain fp32 ones also for odd sizes and offset views."""
    specs = []
    ints = {n: "i32" for n in ("N", "C", "ws0", "ws1", "pws0", "pws1")}
    floats = {name: "i32" for name in _SPEC_WORDS}
    plain = {"KIND": 0, "GENERIC": False, "HAS_IGNORE": False}

    # N >= 2^31 (WIDE): Triton passes N, C (= N, flat) and a mean's divisor (= N) as i64
    wide_ints = {"N": "i64", "C": "i64", "divisor": "i64"}

    def fwd(dt, label, aligned=True, **ce):
        return AotSpec(
            _bce_fwd_kernel,
            {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": "*fp32", "pw_ptr": "*fp32", "loss_ptr": "*fp32",
             "grad_ptr": f"*{dt}", "part_ptr": "*fp32", **ints, "divisor": "i32", **floats,
             **(wide_ints if ce.get("WIDE") else {})},
            {"GRAD": False, "ACC": tl.float32, "BLOCK": BLOCK, **ce}, name=f"_bce_fwd_kernel[{dt},{label}]",
            options={"num_warps": NUM_WARPS}, aligned=aligned, divisible=("N", "C") if aligned else ())

    def bwd(dt, label, aligned=True, **ce):
        return AotSpec(
            _bce_bwd_kernel,
            {"go_ptr": "*fp32", "x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": "*fp32", "pw_ptr": "*fp32",
             "gi_ptr": f"*{dt}", "gt_ptr": f"*{dt}", **ints, "divisor": "i32", **floats,
             **(wide_ints if ce.get("WIDE") else {})},
            {"ACC": tl.float32, "BLOCK": BLOCK, **ce}, name=f"_bce_bwd_kernel[{dt},{label}]",
            options={"num_warps": NUM_WARPS}, aligned=aligned, divisible=("N", "C") if aligned else ())

    for dt in ("fp32", "fp16", "bf16"):
        # ops/bce.py runs same-shape (or absent) weights flat: the usual launch
        flat = dict(FLAT=True, WIDE=False, BLOCK_C=1)
        for weighted in (False, True):
            for reduce_ in (True, False):
                label = f"{'weighted' if weighted else 'plain'},{'reduce' if reduce_ else 'none'},flat"
                common = dict(HAS_W=weighted, HAS_PW=weighted, **flat, **plain)
                specs.append(fwd(dt, label, REDUCE=reduce_, **common))
                specs.append(bwd(dt, label, PER_ELEM=not reduce_, GI=True, GT=False, **common))
                if dt == "fp32" and not weighted:
                    specs.append(fwd(dt, label + ",unaligned", False, REDUCE=reduce_, **common))
                    specs.append(bwd(dt, label + ",unaligned", False, PER_ELEM=not reduce_, GI=True, GT=False,
                                     **common))
        if dt == "fp32":  # 2^31 elements or more: 64-bit offsets
            wide = dict(HAS_W=False, HAS_PW=False, FLAT=True, WIDE=True, BLOCK_C=1, **plain)
            specs.append(fwd(dt, "plain,reduce,flat,wide", REDUCE=True, **wide))
            specs.append(bwd(dt, "plain,reduce,flat,wide", PER_ELEM=False, GI=True, GT=False, **wide))
            specs.append(AotSpec(_bce_sum_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32", "P": "i32",
                                                   "divisor": "i64"}, {"SUM_BLOCK": SUM_BLOCK},
                                 name="_bce_sum_kernel[fp32,wide]", options={"num_warps": NUM_WARPS}))
        weighted = dict(HAS_W=True, HAS_PW=True, **plain)
        specs.append(bwd(dt, "weighted,reduce,flat,target grad", PER_ELEM=False, GI=True, GT=True, **flat,
                         **weighted))
        # broadcast weights and pos_weight of shape (C,), the common multi-label case: 2-D tiles,
        # narrow (C <= 64) and as wide as a block
        for block_c in (64, BLOCK):
            rc = dict(FLAT=False, WIDE=False, BLOCK_C=block_c)
            specs.append(fwd(dt, f"weighted,reduce,rc{block_c}", REDUCE=True, **rc, **weighted))
            specs.append(bwd(dt, f"weighted,reduce,rc{block_c}", PER_ELEM=False, GI=True, GT=False, **rc,
                             **weighted))
            pw = dict(HAS_W=False, HAS_PW=True, **rc, **plain)
            specs.append(fwd(dt, f"pos_weight,reduce,rc{block_c}", REDUCE=True, **pw))
            specs.append(bwd(dt, f"pos_weight,reduce,rc{block_c}", PER_ELEM=False, GI=True, GT=False, **pw))
        # the generic kinds: focal loss and ASL with their defaults (no weight, no ignore_index),
        # BCE with label smoothing, each with a full-shape weight, an ignore_index or both,
        # reduced (a mean over the known elements is a sum) and not
        for kind, name in ((0, "bce+smoothing"), (1, "focal"), (2, "asl")):
            for has_w, has_ignore in ((False, False), (True, False), (False, True), (True, True)):
                for reduce_ in (True, False):
                    label = (f"{name}{'+weight' if has_w else ''}{'+ignore' if has_ignore else ''},"
                             f"{'reduce' if reduce_ else 'none'}")
                    gen = dict(HAS_W=has_w, HAS_PW=False, **flat, KIND=kind, GENERIC=True, HAS_IGNORE=has_ignore)
                    specs.append(fwd(dt, label, REDUCE=reduce_, **gen))
                    specs.append(bwd(dt, label, PER_ELEM=not reduce_, GI=True, GT=False, **gen))
        # a weight of shape (C,) with focal loss and ASL: the 2-D tiles (a reduction over one
        # axis of a tile is a vector there, not the scalar it is in the flat layout)
        for kind, name in ((1, "focal"), (2, "asl")):
            for block_c in (64, BLOCK):
                gen = dict(HAS_W=True, HAS_PW=False, FLAT=False, WIDE=False, BLOCK_C=block_c, KIND=kind,
                           GENERIC=True, HAS_IGNORE=False)
                specs.append(fwd(dt, f"{name}+weight,reduce,rc{block_c}", REDUCE=True, **gen))
                specs.append(bwd(dt, f"{name}+weight,reduce,rc{block_c}", PER_ELEM=False, GI=True, GT=False, **gen))
        gen = dict(HAS_W=True, HAS_PW=True, **flat, KIND=0, GENERIC=True, HAS_IGNORE=True)
        specs.append(fwd(dt, "bce+pos_weight+weight+ignore,reduce", REDUCE=True, **gen))
        specs.append(bwd(dt, "bce+pos_weight+weight+ignore,reduce", PER_ELEM=False, GI=True, GT=False, **gen))
        specs.append(AotSpec(_bce_sum_kernel, {"part_ptr": "*fp32", "out_ptr": f"*{dt}", "P": "i32",
                                               "divisor": "i32"}, {"SUM_BLOCK": SUM_BLOCK},
                             options={"num_warps": NUM_WARPS}))
    return specs


AOT_SPECS = _specs()
