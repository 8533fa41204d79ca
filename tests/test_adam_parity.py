"""FusedAdam / FusedAdamW held to torch.optim.Adam / AdamW (issue #11).

* The constructor rejects exactly what torch's rejects, with the same exception type and
  message.
* The numerics against torch itself run in float64 on copies of the same params
  (fusedtrain.reference is not the oracle), on every backend (the backend_device fixture):
  params of one group at different step counts (grads of None, a loaded state_dict with a
  different `step` per param), steps through the one-read clipped step of gradients scaled
  by 2^10, torch.amp.GradScaler's unscale_ + step (inf steps skipped bit-identically), and
  the CPU op called through the dispatcher.

Teacher forcing: before every step the float64 torch optimizer receives our params and
moments (never our step counts: those it counts itself, and they are compared exactly), so
every step is held to one rounding of the storage dtype. The per-element bound
(`_check`) is relative: RTOL[storage dtype] * |true value| plus a few fp32 ulps of the
magnitudes the update combines (|before| + |after| + |after - before|) for the
cancellation fp32 arithmetic cannot avoid. Seeds come from zlib.crc32 of the test id and
appear in every failure message.
"""
import copy
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedtrain
from fusedtrain import FusedAdam, FusedAdamW, _ext
from helpers import RTOL

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

