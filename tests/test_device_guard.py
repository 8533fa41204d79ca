"""Triton launches on the tensors' device, not the current one: with every tensor on cuda:1
and cuda:0 current, each Triton op gives the native op's results (needs two GPUs)."""
import pytest
import torch

import fusedtrain
from fusedtrain import FusedAdamW

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2 or not fusedtrain.backends("cuda")["triton"][0]
                                or not fusedtrain.backends("cuda")["native"][0],
                                reason="needs two GPUs and both CUDA backends")]


def _twice(fn):
    """fn() under the triton and the native backend, cuda:0 current, tensors on cuda:1."""
    out = []
    for backend in ("triton", "native"):
        with torch.cuda.device(0), fusedtrain.use_backend(backend):
            out.append(fn())
        torch.cuda.synchronize(1)
    return out


def test_bce_on_cuda1():
    g = torch.Generator(device="cuda:1").manual_seed(0)
    x = torch.randn(300, 70, device="cuda:1", generator=g, requires_grad=True)
    y = torch.rand(300, 70, device="cuda:1", generator=g)
    pw = torch.rand(70, device="cuda:1", generator=g) + 0.5

    def run():
        x.grad = None
        loss = fusedtrain.functional.binary_cross_entropy_with_logits(x, y, pos_weight=pw)
        loss.backward()
        return loss.detach().clone(), x.grad.clone()

    (lt, gt), (ln, gn) = _twice(run)
    torch.testing.assert_close(lt, ln, rtol=1e-5, atol=0)
    torch.testing.assert_close(gt, gn, rtol=1e-5, atol=1e-12)


def test_unscale_on_cuda1():
    def run():
        ts = [torch.full((n,), 3.0, device="cuda:1") for n in (5, 4097, 70000)]
        ts[1][7] = float("inf")
        found = torch.zeros((), device="cuda:1")
        norm = fusedtrain.unscale_and_check_(ts, torch.full((), 0.5, device="cuda:1"), found, compute_norm=True)
        return [t.clone() for t in ts], found.clone(), norm.clone()

    (tt, ft, nt), (tn, fn, nn) = _twice(run)
    assert all(torch.equal(a, b) for a, b in zip(tt, tn)) and torch.equal(ft, fn) and ft.item() == 1.0
    assert torch.equal(nt.isfinite(), nn.isfinite())


def test_adam_on_cuda1():
    init = [torch.randn(s, device="cuda:1") for s in [(33, 7), (4096,), (1,)]]

    def run():
        ps = [t.clone().requires_grad_() for t in init]
        opt = FusedAdamW(ps, lr=1e-2)
        for k in range(3):
            for p in ps:
                p.grad = torch.full_like(p, 0.1 * (k + 1))
            opt.step()
        return [p.detach().clone() for p in ps]

    triton_ps, native_ps = _twice(run)
    for a, b in zip(triton_ps, native_ps):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
