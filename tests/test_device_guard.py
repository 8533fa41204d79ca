"""Triton launches on the tensors' device and its current stream, not the current device's:
with every tensor on cuda:1 and cuda:0 current, each Triton op gives the native op's results
(needs two GPUs); and every op, on either backend, runs on the current stream of its tensors'
device, after what that stream did before it (one GPU; on two, with another device current)."""
import pytest
import torch

import fusedtrain
from fusedtrain import FusedAdamW
from fusedtrain.functional import asymmetric_loss, linear_binary_cross_entropy_with_logits, sigmoid_focal_loss


def _backends_ok():
    return torch.cuda.is_available() and all(fusedtrain.backends("cuda")[b][0] for b in ("triton", "native"))


pytestmark = pytest.mark.gpu
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2 or not _backends_ok(),
                              reason="needs two GPUs and both CUDA backends")
ONE_GPU = pytest.mark.skipif(not _backends_ok(), reason="needs a GPU and both CUDA backends")


def _twice(fn):
    """fn() under the triton and the native backend, cuda:0 current, tensors on cuda:1."""
    out = []
    for backend in ("triton", "native"):
        with torch.cuda.device(0), fusedtrain.use_backend(backend):
            out.append(fn())
        torch.cuda.synchronize(1)
    return out


@TWO_GPUS
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


@TWO_GPUS
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


@TWO_GPUS
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


@TWO_GPUS
def test_loss_family_on_cuda1():
    g = torch.Generator(device="cuda:1").manual_seed(1)
    x = torch.randn(300, 70, device="cuda:1", generator=g, requires_grad=True)
    y = (torch.rand(300, 70, device="cuda:1", generator=g) < 0.3).float()
    y_unknown = y.clone()
    y_unknown[::7, ::5] = -1.0
    options = dict(weight=torch.rand(300, 70, device="cuda:1", generator=g), ignore_index=-1.0, label_smoothing=0.1)
    cases = [(sigmoid_focal_loss, y, {}), (asymmetric_loss, y, {}),
             (sigmoid_focal_loss, y_unknown, dict(options, reduction="mean")),
             (asymmetric_loss, y_unknown, dict(options, reduction="none"))]

    def run():
        out = []
        for fn, target, kw in cases:
            x.grad = None
            loss = fn(x, target, **kw)
            (loss.sum() * 1024.0).backward()
            out += [loss.detach().clone(), x.grad.clone()]
        return out

    triton_out, native_out = _twice(run)
    for a, b in zip(triton_out, native_out):  # fp32 evaluations of one formula (tests/test_multilabel_loss.py)
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-6)


@TWO_GPUS
def test_head_on_cuda1():
    g = torch.Generator(device="cuda:1").manual_seed(2)
    B, H, L = 70, 64, 300
    h = torch.randn(B, H, device="cuda:1", generator=g)
    w = torch.randn(L, H, device="cuda:1", generator=g) * 0.1
    b = torch.randn(L, device="cuda:1", generator=g)
    y = (torch.rand(B, L, device="cuda:1", generator=g) < 0.05).float()
    options = dict(pos_weight=torch.rand(L, device="cuda:1", generator=g) + 0.5,
                   label_weight=torch.rand(L, device="cuda:1", generator=g),
                   unknown_mask=torch.rand(B, L, device="cuda:1", generator=g) < 0.1)

    def run():
        out = []
        for kw in ({}, options):
            hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
            loss = linear_binary_cross_entropy_with_logits(hh, ww, bb, y, chunk_size=128, **kw)
            loss.backward()
            out += [loss.detach(), hh.grad, ww.grad, bb.grad]
        return out

    triton_out, native_out = _twice(run)
    for a, b_ in zip(triton_out, native_out):  # fp32 matmuls summed in other orders
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-8)


# ---- the current stream of the tensors' device ----------------------------------------------

SLEEP_CYCLES = 1 << 30  # about half a second of one GPU thread spinning: longer than launching every op


def _every_op(t):
    """BCE, focal loss, ASL, unscale, an Adam step and the head on the tensors of dict t;
    their results (cloned)."""
    out = []
    x = t["x"].clone().requires_grad_()
    for fn, kw in ((fusedtrain.functional.binary_cross_entropy_with_logits, {"pos_weight": t["pw"]}),
                   (sigmoid_focal_loss, {"reduction": "mean"}), (asymmetric_loss, {})):
        x.grad = None
        loss = fn(x, t["y"], **kw)
        loss.backward()
        out += [loss.detach().clone(), x.grad.clone()]
    grads = [t["g1"].clone(), t["g2"].clone()]  # unscaled in place; t stays as it was
    found = torch.zeros((), device=x.device)
    norm = fusedtrain.unscale_and_check_(grads, torch.full((), 0.5, device=x.device), found, compute_norm=True)
    out += [g.clone() for g in grads] + [found.clone(), norm.clone()]
    ps = [t["p1"].clone().requires_grad_(), t["p2"].clone().requires_grad_()]
    opt = FusedAdamW(ps, lr=1e-2)
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()
    out += [p.detach().clone() for p in ps]
    hh = t["h"].clone().requires_grad_()
    loss = linear_binary_cross_entropy_with_logits(hh, t["w"], None, t["yh"], chunk_size=128)
    loss.backward()
    out += [loss.detach().clone(), hh.grad.clone()]
    return out


def _inputs(dev):
    g = torch.Generator(device=dev).manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, device=dev, generator=g)

    return dict(x=r(200, 70), y=(r(200, 70) > 0.5).float(), pw=r(70).abs() + 0.5, g1=r(4099), g2=r(33, 65),
                p1=r(4099), p2=r(33, 65), h=r(64, 48), w=r(300, 48) * 0.1, yh=(r(64, 300) > 1.5).float())


def _check_current_stream(backend, index, current):
    """Every op with tensors on cuda:index whose inputs are written on a side stream (current on
    cuda:index, while cuda:current is the current device) after that stream spun for a while:
    an op launched on any other stream reads its inputs before they are written (zeros) and
    gives other results than the same ops run eagerly."""
    dev = torch.device("cuda", index)
    src = _inputs(dev)
    with torch.cuda.device(dev), fusedtrain.use_backend(backend):
        expected = _every_op(src)  # also compiles every kernel: the timed run below only launches
    torch.cuda.synchronize(dev)
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    torch.cuda.synchronize(dev)
    side = torch.cuda.Stream(dev)
    with fusedtrain.use_backend(backend), torch.cuda.device(dev), torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)  # on side, now cuda:index's current stream
        for k, v in dst.items():
            v.copy_(src[k])
        with torch.cuda.device(current):  # side stays cuda:index's current stream
            got = _every_op(dst)
    torch.cuda.synchronize(dev)
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=lambda m, i=i: f"{backend} result {i}: {m}")


@ONE_GPU
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_every_op_runs_on_the_current_stream(backend):
    _check_current_stream(backend, 0, 0)


@TWO_GPUS
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_every_op_runs_on_the_current_stream_of_cuda1_with_cuda0_current(backend):
    _check_current_stream(backend, 1, 0)
