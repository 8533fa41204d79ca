"""Adam/AdamW as one Triton launch over every tensor of a (device, dtype) group: the op
fusedtrain_triton::adam_, with fusedtrain::adam_'s contract (csrc/ops.cpp).

Programs take tiles of the tables of fusedtrain/triton/multi_tensor.py (columns: param,
grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, step; numel). The per-tensor scalars are
computed in float64 from the tensor's step (hyper-parameters arrive as int64 bit patterns of
the host's doubles), the per-element math is fp32 in the order of
csrc/include/fusedtrain/adam_math.h. The step increment: every program reads the old step
and bumps a per-tensor counter; the last program of a tensor writes step + 1 and resets the
counter. A nonzero found_inf masks every load, store and atomic. ALIGNED: the host checked
that every streamed address of the launch is 16-byte aligned after a peeled head of
tile_off % 16 elements (multi_tensor.py), and the kernel moves 128 bits per access.

8-bit states (uint8 codes, one fp32 absmax per block of 256 elements: adam_math.h q8_*) have a
kernel of their own, _adam_q8_kernel (tables of COLUMNS_Q8, with the three absmax lists): the
same scalars and per-element math, its tiles whole blocks, each iteration an (blocks, 256)
block of elements decoded with the old absmax, updated, reduced per row to the new absmax
(NaN propagates) and encoded with it, as csrc/cpu/adam.cpp run_range_q8 does block by block.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from fusedtrain import reference
from fusedtrain.triton import as_int32, device_guard, f64_bits, multi_tensor
from fusedtrain.triton.aot import AotSpec
from fusedtrain.triton.rounding import store_rounded


# the multipliers of the param's and exp_avg_sq's bits (adam_math.h SR_P, SR_V; the reference's)
_SR_P = tl.constexpr(reference.SR_P)
_SR_V = tl.constexpr(reference.SR_V)


@triton.jit
def _sr_mix(x):
    # adam_math.h sr_mix on uint32 (>> is logical on unsigned integers, * wraps)
    x = x ^ (x >> 16)
    x = x * 0x7feb352d
    x = x ^ (x >> 15)
    x = x * 0x846ca68b
    return x ^ (x >> 16)


@triton.jit
def _sr_bits(key, offs, MULT: tl.constexpr):
    # adam_math.h sr_bits: the high 16 bits of (key ^ index) * MULT (uint32, wrapping)
    lo = offs.to(tl.uint32)  # the low 32 bits of the element index (int64 -> uint32 wraps)
    hi = (offs >> 32).to(tl.uint32)
    return ((key ^ lo ^ (hi * 0xC2B2AE35)) * MULT) >> 16


@triton.jit
def _sr_round(x, bits16):
    # adam_math.h sr_round: 16 random bits added to x's fp32 bits, the low 16 cleared; the store
    # then rounds a bf16 value (exact)
    r = ((x.to(tl.uint32, bitcast=True) + bits16) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, r)


@triton.jit
def _adam_moments(p, g, m, v, gscale, wd, decay, l2, lerp_low, w1, omw1, b2, omb2, DECOUPLED: tl.constexpr):
    """adam_math.h update() in fp32 up to the new moments: (p after weight decay, m, v)."""
    g = g * gscale
    if DECOUPLED:
        if wd != 0.0:
            p = p * decay
    else:
        if wd != 0.0:
            g = g + l2 * p
    if lerp_low:
        m = m + w1 * (g - m)
    else:
        m = g - (g - m) * omw1
    v = v * b2 + omb2 * g * g
    return p, m, v


@triton.jit
def _adam_denom(v, bc2_sqrt, eps):
    # IEEE division as in adam_math.h (Triton's fp32 `/` is the approximate div.full); the
    # param's update is then p - div_rn(step_size * m, denom)
    return tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps


@triton.jit
def _adam_elements(offs, mask, first, pp, gp, mp, vp, xp, wp, gscale, wd, decay, l2, lerp_low, w1, omw1, b2, omb2,
                   bc2_sqrt, eps, step_size, sr_key, AMSGRAD: tl.constexpr, MASTER: tl.constexpr,
                   DECOUPLED: tl.constexpr, SR_P: tl.constexpr, SR_V: tl.constexpr):
    """The update of the elements at offs (where mask) from the pointers, which point at the
    tensor's element `first` (stochastic rounding hashes the element's index in the tensor):
    adam_math.h's order."""
    if MASTER:
        p = tl.load(wp + offs, mask=mask, other=0.0)
    else:
        p = tl.load(pp + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mp + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(vp + offs, mask=mask, other=0.0).to(tl.float32)
    p, m, v = _adam_moments(p, g, m, v, gscale, wd, decay, l2, lerp_low, w1, omw1, b2, omb2, DECOUPLED)
    if AMSGRAD:
        x = tl.load(xp + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where((x != x) | (x > v), x, v)  # torch.maximum: NaN propagates
        denom = _adam_denom(x, bc2_sqrt, eps)
        store_rounded(xp + offs, x, mask)
    else:
        denom = _adam_denom(v, bc2_sqrt, eps)
    p = p - tl.math.div_rn(step_size * m, denom)
    if MASTER:
        tl.store(wp + offs, p, mask=mask)
    if SR_P:
        p = _sr_round(p, _sr_bits(sr_key, first + offs, _SR_P))
    if SR_V:  # after the param's update, which read it unrounded
        v = _sr_round(v, _sr_bits(sr_key, first + offs, _SR_V))
    store_rounded(pp + offs, p, mask)
    store_rounded(mp + offs, m, mask)
    store_rounded(vp + offs, v, mask)


@triton.jit
def _adam_scalars(step, t, lr_ptr, gm_ptr, lr_bits, beta1_bits, beta2_bits, wd_bits, sr_seed,
                  LR_TENSOR: tl.constexpr, HAS_MULT: tl.constexpr, MAXIMIZE: tl.constexpr, SR: tl.constexpr):
    """The per-tensor scalars of a step (adam_math.h make_coef) from the new step of tensor t:
    (gscale, wd, decay, l2, lerp_low, w1, omw1, b2, omb2, bc2_sqrt, step_size, sr_key), computed
    in float64 from the host's doubles (the hyper-parameters' int64 bit patterns), bit for bit."""
    beta1 = beta1_bits.to(tl.int64).to(tl.float64, bitcast=True)
    beta2 = beta2_bits.to(tl.int64).to(tl.float64, bitcast=True)
    wd = wd_bits.to(tl.int64).to(tl.float64, bitcast=True)
    if LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = lr_bits.to(tl.int64).to(tl.float64, bitcast=True)
    s = step.to(tl.float64)
    bc1 = 1.0 - tl.exp(s * tl.log(beta1))
    bc2 = 1.0 - tl.exp(s * tl.log(beta2))
    step_size = (lr / bc1).to(tl.float32)
    bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
    w1 = (1.0 - beta1).to(tl.float32)
    omw1 = 1.0 - w1
    b2 = beta2.to(tl.float32)
    omb2 = (1.0 - beta2).to(tl.float32)
    decay = (1.0 - lr * wd).to(tl.float32)
    l2 = wd.to(tl.float32)
    gscale = 1.0
    if HAS_MULT:
        gscale = tl.load(gm_ptr)
    if MAXIMIZE:
        gscale = -gscale
    lerp_low = tl.abs(w1) < 0.5
    sr_key = tl.zeros((), dtype=tl.uint32)
    if SR:  # adam_math.h sr_key(seed, step, tensor)
        seed = sr_seed.to(tl.int64).to(tl.uint32)
        sr_key = _sr_mix(_sr_mix(seed ^ _sr_mix(step.to(tl.uint32))) ^ (t.to(tl.uint32) * 0x9E3779B9))
    return gscale, wd, decay, l2, lerp_low, w1, omw1, b2, omb2, bc2_sqrt, step_size, sr_key


# the hyper-parameters vary during training (an LR schedule): no specialization on their
# values, or every new value could compile a new kernel
@triton.jit(do_not_specialize=["lr_bits", "beta1_bits", "beta2_bits", "eps", "wd_bits", "sr_seed"])
def _adam_kernel(tab, tile_t, tile_off, counters, p_ref, s_ref, lr_ptr, gm_ptr, fi_ptr,
                 lr_bits, beta1_bits, beta2_bits, eps, wd_bits, sr_seed,
                 AMSGRAD: tl.constexpr, MASTER: tl.constexpr, LR_TENSOR: tl.constexpr,
                 HAS_MULT: tl.constexpr, HAS_FI: tl.constexpr, MAXIMIZE: tl.constexpr,
                 DECOUPLED: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, ALIGNED: tl.constexpr,
                 SR_P: tl.constexpr, SR_V: tl.constexpr):
    CHUNK: tl.constexpr = BLOCK * ITERS
    pid = tl.program_id(0)
    t = tl.load(tile_t + pid).to(tl.int64)
    off0 = tl.load(tile_off + pid)
    row = tab + t * 8
    numel = tl.load(row + 7)
    go = pid >= 0
    if HAS_FI:
        go = tl.load(fi_ptr) == 0.0
    step_ptr = tl.load(row + 6).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr, mask=go, other=0.0) + 1.0

    gscale, wd, decay, l2, lerp_low, w1, omw1, b2, omb2, bc2_sqrt, step_size, sr_key = _adam_scalars(
        step, t, lr_ptr, gm_ptr, lr_bits, beta1_bits, beta2_bits, wd_bits, sr_seed, LR_TENSOR, HAS_MULT, MAXIMIZE,
        SR_P or SR_V)

    pp = tl.load(row + 0).to(p_ref.dtype)
    gp = tl.load(row + 1).to(p_ref.dtype)
    mp = tl.load(row + 2).to(s_ref.dtype)
    vp = tl.load(row + 3).to(s_ref.dtype)
    xp = tl.load(row + 4).to(s_ref.dtype)
    wp = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        # the head peeled off misaligned views (multi_tensor.py): tiles start at h + k * CHUNK,
        # and the lists are 16-byte aligned from element h on (128-bit accesses)
        h = off0 % 16
        off0 = tl.multiple_of(off0 - h, CHUNK)
        lim = tl.where(go, numel - h, 0)  # found_inf: every load and store masked off
        lim16 = lim // 16 * 16  # the loop's mask is constant over 16 elements (a vector of any dtype)
        # the head [0, h) (the first tile) and the last (fewer than 16) elements (the tile that
        # holds them), scalar, in one pass of 32 lanes at the tensor's own indices
        # (scalar conditions folded into the bounds: the interpreter cannot & a vector with a
        # scalar derived from a tl.multiple_of value)
        lane = tl.arange(0, 32)
        nhead = tl.where((off0 == 0) & go, h, 0)
        tail_end = tl.where((lim16 >= off0) & (lim16 < off0 + CHUNK), lim, lim16)
        sidx = tl.where(lane < 16, lane, h + lim16 + lane - 16)
        smask = tl.where(lane < 16, lane < nhead, lim16 + lane - 16 < tail_end)
        _adam_elements(sidx, smask, 0, pp, gp, mp, vp, xp, wp, gscale, wd, decay, l2, lerp_low, w1, omw1, b2,
                       omb2, bc2_sqrt, eps, step_size, sr_key, AMSGRAD, MASTER, DECOUPLED, SR_P, SR_V)
        pp = tl.multiple_of(pp + h, 16)
        gp = tl.multiple_of(gp + h, 16)
        mp = tl.multiple_of(mp + h, 16)
        vp = tl.multiple_of(vp + h, 16)
        xp = tl.multiple_of(xp + h, 16)
        wp = tl.multiple_of(wp + h, 16)
    else:
        h = off0 * 0
        lim = tl.where(go, numel, 0)
        lim16 = lim
    for k in tl.range(0, CHUNK, BLOCK):
        offs = off0 + k + tl.arange(0, BLOCK)
        _adam_elements(offs, offs < lim16, h, pp, gp, mp, vp, xp, wp, gscale, wd, decay, l2, lerp_low, w1, omw1, b2,
                       omb2, bc2_sqrt, eps, step_size, sr_key, AMSGRAD, MASTER, DECOUPLED, SR_P, SR_V)

    # the step increment: the last program of this tensor (all others have read the step)
    ntiles = tl.maximum((numel - h + CHUNK - 1) // CHUNK, 1)  # an empty tensor has one tile
    old = tl.atomic_add(counters + t, 1, mask=go)
    last = go & (old == ntiles - 1)
    tl.store(step_ptr, step, mask=last)
    tl.store(counters + t, 0, mask=last)


# ---- 8-bit blockwise states (adam_math.h "8-bit blockwise states", csrc/cpu/adam.cpp run_range_q8) ----
# uint8 codes and one fp32 absmax per block of Q8_BLOCK elements (blocks from element 0 of each
# tensor). The maps' integer steps are adam_math.h's q8_* on uint32 (>> logical, + and - wrap);
# a decoded value is a code's bit pattern as fp32 times the block's scale.
_Q8_BLOCK = tl.constexpr(reference.Q8_BLOCK)
_Q8_SIGNED_MAX = tl.constexpr(reference.Q8_SIGNED_MAX)
_Q8_UNSIGNED_MAX = tl.constexpr(reference.Q8_UNSIGNED_MAX)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _q8_round3(b):
    # adam_math.h q8_round3: the top 12 bits of an fp32 bit pattern rounded at its 3rd mantissa bit
    return (b + 0x7FFFF + ((b >> 20) & 1)) >> 20


@triton.jit
def _q8_round8x(x):
    # adam_math.h q8_round8x: 8x rounded to the nearest integer (ties to even) for 0 <= x < 2^20,
    # in one rounding: added to 1.5 * 2^23 (whose ulp is 1), the low bits are it (8x is exact,
    # so a contraction into an FMA gives the same)
    return (x * 8.0 + 12582912.0).to(tl.uint32, bitcast=True) - 0x4B400000


@triton.jit
def _q8_scale(absmax, QMAX: tl.constexpr):
    # adam_math.h q8_scale: absmax / qmax, IEEE division
    return tl.math.div_rn(absmax, QMAX)


@triton.jit
def _q8_inv(absmax, QMAX: tl.constexpr):
    # adam_math.h q8_inv: qmax / absmax (IEEE) clamped to FLT_MAX; 0 for an absmax of 0 or NaN
    pos = absmax > 0.0
    return tl.where(pos, tl.minimum(tl.math.div_rn(QMAX, tl.where(pos, absmax, 1.0)), _FLT_MAX), 0.0)


@triton.jit
def _q8_encode_signed(value, inv):
    # adam_math.h q8_encode_signed: value's exp_avg code (uint32) with inv = q8_inv(absmax, Q8_SIGNED_MAX)
    x = tl.abs(value) * inv
    sub = _q8_round8x(x)  # below 1 the codes are f/8: f = 8x rounded (8 is the code of 1)
    norm = _q8_round3(x.to(tl.uint32, bitcast=True)) - (126 << 3)
    mag = tl.where(x < 1.0, sub, norm)
    mag = tl.where(x != x, 0, tl.where(mag > 127, 127, mag))
    return mag | tl.where(value < 0.0, 0x80, 0)


@triton.jit
def _q8_decode_signed(code, scale):
    # adam_math.h q8_decode_signed (code: uint32): 2^(e-1) (1 + f/8), or f/8 for e = 0 (exact)
    c = code & 0x7F
    m = ((c << 20) + (126 << 23)).to(tl.float32, bitcast=True)
    mag = tl.where(c < 8, m * 2.0 - 1.0, m)
    return tl.where((code & 0x80) != 0, -mag, mag) * scale


@triton.jit
def _q8_encode_unsigned(value, inv):
    # adam_math.h q8_encode_unsigned: value's exp_avg_sq code with inv = q8_inv(absmax, Q8_UNSIGNED_MAX);
    # below the smallest code, and NaN: code 0
    x = value * inv
    c = _q8_round3(x.to(tl.uint32, bitcast=True)) - (127 << 3)
    return tl.where(x > 1.0, tl.where(c > 255, 255, c), 0)


@triton.jit
def _q8_decode_unsigned(code, scale):
    # adam_math.h q8_decode_unsigned (code: uint32): 2^e (1 + f/8)
    return ((code << 20) + (127 << 23)).to(tl.float32, bitcast=True) * scale


@triton.jit
def _q8_absmax_bits(x, mask, AXIS: tl.constexpr):
    """max |x| over AXIS where mask (0 where none) as fp32 bits in an int32: |x|'s bits (sign
    cleared) order as the values do, and a NaN's are above inf's, so a NaN propagates as
    adam_math.h ft_max does (a float tl.max drops it)."""
    b = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.max(tl.where(mask, b, 0), axis=AXIS)


@triton.jit
def _q8_elements(offs, mask, base, pp, gp, mp, vp, xp, wp, sm, sv, sx, gscale, wd, decay, l2, lerp_low, w1, omw1,
                 b2, omb2, bc2_sqrt, eps, step_size, sr_key, AMSGRAD: tl.constexpr, MASTER: tl.constexpr,
                 DECOUPLED: tl.constexpr, SR_P: tl.constexpr):
    """The update of the elements base + offs (where mask) of one tensor with 8-bit states (the
    pointers are the tensors' own plus base): the codes decoded with their blocks' scales (sm,
    sv, sx, broadcast to offs), the fp32 update in adam_math.h's order, the param (and master)
    stored. Returns the new fp32 (m, v, x) (x: v without AMSGRAD), which the caller encodes
    once their blocks' absmax are known."""
    if MASTER:
        p = tl.load(wp + offs, mask=mask, other=0.0)
    else:
        p = tl.load(pp + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32)
    m = _q8_decode_signed(tl.load(mp + offs, mask=mask, other=0).to(tl.uint32), sm)
    v = _q8_decode_unsigned(tl.load(vp + offs, mask=mask, other=0).to(tl.uint32), sv)
    p, m, v = _adam_moments(p, g, m, v, gscale, wd, decay, l2, lerp_low, w1, omw1, b2, omb2, DECOUPLED)
    x = v
    if AMSGRAD:
        x = _q8_decode_unsigned(tl.load(xp + offs, mask=mask, other=0).to(tl.uint32), sx)
        x = tl.where((x != x) | (x > v), x, v)  # torch.maximum: NaN propagates
        denom = _adam_denom(x, bc2_sqrt, eps)
    else:
        denom = _adam_denom(v, bc2_sqrt, eps)
    p = p - tl.math.div_rn(step_size * m, denom)
    if MASTER:
        tl.store(wp + offs, p, mask=mask)
    if SR_P:  # the bits of the element's index in its tensor
        p = _sr_round(p, _sr_bits(sr_key, base + offs, _SR_P))
    store_rounded(pp + offs, p, mask)
    return m, v, x


@triton.jit
def _q8_store(cp, ap, offs, mask, blk, has, y, SIGNED: tl.constexpr):
    """Store one state of an iteration: the new absmax of each row's block (the rows `has` a
    block of the tensor) and the codes of its fp32 values y (where mask) encoded with it."""
    absmax = _q8_absmax_bits(y, mask, 1).to(tl.float32, bitcast=True)
    tl.store(ap + blk, absmax, mask=has)
    if SIGNED:
        code = _q8_encode_signed(y, _q8_inv(absmax, _Q8_SIGNED_MAX)[:, None])
    else:
        code = _q8_encode_unsigned(y, _q8_inv(absmax, _Q8_UNSIGNED_MAX)[:, None])
    tl.store(cp + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def _q8_iteration(base, bound, pp, gp, mp, vp, xp, wp, amp, avp, axp, gscale, wd, decay, l2, lerp_low, w1, omw1, b2,
                  omb2, bc2_sqrt, eps, step_size, sr_key, ROWS: tl.constexpr, AMSGRAD: tl.constexpr,
                  MASTER: tl.constexpr, DECOUPLED: tl.constexpr, SR_P: tl.constexpr):
    """The ROWS blocks of Q8_BLOCK elements from element `base` (a multiple of Q8_BLOCK) of one
    tensor, as an (ROWS, Q8_BLOCK) block: its elements below `bound`, decoded with their blocks'
    old absmax, updated, the blocks' new absmax stored and the codes encoded with them. (The
    offsets from base are int32: the pointers move by base once.)"""
    rows = tl.arange(0, ROWS)
    offs = rows[:, None] * _Q8_BLOCK + tl.arange(0, _Q8_BLOCK)[None, :]
    n = bound - base
    mask = offs < n
    has = rows * _Q8_BLOCK < n  # rows with elements of the tensor
    blk = base // _Q8_BLOCK
    amp += blk
    avp += blk
    axp += blk
    sm = _q8_scale(tl.load(amp + rows, mask=has, other=0.0), _Q8_SIGNED_MAX)[:, None]
    sv = _q8_scale(tl.load(avp + rows, mask=has, other=0.0), _Q8_UNSIGNED_MAX)[:, None]
    sx = sv
    if AMSGRAD:
        sx = _q8_scale(tl.load(axp + rows, mask=has, other=0.0), _Q8_UNSIGNED_MAX)[:, None]
    mp += base
    vp += base
    xp += base
    m, v, x = _q8_elements(offs, mask, base, pp + base, gp + base, mp, vp, xp, wp + base, sm, sv, sx, gscale, wd,
                           decay, l2, lerp_low, w1, omw1, b2, omb2, bc2_sqrt, eps, step_size, sr_key, AMSGRAD, MASTER,
                           DECOUPLED, SR_P)
    _q8_store(mp, amp, offs, mask, rows, has, m, True)
    _q8_store(vp, avp, offs, mask, rows, has, v, False)
    if AMSGRAD:
        _q8_store(xp, axp, offs, mask, rows, has, x, False)


@triton.jit(do_not_specialize=["lr_bits", "beta1_bits", "beta2_bits", "eps", "wd_bits", "sr_seed"])
def _adam_q8_kernel(tab, tile_t, tile_off, counters, p_ref, lr_ptr, gm_ptr, fi_ptr,
                    lr_bits, beta1_bits, beta2_bits, eps, wd_bits, sr_seed,
                    AMSGRAD: tl.constexpr, MASTER: tl.constexpr, LR_TENSOR: tl.constexpr,
                    HAS_MULT: tl.constexpr, HAS_FI: tl.constexpr, MAXIMIZE: tl.constexpr,
                    DECOUPLED: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, ALIGNED: tl.constexpr,
                    SR_P: tl.constexpr):
    """_adam_kernel for 8-bit states (tables of COLUMNS_Q8): a tile is ITERS iterations of
    BLOCK // Q8_BLOCK whole blocks (_q8_iteration). ALIGNED: an iteration whose elements are
    all in the tensor has a mask constant over 16 elements (128-bit accesses, 8 elements a
    thread); the iteration that holds the tensor's end goes block by block with a mask per
    element (scalar accesses; no tail of its own as in _adam_kernel, since a block's absmax is
    reduced over all its elements before any is encoded; and the wide block with a mask per
    element took 168-255 registers on sm_90). Not ALIGNED: every iteration block by block."""
    CHUNK: tl.constexpr = BLOCK * ITERS
    ROWS: tl.constexpr = BLOCK // _Q8_BLOCK
    pid = tl.program_id(0)
    t = tl.load(tile_t + pid).to(tl.int64)
    off0 = tl.load(tile_off + pid)
    row = tab + t * 11
    numel = tl.load(row + 10)
    go = pid >= 0
    if HAS_FI:
        go = tl.load(fi_ptr) == 0.0
    step_ptr = tl.load(row + 9).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr, mask=go, other=0.0) + 1.0

    gscale, wd, decay, l2, lerp_low, w1, omw1, b2, omb2, bc2_sqrt, step_size, sr_key = _adam_scalars(
        step, t, lr_ptr, gm_ptr, lr_bits, beta1_bits, beta2_bits, wd_bits, sr_seed, LR_TENSOR, HAS_MULT, MAXIMIZE,
        SR_P)

    pp = tl.load(row + 0).to(p_ref.dtype)
    gp = tl.load(row + 1).to(p_ref.dtype)
    mp = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
    vp = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
    xp = tl.load(row + 4).to(tl.pointer_type(tl.uint8))
    wp = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    amp = tl.load(row + 6).to(tl.pointer_type(tl.float32))
    avp = tl.load(row + 7).to(tl.pointer_type(tl.float32))
    axp = tl.load(row + 8).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # the host checked every address (multi_tensor.py): 128-bit accesses
        off0 = tl.multiple_of(off0, CHUNK)
        pp = tl.multiple_of(pp, 16)
        gp = tl.multiple_of(gp, 16)
        mp = tl.multiple_of(mp, 16)
        vp = tl.multiple_of(vp, 16)
        xp = tl.multiple_of(xp, 16)
        wp = tl.multiple_of(wp, 16)
        amp = tl.multiple_of(amp, 16)
        avp = tl.multiple_of(avp, 16)
        axp = tl.multiple_of(axp, 16)
    lim = tl.where(go, numel, 0)  # found_inf: every load and store masked off, absmax included
    lim16 = lim // 16 * 16
    for k in tl.range(0, CHUNK, BLOCK):
        base = off0 + k
        if ALIGNED and base + BLOCK <= lim16:  # every element in the tensor: a bound of 16 elements
            _q8_iteration(base, lim16, pp, gp, mp, vp, xp, wp, amp, avp, axp, gscale, wd, decay, l2, lerp_low, w1,
                          omw1, b2, omb2, bc2_sqrt, eps, step_size, sr_key, ROWS, AMSGRAD, MASTER, DECOUPLED, SR_P)
        else:  # the tensor's last blocks (if any), one by one with a mask per element
            nb = tl.minimum((tl.maximum(lim - base, 0) + _Q8_BLOCK - 1) // _Q8_BLOCK, ROWS)
            for r in tl.range(0, nb):
                _q8_iteration(base + r * _Q8_BLOCK, lim, pp, gp, mp, vp, xp, wp, amp, avp, axp, gscale, wd, decay, l2,
                              lerp_low, w1, omw1, b2, omb2, bc2_sqrt, eps, step_size, sr_key, 1, AMSGRAD, MASTER,
                              DECOUPLED, SR_P)

    # the step increment: the last program of this tensor (all others have read the step)
    ntiles = tl.maximum((numel + CHUNK - 1) // CHUNK, 1)  # an empty tensor has one tile
    old = tl.atomic_add(counters + t, 1, mask=go)
    last = go & (old == ntiles - 1)
    tl.store(step_ptr, step, mask=last)
    tl.store(counters + t, 0, mask=last)


BLOCK = 1024   # elements per loop iteration of a program
ITERS = 4      # iterations per program: a tile of 4096 elements
# stochastic rounding's hash needs registers: with ptxas's own choice (96 on sm_90) the amsgrad
# variant spilled 12 bytes; more warps would cost the 128-bit accesses of bf16 tensors
SR_OPTIONS = {"num_warps": 4, "maxnreg": 128}

# the 8-bit kernel: decoding, the blocks' reductions and encoding add registers to the update's
# (8 elements a thread of p, g, m, v, x live until the blocks' absmax are known): with ptxas's
# own choice (96 on sm_90) fp32 AdamW spilled 12 bytes, the amsgrad variants took up to 128;
# with 128 every variant of AOT_SPECS fits without spills (4 blocks of 4 warps per SM, as SR_OPTIONS)
Q8_OPTIONS = {"num_warps": 4, "maxnreg": 128}

# the table's columns as AdamTensors fields (fusedtrain/ops/adam.py): param, grad, exp_avg,
# exp_avg_sq, max_exp_avg_sq, master, step
COLUMNS = (0, 1, 2, 3, 4, 6, 5)
# 8-bit states (_adam_q8_kernel): param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master,
# exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax, step
COLUMNS_Q8 = (0, 1, 2, 3, 4, 6, 7, 8, 9, 5)


def peel_sizes(lists):
    """The sizes argument of multi_tensor.tables() for _adam_kernel: the element sizes of the
    streamed columns of COLUMNS (all but the step), from the op's ten lists (AdamTensors order)."""
    return multi_tensor.element_sizes([lists[c] for c in COLUMNS], len(COLUMNS) - 1)


def tile(max_numel, q8=False):
    """(BLOCK, ITERS) of a launch over tensors of at most max_numel elements; q8: of 8-bit
    states, whose iterations are whole blocks of reference.Q8_BLOCK elements."""
    block, iters = multi_tensor.tile(max_numel, BLOCK, ITERS)
    return (max(block, reference.Q8_BLOCK) if q8 else block), iters


def launch(tables, block, iters, refs, lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, master, maximize,
           decoupled_weight_decay, grad_mult, found_inf, sr_seed=0, sr_params=False, sr_exp_avg_sq=False):
    """One launch of the kernel over the tables (rows, tile_t, tile_off) of a call.

    Args:
        tables: the launches from multi_tensor.tables() or a KeptTables, with tiles of
            block * iters; of COLUMNS, or of COLUMNS_Q8 for 8-bit (uint8) states.
        block, iters: from tile().
        refs: (params[0], exp_avgs[0], steps[0]): the dtypes of the call, and the device.
        the others: fusedtrain::adam_'s arguments (csrc/ops.cpp); master: whether the table
            has master params.
    """
    p_ref, s_ref, dummy = refs
    q8 = s_ref.dtype == torch.uint8
    for tab, tile_t, tile_off, aligned in tables:
        # per-launch counters (a stream-ordered memset): launches on two streams never share them
        args = (tab, tile_t, tile_off, torch.zeros(tab.shape[0], dtype=torch.int32, device=p_ref.device), p_ref)
        scalars = (lr_tensor if lr_tensor is not None else dummy,
                   grad_mult if grad_mult is not None else dummy,
                   found_inf if found_inf is not None else dummy,
                   f64_bits(lr), f64_bits(beta1), f64_bits(beta2), float(eps), f64_bits(weight_decay),
                   as_int32(sr_seed))  # the seed: i32 for any value, as AOT_SPECS declare it
        flags = dict(AMSGRAD=bool(amsgrad), MASTER=bool(master), LR_TENSOR=lr_tensor is not None,
                     HAS_MULT=grad_mult is not None, HAS_FI=found_inf is not None, MAXIMIZE=bool(maximize),
                     DECOUPLED=bool(decoupled_weight_decay), BLOCK=block, ITERS=iters, ALIGNED=aligned,
                     SR_P=bool(sr_params))
        with device_guard(p_ref):
            if q8:  # (no stochastic rounding of exp_avg_sq: check_sr)
                _adam_q8_kernel[(tile_t.numel(),)](*args, *scalars, **flags, **Q8_OPTIONS)
            else:
                _adam_kernel[(tile_t.numel(),)](
                    *args, s_ref, *scalars, **flags, SR_V=bool(sr_exp_avg_sq),
                    **(SR_OPTIONS if sr_params or sr_exp_avg_sq else {"num_warps": 4}))


@torch.library.custom_op("fusedtrain_triton::adam_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps",
                                       "master_params", "exp_avg_absmax", "exp_avg_sq_absmax",
                                       "max_exp_avg_sq_absmax"))
def adam_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
          exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
          master_params: list[torch.Tensor], exp_avg_absmax: list[torch.Tensor], exp_avg_sq_absmax: list[torch.Tensor],
          max_exp_avg_sq_absmax: list[torch.Tensor], lr: float, lr_tensor: Optional[torch.Tensor], beta1: float,
          beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
          decoupled_weight_decay: bool, grad_mult: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
          sr_seed: int = 0, sr_params: bool = False, sr_exp_avg_sq: bool = False) -> None:
    # an opaque custom op (not triton_op): the kernel reads addresses from a table, which
    # torch.compile could not trace
    if not params:
        return
    _check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, exp_avg_absmax,
           exp_avg_sq_absmax, max_exp_avg_sq_absmax, amsgrad=amsgrad)
    from fusedtrain.ops.adam import check_sr

    check_sr(sr_seed, sr_params, sr_exp_avg_sq, params, exp_avgs, master_params)
    q8 = exp_avgs[0].dtype == torch.uint8  # 8-bit states: codes and their blocks' absmax
    block, iters = tile(max(p.numel() for p in params), q8)
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, exp_avg_absmax,
             exp_avg_sq_absmax, max_exp_avg_sq_absmax]
    if not amsgrad:
        lists[4] = lists[9] = []
    tables = multi_tensor.tables([lists[c] for c in (COLUMNS_Q8 if q8 else COLUMNS)], block * iters, empty_tiles=True,
                                 sizes=None if q8 else peel_sizes(lists))
    launch(tables, block, iters, (params[0], exp_avgs[0], steps[0]), lr, lr_tensor, beta1, beta2, eps, weight_decay,
           amsgrad, bool(master_params), maximize, decoupled_weight_decay, grad_mult, found_inf, sr_seed, sr_params,
           sr_exp_avg_sq)


