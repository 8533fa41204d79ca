"""FusedAdam's plans (csrc/adam_plan.cpp): a step that reuses the lists of the step before must
see every change a user can make between steps, as torch.optim.AdamW (float64, the oracle),
which reads everything every step, sees it."""
import copy
import gc
import weakref

import pytest
import torch

import fusedtrain
from fusedtrain import FusedAdamW
from helpers import OpCalls, assert_close

SHAPES = [(5,), (3, 4), (1,), (0,), (17,), (2, 3)]
HYPER = dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)


def _replace(opt, p, key, value):
    opt.state[p][key] = value


MUTATIONS = {
    # a state tensor assigned anew (the "move the optimizer to a device" idiom does this)
    "exp_avg assigned": lambda opt, ps, dev: _replace(opt, ps[1], "exp_avg", torch.full_like(
        opt.state[ps[1]]["exp_avg"], 0.25)),
    "exp_avg_sq assigned": lambda opt, ps, dev: _replace(opt, ps[4], "exp_avg_sq", torch.full_like(
        opt.state[ps[4]]["exp_avg_sq"], 0.5)),
    "step assigned": lambda opt, ps, dev: _replace(opt, ps[0], "step", torch.tensor(10.0, device=dev)),
    "every state cloned": lambda opt, ps, dev: [st.update({k: v.clone() for k, v in st.items()})
                                                for st in opt.state.values()],
    "state of a param reset": lambda opt, ps, dev: opt.state.__setitem__(ps[2], {}),
    "state of a param deleted": lambda opt, ps, dev: opt.state.__delitem__(ps[5]),
    "all state cleared": lambda opt, ps, dev: opt.state.clear(),
    "in place, same tensors": lambda opt, ps, dev: [st["exp_avg"].mul_(0.5) for st in opt.state.values()],
}


def _pair(device, seed):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [p.clone().to(device).requires_grad_() for p in init]
    ref = [p.double().requires_grad_() for p in init]
    return ours, ref, gen


def _grads(ours, ref, gen, skip=()):
    for k, (a, b) in enumerate(zip(ours, ref)):
        if k in skip:
            a.grad = b.grad = None
            continue
        g = torch.randn(a.shape, generator=gen)
        a.grad, b.grad = g.to(a.device), g.double()


def _compare(opt, topt, ours, ref, what):
    for k, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a.detach(), b.detach(), torch.float32, what=f"param {k} {what}")
        sa, sb = opt.state.get(a, {}), topt.state.get(b, {})
        assert set(sa) == set(sb), f"state keys of param {k} {what}"
        for key in sb:
            assert_close(sa[key].reshape(sb[key].shape), sb[key], torch.float32, what=f"{key} of param {k} {what}")


def _steps(opt, topt, ours, ref, gen, n, skip=()):
    for _ in range(n):
        _grads(ours, ref, gen, skip)
        opt.step()
        topt.step()


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_change_of_state_between_steps_is_seen(backend_device, mutation):
    backend, device = backend_device
    ours, ref, gen = _pair(device, 1)
    opt, topt = FusedAdamW(ours, **HYPER), torch.optim.AdamW(ref, foreach=False, **HYPER)
    _steps(opt, topt, ours, ref, gen, 2)  # the second step runs a plan
    for o, ps, dev in ((opt, ours, device), (topt, ref, "cpu")):
        MUTATIONS[mutation](o, ps, dev)
    if mutation == "step assigned":
        topt.state[ref[0]]["step"] = torch.tensor(10.0)
    _steps(opt, topt, ours, ref, gen, 2)
    _compare(opt, topt, ours, ref, f"after '{mutation}'")


@pytest.mark.parametrize("change", ["param removed", "param added", "param swapped", "group list replaced",
                                    "grads missing",
                                    "group added", "load_state_dict"])
def test_a_change_of_params_grads_or_groups_is_seen(backend_device, change):
    backend, device = backend_device
    ours, ref, gen = _pair(device, 2)
    opt, topt = FusedAdamW(ours[:5], **HYPER), torch.optim.AdamW(ref[:5], foreach=False, **HYPER)
    _steps(opt, topt, ours, ref, gen, 2)
    skip = ()
    if change == "param removed":
        for o in (opt, topt):
            o.param_groups[0]["params"].pop(1)
    elif change == "param added":
        for o, ps in ((opt, ours), (topt, ref)):
            o.param_groups[0]["params"].append(ps[5])
    elif change == "param swapped":  # the same number of params
        for o, ps in ((opt, ours), (topt, ref)):
            o.param_groups[0]["params"][1] = ps[5]
    elif change == "group list replaced":  # same params, a new list: the plan still holds
        for o in (opt, topt):
            o.param_groups[0]["params"] = list(reversed(o.param_groups[0]["params"]))
    elif change == "grads missing":
        skip = (0, 4)
    elif change == "group added":
        opt.add_param_group({"params": [ours[5]], "lr": 3e-2})
        topt.add_param_group({"params": [ref[5]], "lr": 3e-2})
    else:
        saved, tsaved = copy.deepcopy(opt.state_dict()), copy.deepcopy(topt.state_dict())
        _steps(opt, topt, ours, ref, gen, 1)
        opt.load_state_dict(saved)
        topt.load_state_dict(tsaved)
        for a, b in zip(ours, ref):  # rewind the params too
            a.detach().copy_(b.detach())
    _steps(opt, topt, ours, ref, gen, 1, skip)
    _steps(opt, topt, ours, ref, gen, 2)
    _compare(opt, topt, ours, ref, f"after '{change}'")


