"""fusedtrain inside a Hugging Face Accelerate loop, on CPU: accelerator.prepare(model,
FusedAdamW, dataloader, scheduler), accelerator.backward, accelerator.clip_grad_norm_,
gradient accumulation, mixed_precision="bf16", against the same loop with torch.optim.AdamW
(and torch.nn.BCEWithLogitsLoss); a state round trip through accelerator.save_state/load_state.

mixed_precision="fp16" on CPU: Accelerate 1.x then makes no GradScaler and enters no autocast
(it silently runs fp32). Its fp16 path -- the one GPU users take -- is run here by doing on CPU
the two assignments its __init__ makes on a GPU (fp16_on_cpu); from there on everything is
Accelerate's own code: the autocast forward, the scaled backward, clip_grad_norm_'s unscale_,
AcceleratedOptimizer.step through the scaler, the scheduler that skips with a skipped step.
"""
import functools
import math

import pytest

accelerate = pytest.importorskip("accelerate")

import torch  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from fusedtrain import FusedAdamW, FusedBCEWithLogits, GradScaler  # noqa: E402
from same_run import assert_same_run, bitwise, mlp, multilabel_data, params_of  # noqa: E402

pytestmark = pytest.mark.integration

EPOCHS, BATCH, ACCUM, MAX_NORM = 4, 8, 2, 0.5
LR, WEIGHT_DECAY = 3e-3, 0.1


def forget_accelerator():
    """Accelerate keeps its state in process-wide singletons: each Accelerator starts from none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def no_accelerator_left():
    yield
    forget_accelerator()


def make_accelerator(mixed_precision, scaler=None):
    forget_accelerator()
    acc = accelerate.Accelerator(cpu=True, mixed_precision=mixed_precision, gradient_accumulation_steps=ACCUM)
    if scaler is not None:
        fp16_on_cpu(acc, scaler)
    return acc


def fp16_on_cpu(acc, scaler):
    """Accelerator.__init__'s branch for mixed_precision="fp16" on a GPU, on CPU: fp16 autocast
    (native_amp, read by prepare) and a GradScaler (handed to AcceleratedOptimizer by prepare)."""
    assert acc.state.mixed_precision == "fp16"
    assert acc.scaler is None and not acc.native_amp, \
        f"this Accelerate runs fp16 on CPU itself (scaler {acc.scaler}): use its scaler instead of fp16_on_cpu"
    acc.native_amp, acc.scaler = True, scaler


class Loop:
    """A prepared (accelerator, model, optimizer, dataloader, scheduler) and the loop of
    Accelerate's documentation over it; same seed, same init, same batches for every optimizer."""

    def __init__(self, optimizer, mixed_precision, scaler=None, clip=True):
        self.acc, self.clip = make_accelerator(mixed_precision, scaler), clip
        model = mlp()
        opt = optimizer(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        x, y = multilabel_data(n=64)
        self.shuffle = torch.Generator()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                                             generator=self.shuffle)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=EPOCHS * len(loader) // ACCUM)
        self.model, self.opt, self.loader, self.sched = self.acc.prepare(model, opt, loader, sched)

    def train(self, criterion, epochs):
        """(losses, clip norms) of `epochs` (a range of epoch numbers)."""
        acc, model, opt, sched = self.acc, self.model, self.opt, self.sched
        losses, norms = [], []
        model.train()
        for epoch in epochs:
            self.shuffle.manual_seed(epoch)  # the order of an epoch, whether or not the run was resumed
            for x, y in self.loader:
                with acc.accumulate(model):
                    loss = criterion(model(x), y)
                    acc.backward(loss)
                    if acc.sync_gradients and self.clip:
                        norms.append(float(acc.clip_grad_norm_(model.parameters(), MAX_NORM)))
                    opt.step()
                    sched.step()
                    opt.zero_grad()
                losses.append(loss.item())
        return losses, norms

    def params(self):
        return params_of(self.acc.unwrap_model(self.model))


def run(optimizer, criterion, mixed_precision, scaler=None):
    """(losses, params, clip norms) of EPOCHS epochs."""
    loop = Loop(optimizer, mixed_precision, scaler)
    losses, norms = loop.train(criterion, range(EPOCHS))
    return losses, loop.params(), norms


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_fused_adamw_matches_adamw(mixed_precision):
    """FusedAdamW in the prepared loop (clipping active, 2-step accumulation, OneCycleLR) trains
    as torch.optim.AdamW; RUN_ATOL/RUN_RTOL (same_run.py)."""
    crit = torch.nn.BCEWithLogitsLoss()
    *ours, our_norms = run(FusedAdamW, crit, mixed_precision)
    *theirs, their_norms = run(torch.optim.AdamW, crit, mixed_precision)
    assert max(their_norms) > MAX_NORM, "the clip never clipped: the test would not see a clipping bug"
    assert_same_run(ours, theirs, what=f"FusedAdamW under Accelerate ({mixed_precision})")