MATH = 2.0 ** -20  # fp32 arithmetic: 16 fp32 ulps of the magnitudes one update combines
TORCH = {FusedAdam: torch.optim.Adam, FusedAdamW: torch.optim.AdamW}
DTYPES = [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
DTYPE_IDS = ["fp32", "bf16", "bf16-master"]
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _seed(request):
    return zlib.crc32(request.node.nodeid.encode())


# ---------------------------------------------------------------------------------------
# 1. constructor errors: torch's type and message
# ---------------------------------------------------------------------------------------

def _p():
    return torch.randn(3, requires_grad=True)


def _shared_param_in_two_groups():
    p = _p()
    return [{"params": [p]}, {"params": [p]}]


T = torch.tensor
NAN = float("nan")
# name -> () -> (params, kwargs)
CTOR_CASES = {
    "lr-negative": lambda: ([_p()], dict(lr=-1e-3)),
    "lr-negative-int": lambda: ([_p()], dict(lr=-1)),
    "lr-nan": lambda: ([_p()], dict(lr=NAN)),
    "lr-str": lambda: ([_p()], dict(lr="0.1")),
    "lr-None": lambda: ([_p()], dict(lr=None)),
    "lr-tensor-2-elements": lambda: ([_p()], dict(lr=T([1e-3, 1e-3]))),
    "lr-tensor-negative": lambda: ([_p()], dict(lr=T(-1.0))),
    "lr-tensor-foreach": lambda: ([_p()], dict(lr=T(1e-3), foreach=True)),
    "lr-tensor-2-elements-foreach": lambda: ([_p()], dict(lr=T([1e-3, 1e-3]), foreach=True)),
    "lr-tensor-foreach-capturable": lambda: ([_p()], dict(lr=T(1e-3), foreach=True, capturable=True)),
    "lr-tensor-1x1": lambda: ([_p()], dict(lr=T([[1e-3]]))),
    "eps-negative": lambda: ([_p()], dict(eps=-1e-8)),
    "eps-None": lambda: ([_p()], dict(eps=None)),
    "eps-nan": lambda: ([_p()], dict(eps=NAN)),
    "beta0-one": lambda: ([_p()], dict(betas=(1.0, 0.999))),
    "beta0-negative": lambda: ([_p()], dict(betas=(-0.1, 0.999))),
    "beta1-one": lambda: ([_p()], dict(betas=(0.9, 1.0))),
    "beta1-negative": lambda: ([_p()], dict(betas=(0.9, -1e-3))),
    "beta1-nan": lambda: ([_p()], dict(betas=(0.9, NAN))),
    "beta0-tensor-out-of-range": lambda: ([_p()], dict(betas=(T(1.5), T(0.9)))),
    "betas-float-tensor": lambda: ([_p()], dict(betas=(0.9, T(0.999)))),
    "betas-tensor-float": lambda: ([_p()], dict(betas=(T(0.9), 0.999))),
    "betas-int": lambda: ([_p()], dict(betas=(0, 0.999))),
    "betas-one-value": lambda: ([_p()], dict(betas=(0.9,))),
    "betas-None": lambda: ([_p()], dict(betas=None)),
    "betas-tensors-foreach": lambda: ([_p()], dict(betas=(T(0.9), T(0.999)), foreach=True)),
    "betas-tensors-foreach-capturable": lambda: ([_p()], dict(betas=(T(0.9), T(0.999)), foreach=True,
                                                              capturable=True)),
    "beta1-tensor-2-elements": lambda: ([_p()], dict(betas=(T(0.9), T([0.99, 0.999])))),
    "betas-tensors-1-d": lambda: ([_p()], dict(betas=(T([0.9]), T([[0.999]])))),
    "betas-list": lambda: ([_p()], dict(betas=[0.8, 0.99])),
    "betas-three": lambda: ([_p()], dict(betas=(0.8, 0.99, 5.0))),
    "weight-decay-negative": lambda: ([_p()], dict(weight_decay=-0.1)),
    "weight-decay-negative-int": lambda: ([_p()], dict(weight_decay=-1)),
    "weight-decay-None": lambda: ([_p()], dict(weight_decay=None)),
    "fused-and-foreach": lambda: ([_p()], dict(fused=True, foreach=True)),
    "fused-and-differentiable": lambda: ([_p()], dict(fused=True, differentiable=True)),
    "order-lr-first": lambda: ([_p()], dict(lr=-1.0, eps=-1.0, betas=(2.0, 0.9), weight_decay=-1.0)),
    "order-eps-before-betas": lambda: ([_p()], dict(eps=-1.0, betas=(2.0, 2.0), weight_decay=-1.0)),
    "order-beta0-before-beta1": lambda: ([_p()], dict(betas=(2.0, 2.0), weight_decay=-1.0)),
    "order-ranges-before-types": lambda: ([_p()], dict(betas=(0.9, T(2.0)))),
    "order-lr-before-differentiable": lambda: ([_p()], dict(lr=-1.0, differentiable=True)),
    "order-params-before-fused": lambda: ([], dict(fused=True, foreach=True)),
    "params-empty": lambda: ([], {}),
    "params-a-tensor": lambda: (_p(), {}),
    "params-non-leaf": lambda: ([_p() * 2], {}),
    "params-a-float": lambda: ([1.0], {}),
    "params-in-two-groups": lambda: (_shared_param_in_two_groups(), {}),
    "group-without-params": lambda: ([{"lr": 0.1}], {}),
    "group-with-negative-lr": lambda: ([{"params": [_p()], "lr": -1.0}], {}),
    "accepted-defaults": lambda: ([_p()], {}),
    "accepted-fused": lambda: ([_p()], dict(fused=True)),
    "accepted-foreach": lambda: ([_p()], dict(foreach=True)),
}


def _outcome(cls, params, kwargs):
    try:
        return cls(params, **kwargs), None
    except Exception as e:  # noqa: BLE001 -- the very thing compared
        return None, e


def _same_value(a, b):
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("case", list(CTOR_CASES))
def test_constructor_errors_are_torchs(cls, case):
    params, kwargs = CTOR_CASES[case]()
    theirs, terr = _outcome(TORCH[cls], params, kwargs)
    params, kwargs = CTOR_CASES[case]()
    ours, err = _outcome(cls, params, kwargs)
    if terr is not None:
        assert err is not None, f"{case}: torch raises {type(terr).__name__}({terr}), {cls.__name__} accepts"
        assert (type(err), str(err)) == (type(terr), str(terr)), (
            f"{case}: {cls.__name__} raises {type(err).__name__}({err!s}), torch {type(terr).__name__}({terr!s})")
        return
    assert err is None, f"{case}: torch accepts, {cls.__name__} raises {type(err).__name__}({err})"
    assert len(ours.param_groups) == len(theirs.param_groups)
    for g, tg in zip(ours.param_groups, theirs.param_groups):
        for k, v in tg.items():
            if k != "params":
                assert _same_value(g[k], v), f"{case}: param group {k!r}: ours {g[k]!r}, torch {v!r}"


def test_differentiable_is_our_own_restriction():
    """torch accepts differentiable=True; a fused kernel outside autograd cannot honor it."""
    torch.optim.AdamW([_p()], differentiable=True)
    with pytest.raises(ValueError, match="differentiable=True"):
        FusedAdamW([_p()], differentiable=True)


# ---------------------------------------------------------------------------------------
# the float64 twin and the comparison
# ---------------------------------------------------------------------------------------

def _check(ours, before, after, dtype, what):
    """One value of ours (stored in `dtype`) against the float64 truth `after`, which torch
    computed from `before` (the very values ours started from)."""
    a = ours.detach().double().cpu().reshape(-1)
    e = after.detach().double().cpu().reshape(-1)
    b = before.detach().double().cpu().reshape(-1)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    assert not torch.isnan(e).any(), f"{what}: the float64 truth has NaN (a broken test)"
    fi = torch.finfo(dtype)
    err = (a - e).abs()
    bound = RTOL[dtype] * e.abs() + MATH * (b.abs() + e.abs() + (e - b).abs()) + fi.smallest_normal * fi.eps
    ok = err <= bound  # NaN in ours fails here
    if not bool(ok.all()):
        i = int(torch.argmax(torch.where(ok, torch.zeros_like(err), torch.nan_to_num(err / bound, nan=1e300))))
        ulp = fi.eps * 2.0 ** torch.floor(torch.log2(e[i].abs().clamp_min(fi.smallest_normal))).item()
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {a.numel()} elements off; element {i}: ours {a[i].item()!r}, "
            f"float64 torch {e[i].item()!r} (from {b[i].item()!r}), error {err[i].item():.3e} = "
            f"{(err[i] / ulp).item():.1f} ulp of {dtype} > bound {bound[i].item():.3e}")


