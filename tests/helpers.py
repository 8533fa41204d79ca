"""Comparison helpers shared by the op-family tests."""
import torch

# Relative tolerance of one rounding of the result to the storage dtype, with room for
# fp32 math vs the float64 reference (DESIGN §6).
RTOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that an element a kernel never wrote fails the comparison."""
    return t.fill_(float("nan")) if t.is_floating_point() else t


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, rtol=None, atol=None, what=""):
    """actual (any dtype) against a float64 `expected`: NaN must match NaN exactly, infinities
    must match, finite values within rtol*|expected| + atol."""
    dtype = dtype or actual.dtype
    rtol = RTOL[dtype] if rtol is None else rtol
    atol = rtol if atol is None else atol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (
        f"{what}: NaN where none expected at {torch.nonzero(nan_a & ~nan_e)[:5].tolist()} "
        f"or missing NaN at {torch.nonzero(nan_e & ~nan_a)[:5].tolist()}")
    inf_e = torch.isinf(e)
    assert torch.equal(a[inf_e], e[inf_e]), f"{what}: infinities differ"
    fin = ~(nan_e | inf_e)
    if fin.any():
        err = (a[fin] - e[fin]).abs()
        bound = rtol * e[fin].abs() + atol
        worst = torch.argmax(err - bound)
        assert bool((err <= bound).all()), (
            f"{what}: max abs err {err.max().item():.3e}; worst element {a[fin][worst].item()!r} vs "
            f"{e[fin][worst].item()!r} (rtol {rtol}, atol {atol}, dtype {dtype})")
