"""Adam/AdamW step as one Triton launch over every tensor of a (device, dtype) group.

Tables (int64 tensors, cached on the device per set of tensors, so a step with the same
tensors launches the kernel and nothing else):
  tab[t, :] = addresses of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, step; numel
  tiles: (tensor index, first element) of every CHUNK-element tile of every tensor.
The grid is one program per tile. The per-tensor scalars (bias corrections, step size) are
computed in float64 from the tensor's step, like the CPU kernel (hyperparameters arrive as
int64 bit patterns of the host's doubles); the per-element math is fp32, in the order of
csrc/include/fusedtrain/adam_math.h. The step increment: every program reads the old
step, then bumps a per-tensor counter (atomic); the last program of the tensor writes
step + 1 and resets the counter to 0 for the next launch. found_inf nonzero masks every
load, store and atomic: nothing is written.
"""
import os
import struct
import threading

import torch
import triton
import triton.language as tl

from fusedtrain.triton.rounding import store_rounded

from fusedtrain.triton.aot import AotSpec

_COLS = 8  # p, g, m, v, vmax, master, step, numel


@triton.jit
def _adam_kernel(tab, tile_t, tile_off, counters, p_ref, s_ref, lr_ptr, gm_ptr, fi_ptr,
                 lr_bits, beta1_bits, beta2_bits, eps, wd_bits,
                 AMSGRAD: tl.constexpr, MASTER: tl.constexpr, LR_TENSOR: tl.constexpr,
                 HAS_MULT: tl.constexpr, HAS_FI: tl.constexpr, MAXIMIZE: tl.constexpr,
                 DECOUPLED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
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

    pp = tl.load(row + 0).to(p_ref.dtype)
    gp = tl.load(row + 1).to(p_ref.dtype)
    mp = tl.load(row + 2).to(s_ref.dtype)
    vp = tl.load(row + 3).to(s_ref.dtype)
    xp = tl.load(row + 4).to(s_ref.dtype)
    wp = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    lim = tl.where(go, numel, 0)  # found_inf: every load and store masked off
    for k in tl.range(0, CHUNK, BLOCK):
        offs = off0 + k + tl.arange(0, BLOCK)
        mask = offs < lim
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
            denom = tl.sqrt_rn(x) / bc2_sqrt + eps
            store_rounded(xp + offs, x, mask)
        else:
            denom = tl.sqrt_rn(v) / bc2_sqrt + eps
        p = p - step_size * m / denom
        if MASTER:
            tl.store(wp + offs, p, mask=mask)
        store_rounded(pp + offs, p, mask)
        store_rounded(mp + offs, m, mask)
        store_rounded(vp + offs, v, mask)

    # the step increment: the last program of this tensor (all others have read the step)
    ntiles = tl.maximum((numel + CHUNK - 1) // CHUNK, 1)  # an empty tensor has one tile
    old = tl.atomic_add(counters + t, 1, mask=go)
    last = go & (old == ntiles - 1)
    tl.store(step_ptr, step, mask=last)
    tl.store(counters + t, 0, mask=last)


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK = 1024   # elements per loop iteration of a program
CHUNK = 4096   # elements per program (tile)


def _tile(max_numel):
    """(CHUNK, BLOCK) of a launch. The interpreter runs one program at a time, one numpy call
    per operation: one iteration per program, tiles no wider than the largest tensor."""
    if _INTERPRET:
        b = min(1 << 16, max(16, triton.next_power_of_2(max(int(max_numel), 1))))
        return b, b
    return CHUNK, BLOCK

_lock = threading.Lock()
_tables = {}      # (device, key) -> (tab, tile_t, tile_off); key = every address and size
_counters = {}    # device -> int32 zeros (self-resetting), at least as long as the largest call
_MAX_TABLES = 16


def _ptr(t):
    return t.data_ptr() if t is not None else 0


def _to_device(t, device):
    # from pinned memory and stream-ordered: a pageable host-to-device copy would block the host
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _tables_for(device, cols, chunk):
    key = (str(device), chunk, tuple(cols))
    with _lock:
        hit = _tables.get(key)
        if hit is not None:
            return hit
    n = len(cols) // _COLS
    tab = torch.tensor(cols, dtype=torch.int64).reshape(n, _COLS)
    # tiles per tensor in Python ints (no tensor is read back); an empty tensor gets one tile
    # (its step)
    per_list = [max(1, -(-cols[i * _COLS + 7] // chunk)) for i in range(n)]
    per = torch.tensor(per_list, dtype=torch.int64)
    tile_t = torch.repeat_interleave(torch.arange(n, dtype=torch.int32), per)
    first = torch.cumsum(per, 0) - per
    tile_off = (torch.arange(sum(per_list), dtype=torch.int64) - torch.repeat_interleave(first, per)) * chunk
    entry = tuple(_to_device(t, device) for t in (tab, tile_t, tile_off))
    with _lock:
        if len(_tables) >= _MAX_TABLES:
            _tables.pop(next(iter(_tables)))
        _tables[key] = entry
    return entry


def _counters_for(device, n):
    with _lock:
        c = _counters.get(str(device))
        if c is None or c.numel() < n:
            c = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
            _counters[str(device)] = c
        return c


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params, *, lr, lr_tensor,
          beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_mult, found_inf):
    """Lists validated by fusedtrain/ops/adam.py (one device, contiguous, consistent dtypes)."""
    n = len(params)
    cols = []
    for i in range(n):
        cols += [params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                 max_exp_avg_sqs[i].data_ptr() if amsgrad else 0,
                 master_params[i].data_ptr() if master_params else 0, steps[i].data_ptr(), params[i].numel()]
    device = params[0].device
    chunk, block = _tile(max(p.numel() for p in params))
    tab, tile_t, tile_off = _tables_for(device, cols, chunk)
    ntiles = tile_t.numel()
    if ntiles == 0:
        return
    counters = _counters_for(device, n)
    dummy = steps[0]
    _adam_kernel[(ntiles,)](
        tab, tile_t, tile_off, counters, params[0], exp_avgs[0],
        lr_tensor if lr_tensor is not None else dummy,
        grad_mult if grad_mult is not None else dummy,
        found_inf if found_inf is not None else dummy,
        _bits(lr), _bits(beta1), _bits(beta2), float(eps), _bits(weight_decay),
        AMSGRAD=bool(amsgrad), MASTER=bool(master_params), LR_TENSOR=lr_tensor is not None,
        HAS_MULT=grad_mult is not None, HAS_FI=found_inf is not None, MAXIMIZE=bool(maximize),
        DECOUPLED=bool(decoupled_weight_decay), CHUNK=chunk, BLOCK=block)


def _spec(pdt, sdt, amsgrad, master, flags):
    sig = {"tab": "*i64", "tile_t": "*i32", "tile_off": "*i64", "counters": "*i32", "p_ref": f"*{pdt}",
           "s_ref": f"*{sdt}", "lr_ptr": "*fp32", "gm_ptr": "*fp32", "fi_ptr": "*fp32", "lr_bits": "i64",
           "beta1_bits": "i64", "beta2_bits": "i64", "eps": "fp32", "wd_bits": "i64"}
    ce = dict(AMSGRAD=amsgrad, MASTER=master, LR_TENSOR=flags, HAS_MULT=flags, HAS_FI=flags, MAXIMIZE=flags,
              DECOUPLED=not flags, CHUNK=4096, BLOCK=1024)
    name = f"_adam_kernel[{pdt}/{sdt}{',amsgrad' if amsgrad else ''}{',master' if master else ''}" \
           f"{',lr_t,mult,found_inf,maximize' if flags else ',adamw'}]"
    return AotSpec(_adam_kernel, sig, ce, name=name)


AOT_SPECS = [
    _spec("fp32", "fp32", False, False, False),
    _spec("fp32", "fp32", True, False, True),
    _spec("bf16", "bf16", True, False, False),
    _spec("fp16", "fp16", False, False, True),
    _spec("bf16", "fp32", True, True, True),
    _spec("fp16", "fp32", False, True, False),
]