class Twin:
    """Our optimizer over `ours` and torch's (same class, same hyperparameters) over float64
    copies, stepped in lockstep with teacher forcing (see the module docstring)."""

    def __init__(self, opt, topt, ours, ref, dtype, master, tag):
        self.opt, self.topt, self.ours, self.ref = opt, topt, ours, ref
        self.dtype, self.master, self.tag = dtype, master, tag

    @classmethod
    def build(cls, opt_cls, init, device, dtype, master, tag, **kw):
        """init: float64 values; both sides start from their rounding to `dtype`."""
        ours = [x.to(dtype).to(device).requires_grad_() for x in init]
        ref = [x.to(dtype).double().requires_grad_() for x in init]
        opt = opt_cls(ours, master_weights=master, **kw)
        topt = TORCH[opt_cls](ref, foreach=False, **kw)
        return cls(opt, topt, ours, ref, dtype, master, tag)

    def _param(self, o):
        st = self.opt.state.get(o, {})
        return st["master_param"] if self.master and "master_param" in st else o

    def set_grads(self, grads, ours_mult=1.0, ref_mult=1.0):
        """grads: float64 or None per param; ours get their rounding to the param dtype
        times ours_mult (a power of two: exact), torch's side that rounding times ref_mult."""
        for o, r, g in zip(self.ours, self.ref, grads):
            if g is None:
                o.grad = r.grad = None
            else:
                gs = g.to(self.dtype)
                o.grad = (gs * ours_mult).to(o.device)
                r.grad = gs.double() * ref_mult

    def force(self):
        """Hand torch's side our current values; returns them (the `before` of the step)."""
        before = []
        for i, (o, r) in enumerate(zip(self.ours, self.ref)):
            so, sr = self.opt.state.get(o, {}), self.topt.state.get(r, {})
            assert bool(so) == bool(sr), f"{self.tag}: param {i} has state on one side only"
            with torch.no_grad():
                r.copy_(self._param(o).detach().double().cpu())
            snap = {"param": r.detach().clone()}
            for k in STATE_KEYS:
                if k in so:
                    sr[k].copy_(so[k].detach().double().cpu())
                snap[k] = sr[k].detach().clone() if k in sr else torch.zeros_like(snap["param"])
            snap["step"] = float(so["step"]) if so else 0.0
            before.append(snap)
        return before

    def compare(self, before, what):
        what = f"{self.tag} {what}"
        sdtype = torch.float32 if self.master else self.dtype
        for i, (o, r, b) in enumerate(zip(self.ours, self.ref, before)):
            so, sr = self.opt.state.get(o, {}), self.topt.state.get(r, {})
            assert bool(so) == bool(sr), f"{what}: param {i} has state on one side only"
            if not sr:
                assert torch.equal(o.detach().double().cpu(), b["param"]), f"{what}: param {i} without grad moved"
                continue
            assert float(so["step"]) == float(sr["step"]), (
                f"{what}: param {i} step {float(so['step'])}, torch {float(sr['step'])}")
            assert so["step"].dtype == torch.float32 and so["step"].device == o.device
            _check(self._param(o), b["param"], r, sdtype, f"{what}: param {i}")
            if self.master:
                assert torch.equal(o.detach(), so["master_param"].to(self.dtype)), \
                    f"{what}: param {i} is not its master rounded"
            for k in STATE_KEYS:
                assert (k in so) == (k in sr), f"{what}: param {i} state key {k}"
                if k in sr:
                    assert so[k].dtype == sdtype, f"{what}: param {i} {k} is {so[k].dtype}"
                    _check(so[k], b[k], sr[k], sdtype, f"{what}: param {i} {k}")

    def snapshot(self):
        return ([o.detach().clone() for o in self.ours],
                [{k: v.clone() for k, v in self.opt.state.get(o, {}).items()} for o in self.ours])

    def assert_unchanged(self, snap, what):
        ps, sts = snap
        for i, (o, p0, st0) in enumerate(zip(self.ours, ps, sts)):
            assert torch.equal(o.detach(), p0), f"{self.tag} {what}: param {i} changed"
            st = self.opt.state.get(o, {})
            assert set(st) == set(st0), f"{self.tag} {what}: param {i} state keys changed"
            for k, v in st0.items():
                assert st[k].dtype == v.dtype and torch.equal(st[k], v), \
                    f"{self.tag} {what}: param {i} state {k} changed"


