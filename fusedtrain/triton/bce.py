"""BCE with logits in Triton: the bodies of fusedtrain_triton::bce_with_logits and
fusedtrain_triton::bce_with_logits_target_grad (torch.library.triton_op; contract in
csrc/ops.cpp `// ---- bce`, autograd and fake registration in fusedtrain/ops/bce.py).

Per element the formulas of csrc/include/fusedtrain/bce_math.h (DESIGN §4), in fp32 (fp64 for
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

from fusedtrain.triton.aot import AotSpec

BLOCK = 1024        # elements per program of the elementwise kernels
SUM_BLOCK = 1024    # partials per step of the final sum
NUM_WARPS = 4


@triton.jit
def _log1p_small(e):
    # log1p(e) for e in [0, 1], as bce_math.h's log1p_unit: 2 atanh(s), s = e / (2 + e) <= 1/3,
    # by its series to s^15 (truncation < 2e-8 relative); fp64 uses the same series to s^31
    s = e / (2.0 + e)
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
def _softplus_terms(x):
    e = tl.exp(-tl.abs(x))
    l1p = _log1p_small(e)
    return e, l1p


@triton.jit
def _tile(pid, N, C, FLAT: tl.constexpr, BLOCK: tl.constexpr):
    """This program's flat offsets into the (R, C) tensors, their mask, and their row and
    column (the flat offset for both when FLAT: every weight is then indexed flat)."""
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if FLAT:
        rows = offs
        cols = offs
    else:
        rows = offs // C
        cols = offs - rows * C
    return offs, mask, rows, cols


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
def _bce_fwd_kernel(x_ptr, y_ptr, w_ptr, pw_ptr, loss_ptr, grad_ptr, part_ptr,
                    N, C, ws0, ws1, pws0, pws1, scale,
                    HAS_W: tl.constexpr, HAS_PW: tl.constexpr, FLAT: tl.constexpr, REDUCE: tl.constexpr,
                    GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask, rows, cols = _tile(pid, N, C, FLAT, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
    w = _load_weight(w_ptr, offs, rows, cols, ws0, ws1, mask, HAS_W, FLAT, ACC)
    pw = _load_weight(pw_ptr, offs, rows, cols, pws0, pws1, mask, HAS_PW, FLAT, ACC)
    e, l1p = _softplus_terms(x)
    r = 1.0 / (1.0 + e)
    sig = tl.where(x >= 0, r, e * r)
    # (1 - y) * x + lw * softplus(-x) regrouped as in bce_math.h forward(): no cancelling large
    # terms; (x - x) makes x = -inf NaN, as torch's formula gives
    ypw = pw * y if HAS_PW else y
    tail = tl.where(x >= 0, (1.0 - y) * x, (x - x) - ypw * x)
    if HAS_PW:
        lw = 1.0 + (pw - 1.0) * y
        loss = w * (lw * l1p + tail)
        dx = w * (lw * sig - ypw)
    else:
        loss = w * (l1p + tail)
        dx = w * (sig - y)
    if REDUCE:
        tl.store(part_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))
    else:
        tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)
    if GRAD:
        tl.store(grad_ptr + offs, (dx * scale).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bce_sum_kernel(part_ptr, out_ptr, P, divisor, SUM_BLOCK: tl.constexpr):
    # one program: partials summed in a fixed order (lane i takes i, i + SUM_BLOCK, ...; then a tree)
    acc = tl.zeros((SUM_BLOCK,), dtype=part_ptr.dtype.element_ty)
    for start in range(0, P, SUM_BLOCK):
        idx = start + tl.arange(0, SUM_BLOCK)
        acc += tl.load(part_ptr + idx, mask=idx < P, other=0.0)
    total = tl.sum(acc, axis=0) / divisor
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


@triton.jit
def _bce_target_grad_kernel(x_ptr, w_ptr, pw_ptr, out_ptr, N, C, ws0, ws1, pws0, pws1, scale,
                            HAS_W: tl.constexpr, HAS_PW: tl.constexpr, FLAT: tl.constexpr,
                            ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs, mask, rows, cols = _tile(pid, N, C, FLAT, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    w = _load_weight(w_ptr, offs, rows, cols, ws0, ws1, mask, HAS_W, FLAT, ACC)
    pw = _load_weight(pw_ptr, offs, rows, cols, pws0, pws1, mask, HAS_PW, FLAT, ACC)
    if HAS_PW:
        e, l1p = _softplus_terms(x)
        dy = w * (pw * (l1p + tl.maximum(-x, 0.0)) - (l1p + tl.maximum(x, 0.0)))
    else:
        dy = w * -x
    tl.store(out_ptr + offs, (dy * scale).to(out_ptr.dtype.element_ty), mask=mask)


AOT_HELPERS = ("_log1p_small", "_softplus_terms", "_tile", "_load_weight")


# ---- launchers (the triton_op bodies) --------------------------------------------------

def _strides(t, R, C):
    """Element strides of an (R, C) broadcast operand, 0 for size-1 dims (the FLAT case reads
    element i at i * s1)."""
    if t is None:
        return 0, 0
    return (0 if R == 1 else t.stride(0)), (0 if C == 1 else t.stride(1))


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@torch.library.triton_op("fusedtrain_triton::bce_with_logits", mutates_args=())
def bce_with_logits(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                    pos_weight: torch.Tensor | None, reduction: int, compute_grad: bool,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    R, C = input.shape
    N = R * C
    loss = input.new_empty((R, C) if reduction == 0 else (), dtype=out_dtype)
    grad = input.new_empty((R, C) if compute_grad else (0, 0))
    if N == 0:
        if reduction != 0:
            loss.fill_(float("nan") if reduction == 1 else 0.0)
        return loss, grad
    acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    nprog = triton.cdiv(N, BLOCK)
    partials = input.new_empty((nprog if reduction != 0 else 1,), dtype=acc_dtype)
    ws0, ws1 = _strides(weight, R, C)
    pws0, pws1 = _strides(pos_weight, R, C)
    scale = 1.0 / N if reduction == 1 else 1.0
    torch.library.wrap_triton(_bce_fwd_kernel)[(nprog,)](
        input, target, input if weight is None else weight, input if pos_weight is None else pos_weight,
        loss, grad if compute_grad else loss, partials,
        N, C, ws0, ws1, pws0, pws1, scale,
        HAS_W=weight is not None, HAS_PW=pos_weight is not None, FLAT=R == 1, REDUCE=reduction != 0,
        GRAD=compute_grad, ACC=_acc(input.dtype), BLOCK=BLOCK, num_warps=NUM_WARPS)
    if reduction != 0:
        torch.library.wrap_triton(_bce_sum_kernel)[(1,)](
            partials, loss, nprog, float(N) if reduction == 1 else 1.0, SUM_BLOCK=SUM_BLOCK, num_warps=NUM_WARPS)
    return loss, grad


@torch.library.triton_op("fusedtrain_triton::bce_with_logits_target_grad", mutates_args=())
def bce_with_logits_target_grad(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                                pos_weight: torch.Tensor | None, reduction: int) -> torch.Tensor:
    R, C = input.shape
    N = R * C
    out = input.new_empty((R, C), dtype=target.dtype)
    if N == 0:
        return out
    ws0, ws1 = _strides(weight, R, C)
    pws0, pws1 = _strides(pos_weight, R, C)
    torch.library.wrap_triton(_bce_target_grad_kernel)[(triton.cdiv(N, BLOCK),)](
        input, input if weight is None else weight, input if pos_weight is None else pos_weight, out,
        N, C, ws0, ws1, pws0, pws1, 1.0 / N if reduction == 1 else 1.0,
        HAS_W=weight is not None, HAS_PW=pos_weight is not None, FLAT=R == 1, ACC=_acc(input.dtype),
        BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


# ---- ahead-of-time compilation specs (tests/test_gpu_compile.py) -----------------------

def _specs():
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        for reduce_, flat in ((False, True), (True, False)):
            specs.append(AotSpec(
                _bce_fwd_kernel,
                {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "w_ptr": "*fp32", "pw_ptr": "*fp32", "loss_ptr": "*fp32",
                 "grad_ptr": f"*{dt}", "part_ptr": "*fp32", "N": "i32", "C": "i32", "ws0": "i32", "ws1": "i32",
                 "pws0": "i32", "pws1": "i32", "scale": "fp32"},
                {"HAS_W": True, "HAS_PW": True, "FLAT": flat, "REDUCE": reduce_, "GRAD": True, "ACC": tl.float32,
                 "BLOCK": BLOCK},
                name=f"_bce_fwd_kernel[{dt},{'reduce' if reduce_ else 'none'},{'flat' if flat else 'rc'}]"))
        specs.append(AotSpec(
            _bce_target_grad_kernel,
            {"x_ptr": f"*{dt}", "w_ptr": "*fp32", "pw_ptr": "*fp32", "out_ptr": f"*{dt}", "N": "i32", "C": "i32",
             "ws0": "i32", "ws1": "i32", "pws0": "i32", "pws1": "i32", "scale": "fp32"},
            {"HAS_W": True, "HAS_PW": True, "FLAT": False, "ACC": tl.float32, "BLOCK": BLOCK}))
        specs.append(AotSpec(_bce_sum_kernel, {"part_ptr": "*fp32", "out_ptr": f"*{dt}", "P": "i32",
                                               "divisor": "fp32"}, {"SUM_BLOCK": SUM_BLOCK}))
    return specs


AOT_SPECS = _specs()