def _unplanned(opt):
    """opt.step with no plan kept: every step gathers in Python (the path the plans must match)."""
    def step():
        opt.__dict__.pop("_plans", None)
        opt.step()
        opt.__dict__.pop("_plans", None)
    return step


def _twins(device, seed, groups=1):
    """Two FusedAdamW over equal params, one stepping with plans, one without."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    a = [p.clone().to(device).requires_grad_() for p in init]
    b = [p.clone().to(device).requires_grad_() for p in init]
    split = lambda ps: [{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-2}] if groups == 2 else ps
    return a, b, FusedAdamW(split(a), **HYPER), FusedAdamW(split(b), **HYPER), gen


def _twin_steps(a, b, opt_a, opt_b, gen, n=1):
    for _ in range(n):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen)
            x.grad, y.grad = g.to(x.device, x.dtype), g.to(y.device, y.dtype)
        opt_a.step()
        _unplanned(opt_b)()
    for x, y in zip(a, b):
        assert torch.equal(x.detach(), y.detach())
        for key, v in opt_b.state[y].items():
            assert torch.equal(opt_a.state[x][key], v), key


def test_a_param_changing_dtype_is_cut_into_calls_again(backend_device):
    backend, device = backend_device
    _dtype_change(device, torch.bfloat16)


@pytest.mark.skipif(fusedtrain._ext._C is None, reason="native backend only")
def test_float64_params_after_planned_steps_run_on_the_reference_backend():
    _dtype_change("cpu", torch.float64)  # the backend fusedtrain chooses: native, then reference


def _dtype_change(device, to):
    """Params and states given another dtype through .data (a model converted after its
    optimizer was made): the step runs as the Python path cuts it (a bf16 call; float64 on the
    reference backend), not as the plan had it."""
    a, b, opt_a, opt_b, gen = _twins(device, 3)
    _twin_steps(a, b, opt_a, opt_b, gen, 2)
    for ps, opt in ((a, opt_a), (b, opt_b)):
        for p in ps[1:3] if to == torch.bfloat16 else ps:
            p.data = p.data.to(to)
            if to == torch.float64:
                for v in opt.state[p].values():
                    v.data = v.data.to(to) if v.dim() else v.data
    _twin_steps(a, b, opt_a, opt_b, gen, 2)


def _bad_grad(opt, a, device):
    a[4].grad.data = torch.zeros(3, device=device)  # what only .data can do


def _bad_lr(opt, a, device):
    opt.param_groups[1]["lr"] = torch.tensor([1e-3, 2e-3])


@pytest.mark.parametrize("spoil,error,match", [(_bad_grad, RuntimeError, "grad of param .* has shape"),
                                               (_bad_lr, ValueError, "lr must be a one-element tensor")],
                         ids=["grad", "lr tensor"])
def test_a_bad_input_in_a_later_group_after_planned_steps_changes_nothing(backend_device, spoil, error, match):
    """The second group's bad grad or lr tensor raises before the first group is written."""
    backend, device = backend_device
    a, b, opt, _, gen = _twins(device, 6, groups=2)
    _twin_steps(a, b, opt, _, gen, 2)
    for p in a:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    spoil(opt, a, device)
    before = [p.detach().clone() for p in a]
    with pytest.raises(error, match=match):
        opt.step()
    assert all(torch.equal(x, p.detach()) for x, p in zip(before, a))
    assert all(opt.state[p]["step"].item() == 2 for p in a)


def test_the_backend_chosen_now_runs_the_step(backend_device):
    backend, device = backend_device
    a, b, opt, _, gen = _twins(device, 8)
    _twin_steps(a, b, opt, _, gen, 2)
    for p in a:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    with fusedtrain.use_backend("reference"), OpCalls("adam_") as calls:
        opt.step()
    assert calls == ["fusedtrain_ref::adam_"]


def test_the_same_params_in_a_new_list_keep_the_plan(backend_device):
    backend, device = backend_device
    a, b, opt, _, gen = _twins(device, 9)
    _twin_steps(a, b, opt, _, gen, 2)
    opt.param_groups[0]["params"] = list(opt.param_groups[0]["params"])
    opt._init_group = None  # a step that gathered in Python would fail
    if backend != "reference":
        _twin_steps(a, b, opt, _, gen, 1)


