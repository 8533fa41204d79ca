"""`fusedtrain check`: every op family on every backend of this device against PyTorch itself.

Prints a table (op x backend: pass, FAIL with the error, or unavailable with the reason)
and returns non-zero on any failure. It is how a user with a GPU verifies an install.

The truth is torch, never fusedtrain.reference (which is itself one of the backends checked):
torch.nn.functional.binary_cross_entropy_with_logits and its autograd on float64 copies,
torch.optim.Adam/AdamW in float64 started from the very state the checked step started from,
and torch._amp_foreach_non_finite_check_and_unscale_ (bit for bit; the norm in float64).
Only the public API is called (fusedtrain.functional, FusedAdam/FusedAdamW,
fusedtrain.unscale_and_check_), so the check does not depend on how an op is built.
Tolerances are in ulps of the storage dtype (half an ulp: the one rounding of the result)
plus a few fp32 ulps of the terms that cancel (the fp32 math): an optimizer that does nothing,
a gradient off by a factor or a norm off by 1e-4 fails. Seeds are stable hashes, printed with
a failure.
"""
import argparse
import math
import traceback

import torch

import fusedtrain
from fusedtrain import _backend
from fusedtrain._compare import assert_close, stable_seed, ulp_at_one

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MATH = 8 * ulp_at_one(torch.float32)  # fp32 math, relative to the terms it adds up
REDUCE = 32 * ulp_at_one(torch.float32)  # fp32 accumulation of a sum, relative to the sum of |terms|
NORM = 16 * ulp_at_one(torch.float32)  # the fp32 L2 norm, relative


def _store(dtype):
    """Relative bound of the one rounding to `dtype` (round to nearest: half an ulp); the fp32
    math before it is covered by MATH * scale."""
    return 0.5 * ulp_at_one(dtype)


def _tiny(dtype):
    """Absolute slack near zero: below the smallest normal of `dtype` the rounding error is up
    to half the subnormal spacing, tiny * eps."""
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps


def _in(backend, fn):
    with fusedtrain.use_backend(backend):
        return fn()


def _close(actual, expected, dtype, scale, what):
    """actual (storage dtype) vs float64 truth: one rounding to dtype plus fp32 math on `scale`."""
    if actual.dtype != dtype:
        raise AssertionError(f"{what}: dtype {actual.dtype}, expected {dtype}")
    assert_close(actual, expected, dtype=dtype, rtol=_store(dtype), atol=MATH * scale + _tiny(dtype), what=what)


# ---- bce ------------------------------------------------------------------------------------

