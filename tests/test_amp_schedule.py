"""LR schedules that do not advance on a step GradScaler skipped: SkipAwareLambdaLR (on the
device, no host sync) and the host recipe with torch's schedulers, against learning rates
computed by hand with infs injected at known steps (docs/design.md §7)."""
import warnings

import pytest
import torch

import fusedtrain

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

BASE_LR = 0.01
STEPS = 9
BAD = {0: float("inf"), 3: float("nan"), 4: float("inf"), 8: float("-inf")}  # skipped steps


def warmup_decay(step):
    """Linear warmup over 3 steps, then 0.8x per step: device form (tensor ops only)."""
    return torch.clamp((step + 1) / 3, max=1.0) * 0.8 ** torch.clamp(step - 2, min=0)


def warmup_decay_host(k):
    """The same schedule for a Python int (what LambdaLR calls, and the hand computation)."""
    return min((k + 1) / 3, 1.0) * 0.8 ** max(k - 2, 0)


def expected_lrs():
    """lr after each step's scheduler step, by hand: the count advances on steps taken only."""
    taken, lrs = 0, []
    for step in range(STEPS):
        taken += step not in BAD
        lrs.append(BASE_LR * warmup_decay_host(taken))
    return lrs


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, opt, scaler, after_step, steps=STEPS, first=0):
    """AMP steps with an inf/NaN put in a gradient at the steps of BAD; after_step() where
    the scheduler steps. Returns the lrs the optimizer's first group holds after each step."""
    lrs = []
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if step in BAD:
            next(model.parameters()).grad.view(-1)[2] = BAD[step]
        scaler.step(opt)
        scaler.update()
        after_step()
        lr = opt.param_groups[0]["lr"]
        lrs.append(float(lr))
    return lrs


@pytest.mark.parametrize("opt_kind", ["fused_adamw", "torch_adamw_fused"])
def test_device_schedule_holds_on_skipped_steps(opt_kind):
    model = _model()
    opt = (fusedtrain.FusedAdamW(model.parameters(), lr=BASE_LR) if opt_kind == "fused_adamw"
           else torch.optim.AdamW(model.parameters(), lr=BASE_LR, fused=True))
    scaler = fusedtrain.GradScaler("cpu", init_scale=2.0**8)
    sched = fusedtrain.SkipAwareLambdaLR(opt, warmup_decay, scaler)
    lr = opt.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr.dtype == torch.float32 and lr.item() == pytest.approx(BASE_LR / 3, rel=1e-6)
    lrs = _train(model, opt, scaler, sched.step)
    assert opt.param_groups[0]["lr"] is lr  # written in place: a compiled or planned step keeps reading it
    assert lrs == pytest.approx(expected_lrs(), rel=1e-6)  # fp32 on the device against float64
    assert sched.state_dict() == {"steps_taken": STEPS - len(BAD), "base_lrs": [BASE_LR]}
    assert [float(x) for x in sched.get_last_lr()] == [lrs[-1]]