def test_swap_tensors_after_a_step(backend_device):
    """A plan holds no param between steps: torch.utils.swap_tensors (nn.Module.to under
    torch.__future__.set_swap_module_params_on_conversion) works on params, and the step
    after it updates the swapped-in tensor as the Python path does."""
    backend, device = backend_device
    a, b, opt_a, opt_b, gen = _twins(device, 10)
    _twin_steps(a, b, opt_a, opt_b, gen, 2)
    for ps in (a, b):
        torch.utils.swap_tensors(ps[1], torch.nn.Parameter(ps[1].detach() * 2))
    _twin_steps(a, b, opt_a, opt_b, gen, 2)


def test_what_a_plan_held_is_freed(backend_device):
    """A removed group's states and the states a failed step created are freed."""
    backend, device = backend_device
    a, b, opt, _, gen = _twins(device, 11, groups=2)
    _twin_steps(a, b, opt, _, gen, 2)
    removed = weakref.ref(opt.state[a[4]]["exp_avg"])
    opt.param_groups.pop(1)
    for p in a[3:]:
        del opt.state[p]
    for p in a:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    opt.step()
    gc.collect()
    assert removed() is None, "the states of a removed group are still held"

    fresh = torch.randn(4, device=device, requires_grad=True)
    opt.add_param_group({"params": [fresh]})
    fresh.grad = torch.zeros(4, device=device)
    fresh.grad.data = torch.zeros(3, device=device)
    with pytest.raises(RuntimeError):
        opt.step()  # creates fresh's state, then removes it
    assert fresh not in opt.state


def test_an_optimizer_in_a_reference_cycle_is_collected(backend_device):
    backend, device = backend_device
    a, b, opt, _, gen = _twins(device, 12)
    _twin_steps(a, b, opt, _, gen, 2)
    a[0].optimizer = opt  # a cycle: the optimizer, its plan and state, the param
    alive = weakref.ref(opt)
    del opt, a, b, _
    gc.collect()
    assert alive() is None, "an optimizer in a reference cycle was not collected"


def test_the_planned_step_is_the_one_taken(backend_device):
    """Steady state does not gather in Python (on the native and Triton backends, outside
    torch.compile): if it did, the plans would cost without saving."""
    backend, device = backend_device
    ours, ref, gen = _pair(device, 4)
    opt = FusedAdamW(ours, **HYPER)
    for _ in range(2):
        _grads(ours, ref, gen)
        opt.step()

    def no_gather(*args):
        raise AssertionError("the group was gathered in Python")

    opt._init_group = no_gather
    _grads(ours, ref, gen)
    if backend in ("native", "triton"):
        opt.step()
        assert all(opt.state[p]["step"].item() == 3 for p in ours)
    else:
        with pytest.raises(AssertionError, match="gathered in Python"):
            opt.step()


def test_a_plan_holds_no_grad_after_the_step(backend_device):
    """zero_grad(set_to_none=True) frees the grads: a plan keeps none of them."""
    backend, device = backend_device
    ours, ref, gen = _pair(device, 5)
    opt = FusedAdamW(ours, **HYPER)
    refs = []
    for _ in range(3):
        _grads(ours, ref, gen)
        refs = [weakref.ref(p.grad) for p in ours]
        opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs), "a grad outlived zero_grad"