# ---------------------------------------------------------------------------------------
# 2a. params of one group at different step counts
# ---------------------------------------------------------------------------------------

SHAPES = [(7,), (3, 5), (33,), (1,)]
FIRST = (0, 2, 5, 1)      # the step at which each param first has a grad
HOLES = {3: (1,), 6: (0, 3)}  # later steps at which some params have none
STEPS = 8
OPT_CASES = [(FusedAdam, dict(lr=1e-2, weight_decay=0.1)),
             (FusedAdamW, dict(lr=2e-2, weight_decay=0.1, amsgrad=True)),
             (FusedAdamW, dict(lr=1e-2, betas=(0.3, 0.95), eps=1e-3, maximize=True))]
OPT_IDS = ["Adam-l2", "AdamW-amsgrad", "AdamW-beta1-0.3-maximize"]


@pytest.mark.parametrize("dtype,master", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt_cls,kw", OPT_CASES, ids=OPT_IDS)
def test_params_at_different_step_counts(request, backend_device, opt_cls, kw, dtype, master):
    """Some params have no grad for their first steps (and now and then later): each param's
    bias correction must come from its own step count."""
    backend, device = backend_device
    seed = _seed(request)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    tw = Twin.build(opt_cls, init, device, dtype, master, f"[seed {seed}]", **kw)
    for t in range(STEPS):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64)
                 if t >= FIRST[i] and i not in HOLES.get(t, ()) else None for i, s in enumerate(SHAPES)]
        tw.set_grads(grads)
        before = tw.force()
        tw.opt.step()
        tw.topt.step()
        tw.compare(before, f"step {t + 1}")
    counts = [float(tw.opt.state[o]["step"]) for o in tw.ours]
    assert len(set(counts)) == len(counts), f"the schedule must leave distinct step counts, got {counts}"


