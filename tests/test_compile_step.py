"""torch.compile of the optimizer step and of the one-read clipped step: Dynamo traces
through fusedtrain's host code without graph breaks or untraceable calls, and the compiled
steps give the eager steps' bits (as torch.optim.AdamW(foreach=True) does)."""
import warnings

import pytest
import torch

import fusedtrain
from fusedtrain import FusedAdamW, GradScaler
from helpers import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET or fusedtrain._ext._C is None,
                                reason="the native backend in a normal test process")

SHAPES = [(8, 5), (7,), (3, 4, 2)]


def _twins(seed, dtype=torch.float32, **kw):
    """Two identical optimizers over identical params: two groups (the second with a tensor lr
    and maximize), so that the traced step covers several calls and their flags."""
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    out = []
    for _ in range(2):
        ps = [t.clone().requires_grad_() for t in init]
        groups = [{"params": ps[:2]}, {"params": ps[2:], "lr": torch.tensor(3e-3), "maximize": True}]
        out.append((ps, FusedAdamW(groups, lr=1e-2, weight_decay=0.05, **kw)))
    return out


def _set_grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)


def _graph_breaks(fn):
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an untraceable call is a warning from Dynamo
        explanation = torch._dynamo.explain(fn)()
    return explanation.graph_break_count, explanation.break_reasons


@pytest.mark.parametrize("amsgrad,dtype,master", [(False, torch.float32, False), (True, torch.float32, False),
                                                  (False, torch.bfloat16, True)], ids=["plain", "amsgrad", "bf16-master"])
def test_compiled_step_no_graph_breaks_same_bits(amsgrad, dtype, master):
    (ps, opt), (ref_ps, ref_opt) = _twins(3, dtype, amsgrad=amsgrad, master_weights=master)
    for t in range(2):  # eager steps first: the compiled step takes over existing states
        _set_grads(ps, t)
        _set_grads(ref_ps, t)
        opt.step()
        ref_opt.step()
    count, reasons = _graph_breaks(opt.step)
    assert count == 0, reasons
    _set_grads(ref_ps, 1)  # explain() ran one step on the grads of step 1
    ref_opt.step()
    torch._dynamo.reset()
    # fullgraph: a graph break anywhere in the step, even before its first op, is an error
    step = torch.compile(opt.step, fullgraph=True)
    for t in range(2, 6):
        _set_grads(ps, t)
        _set_grads(ref_ps, t)
        found_inf = torch.tensor(1.0 if t == 4 else 0.0)  # step 4 is skipped on the device
        opt.found_inf = ref_opt.found_inf = found_inf
        step()
        ref_opt.step()
    for a, b in zip(ps, ref_ps):
        assert torch.equal(a, b)
        for k in ("exp_avg", "exp_avg_sq", "step") + (("master_param",) if master else ()):
            assert torch.equal(opt.state[a][k], ref_opt.state[b][k]), k
    assert opt.state[ps[0]]["step"].item() == 6.0


def test_compiled_clipped_scaler_step_no_graph_breaks_same_bits():
    (ps, opt), (ref_ps, ref_opt) = _twins(5)
    scaler, ref_scaler = GradScaler("cpu", init_scale=1024.0), GradScaler("cpu", init_scale=1024.0)

    def step(s, o):
        return s.step(o, max_norm=0.5)

    compiled = torch.compile(step, fullgraph=True)  # a graph break anywhere is an error
    for t in range(4):
        for s in (scaler, ref_scaler):
            s.scale(torch.ones(()))  # as a loss is scaled
        _set_grads(ps, t, 1024.0)
        _set_grads(ref_ps, t, 1024.0)
        if t == 2:  # an inf: the step is skipped and the scale backs off
            ps[0].grad.view(-1)[3] = ref_ps[0].grad.view(-1)[3] = float("inf")
        if t == 0:
            count, reasons = _graph_breaks(lambda: scaler.step(opt, max_norm=0.5))
            assert count == 0, reasons
            norm = None
        else:
            norm = compiled(scaler, opt)
        ref_norm = step(ref_scaler, ref_opt)
        scaler.update()
        ref_scaler.update()
        if norm is not None:
            assert torch.equal(norm, ref_norm)
    assert scaler.get_scale() == ref_scaler.get_scale()
    for a, b in zip(ps, ref_ps):
        assert torch.equal(a, b)