class _Logged(torch.nn.Parameter):
    """A param subclass with a __torch_function__ of its own, which records the ops it sees."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_param_subclass_with_torch_function_sees_every_step(backend_device):
    """A planned step calls the op from C++, past __torch_function__: params whose class has
    its own are never planned, so the op call reaches it at every step, as it does with
    torch.ops from the Python path."""
    backend, device = backend_device
    ours, ref, gen = _pair(device, 5)
    ours = [_Logged(p.detach()) for p in ours]
    opt = FusedAdamW(ours, **HYPER)
    topt = torch.optim.AdamW(ref, foreach=False, **HYPER)
    for step in range(3):
        _Logged.seen.clear()
        _grads(ours, ref, gen)
        opt.step()
        topt.step()
        assert any("adam_" in name for name in _Logged.seen), f"step {step}: the op call did not reach it"
    _compare(opt, topt, ours, ref, "after 3 steps")


# ---- 8-bit states (state_format="8bit"): planned on the native backend, their absmax with them ----

Q8_SHAPES = [(4096,), (64, 80), (5,), (5003,), (3, 4)]  # 8-bit from 4096 elements; the small keep fp32


def _q8_absmax(st, fn):
    for k in ("exp_avg_absmax", "exp_avg_sq_absmax", "max_exp_avg_sq_absmax"):
        if k in st:
            st[k] = fn(st[k])


def _drop_plans(opt, ps):
    ps[1].grad = None  # another set of params with a grad: the plan is built anew


Q8_MUTATIONS = {
    "nothing": lambda opt, ps: None,
    "absmax assigned": lambda opt, ps: _q8_absmax(opt.state[ps[0]], lambda a: a.clone()),
    "absmax scaled in place": lambda opt, ps: _q8_absmax(opt.state[ps[3]], lambda a: a.mul_(2)),
    "codes assigned": lambda opt, ps: opt.state[ps[1]].__setitem__("exp_avg", opt.state[ps[1]]["exp_avg"].flip(0)),
    "every state cloned": lambda opt, ps: [st.update({k: v.clone() for k, v in st.items()})
                                           for st in opt.state.values()],
    "state of a param reset": lambda opt, ps: opt.state.__setitem__(ps[0], {}),
    "all state cleared": lambda opt, ps: opt.state.clear(),
    "state_dict reloaded": lambda opt, ps: opt.load_state_dict(copy.deepcopy(opt.state_dict())),
    # the existing 8-bit states stay 8-bit (none is converted); with and without a plan kept
    "state_format edited": lambda opt, ps: opt.param_groups[0].__setitem__("state_format", "fp32"),
    "state_format edited, plan dropped": lambda opt, ps: (opt.param_groups[0].__setitem__("state_format", "fp32"),
                                                          _drop_plans(opt, ps)),
}

Q8_CONFIGS = {  # param dtype, optimizer options
    "fp32 params": (torch.float32, {}),
    "fp32 params, amsgrad": (torch.float32, {"amsgrad": True}),
    "bf16 params, master weights, amsgrad": (torch.bfloat16, {"master_weights": True, "amsgrad": True}),
    "bf16 params, stochastic rounding": (torch.bfloat16, {"stochastic_rounding": True}),
}


@pytest.mark.parametrize("config", list(Q8_CONFIGS))
@pytest.mark.parametrize("mutation", list(Q8_MUTATIONS))
def test_planned_8bit_steps_are_the_python_paths_bit_for_bit(backend_device, monkeypatch, mutation, config):
    """Planned steps of a group with 8-bit states (and small params on fp32 ones) give the bits
    of the Python path's (no plan built or kept: _init_group, prepare, the op), before and
    after each change a user can make between steps."""
    from fusedtrain.ops import adam as adam_ops

    backend, device = backend_device
    if backend != "native":  # the others never plan 8-bit groups (under the interpreter: 40 slow cases)
        pytest.skip(f"{backend} does not plan 8-bit groups")
    dtype, options = Q8_CONFIGS[config]
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen).to(dtype) for s in Q8_SHAPES]
    a = [p.clone().to(device).requires_grad_() for p in init]
    b = [p.clone().to(device).requires_grad_() for p in init]
    kw = dict(HYPER, state_format="8bit", **options)
    opt, unplanned = FusedAdamW(a, **kw), FusedAdamW(b, **kw)
    skip = set()

    def steps(n):
        for _ in range(n):
            for k, (x, y) in enumerate(zip(a, b)):
                g = torch.randn(x.shape, generator=gen).to(device, dtype)
                x.grad, y.grad = (None, None) if k in skip else (g, g.clone())
            opt.step()
            with monkeypatch.context() as m:
                m.setattr(adam_ops, "plan_group", lambda *args: None)
                unplanned.step()

    steps(3)  # the second and third run a plan where the backend plans
    for o, ps in ((opt, a), (unplanned, b)):
        Q8_MUTATIONS[mutation](o, ps)
    if "plan dropped" in mutation:
        skip.add(1)
    steps(2)
    assert opt.state[a[0]]["exp_avg"].dtype == torch.uint8 and opt.state[a[2]]["exp_avg"].dtype != torch.uint8
    for k, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"param {k} after '{mutation}'"
        sx, sy = opt.state[x], unplanned.state[y]
        assert set(sx) == set(sy)
        for key in sy:
            assert torch.equal(sx[key], sy[key]), f"{key} of param {k} after '{mutation}'"


def test_8bit_steady_state_is_planned_on_the_native_backend(backend_device):
    """8-bit groups no longer gather in Python every step (1000x4096 8-bit row: the host's
    share of the step); the Triton backend still does (its planned launch reads no absmax)."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(8)
    ps = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in Q8_SHAPES]
    opt = FusedAdamW(ps, state_format="8bit", **HYPER)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        opt.step()

    def no_gather(*args):
        raise AssertionError("the group was gathered in Python")

    opt._init_group = no_gather
    if backend == "native":
        opt.step()
        assert all(opt.state[p]["step"].item() == 3 for p in ps)
    else:
        with pytest.raises(AssertionError, match="gathered in Python"):
            opt.step()
