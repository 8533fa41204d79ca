"""GradScaler's step bookkeeping: steps_taken(), steps_skipped() and last_step_skipped() count
every scaler.step(optimizer) call on the device, on every path of step(), without a host
sync, and travel in state_dict() (docs/design.md §7)."""
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedtrain

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

STEPS = 8
BAD = {2: float("inf"), 5: float("nan"), 6: float("-inf")}  # step -> the value put in a gradient


def _opt(kind, params):
    if kind == "fused_adamw":
        return fusedtrain.FusedAdamW(params, lr=1e-2)
    if kind == "sgd":  # unscaled by the fused pass, skipped on the host as torch does
        return torch.optim.SGD(params, lr=0.1)
    if kind == "torch_fused_adam":  # torch's grad_scale/found_inf protocol
        return torch.optim.Adam(params, lr=1e-2, fused=True)
    raise ValueError(kind)


def _scaled_grads(params, scaler, step, bad=None):
    for p in params:
        p.grad = None
    g = torch.Generator().manual_seed(step)
    scaler.scale(sum((p * torch.randn(p.shape, generator=g).to(p.device)).sum() for p in params)).backward()
    if bad is not None:
        params[0].grad.view(-1)[1] = bad


def _step(scaler, opt, how):
    """One scaler step the way `how` spells it."""
    if how == "plain":
        scaler.step(opt)
    elif how == "unscale_first":
        scaler.unscale_(opt)
        scaler.step(opt)
    elif how == "max_norm":
        scaler.step(opt, max_norm=0.5)
    elif how == "unscale_then_max_norm":
        scaler.unscale_(opt)
        scaler.step(opt, max_norm=0.5)
    elif how == "clip_grad_norm_":
        scaler.clip_grad_norm_(opt, 0.5)
        scaler.step(opt)
    else:
        raise ValueError(how)


PATHS = [(k, h) for k in ("fused_adamw", "sgd") for h in
         ("plain", "unscale_first", "max_norm", "unscale_then_max_norm", "clip_grad_norm_")]
PATHS += [("torch_fused_adam", h) for h in ("plain", "unscale_first", "max_norm")]


@pytest.mark.parametrize("kind,how", PATHS, ids=[f"{k}-{h}" for k, h in PATHS])
def test_counts_every_step_call_on_every_path(kind, how):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = _opt(kind, params)
    scaler = fusedtrain.GradScaler("cpu", init_scale=2.0**6, growth_interval=3)
    taken = skipped = 0
    for step in range(STEPS):
        _scaled_grads(params, scaler, step, BAD.get(step))
        before = [p.detach().clone() for p in params]
        _step(scaler, opt, how)
        scaler.update()
        # the truth: a skipped step left every parameter as it was
        unchanged = all(torch.equal(a, p) for a, p in zip(before, params))
        assert unchanged == (step in BAD), f"step {step}: the test's injection did not do what it should"
        skipped += unchanged
        taken += not unchanged
        flag = scaler.last_step_skipped(opt)
        assert flag.dtype == torch.bool and flag.shape == () and flag.device == scaler._scale.device
        assert bool(flag) == unchanged, f"step {step}: last_step_skipped"
        assert bool(scaler.last_step_skipped()) == unchanged
        assert scaler.steps_taken().item() == taken, f"step {step}: steps_taken"
        assert scaler.steps_skipped().item() == skipped, f"step {step}: steps_skipped"
        assert scaler.steps_taken().dtype == scaler.steps_skipped().dtype == torch.int64


def test_disabled_scaler_counts_every_step_as_taken():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = fusedtrain.GradScaler("cpu", enabled=False)
    for step in range(3):
        scaler.scale(p.sum()).backward()
        if step == 1:
            p.grad[0] = float("inf")  # not checked when disabled: torch steps anyway
        if step == 2:
            norm = scaler.step(opt, max_norm=0.5)
            assert torch.is_tensor(norm)  # as when enabled: max_norm returns the norm
        else:
            scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert not bool(scaler.last_step_skipped(opt))
    assert scaler.steps_taken().item() == 3 and scaler.steps_skipped().item() == 0
    assert scaler.state_dict() == {}  # torch's, for a disabled scaler