def test_fused_stack_matches_torch_stack():
    """FusedBCEWithLogits + FusedAdamW against torch.nn.BCEWithLogitsLoss + torch.optim.AdamW, bf16
    autocast (Accelerate's: the forward in bf16, its outputs handed back in fp32, so the loss
    sees fp32 logits of bf16 values); RUN_ATOL/RUN_RTOL."""
    ours = run(FusedAdamW, FusedBCEWithLogits(), "bf16")[:2]
    theirs = run(torch.optim.AdamW, torch.nn.BCEWithLogitsLoss(), "bf16")[:2]
    assert_same_run(ours, theirs, what="fused stack under Accelerate (bf16)")


def test_save_state_load_state(tmp_path):
    """accelerator.save_state after 2 epochs; a fresh accelerator, model, FusedAdamW and
    scheduler load_state it and train 2 more: bit-identical to 4 epochs without the stop."""
    crit = torch.nn.BCEWithLogitsLoss()
    loop = Loop(FusedAdamW, "bf16")
    first, _ = loop.train(crit, range(2))
    loop.acc.save_state(str(tmp_path))
    rest, _ = loop.train(crit, range(2, EPOCHS))
    whole = (rest, loop.params())

    loop = Loop(FusedAdamW, "bf16")
    loop.acc.load_state(str(tmp_path))
    assert len(loop.opt.state_dict()["state"]) == len(list(loop.model.parameters()))
    resumed, _ = loop.train(crit, range(2, EPOCHS))
    bitwise(whole, (resumed, loop.params()), what="Accelerate save_state/load_state")


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "no-clip"])
@pytest.mark.parametrize("scaler", ["torch", "fusedtrain"])
def test_fp16_grad_scaler(scaler, clip):
    """Accelerate's fp16 path (fp16_on_cpu) with torch's or fusedtrain's GradScaler, its scale
    high enough that 3 of the 16 steps overflow in fp16 (the first, and two after the scale grew
    back): FusedAdamW trains as torch.optim.AdamW(fused=True) does (bit-identical here; checked
    to RUN_ATOL/RUN_RTOL), skips the same steps and counts only the others in its `step`. With
    clip_grad_norm_ the step gets unscaled gradients and found_inf; without, the scale itself
    (torch's grad_scale, fusedtrain's grad_mult), and unscales as it reads.

    Not against torch.optim.AdamW's default (for-each) implementation: the scaler does not call its
    step on an overflow, so Accelerate sees a skipped step and holds the scheduler back, while
    FusedAdamW -- like every optimizer that unscales in its step, torch's fused AdamW too -- is
    called and skips on the device, and the scheduler advances (Accelerate cannot see a skip that
    happens on the device without a sync): 3 scheduler steps more here."""
    def fp16_loop(optimizer):
        cls = torch.amp.GradScaler if scaler == "torch" else GradScaler
        return Loop(optimizer, "fp16", cls("cpu", init_scale=2.0**20, growth_interval=4), clip)

    crit = torch.nn.BCEWithLogitsLoss()
    runs = []
    for optimizer in (FusedAdamW, functools.partial(torch.optim.AdamW, fused=True)):
        loop = fp16_loop(optimizer)
        losses, norms = loop.train(crit, range(EPOCHS))
        steps = {float(st["step"]) for st in loop.opt.state_dict()["state"].values()}
        if clip:  # a norm per step: inf/NaN where it overflowed
            assert steps == {float(sum(map(math.isfinite, norms)))}, f"optimizer steps {steps}, norms {norms}"
        runs.append(((losses, loop.params()), steps, loop.acc.scaler.state_dict()))
    (ours, our_steps, our_amp), (theirs, their_steps, their_amp) = runs
    steps_per_run = EPOCHS * len(loop.loader) // ACCUM
    assert len(their_steps) == 1 and steps_per_run // 2 < min(their_steps) < steps_per_run, \
        f"torch's fused AdamW took {their_steps} of {steps_per_run} steps: the skip is not tested"
    assert our_steps == their_steps and our_amp == their_amp
    assert_same_run(ours, theirs, what=f"FusedAdamW under Accelerate fp16 with {scaler}'s GradScaler")
