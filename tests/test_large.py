"""One huge tensor per op family at training scale (docs/design.md §6, "One huge tensor";
int64 offsets): Adam here (the unscale case is test_unscale.py::test_one_huge_tensor).
2^24 + 3 elements: past the integers fp32 holds exactly, and not a multiple of any block or
chunk."""
import torch

import fusedtrain
from fusedtrain._compare import ulp_at_one
from helpers import INTERPRET, assert_close, seed_for


def test_adam_one_huge_param(backend_device):
    """One FusedAdamW step on a single 2^24 + 3 element fp32 param: every element written,
    and against torch.optim.AdamW in float64 (Adam is elementwise, so torch runs on a sample:
    the head, everything past 2^24 - 2^15, and random elements), the param to half an fp32 ulp
    plus a few ulps of the terms the update adds up, both moments to a few ulps."""
    _, device = backend_device
    n = (1 << 20) + 3 if INTERPRET else (1 << 24) + 3
    seed = seed_for("adam huge", n)
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g)
    lr, wd = 1e-2, 0.1
    p = p0.to(device, copy=True).requires_grad_()
    p.grad = grad.to(device, copy=True)
    opt = fusedtrain.FusedAdamW([p], lr=lr, weight_decay=wd)
    opt.step()
    st = opt.state[p]
    what = f"seed {seed}"
    assert float(st["step"]) == 1.0, what
    # every element moved (the update is ~lr, thousands of ulps): none skipped past 2^24
    moved = p.detach().cpu() != p0
    assert bool(moved.all()), (f"{int((~moved).sum())} elements unchanged, first "
                               f"{torch.nonzero(~moved)[:3].tolist()} ({what})")

    idx = torch.cat([torch.arange(1 << 16), torch.arange(n - (1 << 15) - 3, n),
                     torch.randint(n, (1 << 16,), generator=g)])
    q = p0[idx].double().requires_grad_()
    q.grad = grad[idx].double()
    ref = torch.optim.AdamW([q], lr=lr, weight_decay=wd, foreach=False)
    ref.step()
    rst = ref.state[q]
    eps32 = ulp_at_one(torch.float32)
    # fp32 math: (1 - beta1) and (1 - beta2) are themselves rounded to fp32, then one rounding
    # of each product; the param's update adds terms of size |p| and ~lr
    assert_close(st["exp_avg"].cpu()[idx], rst["exp_avg"], rtol=2 * eps32, atol=0, what=f"exp_avg ({what})")
    assert_close(st["exp_avg_sq"].cpu()[idx], rst["exp_avg_sq"], rtol=4 * eps32, atol=0, what=f"exp_avg_sq ({what})")
    scale = p0[idx].double().abs() + lr
    assert_close(p.detach().cpu()[idx], q.detach(), rtol=0.5 * eps32, atol=8 * eps32 * scale, what=f"param ({what})")