def _check(*lists, amsgrad):
    """fusedtrain::adam_'s list checks (fusedtrain/ops/adam.py), and contiguity, which the
    kernel's tables assume: a call with bad lists raises instead of reading past a tensor.

    Args:
        lists: the op's ten tensor lists, in its order (AdamTensors).
        amsgrad: the op's flag.
    """
    from fusedtrain.ops.adam import AdamTensors, _check as check_lists

    t = AdamTensors(*lists)
    check_lists(t, amsgrad)
    for name, lst in zip(AdamTensors._fields, t):
        if not all(map(torch.Tensor.is_contiguous, lst)):
            i = next(i for i, x in enumerate(lst) if not x.is_contiguous())
            raise ValueError(f"fusedtrain_triton::adam_: {name}[{i}] is not contiguous (the kernel reads "
                             "contiguous tensors; fusedtrain.ops.adam stages others)")


def _spec(pdt, sdt, amsgrad, master, flags, wd_zero=False, amp=False, aligned=True, sr_p=False, sr_v=False):
    sr = sr_p or sr_v
    # an int argument is i32 when its value fits: lr_bits is f64_bits(0.0) = 0 with an lr tensor,
    # wd_bits with weight_decay=0 (torch Adam's default)
    sig = {"tab": "*i64", "tile_t": "*i64", "tile_off": "*i64", "counters": "*i32", "p_ref": f"*{pdt}",
           "s_ref": f"*{sdt}", "lr_ptr": "*fp32", "gm_ptr": "*fp32", "fi_ptr": "*fp32",
           "lr_bits": "i32" if flags else "i64", "beta1_bits": "i64", "beta2_bits": "i64", "eps": "fp32",
           "wd_bits": "i32" if wd_zero else "i64", "sr_seed": "i32"}
    ce = dict(AMSGRAD=amsgrad, MASTER=master, LR_TENSOR=flags, HAS_MULT=flags or amp, HAS_FI=flags or amp,
              MAXIMIZE=flags, DECOUPLED=not flags, BLOCK=BLOCK, ITERS=ITERS, ALIGNED=aligned, SR_P=sr_p, SR_V=sr_v)
    name = f"_adam_kernel[{pdt}/{sdt}{',amsgrad' if amsgrad else ''}{',master' if master else ''}" \
           f"{',lr_t,mult,found_inf,maximize' if flags else ',adamw'}{',amp' if amp else ''}" \
           f"{',wd=0' if wd_zero else ''}{'' if aligned else ',unaligned'}{',sr_params' if sr_p else ''}" \
           f"{',sr_exp_avg_sq' if sr_v else ''}]"
    return AotSpec(_adam_kernel, sig, ce, name=name, options=dict(SR_OPTIONS) if sr else {"num_warps": 4})