@pytest.mark.parametrize("dtype,master", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_loaded_state_with_a_step_per_param(request, backend_device, dtype, master, amsgrad):
    """A torch state_dict whose params carry different `step`s loads into FusedAdamW and the
    run continues on torch's trajectory; our own state_dict then carries those steps into a
    fresh FusedAdamW, which continues it too."""
    backend, device = backend_device
    seed = _seed(request)
    gen = torch.Generator().manual_seed(seed)
    kw = dict(lr=1e-2, weight_decay=0.05, amsgrad=amsgrad, betas=(0.8, 0.99))
    tag = f"[seed {seed}]"
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    loaded_steps = [3.0, 1.0, 250.0, 17.0]
    # torch's side with the state a checkpoint would hold (values representable in our storage)
    sdtype = torch.float32 if master else dtype
    ref = [x.to(dtype).double().requires_grad_() for x in init]
    topt = torch.optim.AdamW(ref, foreach=False, **kw)
    for r in ref:
        r.grad = torch.zeros_like(r)
    topt.step()
    for r, s in zip(ref, loaded_steps):
        st = topt.state[r]
        st["step"].fill_(s)
        st["exp_avg"].copy_((torch.randn(r.shape, generator=gen, dtype=torch.float64) * 0.1).to(sdtype))
        st["exp_avg_sq"].copy_((torch.rand(r.shape, generator=gen, dtype=torch.float64) * 0.01).to(sdtype))
        if amsgrad:
            st["max_exp_avg_sq"].copy_(st["exp_avg_sq"] * 1.5)
        with torch.no_grad():
            r.copy_(torch.randn(r.shape, generator=gen, dtype=torch.float64).to(dtype))
    ours = [r.detach().to(dtype).to(device).requires_grad_() for r in ref]
    opt = FusedAdamW(ours, master_weights=master, **kw)
    opt.load_state_dict(copy.deepcopy(topt.state_dict()))
    tw = Twin(opt, topt, ours, ref, dtype, master, tag)
    assert [float(opt.state[o]["step"]) for o in ours] == loaded_steps, f"{tag}: steps not loaded per param"

    def run(steps, what):
        for t in range(steps):
            # one param without a grad in the middle step: the counts drift further apart
            tw.set_grads([None if (t == 1 and i == 0) else torch.randn(s, generator=gen, dtype=torch.float64)
                          for i, s in enumerate(SHAPES)])
            before = tw.force()
            tw.opt.step()
            tw.topt.step()
            tw.compare(before, f"{what} step {t + 1}")

    run(3, "after loading torch's state_dict:")
    # our state_dict, per-param steps included, into a fresh optimizer
    sd = copy.deepcopy(tw.opt.state_dict())
    assert [float(sd["state"][i]["step"]) for i in range(len(SHAPES))] == [s + 2 if i == 0 else s + 3
                                                                           for i, s in enumerate(loaded_steps)]
    tw.ours = [o.detach().clone().requires_grad_() for o in tw.ours]
    tw.opt = FusedAdamW(tw.ours, master_weights=master, **kw)
    tw.opt.load_state_dict(sd)
    run(2, "after reloading our own state_dict:")


# ---------------------------------------------------------------------------------------
# 2b. the one-read clipped step of gradients scaled by 2^10
# ---------------------------------------------------------------------------------------

CLIP_FACTORS = (0.3, 2.5, 0.7, 4.0, 1.6, 0.2)  # max_norm / true norm per step: clipping on, off, ...


@pytest.mark.parametrize("via", ["GradScaler.step", "clipped_step_"])
@pytest.mark.parametrize("dtype,master", DTYPES, ids=DTYPE_IDS)
def test_clipped_step_of_scaled_grads(request, backend_device, dtype, master, via):
    """Gradients times 2^10 through the one-read clipped step: the state after each step is
    torch's after unscale, clip_grad_norm_ and step in float64, whether the clip is active
    (max_norm below the norm) or not (above it: the coefficient must stay 1)."""
    backend, device = backend_device
    seed = _seed(request)
    gen = torch.Generator().manual_seed(seed)
    scale = 2.0 ** 10
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    tw = Twin.build(FusedAdamW, init, device, dtype, master, f"[seed {seed}]", lr=1e-2, weight_decay=0.1)
    scaler = fusedtrain.GradScaler(device, init_scale=scale, growth_interval=10 ** 6)
    for t, factor in enumerate(CLIP_FACTORS):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        tw.set_grads(grads, ours_mult=scale)
        norm = torch.linalg.vector_norm(torch.cat([r.grad.reshape(-1) for r in tw.ref])).item()
        max_norm = factor * norm
        scaled = [o.grad.clone() for o in tw.ours]
        before = tw.force()
        if via == "GradScaler.step":
            scaler.scale(torch.ones((), device=device))
            total = scaler.step(tw.opt, max_norm=max_norm)
            scaler.update()
            assert scaler.get_scale() == scale
        else:
            total = fusedtrain.clipped_step_(tw.opt, max_norm, inv_scale=torch.tensor(1.0 / scale, device=device),
                                             found_inf=torch.zeros((), device=device))
        tnorm = torch.nn.utils.clip_grad_norm_(tw.ref, max_norm)
        tw.topt.step()
        assert abs(float(total) - float(tnorm)) <= 1e-5 * float(tnorm), \
            f"{tw.tag} step {t + 1}: norm {float(total)} vs torch {float(tnorm)}"
        assert all(torch.equal(o.grad, g) for o, g in zip(tw.ours, scaled)), "the step wrote the gradients"
        tw.compare(before, f"step {t + 1} (max_norm = {factor} x norm)")


# ---------------------------------------------------------------------------------------
# 2c. torch.amp.GradScaler: unscale_ then step
# ---------------------------------------------------------------------------------------

BAD_STEPS = {2: float("inf"), 5: float("nan")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opt_cls,kw", OPT_CASES[:2], ids=OPT_IDS[:2])
def test_torch_grad_scaler_unscale_then_step(request, backend_device, opt_cls, kw, dtype):
    """torch's own GradScaler: scaler.unscale_(opt); scaler.step(opt); scaler.update(), as
    with torch's AdamW. Our step sees grad_scale None and found_inf set; an inf or NaN step
    leaves params and state bit-identical, and the scale sequences are torch's."""
    backend, device = backend_device
    seed = _seed(request)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    tw = Twin.build(opt_cls, init, device, dtype, False, f"[seed {seed}]", **kw)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=2)
    tscaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    seen = []
    real = tw.opt._step_scaled

    def spy(grad_mult=None, found_inf=None):
        seen.append((grad_mult, None if found_inf is None else float(found_inf)))
        return real(grad_mult=grad_mult, found_inf=found_inf)

    tw.opt._step_scaled = spy
    one = torch.ones((), device=device)
    for t in range(8):
        scaler.scale(one), tscaler.scale(torch.ones(()))  # as a loss would be scaled
        s = scaler.get_scale()
        assert s == tscaler.get_scale(), f"{tw.tag} step {t + 1}: scale {s} vs torch {tscaler.get_scale()}"
        grads = [torch.randn(sh, generator=gen, dtype=torch.float64) for sh in SHAPES]
        if t in BAD_STEPS:
            grads[t % len(SHAPES)].view(-1)[1 % grads[t % len(SHAPES)].numel()] = BAD_STEPS[t]
        tw.set_grads(grads, ours_mult=s, ref_mult=s)
        before = tw.force()
        snap = tw.snapshot()
        scaler.unscale_(tw.opt)
        scaler.step(tw.opt)
        scaler.update()
        tscaler.unscale_(tw.topt)
        tscaler.step(tw.topt)
        tscaler.update()
        assert seen[-1] == (None, 1.0 if t in BAD_STEPS else 0.0), f"{tw.tag} step {t + 1}: step() got {seen[-1]}"
        if t in BAD_STEPS:
            tw.assert_unchanged(snap, f"step {t + 1} ({BAD_STEPS[t]} gradient)")
        else:
            tw.compare(before, f"step {t + 1}")
    assert scaler.get_scale() == tscaler.get_scale()
    assert [float(tw.opt.state[o]["step"]) for o in tw.ours] == [8.0 - len(BAD_STEPS)] * len(SHAPES)


# ---------------------------------------------------------------------------------------
# 2d. the CPU op through the dispatcher
# ---------------------------------------------------------------------------------------

needs_native = pytest.mark.skipif(_ext._C is None or not hasattr(torch.ops.fusedtrain, "adam_"),
                                  reason="extension not built")


@needs_native
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("decoupled,amsgrad,maximize", [(False, False, False), (True, True, True)],
                         ids=["Adam", "AdamW-amsgrad-maximize"])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=DTYPE_IDS)