def test_two_optimizers_count_one_step_each():
    """Each scaler.step(optimizer) counts for its optimizer: an inf in b's gradients skips b's
    step and not a's (torch skips per optimizer), while update() backs the scale off once."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    oa, ob = fusedtrain.FusedAdamW(a.parameters(), lr=1e-2), torch.optim.SGD(b.parameters(), lr=0.1)
    scaler = fusedtrain.GradScaler("cpu", init_scale=2.0**6)
    x = torch.randn(4, 3)
    for step in range(3):
        oa.zero_grad(), ob.zero_grad()
        scaler.scale(b(a(x)).sum()).backward()
        if step == 1:
            b.weight.grad[0, 0] = float("nan")
        scaler.step(oa)
        scaler.step(ob)
        scaler.update()
        assert not bool(scaler.last_step_skipped(oa))
        assert bool(scaler.last_step_skipped(ob)) == (step == 1)
        assert bool(scaler.last_step_skipped()) == (step == 1)  # the last step() call: ob's
    assert scaler.steps_taken().item() == 5 and scaler.steps_skipped().item() == 1
    assert scaler.get_scale() == 2.0**5  # one backoff for the iteration


def test_last_step_skipped_before_any_step_raises():
    scaler = fusedtrain.GradScaler("cpu")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(RuntimeError, match="has not been called"):
        scaler.last_step_skipped()
    with pytest.raises(RuntimeError, match="for this optimizer"):
        scaler.last_step_skipped(opt)
    assert scaler.steps_taken().item() == 0 and scaler.steps_skipped().item() == 0


def test_clipped_step_without_a_scaler_reports_the_skip_in_found_inf():
    """fusedtrain.clipped_step_'s skip flag is its found_inf argument: zeroed by the caller,
    set by the step when a gradient holds an inf/NaN (then nothing was written)."""
    p = torch.nn.Parameter(torch.ones(6))
    opt = fusedtrain.FusedAdamW([p], lr=1e-2)
    found_inf = torch.zeros(())
    for step, bad in enumerate((None, float("nan"), None)):
        p.grad = torch.full((6,), 8.0)
        if bad is not None:
            p.grad[4] = bad
        before = p.detach().clone()
        found_inf.zero_()
        fusedtrain.clipped_step_(opt, 1.0, inv_scale=torch.tensor(0.125), found_inf=found_inf)
        assert found_inf.item() == (1.0 if bad is not None else 0.0), f"step {step}"
        assert torch.equal(p.detach(), before) == (bad is not None), f"step {step}"
    assert opt.state[p]["step"].item() == 2


def _run(scaler, opt, p, steps, first=0):
    for step in range(first, first + steps):
        opt.zero_grad()
        scaler.scale(p.square().sum()).backward()
        if step in BAD:
            p.grad[0] = BAD[step]
        scaler.step(opt)
        scaler.update()


def test_state_dict_carries_the_counts_both_ways_with_torch():
    p = torch.nn.Parameter(torch.ones(3))
    opt = fusedtrain.FusedAdamW([p], lr=1e-2)
    scaler = fusedtrain.GradScaler("cpu", init_scale=2.0**6)
    _run(scaler, opt, p, 7)  # steps 2, 5 and 6 skipped
    sd = scaler.state_dict()
    assert sd["steps_taken"] == 4 and sd["steps_skipped"] == 3
    # into a scaler that has no scale yet, and into one that has: counting goes on from there
    fresh, used = fusedtrain.GradScaler("cpu"), fusedtrain.GradScaler("cpu")
    _run(used, fusedtrain.FusedAdamW([torch.nn.Parameter(torch.ones(3))]), torch.nn.Parameter(torch.ones(3)), 1)
    for s in (fresh, used):
        s.load_state_dict(sd)
        assert (s.steps_taken().item(), s.steps_skipped().item()) == (4, 3)
        _run(s, opt, p, 2, first=7)
        assert (s.steps_taken().item(), s.steps_skipped().item()) == (6, 3)
    # pickled between iterations, as torch allows
    back = pickle.loads(pickle.dumps(fresh))
    assert back.state_dict() == fresh.state_dict()
    _run(back, opt, p, 1, first=9)
    assert back.steps_taken().item() == 7
    # torch's state_dict (no counts) loads into ours: the counts start again at 0
    t = torch.amp.GradScaler("cpu")
    t.load_state_dict(sd)  # and ours into torch's: it ignores the counts
    assert t.state_dict() == {k: v for k, v in sd.items() if not k.startswith("steps_")}
    fresh.load_state_dict(t.state_dict())
    assert (fresh.steps_taken().item(), fresh.steps_skipped().item()) == (0, 0)


class _NoHostReads(TorchDispatchMode):
    """Fails on any read of a tensor's value by the host (.item(), bool(), int()), which on a
    GPU is a sync; counts the ops dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a host read of a tensor value (a sync on a GPU)")
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_counting_reads_nothing_on_the_host_and_adds_three_ops(max_norm):
    ps = [torch.nn.Parameter(torch.randn(6)) for _ in range(4)]
    opt = fusedtrain.FusedAdamW(ps, lr=1e-2)
    scaler = fusedtrain.GradScaler("cpu", init_scale=2.0**6)
    sched = fusedtrain.SkipAwareLambdaLR(opt, lambda s: 0.9 ** s, scaler)
    counted = []
    for step in range(3):
        _scaled_grads(ps, scaler, step, float("inf") if step == 1 else None)
        with _NoHostReads() as mode:
            scaler.step(opt, max_norm=max_norm)
            scaler.update()
            sched.step()
            scaler.last_step_skipped(opt), scaler.steps_taken(), scaler.steps_skipped()
        found_inf = torch.zeros(())
        with _NoHostReads() as mode:
            scaler._count_step(opt, found_inf)  # the counting alone: 3 ops, whatever the params
        counted.append(len(mode.ops))
    assert counted == [3, 3, 3]
    assert scaler.steps_taken().item() == 2 + 3 and scaler.steps_skipped().item() == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_no_host_sync_on_cuda(max_norm):
    """On a GPU: step, update, the schedule and every read of the bookkeeping without a sync;
    the counters and flags live on the scale's device."""
    ps = [torch.nn.Parameter(torch.randn(64, device="cuda")) for _ in range(3)]
    opt = fusedtrain.FusedAdamW(ps, lr=1e-2)
    scaler = fusedtrain.GradScaler("cuda", init_scale=2.0**6)
    sched = fusedtrain.SkipAwareLambdaLR(opt, lambda step: 0.9 ** step, scaler)
    for step in range(3):
        _scaled_grads(ps, scaler, step, float("inf") if step == 1 else None)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt, max_norm=max_norm)
            scaler.update()
            sched.step()
            flags = scaler.last_step_skipped(opt), scaler.steps_taken(), scaler.steps_skipped()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(t.device.type == "cuda" for t in flags)
    assert (scaler.steps_taken().item(), scaler.steps_skipped().item()) == (2, 1)
    assert opt.param_groups[0]["lr"].device.type == "cuda"
