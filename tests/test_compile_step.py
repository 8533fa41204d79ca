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


def _twins(seed, **kw):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    out = []
    for _ in range(2):
        ps = [t.clone().requires_grad_() for t in init]
        out.append((ps, FusedAdamW(ps, lr=1e-2, weight_decay=0.05, **kw)))
    return out


def _set_grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale


def _graph_breaks(fn):
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an untraceable call is a warning from Dynamo
        explanation = torch._dynamo.explain(fn)()
    return explanation.graph_break_count, explanation.break_reasons


@pytest.mark.parametrize("amsgrad", [False, True])
def test_compiled_step_no_graph_breaks_same_bits(amsgrad):
    (ps, opt), (ref_ps, ref_opt) = _twins(3, amsgrad=amsgrad)
    _set_grads(ps, 0)
    _set_grads(ref_ps, 0)
    ref_opt.step()
    count, reasons = _graph_breaks(opt.step)  # the first step, traced (states created eagerly)
    assert count == 0, reasons
    step = torch.compile(opt.step)
    for t in range(1, 4):
        _set_grads(ps, t)
        _set_grads(ref_ps, t)
        step()
        ref_opt.step()
    for a, b in zip(ps, ref_ps):
        assert torch.equal(a, b)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][k], ref_opt.state[b][k]), k
    assert opt.state[ps[0]]["step"].item() == 4.0


def test_compiled_clipped_scaler_step_no_graph_breaks_same_bits():
    (ps, opt), (ref_ps, ref_opt) = _twins(5)
    scaler, ref_scaler = GradScaler("cpu", init_scale=1024.0), GradScaler("cpu", init_scale=1024.0)

    def step(s, o):
        total = s.step(o, max_norm=0.5)
        s.update()
        return total

    for t in range(3):
        for s in (scaler, ref_scaler):
            s.scale(torch.ones(()))  # as a loss is scaled
        _set_grads(ps, t, 1024.0)
        _set_grads(ref_ps, t, 1024.0)
        if t == 0:
            count, reasons = _graph_breaks(lambda: scaler.step(opt, max_norm=0.5))
            assert count == 0, reasons
            scaler.update()
            norm = None
        else:
            norm = torch.compile(step)(scaler, opt)
        ref_norm = step(ref_scaler, ref_opt)
        if norm is not None:
            assert torch.equal(norm, ref_norm)
    assert scaler.get_scale() == ref_scaler.get_scale()
    for a, b in zip(ps, ref_ps):
        assert torch.equal(a, b)