def _spec_q8(pdt, amsgrad, master, flags=False, amp=False, aligned=True, sr_p=False):
    """A launch of _adam_q8_kernel (8-bit states), the arguments as _spec's."""
    sig = {"tab": "*i64", "tile_t": "*i64", "tile_off": "*i64", "counters": "*i32", "p_ref": f"*{pdt}",
           "lr_ptr": "*fp32", "gm_ptr": "*fp32", "fi_ptr": "*fp32", "lr_bits": "i32" if flags else "i64",
           "beta1_bits": "i64", "beta2_bits": "i64", "eps": "fp32", "wd_bits": "i64", "sr_seed": "i32"}
    ce = dict(AMSGRAD=amsgrad, MASTER=master, LR_TENSOR=flags, HAS_MULT=flags or amp, HAS_FI=flags or amp,
              MAXIMIZE=flags, DECOUPLED=not flags, BLOCK=BLOCK, ITERS=ITERS, ALIGNED=aligned, SR_P=sr_p)
    name = f"_adam_q8_kernel[{pdt}/u8{',amsgrad' if amsgrad else ''}{',master' if master else ''}" \
           f"{',lr_t,mult,found_inf,maximize' if flags else ',adamw'}{',amp' if amp else ''}" \
           f"{'' if aligned else ',unaligned'}{',sr_params' if sr_p else ''}]"
    return AotSpec(_adam_q8_kernel, sig, ce, name=name, options=dict(Q8_OPTIONS))