def test_device_schedule_trains_as_the_host_recipe_with_torch_lambdalr():
    """The device schedule and the host recipe (`if not skipped: sched.step()` with torch's
    LambdaLR) give the same lrs and, up to the fp32 rounding of the lr, the same params."""
    runs = []
    for device_side in (True, False):
        model = _model()
        opt = fusedtrain.FusedAdamW(model.parameters(), lr=BASE_LR)
        scaler = fusedtrain.GradScaler("cpu", init_scale=2.0**8)
        if device_side:
            sched = fusedtrain.SkipAwareLambdaLR(opt, warmup_decay, scaler)
            after = sched.step
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay_host)

            def after():
                if not scaler.last_step_skipped(opt):  # a host read: free on CPU, a sync on a GPU
                    sched.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
            lrs = _train(model, opt, scaler, after)
        runs.append((lrs, [p.detach().clone() for p in model.parameters()]))
    (lrs, params), (host_lrs, host_params) = runs
    assert lrs == pytest.approx(host_lrs, rel=1e-6) and host_lrs == pytest.approx(expected_lrs(), rel=1e-12)
    for a, b in zip(params, host_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_host_recipe_with_sgd_skipping_the_first_step_warns_nothing():
    """torch's SGD path skips optimizer.step() on the host; with the recipe the scheduler does
    not step either, so torch's order warning has nothing to warn about."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR)
    scaler = fusedtrain.GradScaler("cpu", init_scale=2.0**8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay_host)

    def after():
        if not scaler.last_step_skipped(opt):
            sched.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrs = _train(model, opt, scaler, after)
    assert lrs == pytest.approx(expected_lrs(), rel=1e-12)


def test_groups_with_their_own_lambdas_and_a_constant():
    model = _model()
    opt = fusedtrain.FusedAdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}],
                                lr=BASE_LR)
    scaler = fusedtrain.GradScaler("cpu", init_scale=2.0**8)
    sched = fusedtrain.SkipAwareLambdaLR(opt, [warmup_decay, lambda step: 0.25], scaler)
    _train(model, opt, scaler, sched.step)
    assert opt.param_groups[0]["lr"].item() == pytest.approx(expected_lrs()[-1], rel=1e-6)
    assert opt.param_groups[1]["lr"].item() == 0.125
    assert [g["initial_lr"] for g in opt.param_groups] == [BASE_LR, 0.5]
    with pytest.raises(ValueError, match="Expected 2 lr_lambdas"):
        fusedtrain.SkipAwareLambdaLR(opt, [warmup_decay], scaler)


def test_two_optimizers_one_scaler_each_schedule_follows_its_own_steps():
    """An inf in b's gradients skips b's step only (as torch does): a's schedule advances."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    oa, ob = fusedtrain.FusedAdamW(a.parameters(), lr=1.0), fusedtrain.FusedAdamW(b.parameters(), lr=1.0)
    scaler = fusedtrain.GradScaler("cpu", init_scale=2.0**6)
    sa, sb = (fusedtrain.SkipAwareLambdaLR(o, lambda step: 0.5 ** step, scaler) for o in (oa, ob))
    x = torch.randn(4, 3)
    for step in range(3):
        oa.zero_grad(), ob.zero_grad()
        scaler.scale(b(a(x)).sum()).backward()
        if step == 1:
            b.weight.grad[0, 0] = float("nan")
        scaler.step(oa), scaler.step(ob)
        scaler.update()
        sa.step(), sb.step()
    assert oa.param_groups[0]["lr"].item() == 0.125 and ob.param_groups[0]["lr"].item() == 0.25


def test_resume_from_state_dicts_continues_the_schedule():
    model = _model()
    opt = fusedtrain.FusedAdamW(model.parameters(), lr=BASE_LR)
    scaler = fusedtrain.GradScaler("cpu", init_scale=2.0**8)
    sched = fusedtrain.SkipAwareLambdaLR(opt, warmup_decay, scaler)
    first = _train(model, opt, scaler, sched.step, steps=5)
    saved = {k: v.state_dict() for k, v in (("model", model), ("opt", opt), ("scaler", scaler), ("sched", sched))}
    model2 = _model(seed=1)
    opt2 = fusedtrain.FusedAdamW(model2.parameters(), lr=BASE_LR)
    scaler2 = fusedtrain.GradScaler("cpu")
    sched2 = fusedtrain.SkipAwareLambdaLR(opt2, warmup_decay, scaler2)
    model2.load_state_dict(saved["model"]), opt2.load_state_dict(saved["opt"])
    scaler2.load_state_dict(saved["scaler"]), sched2.load_state_dict(saved["sched"])
    assert float(opt2.param_groups[0]["lr"]) == first[-1]
    rest = _train(model2, opt2, scaler2, sched2.step, steps=STEPS - 5, first=5)
    assert first + rest == pytest.approx(expected_lrs(), rel=1e-6)


def test_a_disabled_scaler_skips_nothing():
    model = _model()
    opt = fusedtrain.FusedAdamW(model.parameters(), lr=BASE_LR)
    scaler = fusedtrain.GradScaler("cpu", enabled=False)
    sched = fusedtrain.SkipAwareLambdaLR(opt, lambda step: 0.5 ** step, scaler)
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(2, 6)).sum().backward()
        scaler.step(opt)
        sched.step()
    assert opt.param_groups[0]["lr"].item() == pytest.approx(BASE_LR / 8, rel=1e-6)
    assert scaler.steps_taken().item() == 3
