"""The many-label head in Triton: one chunk's matmul with the loss as its epilogue, so the
chunk's logits live only in registers (contract of a chunk step in fusedtrain/ops/head.py).

Program (m, n) computes the tile rows [m*BM, (m+1)*BM) x labels [n*BN, (n+1)*BN) of
z = h @ W.T (fp32 accumulation over K by tl.dot; operands in the compute dtype, fp32 with IEEE
products), adds the bias, and evaluates the BCE formulas of fusedtrain/triton/bce.py (those of
bce_math.h) in fp32: it writes d loss / d z rounded once to the compute dtype (the operand of the
two gradient matmuls that follow) and the tile's loss sum to partials[program], which the caller
sums in a fixed order (deterministic).
"""
import torch
import triton
import triton.language as tl

from fusedtrain.triton import device_guard
from fusedtrain.triton.aot import AotSpec
from fusedtrain.triton.bce import _bce_input_grad, _bce_loss
from fusedtrain.triton.rounding import store_rounded

BM, BN, BK = 64, 64, 32
NUM_WARPS = 8  # 4 warps hold 32 accumulators per thread beside the epilogue's terms: spills


# R: a chunk's rows, the batch size (which varies: an epoch's last batch, evaluation): one
# compiled variant for all (Triton would compile another for R = 1 and for multiples of 16)
@triton.jit(do_not_specialize=["R"])
def _linear_bce_kernel(h_ptr, w_ptr, b_ptr, y_ptr, pw_ptr, lw_ptr, u_ptr, g_ptr, part_ptr,
                       R, C, K, s_h, s_w, s_y, s_u,
                       HAS_B: tl.constexpr, HAS_PW: tl.constexpr, HAS_LW: tl.constexpr, HAS_U: tl.constexpr,
                       GRAD: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # a 1-D grid (CUDA caps gridDim.y at 65535; a chunk may have more label tiles than that)
    n_tiles = tl.cdiv(C, BN)
    pid = tl.program_id(0)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rin = rows < R
    cin = cols < C
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kin = (k0 + ks) < K
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * s_h + (k0 + ks)[None, :],
                    mask=rin[:, None] & kin[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :].to(tl.int64) * s_w + (k0 + ks)[:, None],
                    mask=cin[None, :] & kin[:, None], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    inb = rin[:, None] & cin[None, :]
    if HAS_B:
        acc += tl.load(b_ptr + cols, mask=cin, other=0.0)[None, :]
    y = tl.load(y_ptr + rows[:, None].to(tl.int64) * s_y + cols[None, :], mask=inb, other=0.0).to(tl.float32)
    if HAS_PW:
        pw = tl.load(pw_ptr + cols, mask=cin, other=1.0)[None, :]
    else:
        pw = 1.0
    if HAS_LW:
        w = tl.load(lw_ptr + cols, mask=cin, other=1.0)[None, :]
    else:
        w = 1.0
    known = inb
    if HAS_U:
        u = tl.load(u_ptr + rows[:, None].to(tl.int64) * s_u + cols[None, :], mask=inb, other=1)
        known = known & (u == 0)
    loss = tl.where(known, _bce_loss(acc, y, w, pw, HAS_PW), 0.0)
    if GRAD:
        g = tl.where(known, _bce_input_grad(acc, y, w, pw, HAS_PW), 0.0)
        store_rounded(g_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], g, inb)
    tl.store(part_ptr + pid, tl.sum(tl.sum(loss, axis=1), axis=0))


def linear_bce_chunk(h, w, bias, target, pos_weight, label_weight, unknown, write_grad):
    """One chunk: (loss sum as a float64 0-d tensor, d loss / d z as (R, C) in h's dtype or None).

    h: (R, K) and w: (C, K), contiguous, one dtype (float32/float16/bfloat16); bias, pos_weight,
    label_weight: contiguous float32 (C,) or None; target: (R, C) with unit column stride
    (float32/float16/bfloat16); unknown: bool (R, C) with unit column stride or None.
    """
    R, K = h.shape
    C = w.shape[0]
    grad = torch.empty((R, C), dtype=h.dtype, device=h.device) if write_grad else None
    if R == 0 or C == 0:
        return torch.zeros((), dtype=torch.float64, device=h.device), grad
    grid = (triton.cdiv(R, BM) * triton.cdiv(C, BN),)
    partials = torch.empty(grid, dtype=torch.float32, device=h.device)
    dummy = partials
    u = unknown.view(torch.uint8) if unknown is not None else None
    with device_guard(h):
        _linear_bce_kernel[grid](
            h, w, bias if bias is not None else dummy, target, pos_weight if pos_weight is not None else dummy,
            label_weight if label_weight is not None else dummy, u if u is not None else dummy,
            grad if grad is not None else dummy, partials,
            R, C, K, h.stride(0), w.stride(0), target.stride(0), u.stride(0) if u is not None else 0,
            HAS_B=bias is not None, HAS_PW=pos_weight is not None, HAS_LW=label_weight is not None,
            HAS_U=u is not None, GRAD=write_grad, IEEE=h.dtype == torch.float32,
            # the interpreter's bf16 tl.dot is wrong (errors of 1e10 seen with triton 3.8); CPU
            # tensors reach this kernel only under the interpreter, and there the bf16 operands
            # go to an fp32 dot: their products are exact in fp32, as in the GPU's bf16 MMA
            UPCAST=h.dtype == torch.bfloat16 and h.device.type == "cpu",
            BM=BM, BN=BN, BK=BK, num_warps=NUM_WARPS)
    return partials.sum(dtype=torch.float64), grad


def _spec(dt, y_dt, grad, options=True):
    """A launch of linear_bce_chunk: h and W in dt, targets in y_dt, with the gradient (training)
    or without (evaluation); options: pos_weight, label_weight and an unknown mask all given,
    else none of them (tests/test_aot_specs.py captures both). Always with a bias (the
    module's default), and with the sizes a launch has as multiples of 16 (labels of a chunk,
    features, row strides) divisible; R is not specialized (do_not_specialize)."""
    sig = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": "*fp32", "y_ptr": f"*{y_dt}", "pw_ptr": "*fp32",
           "lw_ptr": "*fp32", "u_ptr": "*u8", "g_ptr": f"*{dt}", "part_ptr": "*fp32",
           "R": "i32", "C": "i32", "K": "i32", "s_h": "i32", "s_w": "i32", "s_y": "i32", "s_u": "i32"}
    return AotSpec(_linear_bce_kernel, sig,
                   dict(HAS_B=True, HAS_PW=options, HAS_LW=options, HAS_U=options, GRAD=grad, IEEE=dt == "fp32",
                        UPCAST=False, BM=BM, BN=BN, BK=BK),
                   name=f"_linear_bce_kernel[{dt},y={y_dt},grad={grad}{'' if options else ',plain'}]",
                   options={"num_warps": NUM_WARPS}, divisible=("C", "K", "s_h", "s_w", "s_y", "s_u"))


AOT_SPECS = [_spec("bf16", "bf16", True), _spec("fp16", "fp32", True), _spec("fp32", "fp32", True),
             _spec("bf16", "fp32", False), _spec("fp16", "fp16", False), _spec("fp32", "fp32", False)]
AOT_SPECS += [_spec(dt, y_dt, grad, options=False)
              for dt, y_dt in (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "fp32")) for grad in (True, False)]
