"""`fusedtrain check`: every op family on every backend of this device against PyTorch itself
in float64 (never fusedtrain.reference, which is one of the backends checked), through the
public API only. Prints a table (pass, FAIL with the error, unavailable with the reason) and
returns non-zero on a failure: how a user with a GPU verifies an install.

The comparator, oracle and tolerances are the tests' (fusedtrain/_compare.py, docs/design.md §6).
"""
import argparse
import math
import traceback

import torch

import fusedtrain
from fusedtrain import _backend, _ext
from fusedtrain._compare import (COMPUTE_EPS, NORM_RTOL, assert_close, assert_ulps, bce_grad_slack,
                                 bce_loss_tolerance, stable_seed, torch_bce_float64)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _in(backend, fn):
    with fusedtrain.use_backend(backend):
        return fn()


def _expect_dtype(t, dtype, what):
    if t.dtype != dtype:
        raise AssertionError(f"{what}: dtype {t.dtype}, expected {dtype}")


# ---- bce ------------------------------------------------------------------------------------

def check_bce(backend, device):
    """The loss (tests/test_bce.py's bounds) and its input gradient (half an ulp plus the fp32
    math's error) for every reduction and dtype.

    Args:
        backend: the backend name to force.
        device: the torch.device of the inputs.
    """
    F = fusedtrain.functional.binary_cross_entropy_with_logits
    for dtype in DTYPES:
        for shape in [(1,), (1025,), (33, 64)]:
            seed = stable_seed("bce", dtype, shape)
            g = torch.Generator().manual_seed(seed)
            x = (torch.randn(shape, generator=g) * 8).to(dtype)
            y = torch.rand(shape, generator=g).to(dtype)
            w = (torch.rand(shape[-1:], generator=g) + 0.5).to(dtype)
            pw = torch.rand(shape[-1:], generator=g) * 3
            for reduction in ("none", "mean", "sum"):
                what = f"bce {reduction} {dtype} {tuple(shape)} (seed {seed})"
                xa = x.to(device).clone().requires_grad_()
                out = _in(backend, lambda: F(xa, y.to(device), weight=w.to(device), reduction=reduction,
                                             pos_weight=pw.to(device)))
                _in(backend, lambda: out.sum().backward())
                ref, ref_dx, _ = torch_bce_float64(x, y, w, pw, reduction)
                _expect_dtype(out, dtype, what)
                rtol, atol = bce_loss_tolerance(x, y, w, pw, reduction, out.dtype)
                assert_close(out, ref, rtol=rtol, atol=atol, what=what)
                if xa.grad is None:
                    raise AssertionError(f"{what}: no gradient reached the input")
                _expect_dtype(xa.grad, dtype, what + " d/dinput")
                slack, _ = bce_grad_slack(x, y, w, pw, reduction, None, COMPUTE_EPS[dtype])
                assert_ulps(xa.grad, ref_dx, ulps=0.5, slack=slack, what=what + " d/dinput")


# ---- adam -----------------------------------------------------------------------------------

ADAM_SHAPES = [(7,), (130, 33), (1,)]
ADAM_STEPS = 3
ADAM_LR = 0.05  # an update of ~6 bf16 ulps of a unit param: a step that does nothing fails
OPTIMIZERS = (("FusedAdamW", torch.optim.AdamW, 0.1), ("FusedAdam", torch.optim.Adam, 0.01))


def _torch_step(torch_cls, p64, g64, state64, wd, amsgrad):
    """torch's own step in float64 from the given (float64) state; returns (param, state)."""
    q = p64.clone().requires_grad_()
    opt = torch_cls([q], lr=ADAM_LR, weight_decay=wd, amsgrad=amsgrad, foreach=False)
    if state64:
        opt.state[q] = {k: v.clone() for k, v in state64.items()}
    q.grad = g64
    opt.step()
    return q.detach(), opt.state[q]


def check_adam(backend, device):
    """FusedAdam/FusedAdamW steps, each against one torch.optim step in float64 from the very
    state ours started from (tests/test_adam.py's teacher forcing), params and states to
    RTOL of their dtype.

    Args:
        backend: the backend name to force.
        device: the torch.device of the params.
    """
    for dtype in DTYPES:
        for amsgrad in (False, True):
            for name, torch_cls, wd in OPTIMIZERS:
                seed = stable_seed("adam", name, dtype, amsgrad)
                g = torch.Generator().manual_seed(seed)
                params = [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in ADAM_SHAPES]
                opt = _in(backend, lambda: getattr(fusedtrain, name)(params, lr=ADAM_LR, weight_decay=wd,
                                                                      amsgrad=amsgrad))
                for k in range(ADAM_STEPS):
                    for p in params:
                        p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
                    # the state this step starts from, in float64: the truth is one torch step from it
                    before = [(p.detach().double().cpu(), p.grad.double().cpu(),
                               {key: (v.double().cpu() if key != "step" else torch.tensor(float(v)))
                                for key, v in opt.state[p].items()}) for p in params]
                    _in(backend, opt.step)
                    for i, (p, (p64, g64, st64)) in enumerate(zip(params, before)):
                        what = f"{name} amsgrad={amsgrad} {dtype} step {k + 1} param {i} (seed {seed})"
                        e, est = _torch_step(torch_cls, p64, g64, st64, wd, amsgrad)
                        st = opt.state[p]
                        if float(st["step"]) != float(est["step"]):
                            raise AssertionError(f"{what}: step {float(st['step'])}, torch {float(est['step'])}")
                        _expect_dtype(p, dtype, what)
                        assert_close(p, e, dtype, what=what)
                        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
                            assert_close(st[key], est[key], st[key].dtype, what=f"{what} {key}")


# ---- unscale --------------------------------------------------------------------------------

