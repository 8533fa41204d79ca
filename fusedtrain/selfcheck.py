"""`fusedtrain check`: every op family on every backend of this device against the reference.

Prints a table (op x backend: pass, FAIL with the error, or unavailable with the reason)
and returns non-zero on any failure. It is how a user with a GPU verifies an install.
"""
import argparse
import traceback

import torch

import fusedtrain
from fusedtrain import _backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _close(what, actual, expected, dtype):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}")
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        raise AssertionError(f"{what}: NaN pattern differs from the reference")
    fin = torch.isfinite(e)
    if not torch.equal(a[~fin & ~torch.isnan(e)], e[~fin & ~torch.isnan(e)]):
        raise AssertionError(f"{what}: infinities differ from the reference")
    err = (a[fin] - e[fin]).abs()
    bound = RTOL[dtype] * (e[fin].abs() + 1)
    if err.numel() and not bool((err <= bound).all()):
        raise AssertionError(f"{what}: max abs error {err.max().item():.3e} over tolerance ({dtype})")


def _in(backend, fn):
    with fusedtrain.use_backend(backend):
        return fn()


def check_bce(backend, device):
    F = fusedtrain.functional.binary_cross_entropy_with_logits
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for shape in [(1,), (1025,), (33, 64)]:
            x = (torch.randn(shape, generator=g) * 8).to(device, dtype)
            y = torch.rand(shape, generator=g).to(device, dtype)
            pw = (torch.rand(shape[-1:], generator=g) * 3).to(device)
            for reduction in ("none", "mean", "sum"):
                xa = x.clone().requires_grad_()
                out = _in(backend, lambda: F(xa, y, reduction=reduction, pos_weight=pw))
                out.sum().backward()
                xr = x.double().requires_grad_()
                ref = _in("reference", lambda: F(xr, y.double(), reduction=reduction, pos_weight=pw.double()))
                ref.sum().backward()
                _close(f"bce {reduction} {dtype} {shape}", out, ref, dtype)
                _close(f"bce grad {reduction} {dtype} {shape}", xa.grad, xr.grad, dtype)


def _adam_run(backend, device, dtype, amsgrad):
    g = torch.Generator().manual_seed(1)
    # the reference runs in float64 on the same (dtype-rounded) starting values
    store = torch.float64 if backend == "reference" else dtype
    params = [torch.randn(s, generator=g).to(dtype).to(device, store).requires_grad_()
              for s in [(7,), (130, 33), (1,)]]
    opt = _in(backend, lambda: fusedtrain.FusedAdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad))
    g.manual_seed(2)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype).to(device, p.dtype)
        _in(backend, opt.step)
    return params


def check_adam(backend, device):
    for dtype in DTYPES:
        for amsgrad in (False, True):
            ours = _adam_run(backend, device, dtype, amsgrad)
            ref = _adam_run("reference", device, dtype, amsgrad)
            for i, (a, e) in enumerate(zip(ours, ref)):
                _close(f"adamw param {i} {dtype} amsgrad={amsgrad}", a, e, dtype)


def check_unscale(backend, device):
    g = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        ts = [torch.randn(s, generator=g).to(device, dtype) for s in [(5,), (1000,), (64, 65)]]
        ref = [t.double() * 0.25 for t in ts]
        found = torch.zeros(1, device=device)
        norm = _in(backend, lambda: fusedtrain.unscale_and_check_(ts, torch.full((1,), 0.25, device=device),
                                                                  found, compute_norm=True))
        if found.item() != 0:
            raise AssertionError(f"unscale {dtype}: found_inf set on finite gradients")
        for i, (a, e) in enumerate(zip(ts, ref)):
            _close(f"unscale tensor {i} {dtype}", a, e, dtype)
        expect = torch.sqrt(sum((r.to(dtype).double() ** 2).sum() for r in ref))
        _close(f"unscale norm {dtype}", norm.reshape(()), expect, dtype)
        ts[1][7] = float("inf")
        _in(backend, lambda: fusedtrain.unscale_and_check_(ts, torch.ones(1, device=device), found))
        if found.item() != 1:
            raise AssertionError(f"unscale {dtype}: an inf did not set found_inf")


CHECKS = {"bce": check_bce, "adam": check_adam, "unscale": check_unscale}


def run(device: str):
    """[(op, backend, status, detail)] for every op family and backend on `device`."""
    dev = torch.device(device)
    rows = []
    for op, fn in CHECKS.items():
        for backend in _backend.NAMES:
            ok, why = _backend.availability(backend, dev)
            if not ok:
                rows.append((op, backend, "unavailable", why))
                continue
            try:
                fn(backend, dev)
                rows.append((op, backend, "pass", ""))
            except Exception as e:  # report every failure, keep checking the others
                last = traceback.extract_tb(e.__traceback__)[-1]
                rows.append((op, backend, "FAIL", f"{type(e).__name__}: {e} ({last.filename.split('/')[-1]}:{last.lineno})"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fusedtrain check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    print(f"fusedtrain {fusedtrain.__version__}, torch {torch.__version__}, device {a.device}")
    rows = run(a.device)
    w = max(len(r[0]) for r in rows)
    for op, backend, status, detail in rows:
        print(f"{op:<{w}}  {backend:<9}  {status:<11}  {detail}")
    failed = [r for r in rows if r[2] == "FAIL"]
    passed = sum(r[2] == "pass" for r in rows)
    print(f"{passed} passed, {len(failed)} failed, {len(rows) - passed - len(failed)} unavailable")
    return 1 if failed else 0
