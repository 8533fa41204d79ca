"""Comparison helpers and oracles shared by the op-family tests."""
import torch
import torch.nn.functional as F

# RTOL (one rounding to the storage dtype, with room for fp32 math), FLOAT_DTYPES, poison_ and
# the comparator assert_close live in the package (fusedtrain/_compare.py), so that
# `fusedtrain check` uses the very same ones.
from fusedtrain._compare import FLOAT_DTYPES, RTOL, assert_close, poison_, stable_seed  # noqa: F401

# unit roundoff of the arithmetic a kernel uses for a storage dtype (fp32 math; fp64 for fp64)
COMPUTE_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-24, torch.float64: 2.0**-53}
_MANTISSA = {torch.float32: 23, torch.float64: 52, torch.float16: 10, torch.bfloat16: 7}


def seed_for(*parts) -> int:
    """A seed from a stable hash of `parts` (not Python's salted hash()), set as torch's global
    seed and returned so that failure messages can print it."""
    seed = stable_seed(*parts)
    torch.manual_seed(seed)
    return seed


def ulp(v: torch.Tensor, dtype) -> torch.Tensor:
    """The spacing of `dtype`'s numbers at the float64 values v (subnormal spacing below the
    normal range)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(v.abs().clamp_min(fi.tiny))  # |v| = m * 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(v), (e - 1 - _MANTISSA[dtype]).to(torch.int32))


def assert_ulps(actual, truth, dtype=None, ulps=1.0, slack=0.0, what="", seed=None):
    """actual within `ulps` units in the last place of `dtype` (actual's dtype by default) of
    the float64 `truth`, plus an absolute per-element `slack` (the rounding error of the fp32
    math, bounded by the magnitude of its terms); NaN and infinities must match, where the truth
    rounds to an infinity in `dtype` so must actual."""
    dtype = dtype or actual.dtype
    a = actual.detach().double().cpu()
    t = truth.detach().double().cpu()
    tag = f"{what} (seed {seed})" if seed is not None else what
    assert a.shape == t.shape, f"{tag}: shape {tuple(a.shape)} != expected {tuple(t.shape)}"
    nan_a, nan_t = torch.isnan(a), torch.isnan(t)
    assert torch.equal(nan_a, nan_t), (
        f"{tag}: NaN where none expected at {torch.nonzero(nan_a & ~nan_t)[:5].tolist()} "
        f"or missing NaN at {torch.nonzero(nan_t & ~nan_a)[:5].tolist()}")
    rounded = t.to(dtype).double()
    inf_t = torch.isinf(rounded)
    assert torch.equal(a[inf_t], rounded[inf_t]), f"{tag}: infinities differ"
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


# ---- oracles: torch itself in float64 ------------------------------------------------------

def torch_bce_float64(x, y, weight=None, pos_weight=None, reduction="mean", grad_output=None):
    """(loss, d/dx, d/dy) of torch.nn.functional.binary_cross_entropy_with_logits and its
    autograd on float64 copies, the gradients for `grad_output` (default 1)."""
    xd = x.detach().double().cpu().requires_grad_()
    yd = y.detach().double().cpu().requires_grad_()
    w = None if weight is None else weight.detach().double().cpu()
    pw = None if pos_weight is None else pos_weight.detach().double().cpu()
    loss = F.binary_cross_entropy_with_logits(xd, yd, w, reduction=reduction, pos_weight=pw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.detach().double().cpu().expand(loss.shape)
    loss.backward(go)
    return loss.detach(), xd.grad, yd.grad


def bce_grad_slack(x, y, weight, pos_weight, reduction, grad_output, compute_eps, k=8.0):
    """Per-element bound on the rounding error of BCE's input and target gradients computed in
    arithmetic of unit roundoff `compute_eps`: k * eps * |grad_output| / N * (the sum of the
    magnitudes of the terms the formulas add), plus the same for the float64 oracle's own
    formulas (torch's lw sigmoid(x) - pw y cancels where ours does not). Math done in a narrower
    type fails it."""
    xd = x.detach().double().cpu()
    yd = torch.broadcast_to(y.detach().double().cpu(), xd.shape)
    w = 1.0 if weight is None else weight.detach().double().cpu().abs()
    pw = torch.ones(()) if pos_weight is None else pos_weight.detach().double().cpu()
    n = xd.numel() if reduction == "mean" else 1
    go = (torch.ones(()) if grad_output is None else grad_output.detach().double().cpu()).abs() / max(n, 1)
    e = torch.exp(-xd.abs())
    er = e / (1 + e)
    lw = (1 + (pw - 1) * yd).abs()
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
