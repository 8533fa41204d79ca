"""The many-label head (FusedLinearBCEWithLogits / linear_binary_cross_entropy_with_logits) on
every backend against torch's composition F.linear + F.binary_cross_entropy_with_logits in
float64: loss and the three gradients, dense and sparse targets, unknown masks, pos/label
weights, chunks that do and do not divide L and B, L = 1, B = 1, an empty batch, autocast,
GradScaler's loss scale, torch.compile, and the peak memory beyond the gradients."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedtrain
from fusedtrain.functional import linear_binary_cross_entropy_with_logits as head_loss
from fusedtrain.ops import head as head_ops
from helpers import DT_IDS, ROOT, normal_only, seed_for

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# per-tensor tolerance relative to the tensor's largest value: fp32 math everywhere, inputs and
# the logits' gradient rounded to the storage dtype once
TOL = {torch.float32: 2e-5, torch.bfloat16: 2.5e-2, torch.float16: 4e-3, torch.float64: 1e-10}


def truth(h, w, b, y, pw=None, lw=None, unknown=None, reduction="mean", scale=1.0):
    """torch's composition in float64 on the same (rounded) inputs: loss and grads of h, w, b."""
    hh, ww = h.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    bb = None if b is None else b.detach().double().cpu().requires_grad_()
    yd = y.double().cpu()
    z = F.linear(hh, ww, bb)
    per = F.binary_cross_entropy_with_logits(z, yd, weight=None if lw is None else lw.double().cpu(),
                                             pos_weight=None if pw is None else pw.double().cpu(), reduction="none")
    if unknown is not None:
        per = per.masked_fill(unknown.cpu(), 0.0)
    loss = per.sum()
    if reduction == "mean":
        loss = loss / (per.numel() if unknown is None else max(1, int((~unknown).sum())))
    (loss * scale).backward()
    return loss.detach(), hh.grad, ww.grad, None if bb is None else bb.grad


def run(h, w, b, target, scale=1.0, **kw):
    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    bb = None if b is None else b.detach().clone().requires_grad_()
    loss = head_loss(hh, ww, bb, target, **kw)
    (loss * scale).backward()
    return loss.detach(), hh.grad, ww.grad, None if bb is None else bb.grad


def assert_near(actual, expected, tol, what):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{what}: NaN"
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= tol * scale + 1e-30, f"{what}: max abs err {err:.3e} > {tol:g} x max |truth| {scale:.3e}"


def assert_all(got, want, dtype, what=""):
    for name, a, e in zip(("loss", "grad_h", "grad_weight", "grad_bias"), got, want):
        if e is None:
            assert a is None, f"{what}{name}: expected no gradient"
            continue
        assert a.dtype == (torch.float32 if name == "loss" and dtype != torch.float64 and a.dtype == torch.float32
                           else a.dtype)
        assert_near(a, e, TOL[dtype], f"{what}{name}")


def make(B, H, L, dtype, device, seed, p_pos=0.1):
    seed_for("head", B, H, L, dtype, seed)
    h = torch.randn(B, H, device=device).to(dtype)
    w = (torch.randn(L, H, device=device) / math.sqrt(H) * 3).to(dtype)
    b = torch.randn(L, device=device).to(dtype)
    y = (torch.rand(B, L, device=device) < p_pos).to(dtype)
    return h, w, b, y


@pytest.fixture
def poisoned(monkeypatch):
    """grad_weight and grad_bias start as NaN: every element must be written."""
    monkeypatch.setattr(head_ops, "_new_uninitialized",
                        lambda *shape, **kw: torch.full(*shape, float("nan"), **kw))


