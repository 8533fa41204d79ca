"""Adam/AdamW as one Triton launch over every tensor of a (device, dtype) group: the op
fusedtrain_triton::adam_, with fusedtrain::adam_'s contract (csrc/ops.cpp).

Programs take tiles of the tables of fusedtrain/triton/multi_tensor.py (columns: param,
grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, step; numel). The per-tensor scalars are
computed in float64 from the tensor's step (hyper-parameters arrive as int64 bit patterns of
the host's doubles), the per-element math is fp32 in the order of
csrc/include/fusedtrain/adam_math.h. The step increment: every program reads the old step
and bumps a per-tensor counter; the last program of a tensor writes step + 1 and resets the
counter. A nonzero found_inf masks every load, store and atomic. ALIGNED: the host checked
that every address of the launch is 16-byte aligned (multi_tensor.py), and the kernel moves
128 bits per access.
"""
import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from fusedtrain import reference
from fusedtrain.triton import device_guard, multi_tensor
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
def _adam_elements(offs, mask, pp, gp, mp, vp, xp, wp, gscale, wd, decay, l2, lerp_low, w1, omw1, b2, omb2,
                   bc2_sqrt, eps, step_size, sr_key, AMSGRAD: tl.constexpr, MASTER: tl.constexpr,
                   DECOUPLED: tl.constexpr, SR_P: tl.constexpr, SR_V: tl.constexpr):
    """The update of the elements at offs (where mask) of one tensor: adam_math.h's order."""
    if MASTER:
        p = tl.load(wp + offs, mask=mask, other=0.0)
    else:
        p = tl.load(pp + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mp + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(vp + offs, mask=mask, other=0.0).to(tl.float32)
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
    if AMSGRAD:
        x = tl.load(xp + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where((x != x) | (x > v), x, v)  # torch.maximum: NaN propagates
        denom = tl.math.div_rn(tl.sqrt_rn(x), bc2_sqrt) + eps
        store_rounded(xp + offs, x, mask)
    else:
        denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    # IEEE division as in adam_math.h (Triton's fp32 `/` is the approximate div.full)
    p = p - tl.math.div_rn(step_size * m, denom)
    if MASTER:
        tl.store(wp + offs, p, mask=mask)
    if SR_P:
        p = _sr_round(p, _sr_bits(sr_key, offs, _SR_P))
    if SR_V:  # after the param's update, which read it unrounded
        v = _sr_round(v, _sr_bits(sr_key, offs, _SR_V))
    store_rounded(pp + offs, p, mask)
    store_rounded(mp + offs, m, mask)
    store_rounded(vp + offs, v, mask)


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

    # per-tensor scalars in float64 (the host's doubles, bit for bit)
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
    if SR_P or SR_V:  # adam_math.h sr_key(seed, step, tensor)
        seed = sr_seed.to(tl.int64).to(tl.uint32)
        sr_key = _sr_mix(_sr_mix(seed ^ _sr_mix(step.to(tl.uint32))) ^ (t.to(tl.uint32) * 0x9E3779B9))

    pp = tl.load(row + 0).to(p_ref.dtype)
    gp = tl.load(row + 1).to(p_ref.dtype)
    mp = tl.load(row + 2).to(s_ref.dtype)
    vp = tl.load(row + 3).to(s_ref.dtype)
    xp = tl.load(row + 4).to(s_ref.dtype)
    wp = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # the host checked every address (multi_tensor.py): 128-bit accesses
        off0 = tl.multiple_of(off0, CHUNK)
        pp = tl.multiple_of(pp, 16)
        gp = tl.multiple_of(gp, 16)
        mp = tl.multiple_of(mp, 16)
        vp = tl.multiple_of(vp, 16)
        xp = tl.multiple_of(xp, 16)
        wp = tl.multiple_of(wp, 16)
    lim = tl.where(go, numel, 0)  # found_inf: every load and store masked off
    if ALIGNED:
        lim16 = lim // 16 * 16  # the loop's mask is constant over 16 elements (a vector of any dtype)
    else:
        lim16 = lim
    for k in tl.range(0, CHUNK, BLOCK):
        offs = off0 + k + tl.arange(0, BLOCK)
        _adam_elements(offs, offs < lim16, pp, gp, mp, vp, xp, wp, gscale, wd, decay, l2, lerp_low, w1, omw1, b2,
                       omb2, bc2_sqrt, eps, step_size, sr_key, AMSGRAD, MASTER, DECOUPLED, SR_P, SR_V)
    if ALIGNED:  # the last (fewer than 16) elements of the tensor, scalar, by the tile that holds them
        toffs = lim16 + tl.arange(0, 16)
        tmask = (toffs < lim) & (lim16 >= off0) & (lim16 < off0 + CHUNK)
        _adam_elements(toffs, tmask, pp, gp, mp, vp, xp, wp, gscale, wd, decay, l2, lerp_low, w1, omw1, b2,
                       omb2, bc2_sqrt, eps, step_size, sr_key, AMSGRAD, MASTER, DECOUPLED, SR_P, SR_V)

    # the step increment: the last program of this tensor (all others have read the step)
    ntiles = tl.maximum((numel + CHUNK - 1) // CHUNK, 1)  # an empty tensor has one tile
    old = tl.atomic_add(counters + t, 1, mask=go)
    last = go & (old == ntiles - 1)
    tl.store(step_ptr, step, mask=last)
    tl.store(counters + t, 0, mask=last)


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


BLOCK = 1024   # elements per loop iteration of a program
ITERS = 4      # iterations per program: a tile of 4096 elements
# stochastic rounding's hash needs registers: with ptxas's own choice (96 on sm_90) the amsgrad
# variant spilled 12 bytes; more warps would cost the 128-bit accesses of bf16 tensors
SR_OPTIONS = {"num_warps": 4, "maxnreg": 128}

# the table's columns as AdamTensors fields (fusedtrain/ops/adam.py): param, grad, exp_avg,
# exp_avg_sq, max_exp_avg_sq, master, step
COLUMNS = (0, 1, 2, 3, 4, 6, 5)


def tile(max_numel):
    """(BLOCK, ITERS) of a launch over tensors of at most max_numel elements."""
    return multi_tensor.tile(max_numel, BLOCK, ITERS)


def launch(tables, block, iters, refs, lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, master, maximize,
           decoupled_weight_decay, grad_mult, found_inf, sr_seed=0, sr_params=False, sr_exp_avg_sq=False):
    """One launch of the kernel over the tables (rows, tile_t, tile_off) of a call.

    Args:
        tables: the launches from multi_tensor.tables() or a KeptTables, with tiles of
            block * iters.
        block, iters: from tile().
        refs: (params[0], exp_avgs[0], steps[0]): the dtypes of the call, and the device.
        the others: fusedtrain::adam_'s arguments (csrc/ops.cpp); master: whether the table
            has master params.
    """
    p_ref, s_ref, dummy = refs
    for tab, tile_t, tile_off, aligned in tables:
        with device_guard(p_ref):
            _adam_kernel[(tile_t.numel(),)](
                # per-launch counters (a stream-ordered memset): launches on two streams never share them
                tab, tile_t, tile_off, torch.zeros(tab.shape[0], dtype=torch.int32, device=p_ref.device), p_ref,
                s_ref, lr_tensor if lr_tensor is not None else dummy,
                grad_mult if grad_mult is not None else dummy,
                found_inf if found_inf is not None else dummy,
                _bits(lr), _bits(beta1), _bits(beta2), float(eps), _bits(weight_decay), int(sr_seed),
                AMSGRAD=bool(amsgrad), MASTER=bool(master), LR_TENSOR=lr_tensor is not None,
                HAS_MULT=grad_mult is not None, HAS_FI=found_inf is not None, MAXIMIZE=bool(maximize),
                DECOUPLED=bool(decoupled_weight_decay), BLOCK=block, ITERS=iters, ALIGNED=aligned,
                SR_P=bool(sr_params), SR_V=bool(sr_exp_avg_sq),
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
    if exp_avgs[0].dtype == torch.uint8:
        raise NotImplementedError("fusedtrain_triton::adam_: 8-bit states are not built yet")
    from fusedtrain.ops.adam import check_sr

    check_sr(sr_seed, sr_params, sr_exp_avg_sq, params, exp_avgs, master_params)
    block, iters = tile(max(p.numel() for p in params))
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params)
    if not amsgrad:
        lists = lists[:4] + ([],) + lists[5:]
    tables = multi_tensor.tables([lists[c] for c in COLUMNS], block * iters, empty_tiles=True)
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
    # an int argument is i32 when its value fits: lr_bits is _bits(0.0) = 0 with an lr tensor,
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


AOT_HELPERS = ("_adam_elements", "_sr_mix", "_sr_bits", "_sr_round")  # inlined into _adam_kernel

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
]
