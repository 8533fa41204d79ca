"""torch.compile of a whole AMP training step -- forward under autocast, FusedBCEWithLogits,
scaler.scale(loss).backward(), scaler.step(opt) (also with max_norm, or after scaler.unscale_
and torch's clip_grad_norm_), scaler.update(), SkipAwareLambdaLR.step(), opt.zero_grad() --
against the same step run eagerly, with an inf/NaN batch that the step skips.

The step has GRAPH_BREAKS graph breaks, both torch's own and both in every torch training
step: `loss.backward()` (Dynamo does not trace Tensor.backward(); compiled autograd compiles
the backward as a graph of its own) and `opt.zero_grad()` (torch.optim.Optimizer.zero_grad is
marked torch._disable_dynamo). fusedtrain's code adds none (README "A five-line AMP loop",
docs/design.md §7)."""
import os
import shutil

import pytest
import torch
import torch._dynamo.testing

import fusedtrain
from fusedtrain import FusedAdamW, FusedBCEWithLogits, GradScaler, SkipAwareLambdaLR
from helpers import INTERPRET

PACKAGE_DIR = os.path.dirname(os.path.abspath(fusedtrain.__file__)) + os.sep

pytestmark = [pytest.mark.skipif(INTERPRET or fusedtrain._ext._C is None,
                                 reason="the native backend in a normal test process"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

GRAPH_BREAKS = 2  # Tensor.backward() and Optimizer.zero_grad(): the documented number
STEPS = 6
BAD_STEP = 3  # its batch holds an inf: NaN gradients, the step is skipped on the device


class _Run:
    """A small model, its FusedAdamW, GradScaler and SkipAwareLambdaLR, and the training step
    over them (the function that is compiled)."""

    def __init__(self, how, zero_grad_inside=True):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        self.opt = FusedAdamW(self.model.parameters(), lr=1e-2)
        self.scaler = GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
        self.sched = SkipAwareLambdaLR(self.opt, lambda step: 0.9 ** step, self.scaler)
        self.crit = FusedBCEWithLogits()
        self.how, self.zero_grad_inside = how, zero_grad_inside
        self.losses = []

    def step(self, x, y):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = self.crit(self.model(x), y)
        self.scaler.scale(loss).backward()
        if self.how == "step":
            self.scaler.step(self.opt)
        elif self.how == "max_norm":
            self.scaler.step(self.opt, max_norm=0.5)
        else:  # "unscale_clip": torch's recipe for clipping
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.5)
            self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.zero_grad_inside:
            self.opt.zero_grad()
        return loss.detach()

    def record(self, step_fn, x, y):
        """Run one step; keep its loss and whether it was skipped (read as a loop would log it)."""
        loss = step_fn(x, y)
        if not self.zero_grad_inside:
            self.opt.zero_grad()
        self.losses.append((loss, bool(self.scaler.last_step_skipped(self.opt))))


def _batches():
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 8, generator=g), (torch.rand(6, 4, generator=g) > 0.5).float()) for _ in range(STEPS)]
    data[BAD_STEP][0][0, 0] = float("inf")
    return data


def _assert_same(run, ref, exact):
    """run (compiled) and ref (eager) took the same steps to the same state."""
    check = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True))
    assert [s for _, s in run.losses] == [s for _, s in ref.losses] == [t == BAD_STEP for t in range(STEPS)]
    for t, ((a, _), (b, _)) in enumerate(zip(run.losses, ref.losses)):
        assert check(a, b), f"step {t}: loss {a} vs eager {b}"
    for p, q in zip(run.model.parameters(), ref.model.parameters()):
        assert check(p, q)
        for k in ("exp_avg", "exp_avg_sq"):
            assert check(run.opt.state[p][k], ref.opt.state[q][k]), k
        assert torch.equal(run.opt.state[p]["step"], ref.opt.state[q]["step"])
    assert run.scaler.state_dict() == ref.scaler.state_dict()  # scale, growth tracker, step counts
    assert run.scaler.state_dict()["steps_skipped"] == 1
    assert torch.equal(run.opt.param_groups[0]["lr"], ref.opt.param_groups[0]["lr"])
    assert run.sched.state_dict() == ref.sched.state_dict() == {"steps_taken": STEPS - 1, "base_lrs": [1e-2]}