CASES = [  # B, H, L, chunk_size, row budget (elements per chunk; None: the default)
    pytest.param(37, 24, 50, None, None, id="one-chunk"),
    pytest.param(37, 24, 50, 7, None, id="labels-7"),
    pytest.param(150, 24, 50, 16, 1024, id="rows-and-labels"),  # 64-row chunks (chunk_shape's minimum)
    pytest.param(1, 8, 1, None, None, id="B1-L1"),
    pytest.param(5, 33, 300, 64, None, id="L300-chunk64"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("B,H,L,chunk,budget", CASES)
@pytest.mark.parametrize("weights", ["plain", "pos+label+unknown", "no-bias"])
def test_matches_torch_float64(backend_device, poisoned, monkeypatch, dtype, B, H, L, chunk, budget, weights):
    _, device = backend_device
    if budget is not None:
        monkeypatch.setattr(head_ops, "CHUNK_ELEMENTS", budget)
    h, w, b, y = make(B, H, L, dtype, device, weights)
    kw = {}
    unknown = pw = lw = None
    if weights == "pos+label+unknown":
        pw = torch.rand(L, device=device) * 3 + 0.2
        lw = torch.rand(L, device=device) + 0.5
        unknown = torch.rand(B, L, device=device) < 0.2
        kw = dict(pos_weight=pw, label_weight=lw, unknown_mask=unknown)
    if weights == "no-bias":
        b = None
    for reduction in ("mean", "sum"):
        got = run(h, w, b, y, reduction=reduction, chunk_size=chunk, **kw)
        assert got[0].dtype == dtype
        assert_all(got, truth(h, w, b, y, pw, lw, unknown, reduction), dtype, f"{reduction}: ")


def test_empty_batch(backend_device):
    _, device = backend_device
    h, w, b, y = make(0, 8, 10, torch.float32, device, 0)
    loss, gh, gw, gb = run(h, w, b, y, reduction="sum")
    assert loss.item() == 0 and gh.shape == (0, 8) and torch.equal(gw, torch.zeros_like(gw)) and not gb.any()
    mean = head_loss(h, w, b, y)
    assert math.isnan(mean.item())  # torch's mean of nothing


@pytest.mark.parametrize("form", ["csr", "pair", "csr-soft"])
def test_sparse_targets_equal_dense(backend_device, poisoned, monkeypatch, form):
    _, device = backend_device
    monkeypatch.setattr(head_ops, "CHUNK_ELEMENTS", 64 * 24)  # 64-row and 24-label chunks
    B, H, L = 150, 16, 70
    h, w, b, y = make(B, H, L, torch.float32, device, form, p_pos=0.05)
    if form == "csr-soft":
        y = y * torch.rand(B, L, device=device)
    csr = y.to_sparse_csr()
    target = (csr.crow_indices(), csr.col_indices()) if form == "pair" else csr
    pw = torch.rand(L, device=device) + 0.5
    got = run(h, w, b, target, pos_weight=pw, chunk_size=24)
    dense = run(h, w, b, y, pos_weight=pw, chunk_size=24)
    for a, d in zip(got, dense):
        torch.testing.assert_close(a, d, rtol=1e-6, atol=1e-7)
    assert_all(got, truth(h, w, b, y, pw), torch.float32)


def test_all_unknown_mean_is_zero(backend_device):
    _, device = backend_device
    h, w, b, y = make(6, 8, 12, torch.float32, device, 0)
    loss, gh, gw, gb = run(h, w, b, y, unknown_mask=torch.ones(6, 12, dtype=torch.bool, device=device))
    assert loss.item() == 0 and not gh.any() and not gw.any() and not gb.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT_IDS.get)
def test_grad_scale_applied_before_rounding(backend_device, dtype):
    """A loss scale of 2^16 on a mean over many elements: each gradient is the fp32 sum times
    (scale / N), rounded once to the param's dtype (fp32 here), so the unscaled gradient matches
    the float64 truth to fp32-and-bf16-logits accuracy, with nothing flushed to zero."""
    _, device = backend_device
    B, H, L = 64, 32, 512
    h, w, b, y = make(B, H, L, torch.float32, device, 1)
    scale = 65536.0
    with torch.autocast(device, dtype=dtype):
        got = run(h, w, b, y, scale=scale)
    want = truth(h.to(dtype), w.to(dtype), b, y, scale=scale)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    for name, a, e in zip(("grad_h", "grad_weight", "grad_bias"), got[1:], want[1:]):
        assert (a != 0).float().mean() > 0.99, f"{name}: flushed to zero"
        assert_near(a, e, TOL[dtype], name)


@normal_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT_IDS.get)
def test_autocast_parity_with_torch_at_scale(backend_device, dtype):
    """At a realistic size under autocast, the head is at least as close to the float64 truth of
    the same computation as torch's own autocast composition."""
    backend, device = backend_device
    if dtype == torch.float16 and device == "cpu":
        B, H, L = 256, 128, 4096  # CPU fp16 matmuls are slow
    else:
        B, H, L = 512, 256, 8192
    h, w, b, y = make(B, H, L, torch.float32, device, 2, p_pos=0.01)
    with torch.autocast(device, dtype=dtype):
        ours = run(h, w, b, y)
        hh, ww, bb = (t.detach().clone().requires_grad_() for t in (h, w, b))
        loss = F.binary_cross_entropy_with_logits(F.linear(hh, ww, bb), y)
    loss.backward()
    theirs = (loss.detach(), hh.grad, ww.grad, bb.grad)
    want = truth(h.to(dtype), w.to(dtype), b, y)
    for name, a, t, e in zip(("loss", "grad_h", "grad_weight", "grad_bias"), ours, theirs, want):
        err_ours = (a.double().cpu() - e).abs().max().item()
        err_torch = (t.double().cpu() - e).abs().max().item()
        assert err_ours <= 1.5 * err_torch + 1e-6 * e.abs().max().item(), \
            f"{name}: ours {err_ours:.3e} vs torch's autocast {err_torch:.3e}"