def test_dispatcher_cpu_op_matches_torch(request, dtype, master, decoupled, amsgrad, maximize, lr_tensor):
    """torch.ops.fusedtrain.adam_ called through the dispatcher (the CPU kernel's registered
    body, not the direct C++ entry ops/adam.py takes), params at different steps, grads
    scaled by 2^6 and unscaled by grad_mult; then found_inf=1 writes nothing."""
    seed = _seed(request)
    gen = torch.Generator().manual_seed(seed)
    tag = f"[seed {seed}]"
    lr, beta1, beta2, eps, wd, mult = 1e-2, 0.85, 0.995, 1e-8, 0.1, 2.0 ** -6
    sdtype = torch.float32 if master else dtype
    old_steps = [0.0, 3.0, 10.0, 1.0]
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    ps = [x.clone() for x in init]
    masters = [x.float() for x in init] if master else []
    gs64 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    gs = [(g.to(dtype) / mult).to(dtype) for g in gs64]
    ms = [(torch.randn(s, generator=gen, dtype=torch.float64) * 0.1).to(sdtype) for s in SHAPES]
    vs = [(torch.rand(s, generator=gen, dtype=torch.float64) * 0.01).to(sdtype) for s in SHAPES]
    xs = [(v.double() * 1.5).to(sdtype) for v in vs] if amsgrad else []
    steps = [torch.tensor(s, dtype=torch.float32) for s in old_steps]
    # torch in float64 from the same values
    ref = [x.double().requires_grad_() for x in init]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    topt = cls(ref, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, amsgrad=amsgrad, maximize=maximize,
               foreach=False)
    before = []
    for i, r in enumerate(ref):
        r.grad = gs[i].double() * mult
        st = {"step": torch.tensor(old_steps[i]), "exp_avg": ms[i].double(), "exp_avg_sq": vs[i].double()}
        if amsgrad:
            st["max_exp_avg_sq"] = xs[i].double()
        topt.state[r] = st
        before.append({"param": r.detach().clone(), **{k: v.clone() for k, v in st.items()}})
    topt.step()
    args = lambda fi: (ps, gs, ms, vs, xs, steps, masters, [], [], [], 0.0 if lr_tensor else lr,
                       torch.tensor([lr]) if lr_tensor else None, beta1, beta2, eps, wd, amsgrad, maximize,
                       decoupled, torch.tensor([mult]), torch.tensor([fi]))
    torch.ops.fusedtrain.adam_(*args(0.0))
    for i, r in enumerate(ref):
        st = topt.state[r]
        what = f"{tag} param {i}"
        assert float(steps[i]) == float(st["step"]) == old_steps[i] + 1, f"{what}: step {float(steps[i])}"
        _check(masters[i] if master else ps[i], before[i]["param"], r, sdtype, f"{what}: param")
        if master:
            assert torch.equal(ps[i], masters[i].to(dtype)), f"{what}: param is not its master rounded"
        for k, t in (("exp_avg", ms[i]), ("exp_avg_sq", vs[i])) + ((("max_exp_avg_sq", xs[i]),) if amsgrad else ()):
            _check(t, before[i][k], st[k], sdtype, f"{what}: {k}")
    # found_inf set: nothing written, steps included
    kept = [t.clone() for t in ps + ms + vs + xs + steps + masters]
    torch.ops.fusedtrain.adam_(*args(1.0))
    assert all(torch.equal(a, b) for a, b in zip(kept, ps + ms + vs + xs + steps + masters)), \
        f"{tag}: found_inf=1 wrote something"


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_native
def test_optimizer_step_through_the_dispatcher(request):
    """Under a dispatch mode (as under tracing) FusedAdamW's step goes through the dispatcher
    op; that path matches torch in float64 too."""
    seed = _seed(request)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    with fusedtrain.use_backend("native"):
        tw = Twin.build(FusedAdamW, init, "cpu", torch.float32, False, f"[seed {seed}]", lr=1e-2, amsgrad=True)
        for t in range(3):
            tw.set_grads([torch.randn(s, generator=gen, dtype=torch.float64) if t >= FIRST[i] else None
                          for i, s in enumerate(SHAPES)])
            before = tw.force()
            with _OpLog() as log:
                tw.opt.step()
            assert "fusedtrain.adam_.default" in log.ops, f"no dispatcher call: {log.ops}"
            tw.topt.step()
            tw.compare(before, f"step {t + 1}")