def _same_bits(a, b):
    """Bit-identical (NaN equal to the same NaN)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.view(ints[a.element_size()]), b.view(ints[b.element_size()])))


def check_unscale(backend, device):
    """unscale_and_check_ bit for bit against torch's own unscale op, the values to RTOL of
    their dtype, the norm to NORM_RTOL (tests/test_unscale.py's bounds), and a read-only pass
    that meets an inf or a NaN.

    Args:
        backend: the backend name to force.
        device: the torch.device of the gradients.
    """
    for dtype in DTYPES:
        for inv in (1 / 1024.0, 1 / 3000.0):  # AMP's powers of two, and one that really rounds
            seed = stable_seed("unscale", dtype, inv)
            g = torch.Generator().manual_seed(seed)
            what = f"unscale {dtype} inv_scale={inv:.6g} (seed {seed})"
            xs = [(torch.randn(s, generator=g) * 100).to(device, dtype) for s in [(5,), (1000,), (64, 65)]]
            ours, theirs = [x.clone() for x in xs], [x.clone() for x in xs]
            inv_scale = torch.full((1,), inv, device=device)
            inv = float(inv_scale)  # the fp32 value the unscale multiplies by
            found, found_torch = torch.zeros(1, device=device), torch.zeros(1, device=device)
            norm = _in(backend, lambda: fusedtrain.unscale_and_check_(ours, inv_scale, found, compute_norm=True))
            torch._amp_foreach_non_finite_check_and_unscale_(theirs, found_torch, inv_scale)
            if found.item() != 0 or found_torch.item() != 0:
                raise AssertionError(f"{what}: found_inf {found.item()} (torch {found_torch.item()}) on finite grads")
            for i, (a, b, x) in enumerate(zip(ours, theirs, xs)):
                if not torch.equal(a, b):
                    bad = int((a != b).sum())
                    raise AssertionError(f"{what}: tensor {i} differs from torch's unscale in {bad} of "
                                         f"{a.numel()} elements")
                assert_close(a, x.double() * inv, dtype=dtype, what=f"{what} tensor {i}")
            truth = math.sqrt(sum(float((x.double() * inv).square().sum()) for x in xs))
            if not (torch.is_tensor(norm) and norm.dtype == torch.float32 and norm.numel() == 1):
                raise AssertionError(f"{what}: the norm is {norm!r}, expected a one-element float32 tensor")
            assert_close(norm.reshape(()), torch.tensor(truth, dtype=torch.float64), rtol=NORM_RTOL, atol=0,
                         what=f"{what} norm")
            # a read-only pass that meets an inf (then a NaN): found_inf set, tensors untouched
            for bad in (float("inf"), float("nan")):
                i = int(torch.randint(len(xs), (1,), generator=g))
                j = int(torch.randint(xs[i].numel(), (1,), generator=g))
                ours = [x.clone() for x in xs]
                ours[i].view(-1)[j] = bad
                kept = [x.clone() for x in ours]
                found = torch.zeros(1, device=device)
                norm = _in(backend, lambda: fusedtrain.unscale_and_check_(ours, inv_scale, found,
                                                                          compute_norm=True, write=False))
                if found.item() != 1:
                    raise AssertionError(f"{what}: a {bad} at tensor {i} index {j} did not set found_inf")
                if math.isfinite(norm.item()):
                    raise AssertionError(f"{what}: the norm is finite with a {bad} in the grads")
                if not all(_same_bits(a, b) for a, b in zip(ours, kept)):
                    raise AssertionError(f"{what}: write=False changed the tensors")


CHECKS = {"bce": check_bce, "adam": check_adam, "unscale": check_unscale}


def run(device: str, ops=None, backends=None):
    """[(op, backend, status, detail)] for every op family and backend on `device`.

    Args:
        device: the device to check ("cpu", "cuda", ...).
        ops: the op families to check (CHECKS' keys); all when None.
        backends: the backends to check; all when None.
    """
    dev = torch.device(device)
    rows = []
    for op, fn in CHECKS.items():
        if ops is not None and op not in ops:
            continue
        for backend in _backend.NAMES:
            if backends is not None and backend not in backends:
                continue
            ok, why = _backend.availability(backend, dev)
            if not ok:
                rows.append((op, backend, "unavailable", why))
                continue
            try:
                fn(backend, dev)
                rows.append((op, backend, "pass", ""))
            except Exception as e:  # report every failure, keep checking the others
                last = traceback.extract_tb(e.__traceback__)[-1]
                where = f"{last.filename.split('/')[-1]}:{last.lineno}"
                rows.append((op, backend, "FAIL", f"{type(e).__name__}: {e} ({where})"))
    return rows


def main(argv=None) -> int:
    """`fusedtrain check`: prints the table and returns 1 on any failure, else 0.

    Args:
        argv: the command-line arguments (sys.argv[1:] when None); --help lists them.
    """
    p = argparse.ArgumentParser(prog="fusedtrain check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--op", action="append", choices=sorted(CHECKS), help="check only this op family (repeatable)")
    p.add_argument("--backend", action="append", choices=_backend.NAMES, help="check only this backend (repeatable)")
    a = p.parse_args(argv)
    print(f"fusedtrain {fusedtrain.__version__}, torch {torch.__version__}, device {a.device}")
    print(f"native extension: {_ext.describe()}")
    rows = run(a.device, a.op, a.backend)
    w = max(len(r[0]) for r in rows)
    for op, backend, status, detail in rows:
        print(f"{op:<{w}}  {backend:<9}  {status:<11}  {detail}")
    failed = [r for r in rows if r[2] == "FAIL"]
    passed = sum(r[2] == "pass" for r in rows)
    print(f"{passed} passed, {len(failed)} failed, {len(rows) - passed - len(failed)} unavailable")
    return 1 if failed else 0