def test_leading_dims_and_noncontiguous(backend_device):
    _, device = backend_device
    H, L = 16, 40
    h = torch.randn(3, H, 4, device=device).transpose(1, 2)  # (3, 4, H), non-contiguous
    w = torch.randn(H, L, device=device).T / 4  # non-contiguous weight
    b = torch.randn(L, device=device)
    y = (torch.rand(3, 4, L, device=device) < 0.2).float().transpose(0, 1).contiguous().transpose(0, 1)
    got = run(h, w, b, y, chunk_size=9)
    want = truth(h, w, b, y)
    assert got[1].shape == (3, 4, H)
    assert_all(got, want, torch.float32)


def test_accumulation_retain_graph_and_no_grad(backend_device):
    _, device = backend_device
    h, w, b, y = make(9, 12, 30, torch.float32, device, 3)
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    loss = head_loss(hh, ww, bb, y, chunk_size=8)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (hh, ww, bb)]
    loss.backward()  # a second backward through the same graph computes the gradients again
    for t, g in zip((hh, ww, bb), first):
        torch.testing.assert_close(t.grad, 2 * g, rtol=1e-6, atol=0)
    with torch.no_grad():
        assert head_loss(hh, ww, bb, y).item() == pytest.approx(loss.item(), rel=1e-6)
    # only what requires grad gets one
    hh2 = h.clone().requires_grad_()
    head_loss(hh2, w, b, y).backward()
    assert hh2.grad is not None


