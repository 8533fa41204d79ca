"""The comparator shared by the tests (tests/helpers.py) and `fusedtrain check` (selfcheck.py).

Truth is float64 (DESIGN §6); tolerances are relative, in ulps of the storage dtype, with an
optional per-element absolute part (a tensor) for results that cancel. It raises
AssertionError explicitly (not with `assert`), so `python -O` does not turn it off.
"""
import zlib

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Relative tolerance of one rounding of the result to the storage dtype, with room for
# fp32 math vs the float64 reference (DESIGN §6): about 17 ulps for fp32, 2 for fp16/bf16.
RTOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def ulp_at_one(dtype: torch.dtype) -> float:
    """The unit in the last place at 1.0 of `dtype` (torch.finfo(dtype).eps)."""
    return torch.finfo(dtype).eps


def stable_seed(*parts) -> int:
    """A seed from a stable hash of `parts` (zlib.crc32, the same in every process; Python's
    hash() of a string is salted per process). tests/helpers.py seed_for hashes the same way."""
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that an element a kernel never wrote fails the comparison."""
    return t.fill_(float("nan")) if t.is_floating_point() else t


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, rtol=None, atol=None, what=""):
    """actual (any dtype) against a float64 `expected`: NaN must match NaN exactly, infinities
    must match, finite values within rtol*|expected| + atol. rtol defaults to RTOL[dtype]
    (dtype: actual's), atol to rtol; atol may be a tensor of expected's shape (a per-element
    scale of the terms that cancel)."""
    dtype = dtype or actual.dtype
    rtol = RTOL[dtype] if rtol is None else rtol
    atol = rtol if atol is None else atol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(
            f"{what}: NaN where none expected at {torch.nonzero(nan_a & ~nan_e)[:5].tolist()} "
            f"or missing NaN at {torch.nonzero(nan_e & ~nan_a)[:5].tolist()}")
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


__all__ = ["FLOAT_DTYPES", "RTOL", "assert_close", "poison_", "stable_seed", "ulp_at_one"]