# inlined into the kernels
AOT_HELPERS = ("_adam_moments", "_adam_denom", "_adam_elements", "_adam_scalars", "_sr_mix", "_sr_bits", "_sr_round",
               "_q8_round3", "_q8_round8x", "_q8_scale", "_q8_inv", "_q8_encode_signed", "_q8_decode_signed",
               "_q8_encode_unsigned", "_q8_decode_unsigned", "_q8_absmax_bits", "_q8_elements", "_q8_store",
               "_q8_iteration")

AOT_SPECS = [
    _spec("fp32", "fp32", False, False, False),
    # state_format="bf16" (a stochastically rounded exp_avg_sq): of fp32 params, and of bf16
    # params with fp32 masters; stochastic rounding of bf16 params, with and without lean moments
    _spec("fp32", "bf16", True, False, False, amp=True, sr_v=True),
    _spec("bf16", "bf16", True, True, True, amp=True, sr_v=True),
    _spec("bf16", "bf16", False, False, False, amp=True, sr_p=True),
    _spec("bf16", "bf16", True, False, True, sr_p=True, sr_v=True),
    _spec("fp32", "fp32", True, False, True),
    _spec("bf16", "bf16", True, False, False),
    _spec("fp16", "fp16", False, False, True),
    _spec("bf16", "fp32", True, True, True),
    _spec("fp16", "fp32", False, True, False),
    _spec("fp32", "fp32", False, False, False, wd_zero=True),
    # AdamW stepped by a GradScaler: grad_mult and found_inf read in the kernel
    _spec("fp32", "fp32", False, False, False, amp=True),
    _spec("bf16", "fp32", False, True, False, amp=True),
    _spec("fp16", "fp32", False, True, False, amp=True),
    _spec("bf16", "bf16", False, False, False, amp=True),
    _spec("fp16", "fp16", False, False, False, amp=True),
    # tensors off a 16-byte boundary (views into a buffer): scalar accesses
    _spec("fp32", "fp32", False, False, False, aligned=False),
    _spec("bf16", "fp32", False, True, False, amp=True, aligned=False),
    _spec("fp16", "fp16", False, False, False, amp=True, aligned=False),
    # lean AdamW: state_format="bf16" of fp32 params (exp_avg_sq rounded stochastically), and
    # stochastic_rounding=True of bf16 params (their own bf16 exp_avg_sq rounded stochastically
    # too); stepped plainly and by a GradScaler
    _spec("fp32", "bf16", False, False, False, sr_v=True),
    _spec("fp32", "bf16", False, False, False, amp=True, sr_v=True),
    _spec("bf16", "bf16", False, False, False, sr_p=True, sr_v=True),
    _spec("bf16", "bf16", False, False, False, amp=True, sr_p=True, sr_v=True),
]
# state_format="8bit" (_adam_q8_kernel): fp32 params; bf16 params with fp32 masters, without
# (rounded to nearest, or stochastically); fp16 params with fp32 masters (under a GradScaler);
# with and without amsgrad; stepped plainly and by a GradScaler (tests/test_adam_8bit_triton.py
# captures these uses)
AOT_SPECS += [_spec_q8(pdt, amsgrad, master, amp=amp, sr_p=sr_p)
              for pdt, master, sr_p, amsgrads, amps in (("fp32", False, False, (False, True), (False, True)),
                                                        ("bf16", True, False, (False, True), (False, True)),
                                                        ("fp16", True, False, (False, True), (True,)),
                                                        ("bf16", False, False, (False,), (False, True)),
                                                        ("bf16", False, True, (False, True), (False, True)))
              for amsgrad in amsgrads for amp in amps]
AOT_SPECS += [
    _spec_q8("fp32", True, False, flags=True),  # Adam with an lr tensor, maximize
    # tensors off a 16-byte boundary (a grad in DDP's bucket view): block by block, scalar accesses
    _spec_q8("fp32", False, False, amp=True, aligned=False),
    _spec_q8("bf16", False, True, amp=True, aligned=False),
]