@normal_only
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    h, w, b, y = make(16, 8, 40, torch.float32, "cpu", 4)
    head = fusedtrain.FusedLinearBCEWithLogits(8, 40, chunk_size=16)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)

    def step(x, t):
        return head(torch.tanh(x), t) * 2  # the head inside a graph of other ops

    compiled = torch.compile(step, fullgraph=True)
    x1 = h.clone().requires_grad_()
    l1 = compiled(x1, y)
    l1.backward()  # through the compiled graph's backward
    g1 = [x1.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    head.zero_grad()
    x2 = h.clone().requires_grad_()
    l2 = step(x2, y)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    for a, e in zip(g1, [x2.grad, head.weight.grad, head.bias.grad]):
        torch.testing.assert_close(a, e)


def test_module_is_nn_linear():
    torch.manual_seed(5)
    lin = torch.nn.Linear(12, 30)
    torch.manual_seed(5)
    head = fusedtrain.FusedLinearBCEWithLogits(12, 30, pos_weight=torch.ones(30))
    assert torch.equal(lin.weight, head.weight) and torch.equal(lin.bias, head.bias)  # same init
    assert set(head.state_dict()) == {"weight", "bias"}
    trained = torch.nn.Linear(12, 30)
    head.load_state_dict(trained.state_dict())  # strict
    x, y = torch.randn(4, 12), (torch.rand(4, 30) < 0.3).float()
    ref = F.binary_cross_entropy_with_logits(trained(x), y)
    torch.testing.assert_close(head(x, y), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(head.logits(x), trained(x))
    assert fusedtrain.FusedLinearBCEWithLogits(3, 2, bias=False).bias is None


@pytest.mark.parametrize("call,err,match", [
    (lambda h, w, b, y: head_loss(h, w, b, y, reduction="none"), ValueError, "FusedBCEWithLogits"),
    (lambda h, w, b, y: head_loss(h, w, b, y, reduction="avg"), ValueError, "reduction"),
    (lambda h, w, b, y: head_loss(h[:, :3], w, b, y), ValueError, "h must have 8 features"),
    (lambda h, w, b, y: head_loss(h, w, b, y[:, :5]), ValueError, "target must have shape"),
    (lambda h, w, b, y: head_loss(h, w, b[:3], y), ValueError, "bias must have shape"),
    (lambda h, w, b, y: head_loss(h, w, b, y.long()), TypeError, "target must be a floating"),
    (lambda h, w, b, y: head_loss(h.double(), w, b, y), RuntimeError, "same dtype"),
    (lambda h, w, b, y: head_loss(h, w, b, y, pos_weight=torch.ones(3)), ValueError, r"pos_weight must have shape"),
    (lambda h, w, b, y: head_loss(h, w, b, y, unknown_mask=y), TypeError, "unknown_mask must be a bool"),
    (lambda h, w, b, y: head_loss(h, w, b, y, chunk_size=0), ValueError, "chunk_size"),
    (lambda h, w, b, y: head_loss(h, w, b, (torch.tensor([0, 1, 1, 1, 9]), torch.tensor([3]))), ValueError,
     "row offsets"),
    (lambda h, w, b, y: head_loss(h, w, b, (torch.tensor([0, 1, 1, 1, 1]), torch.tensor([20]))), ValueError,
     r"label indices must be in \[0, 10\)"),
    (lambda h, w, b, y: head_loss(h, w, b, y.to_sparse_coo()), TypeError, "sparse_csr"),
    (lambda h, w, b, y: head_loss(h, w, b, y.requires_grad_()), RuntimeError, "not differentiable"),
    (lambda h, w, b, y: head_loss(h, w, b, None), TypeError, "target must be a dense tensor"),
    (lambda h, w, b, y: head_loss(h, w, b, y.to(torch.complex64).to_sparse_csr()), TypeError, "real floating"),
    (lambda h, w, b, y: head_loss(h, w, b, y.to("meta")), RuntimeError, "target is on meta"),
])
def test_errors_name_the_argument(call, err, match):
    h, w, b, y = make(4, 8, 10, torch.float32, "cpu", 6)
    with pytest.raises(err, match=match):
        call(h, w, b, y)
    with pytest.raises(ValueError, match="FusedBCEWithLogits"):
        fusedtrain.FusedLinearBCEWithLogits(8, 10, reduction="none")


def test_chunk_shape():
    assert head_ops.chunk_shape(150, 50, chunk_size=16, budget=1024) == (64, 16)
    assert head_ops.chunk_shape(1024, 131072) == (1024, 4096)
    assert head_ops.chunk_shape(1 << 20, 1000) == (16384, 256)
    assert head_ops.chunk_shape(10, 5) == (10, 5)
    assert head_ops.chunk_shape(8, 100, chunk_size=7) == (8, 7)


@normal_only
def test_peak_memory_beyond_gradients_is_a_few_chunks(tmp_path):
    """A child process's peak RSS over fwd+bwd of a B x L = 512 x 32768 head (64 MiB of fp32
    logits, which torch's composition holds several times over; W is 32 MiB): beyond the inputs
    and the gradients it stays within a few chunks (the budget: 256K elements = 1 MiB), so
    neither a B x L nor a second W-sized buffer exists."""
    script = r'''
import json, sys, torch
import fusedtrain
from fusedtrain.ops import head as head_ops
head_ops.CHUNK_ELEMENTS = 1 << 18
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
torch.manual_seed(0)
B, H, L = 512, 256, 32768
h = torch.randn(B, H, requires_grad=True)
w = (torch.randn(L, H) / 16).requires_grad_()
b = torch.zeros(L, requires_grad=True)
y = (torch.rand(B, L) < 0.01).float()
fusedtrain.functional.linear_binary_cross_entropy_with_logits(h[:2], w[:300], b[:300], y[:2, :300]).backward()
h.grad = w.grad = b.grad = None
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
base = status("VmRSS:")
fusedtrain.functional.linear_binary_cross_entropy_with_logits(h, w, b, y).backward()
peak = status("VmHWM:")
grads = sum(t.grad.numel() * 4 for t in (h, w, b))
print(json.dumps({"base": base, "peak": peak, "grads": grads}))
'''
    # glibc returns every freed buffer of 64 KiB or more at once: the RSS follows live memory
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    beyond = r["peak"] - r["base"] - r["grads"]
    w_bytes = 32768 * 256 * 4
    assert beyond < w_bytes / 4, f"peak beyond the gradients {beyond / 2**20:.1f} MiB (W: {w_bytes / 2**20:.0f} MiB)"


def test_double_backward_is_refused_not_wrong():
    h, w, b, y = make(4, 8, 10, torch.float32, "cpu", 7)
    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    loss = head_loss(hh, ww, b, y)
    with pytest.raises(NotImplementedError, match="create_graph"):
        torch.autograd.grad(loss, hh, create_graph=True)


def test_csr_duplicates_add_up_as_to_dense(backend_device):
    _, device = backend_device
    h, w, b, _ = make(3, 8, 10, torch.float32, device, 8)
    crow = torch.tensor([0, 2, 3, 3], device=device)
    col = torch.tensor([2, 2, 7], device=device)
    vals = torch.tensor([0.3, 0.4, 1.0], device=device)
    csr = torch.sparse_csr_tensor(crow, col, vals, (3, 10))
    got = run(h, w, b, csr)
    assert_all(got, truth(h, w, b, csr.to_dense()), torch.float32)
    pair = run(h, w, b, (crow, col))  # positives: a repeated label is one positive
    dense = torch.zeros(3, 10, device=device)
    dense[0, 2] = dense[1, 7] = 1.0
    assert_all(pair, truth(h, w, b, dense), torch.float32)


def test_zero_features_and_zero_labels(backend_device):
    _, device = backend_device
    h, w, b, y = make(4, 0, 6, torch.float32, device, 9)
    assert_all(run(h, w, b, y), truth(h, w, b, y), torch.float32)
    h, w, b, y = make(4, 5, 0, torch.float32, device, 9)
    loss, gh, gw, gb = run(h, w, b, y, reduction="sum")
    assert loss.item() == 0 and not gh.any() and gw.shape == (0, 5)


def test_module_reset_parameters_and_meta_init():
    head = fusedtrain.FusedLinearBCEWithLogits(12, 30, device="meta")
    assert head.weight.is_meta
    head = head.to_empty(device="cpu")
    head.reset_parameters()
    assert head.weight.abs().max() <= 1 / math.sqrt(12) and head.bias.abs().max() <= 1 / math.sqrt(12)


def test_big_chunk_size_keeps_rows_together():
    assert head_ops.chunk_shape(1024, 10_000_000, chunk_size=5_000_000) == (64, 5_000_000)
