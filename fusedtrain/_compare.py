"""The comparator, tolerances and float64 oracle shared by the tests (tests/helpers.py) and
`fusedtrain check` (selfcheck.py), so that both hold a backend to the same bounds.

Truth is float64 (docs/design.md §6). Every check raises AssertionError explicitly (not with
`assert`), so `python -O` does not turn it off.
"""
import zlib

import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Relative tolerance of one rounding of the result to the storage dtype, with room for
# fp32 math vs the float64 reference (docs/design.md §6): about 17 ulps for fp32, 2 for fp16/bf16.
RTOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Relative tolerance of an L2 norm: fp32 accumulation of fp32 products, whatever the storage dtype.
NORM_RTOL = 1e-5

# unit roundoff of the arithmetic a kernel uses for a storage dtype (fp32 math; fp64 for fp64)
COMPUTE_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-24, torch.float64: 2.0**-53}
_MANTISSA = {torch.float32: 23, torch.float64: 52, torch.float16: 10, torch.bfloat16: 7}


def ulp_at_one(dtype: torch.dtype) -> float:
    """The unit in the last place at 1.0 of `dtype` (torch.finfo(dtype).eps).

    Args:
        dtype: a floating dtype.
    """
    return torch.finfo(dtype).eps


def ulp(v: torch.Tensor, dtype) -> torch.Tensor:
    """The spacing of `dtype`'s numbers at the float64 values v (subnormal spacing below the
    normal range).

    Args:
        v: float64 values.
        dtype: the floating dtype whose spacing is wanted.
    """
    fi = torch.finfo(dtype)
    _, e = torch.frexp(v.abs().clamp_min(fi.tiny))  # |v| = m * 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(v), (e - 1 - _MANTISSA[dtype]).to(torch.int32))