def _compiled_race(how, backend):
    """STEPS steps eagerly and compiled from a cold scaler (its scale, counters and skip flags
    are made at the first step, as torch makes its scale: the second call compiles once more);
    returns the two runs and the compiled frames counted after each call."""
    data = _batches()
    run, ref = _Run(how), _Run(how)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(run.step, backend=counter)
    frames = []
    for x, y in data:
        run.record(compiled, x, y)
        ref.record(ref.step, x, y)
        frames.append(counter.frame_count)
    return run, ref, frames


HOWS = ["step", "max_norm", "unscale_clip"]


@pytest.mark.parametrize("how", HOWS)
def test_compiled_whole_step_matches_eager_bitwise(how):
    """aot_eager: the graphs Dynamo and AOTAutograd capture, run by torch's eager kernels,
    give the eager step's bits; nothing recompiles after the second call."""
    run, ref, frames = _compiled_race(how, "aot_eager")
    _assert_same(run, ref, exact=True)
    # the three graphs between the two breaks; at the second call the first and the last
    # again (the scale, the counters and the skip flags exist now); then never again
    assert frames == [3, 5, 5, 5, 5, 5], frames


def test_compiled_whole_step_inductor_within_tolerance():
    """Inductor (torch.compile's default) fuses the forward and backward, so the model's fp16
    arithmetic rounds differently from eager: losses and params agree to rtol 1e-4 / atol 1e-5
    (observed: 6e-6 after 6 steps); the skipped step, the scale, the step counts and the lr
    agree exactly."""
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("Inductor's CPU backend needs a C++ compiler")
    run, ref, _ = _compiled_race("max_norm", "inductor")
    _assert_same(run, ref, exact=False)


def test_compiled_autograd_whole_step_matches_eager_bitwise():
    """With torch._dynamo.config.compiled_autograd the backward (AccumulateGrad included) is
    compiled as one more graph; the step is still bit for bit the eager one."""
    with torch._dynamo.config.patch(compiled_autograd=True):
        run, ref, frames = _compiled_race("max_norm", "aot_eager")
    _assert_same(run, ref, exact=True)
    assert frames == [4, 7, 7, 7, 7, 7], frames  # as without it, plus the backward's graph at calls 1 and 2


@pytest.mark.parametrize("how,zero_grad_inside,breaks", [(h, True, GRAPH_BREAKS) for h in HOWS]
                         + [("max_norm", False, GRAPH_BREAKS - 1)], ids=HOWS + ["zero_grad-outside"])
def test_graph_breaks_are_torchs_own(how, zero_grad_inside, breaks):
    """The breaks are Tensor.backward() and Optimizer.zero_grad() (none in fusedtrain's code).
    explain() lists them in break_reasons; its graph_count is breaks + 2 (the graphs between
    the breaks, and the traced backward of the loss's autograd.Function, a graph of its own;
    its graph_break_count is graph_count - 1). The graph count is the stricter check:
    break_reasons (torch 2.14) leaves out a break inside an inlined call, e.g. fusedtrain's
    GradScaler calling into torch/amp/, which Dynamo does not trace."""
    run = _Run(how, zero_grad_inside)
    x, y = _batches()[0]
    run.record(run.step, x, y)  # warm: the scale and the counters exist, as in steady state
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(run.step)(x, y)
    reasons = [r.reason for r in explanation.break_reasons]
    assert len(reasons) == breaks, reasons
    assert "Tensor.backward()" in reasons[0]
    if zero_grad_inside:
        assert "Optimizer.zero_grad" in reasons[1]
    for r in explanation.break_reasons:
        # (the package's own folder: a checkout's path may contain "fusedtrain" too)
        assert not any(os.path.abspath(f.filename).startswith(PACKAGE_DIR) for f in r.user_stack), r.user_stack
    assert explanation.graph_count == breaks + 2