def check_bce(backend, device):
    F = fusedtrain.functional.binary_cross_entropy_with_logits
    TF = torch.nn.functional.binary_cross_entropy_with_logits
    for dtype in DTYPES:
        for shape in [(1,), (1025,), (33, 64)]:
            seed = stable_seed("bce", dtype, shape)
            g = torch.Generator().manual_seed(seed)
            x = (torch.randn(shape, generator=g) * 8).to(dtype)
            y = torch.rand(shape, generator=g).to(dtype)
            w = (torch.rand(shape[-1:], generator=g) + 0.5).to(dtype)
            pw = torch.rand(shape[-1:], generator=g) * 3
            x64, y64, w64, pw64 = x.double(), y.double(), w.double(), pw.double()
            n = x.numel()
            # per-element size of the terms the loss and its gradient add up (what fp32 math
            # is accurate relative to): lw = 1 + (pw - 1) y weighs softplus(-x) <= |x| + log 2
            lw = 1 + (pw64 - 1) * y64
            loss_terms = w64 * ((1 - y64) * x64.abs() + lw * (x64.abs() + math.log(2)))
            grad_terms = w64 * (lw * torch.sigmoid(x64) + pw64 * y64)
            for reduction in ("none", "mean", "sum"):
                what = f"bce {reduction} {dtype} {tuple(shape)} (seed {seed})"
                xa = x.to(device).clone().requires_grad_()
                out = _in(backend, lambda: F(xa, y.to(device), weight=w.to(device), reduction=reduction,
                                             pos_weight=pw.to(device)))
                _in(backend, lambda: out.sum().backward())
                xr = x64.clone().requires_grad_()
                ref = TF(xr, y64, weight=w64, reduction=reduction, pos_weight=pw64)
                ref.sum().backward()
                div = n if reduction == "mean" else 1
                if reduction == "none":
                    _close(out, ref, dtype, loss_terms, what)
                else:
                    assert_close(out, ref, dtype=dtype, rtol=_store(dtype),
                                 atol=REDUCE * float(loss_terms.sum()) / div + _tiny(dtype), what=what)
                if xa.grad is None:
                    raise AssertionError(f"{what}: no gradient reached the input")
                _close(xa.grad, xr.grad, dtype, grad_terms / div, what + " d/dinput")


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
                        # the size of the terms each result adds up, from torch's values:
                        # |grad| (with the L2 term), the moments, the update lr/bc1 * m / denom
                        b1, b2 = 0.9, 0.999
                        gl = g64.abs() + (wd * p64.abs() if torch_cls is torch.optim.Adam else 0)
                        m_scale = b1 * st64.get("exp_avg", torch.zeros_like(p64)).abs() + (1 - b1) * gl
                        v_scale = b2 * st64.get("exp_avg_sq", torch.zeros_like(p64)) + 2 * (1 - b2) * gl * gl
                        t = float(est["step"])
                        v = est["max_exp_avg_sq"] if amsgrad else est["exp_avg_sq"]
                        denom = (v / (1 - b2 ** t)).sqrt() + 1e-8
                        m_v = m_scale + est["exp_avg"].abs() * v_scale / (2 * v).clamp_min(1e-300)
                        upd_scale = ADAM_LR / (1 - b1 ** t) * m_v / denom
                        _close(p, e, dtype, p64.abs() + upd_scale, what)
                        _close(st["exp_avg"], est["exp_avg"], st["exp_avg"].dtype, m_scale, what + " exp_avg")
                        _close(st["exp_avg_sq"], est["exp_avg_sq"], st["exp_avg_sq"].dtype, v_scale,
                               what + " exp_avg_sq")
                        if amsgrad:
                            _close(st["max_exp_avg_sq"], est["max_exp_avg_sq"], st["max_exp_avg_sq"].dtype,
                                   v_scale + est["max_exp_avg_sq"], what + " max_exp_avg_sq")


# ---- unscale --------------------------------------------------------------------------------

def _same_bits(a, b):
    """Bit-identical (NaN equal to the same NaN)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.view(ints[a.element_size()]), b.view(ints[b.element_size()])))


def check_unscale(backend, device):
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
                assert_close(a, x.double() * inv, dtype=dtype, rtol=_store(dtype), atol=_tiny(dtype),
                             what=f"{what} tensor {i}")
            truth = math.sqrt(sum(float((x.double() * inv).square().sum()) for x in xs))
            if not (torch.is_tensor(norm) and norm.dtype == torch.float32 and norm.numel() == 1):
                raise AssertionError(f"{what}: the norm is {norm!r}, expected a one-element float32 tensor")
            assert_close(norm.reshape(()), torch.tensor(truth, dtype=torch.float64), rtol=NORM, atol=0,
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
    """[(op, backend, status, detail)] for every op family and backend on `device` (or only
    the given `ops` / `backends`)."""
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
    p = argparse.ArgumentParser(prog="fusedtrain check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--op", action="append", choices=sorted(CHECKS), help="check only this op family (repeatable)")
    p.add_argument("--backend", action="append", choices=_backend.NAMES, help="check only this backend (repeatable)")
    a = p.parse_args(argv)
    print(f"fusedtrain {fusedtrain.__version__}, torch {torch.__version__}, device {a.device}")
    rows = run(a.device, a.op, a.backend)
    w = max(len(r[0]) for r in rows)
    for op, backend, status, detail in rows:
        print(f"{op:<{w}}  {backend:<9}  {status:<11}  {detail}")
    failed = [r for r in rows if r[2] == "FAIL"]
    passed = sum(r[2] == "pass" for r in rows)
    print(f"{passed} passed, {len(failed)} failed, {len(rows) - passed - len(failed)} unavailable")
    return 1 if failed else 0