def stable_seed(*parts) -> int:
    """A seed from a stable hash of `parts` (zlib.crc32, the same in every process; Python's
    hash() of a string is salted per process). tests/helpers.py seed_for hashes the same way.

    Args:
        parts: anything with a str(); joined with "|" before hashing.
    """
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that an element a kernel never wrote fails the comparison.

    Args:
        t: the tensor to fill in place (a non-floating tensor is returned as it is).
    """
    return t.fill_(float("nan")) if t.is_floating_point() else t


def _nan_mismatch(what, nan_a, nan_e):
    return AssertionError(
        f"{what}: NaN where none expected at {torch.nonzero(nan_a & ~nan_e)[:5].tolist()} "
        f"or missing NaN at {torch.nonzero(nan_e & ~nan_a)[:5].tolist()}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, rtol=None, atol=None, what=""):
    """actual (any dtype) against a float64 `expected`: NaN must match NaN exactly, infinities
    must match, finite values within rtol*|expected| + atol.

    Args:
        actual: the result under test.
        expected: the float64 truth, of actual's shape.
        dtype: the storage dtype whose RTOL is the default (actual's dtype when None).
        rtol: relative tolerance; RTOL[dtype] when None.
        atol: absolute tolerance, rtol when None; a tensor of expected's shape gives a
            per-element scale (of the terms that cancel).
        what: names the comparison in the error message.
    """
    dtype = dtype or actual.dtype
    rtol = RTOL[dtype] if rtol is None else rtol
    atol = rtol if atol is None else atol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        raise _nan_mismatch(what, nan_a, nan_e)
    inf_e = torch.isinf(e)
    if not torch.equal(a[inf_e], e[inf_e]):
        raise AssertionError(f"{what}: infinities differ")
    fin = ~(nan_e | inf_e)
    if fin.any():
        if torch.is_tensor(atol):
            atol = atol.detach().double().cpu().expand(e.shape)[fin]
        err = (a[fin] - e[fin]).abs()
        bound = rtol * e[fin].abs() + atol
        if not bool((err <= bound).all()):
            over = err - bound
            worst = int(torch.argmax(over))
            idx = torch.nonzero(fin)[worst].tolist()
            raise AssertionError(
                f"{what}: {int((over > 0).sum())} of {err.numel()} elements out of tolerance; max abs err "
                f"{err.max().item():.3e}; worst at {idx}: {a[fin][worst].item()!r} vs {e[fin][worst].item()!r} "
                f"(rtol {rtol:.3g}, dtype {dtype})")


def assert_ulps(actual, truth, dtype=None, ulps=1.0, slack=0.0, what="", seed=None):
    """actual within `ulps` units in the last place of `dtype` of the float64 `truth`, plus an
    absolute per-element `slack`; NaN and infinities must match, and where the truth rounds to
    an infinity in `dtype` so must actual.

    Args:
        actual: the result under test.
        truth: the float64 truth, of actual's shape.
        dtype: the dtype whose ulps count (actual's dtype when None).
        ulps: how many units in the last place (0.5: one correct rounding).
        slack: absolute per-element allowance (a number or a tensor broadcastable to truth):
            the rounding error of the fp32 math, bounded by the magnitude of its terms.
        what: names the comparison in the error message.
        seed: printed with the message when given.
    """
    dtype = dtype or actual.dtype
    a = actual.detach().double().cpu()
    t = truth.detach().double().cpu()
    tag = f"{what} (seed {seed})" if seed is not None else what
    if a.shape != t.shape:
        raise AssertionError(f"{tag}: shape {tuple(a.shape)} != expected {tuple(t.shape)}")
    nan_a, nan_t = torch.isnan(a), torch.isnan(t)
    if not torch.equal(nan_a, nan_t):
        raise _nan_mismatch(tag, nan_a, nan_t)
    rounded = t.to(dtype).double()
    inf_t = torch.isinf(rounded)
    if not torch.equal(a[inf_t], rounded[inf_t]):
        raise AssertionError(f"{tag}: infinities differ")
    fin = ~(nan_t | inf_t)
    if not fin.any():
        return
    slack = torch.as_tensor(slack, dtype=torch.float64).cpu().expand(t.shape)[fin]
    err = (a[fin] - t[fin]).abs()
    bound = ulps * ulp(t[fin], dtype) + slack
    bad = err > bound
    if bad.any():
        i = torch.argmax(err / bound)
        raise AssertionError(
            f"{tag}: {int(bad.sum())} of {int(fin.sum())} elements beyond {ulps} ulp of {dtype} "
            f"(+ slack); worst {a[fin][i].item()!r} vs truth {t[fin][i].item()!r}: "
            f"{(err[i] / ulp(t[fin][i:i + 1], dtype)[0]).item():.3g} ulp, slack {slack[i].item():.3g}")


# ---- BCE: torch itself in float64, and the bounds of our fp32 math ----------------------------

def torch_bce_float64(x, y, weight=None, pos_weight=None, reduction="mean", grad_output=None):
    """(loss, d/dx, d/dy) of torch.nn.functional.binary_cross_entropy_with_logits and its
    autograd on float64 copies.

    Args:
        x, y: logits and targets (any dtype and device; copied to float64 on the CPU).
        weight, pos_weight: optional, as torch's.
        reduction: "none", "mean" or "sum".
        grad_output: the gradient of the loss to backpropagate (1 when None).
    """
    xd = x.detach().double().cpu().requires_grad_()
    yd = y.detach().double().cpu().requires_grad_()
    w = None if weight is None else weight.detach().double().cpu()
    pw = None if pos_weight is None else pos_weight.detach().double().cpu()
    loss = F.binary_cross_entropy_with_logits(xd, yd, w, reduction=reduction, pos_weight=pw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.detach().double().cpu().expand(loss.shape)
    loss.backward(go)
    return loss.detach(), xd.grad, yd.grad


def bce_loss_tolerance(x, y, weight, pos_weight, reduction, loss_dtype):
    """(rtol, atol) of a BCE loss against torch's float64 value: one rounding to the loss
    dtype after fp32 (fp64) math; for "mean"/"sum" also the fp32 sum, relative to the sum of
    the magnitudes of the terms.

    Args:
        x, y, weight, pos_weight: the loss's inputs.
        reduction: "none", "mean" or "sum".
        loss_dtype: the dtype of the loss under test.
    """
    n = max(x.numel(), 1)
    wmax = 1.0 if weight is None else max(float(weight.abs().max()) if weight.numel() else 1.0, 1e-3)
    pwmax = 1.0 if pos_weight is None else max(float(pos_weight.abs().max()) if pos_weight.numel() else 1.0, 1.0)
    # math in fp32 (fp64 for fp64 input), rounded once to the storage dtype
    comp = RTOL[torch.float64 if x.dtype == torch.float64 else torch.float32]
    rt = max(RTOL[loss_dtype], comp)
    if reduction == "none":
        return rt, rt * wmax * pwmax
    terms = torch_bce_float64(x, y, weight, pos_weight, "none")[0].abs().sum()
    div = n if reduction == "mean" else 1
    rt = max(rt, 1e-5)
    return rt, rt * (float(terms) / div + wmax * pwmax / div)


def bce_grad_slack(x, y, weight, pos_weight, reduction, grad_output, compute_eps, k=8.0):
    """Per-element bounds (input's, target's) on the rounding error of BCE's gradients computed
    in arithmetic of unit roundoff `compute_eps`: k * eps * |grad_output| / N * (the sum of the
    magnitudes of the terms the formulas add), plus the same for the float64 oracle's own
    formulas (torch's lw sigmoid(x) - pw y cancels where ours does not). Math done in a narrower
    type fails it.

    Args:
        x, y, weight, pos_weight: the loss's inputs.
        reduction: "none", "mean" or "sum".
        grad_output: the gradient backpropagated (1 when None).
        compute_eps: unit roundoff of the kernel's arithmetic (COMPUTE_EPS[x.dtype]).
        k: how many roundings of each term to allow.
    """
    xd = x.detach().double().cpu()
    yd = torch.broadcast_to(y.detach().double().cpu(), xd.shape)
    w = 1.0 if weight is None else weight.detach().double().cpu().abs()
    pw = torch.ones(()) if pos_weight is None else pos_weight.detach().double().cpu()
    n = xd.numel() if reduction == "mean" else 1
    go = (torch.ones(()) if grad_output is None else grad_output.detach().double().cpu()).abs() / max(n, 1)
    e = torch.exp(-xd.abs())
    er = e / (1 + e)
    # lw = 1 + (pw - 1) y cancels where pw is small and y near 1: its error is bounded by its
    # terms, not by its value
    lw = 1 + (pw - 1).abs() * yd.abs()
    pos = xd >= 0
    # the terms of the branch the formulas take (bce_math.h): (1 - y) - lw e r or lw e r - pw y,
    # and (pw - 1) log1p(e) - (x or pw x)
    dx_terms = lw * er + torch.where(pos, (1 - yd).abs(), (pw * yd).abs())
    dy_terms = (pw - 1).abs() * torch.log1p(e) + xd.abs() * torch.where(pos, torch.ones(()), pw.abs())
    oracle_dx = lw + (pw * yd).abs()
    oracle_dy = (pw.abs() + 1) * (torch.log1p(e) + xd.abs())
    scale = k * w * go
    eps64 = 2.0**-53
    return (torch.broadcast_to(scale * (compute_eps * dx_terms + eps64 * oracle_dx), xd.shape),
            torch.broadcast_to(scale * (compute_eps * dy_terms + eps64 * oracle_dy), xd.shape))


__all__ = ["COMPUTE_EPS", "FLOAT_DTYPES", "NORM_RTOL", "RTOL", "assert_close", "assert_ulps", "bce_grad_slack",
           "bce_loss_tolerance", "poison_", "stable_seed", "torch_bce_float64", "ulp", "ulp_at_one"]
