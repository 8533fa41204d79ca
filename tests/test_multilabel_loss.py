"""The multi-label loss family on the BCE kernels: sigmoid focal loss, asymmetric loss, label
smoothing and ignore_index, on every backend, against float64 oracles that are not ours:
torchvision's sigmoid_focal_loss (its formula written out in plain torch where torchvision is
absent), the ASL paper's reference formula, torch's BCE on explicitly smoothed/masked targets."""
import pytest
import torch
import torch.nn.functional as F

import fusedtrain
from fusedtrain.functional import asymmetric_loss, binary_cross_entropy_with_logits, sigmoid_focal_loss
from helpers import (COMPUTE_EPS, DT_IDS, INTERPRET, REDUCTIONS, assert_close, assert_ulps, bce_grad_slack,
                     bce_loss_tolerance, seed_for, torch_bce_float64)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- oracles (float64, plain torch, not fusedtrain's formulas) ------------------------------

def focal_oracle(x, y, alpha, gamma, reduction):
    try:
        from torchvision.ops import sigmoid_focal_loss as tv
    except ImportError:
        tv = None
    if tv is not None:
        return tv(x, y, alpha=alpha, gamma=gamma, reduction=reduction)
    p = torch.sigmoid(x)  # torchvision's code, written out
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def asl_oracle(x, y, gamma_neg, gamma_pos, clip, reduction, eps=1e-8):
    """The reference implementation of Ridnik et al. (AsymmetricLoss.forward), per element, with
    its focusing weight differentiated (disable_torch_grad_focal_loss=False)."""
    xs_pos = torch.sigmoid(x)
    xs_neg = 1 - xs_pos
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    los_pos = y * torch.log(xs_pos.clamp(min=eps))
    los_neg = (1 - y) * torch.log(xs_neg.clamp(min=eps))
    loss = los_pos + los_neg
    pt = xs_pos * y + xs_neg * (1 - y)
    loss = loss * torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    loss = -loss  # the reference returns -loss.sum(): our "sum"
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def _run(fn, x, y, reduction, go, **kw):
    xx = x.detach().clone().requires_grad_()
    yy = y.detach().clone().requires_grad_()
    loss = fn(xx, yy, reduction=reduction, **kw)
    loss.backward(go.to(loss.dtype).expand(loss.shape))
    return loss, xx.grad, yy.grad


def _truth(oracle, x, y, reduction, go, **kw):
    xd = x.detach().double().cpu().requires_grad_()
    yd = y.detach().double().cpu().requires_grad_()
    loss = oracle(xd, yd, reduction=reduction, **kw)
    loss.backward(go.double().expand(loss.shape))
    return loss.detach(), xd.grad, yd.grad


# Relative tolerance where the storage dtype's rounding does not dominate: fp32 results carry
# the fp32 evaluation's error, amplified where the formulas are ill-conditioned (ASL's
# p - clip near the margin: up to a few hundred fp32 ulps there), and fp64 the float64 oracle's
# own (torchvision's 1 - p_t cancels). Math done in bf16 or fp16 is off by 4e-3 / 5e-4: it fails.
WIDE_RTOL = {torch.float32: 2e-4, torch.float64: 1e-9}


def _compare(got, truth, dtype, seed, what, x, go, cond=None):
    """Loss and gradients against the float64 truth: for fp16/bf16 within 2 ulps of the storage
    dtype (plus 64 fp32 ulps of the value for the fp32 math), for fp32/fp64 within WIDE_RTOL.
    d/dy adds terms of size up to (|x| + 1) * grad_output of opposite signs: its slack is
    relative to those."""
    loss, gx, gy = got
    tl, tx, ty = truth
    n = x.numel() if what.endswith("mean") else 1
    term = (x.detach().double().cpu().abs() + 1) * go.double().abs() / n
    soft = go.double().abs() / n if "smoothed" in what else 0.0  # soft labels: d/dx cancels
    cond = 1.0 if cond is None else cond
    if dtype in WIDE_RTOL:
        r = WIDE_RTOL[dtype]
        for g, t, name, extra in ((loss, tl, "loss", 0.0), (gx, tx, "grad input", soft),
                                  (gy, ty, "grad target", term)):
            c = cond if t.dim() else 1.0
            assert_ulps(g, t, dtype=g.dtype, ulps=2, slack=r * (t.abs() * c + extra) + 1e-37,
                        what=f"{what} {name}", seed=seed)
        return
    rel = 64 * COMPUTE_EPS[dtype]
    if tl.dim() == 0:  # a reduction: fp32 accumulation, rounded to the loss dtype once
        assert_close(loss, tl, rtol=max(2 * torch.finfo(loss.dtype).eps, 1e-5), atol=1e-30,
                     what=f"{what} loss (seed {seed})")
    else:
        assert_ulps(loss, tl, ulps=2, slack=rel * tl.abs() * cond, what=f"{what} loss", seed=seed)
    assert_ulps(gx, tx, ulps=2, slack=rel * (tx.abs() * cond + soft), what=f"{what} grad input", seed=seed)
    assert_ulps(gy, ty, ulps=2, slack=rel * (ty.abs() + term), what=f"{what} grad target", seed=seed)


def _asl_condition(x, gamma_neg, clip):
    """How much ASL's negative term amplifies the fp32 error of p = sigmoid(x) near the margin:
    (p - clip)^gamma_neg changes by gamma_neg p / (p - clip) relative per relative change of p."""
    p = torch.sigmoid(x.detach().double().cpu())
    pm = (p - clip).clamp_min(1e-30)
    return 1 + gamma_neg * torch.where(p > clip, p / pm, torch.zeros_like(p)) if clip > 0 else 1.0


def _data(dtype, device, shape=(37, 65), soft=False):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    y = torch.rand(shape, dtype=torch.float64)
    y = (y if soft else (y < 0.3).double()).to(dtype)
    return x.to(device), y.to(device)


# ---- values against the oracles -----------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.6, 0.5), (0.25, 0.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_IDS[d])
def test_focal_matches_torchvision(backend_device, dtype, alpha, gamma, reduction):
    _, device = backend_device
    seed = seed_for("focal", dtype, alpha, gamma, reduction)
    x, y = _data(dtype, device)
    go = torch.tensor(1.7) if reduction != "none" else torch.rand(x.shape, dtype=torch.float64) + 0.5
    got = _run(sigmoid_focal_loss, x, y, reduction, go.to(device), alpha=alpha, gamma=gamma)
    assert got[0].dtype == focal_oracle(x, y, alpha, gamma, reduction).dtype
    _compare(got, _truth(focal_oracle, x, y, reduction, go, alpha=alpha, gamma=gamma), dtype, seed,
             f"focal {reduction}", x, go)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gneg,gpos,clip", [(4.0, 1.0, 0.05), (2.0, 0.0, 0.0), (4.0, 1.0, 0.2), (0.0, 0.0, 0.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_IDS[d])
def test_asl_matches_paper_formula(backend_device, dtype, gneg, gpos, clip, reduction):
    _, device = backend_device
    seed = seed_for("asl", dtype, gneg, gpos, clip, reduction)
    x, y = _data(dtype, device)  # |x| < 18: the reference's eps clamp plays no part
    go = torch.tensor(0.9) if reduction != "none" else torch.rand(x.shape, dtype=torch.float64) + 0.5
    got = _run(asymmetric_loss, x, y, reduction, go.to(device), gamma_neg=gneg, gamma_pos=gpos, clip=clip)
    truth = _truth(asl_oracle, x, y, reduction, go, gamma_neg=gneg, gamma_pos=gpos, clip=clip)
    _compare(got, truth, dtype, seed, f"asl {reduction}", x, go, cond=_asl_condition(x, gneg, clip))


@pytest.mark.parametrize("kind", ["bce", "focal", "asl"])
def test_soft_labels(backend_device, kind):
    _, device = backend_device
    seed = seed_for("soft", kind)
    x, y = _data(torch.float64, device, soft=True)
    go = torch.tensor(1.0)
    if kind == "bce":
        got = _run(binary_cross_entropy_with_logits, x, y, "sum", go.to(device))
        truth = _truth(lambda a, b, reduction: F.binary_cross_entropy_with_logits(a, b, reduction=reduction), x, y,
                       "sum", go)
    elif kind == "focal":
        got = _run(sigmoid_focal_loss, x, y, "sum", go.to(device))
        truth = _truth(focal_oracle, x, y, "sum", go, alpha=0.25, gamma=2.0)
    else:
        got = _run(asymmetric_loss, x, y, "sum", go.to(device))
        truth = _truth(asl_oracle, x, y, "sum", go, gamma_neg=4.0, gamma_pos=1.0, clip=0.05)
    # soft labels cancel in the derivatives: absolute tolerance at fp64 scale
    for g, t, name in zip(got, truth, ("loss", "dx", "dy")):
        assert_close(g, t, rtol=1e-10, atol=1e-12, what=f"{kind} soft {name} (seed {seed})")


def test_gamma_zero_is_bce_exactly(backend_device):
    _, device = backend_device
    seed_for("gamma0")
    for dtype in (torch.float32, torch.bfloat16):
        x, y = _data(dtype, device)
        for red in REDUCTIONS:
            go = torch.tensor(1.3, device=device)
            a = _run(sigmoid_focal_loss, x, y, red, go, alpha=-1.0, gamma=0.0)
            b = _run(binary_cross_entropy_with_logits, x, y, red, go)
            # BCE takes log1p(e) and e / (1 + e) from a division each, focal from one it shares
            # (bce_math.h unit_terms): a few fp32 ulp apart. Both within BCE's own bounds of
            # torch's float64 BCE (test_bce.py), which a focal term that is not BCE's fails.
            seen = go.to(b[0].dtype)  # the grad_output the kernels saw
            tl, tdx, tdy = torch_bce_float64(x, y, reduction=red, grad_output=seen)
            rt, at = bce_loss_tolerance(x, y, None, None, red, b[0].dtype)
            sx, sy = bce_grad_slack(x, y, None, None, red, seen, COMPUTE_EPS[dtype])
            for got, name in ((a, "focal(alpha<0, gamma=0)"), (b, "BCE")):
                assert_close(got[0], tl, rtol=rt, atol=at, what=f"{name} loss {red} {dtype}")
                assert_ulps(got[1], tdx, ulps=0.5, slack=sx, what=f"{name} dx {red} {dtype}")
                assert_ulps(got[2], tdy, ulps=0.5, slack=sy, what=f"{name} dy {red} {dtype}")
            # ASL with no focusing and no clip is BCE too (a different evaluation: within ulps)
            c = _run(asymmetric_loss, x, y, red, go, gamma_neg=0.0, gamma_pos=0.0, clip=0.0)
            for u, v, name in zip(c, b, ("loss", "dx", "dy")):
                assert_close(u, v.double(), rtol=4 * torch.finfo(dtype).eps, atol=1e-6, what=f"asl0 {name} {red}")


# ---- label smoothing and ignore_index -------------------------------------------------------

@pytest.mark.parametrize("kind", ["bce", "focal", "asl"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_label_smoothing(backend_device, kind, reduction):
    _, device = backend_device
    seed = seed_for("smooth", kind, reduction)
    eps = 0.1
    x, y = _data(torch.float32, device)
    go = torch.tensor(1.5) if reduction != "none" else torch.rand(x.shape, dtype=torch.float64) + 0.5
    fn, oracle, kw = {
        "bce": (binary_cross_entropy_with_logits,
                lambda a, b, reduction: F.binary_cross_entropy_with_logits(a, b, reduction=reduction), {}),
        "focal": (sigmoid_focal_loss, lambda a, b, reduction: focal_oracle(a, b, 0.25, 2.0, reduction), {}),
        "asl": (asymmetric_loss, lambda a, b, reduction: asl_oracle(a, b, 4.0, 1.0, 0.05, reduction), {}),
    }[kind]
    got = _run(fn, x, y, reduction, go.to(device), label_smoothing=eps, **kw)
    # the oracle on explicitly smoothed targets; d/dy through the smoothing is (1 - eps) d/dy'
    truth = _truth(lambda a, b, reduction: oracle(a, b * (1 - eps) + eps / 2, reduction), x, y, reduction, go)
    cond = _asl_condition(x, 4.0, 0.05) if kind == "asl" else None
    _compare(got, truth, torch.float32, seed, f"{kind} smoothed {reduction}", x, go, cond=cond)


@pytest.mark.parametrize("kind", ["bce", "focal", "asl"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index(backend_device, kind, reduction):
    _, device = backend_device
    seed = seed_for("ignore", kind, reduction)
    x, y = _data(torch.float32, device)
    unknown = torch.rand(x.shape) < 0.3
    y = torch.where(unknown.to(device), torch.full_like(y, -1.0), y)
    fn, oracle = {
        "bce": (binary_cross_entropy_with_logits,
                lambda a, b: F.binary_cross_entropy_with_logits(a, b, reduction="none")),
        "focal": (sigmoid_focal_loss, lambda a, b: focal_oracle(a, b, 0.25, 2.0, "none")),
        "asl": (asymmetric_loss, lambda a, b: asl_oracle(a, b, 4.0, 1.0, 0.05, "none")),
    }[kind]
    go = torch.tensor(2.0)
    got = _run(fn, x, y, reduction, go.to(device), ignore_index=-1.0)
    known = (~unknown).double()

    def masked(a, b, reduction):  # the oracle on the known elements only, mean over their count
        per = oracle(a, torch.where(known.bool(), b, torch.zeros_like(b))) * known
        return {"none": per, "sum": per.sum(), "mean": per.sum() / known.sum()}[reduction]

    cond = _asl_condition(x, 4.0, 0.05) if kind == "asl" else None
    _compare(got, _truth(masked, x, y, reduction, go), torch.float32, seed, f"{kind} ignore {reduction}", x, go,
             cond=cond)
    assert not got[1][unknown.to(device)].any() and not got[2][unknown.to(device)].any()


@pytest.mark.parametrize("kind", ["bce", "focal", "asl"])
def test_all_unknown_mean_is_zero_not_nan(backend_device, kind):
    _, device = backend_device
    fn = {"bce": binary_cross_entropy_with_logits, "focal": sigmoid_focal_loss, "asl": asymmetric_loss}[kind]
    x = torch.randn(4, 5, device=device, requires_grad=True)
    y = torch.full((4, 5), -1.0, device=device)
    loss = fn(x, y, reduction="mean", ignore_index=-1.0)
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


# ---- extreme logits ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,big", [(torch.float16, 65504.0), (torch.bfloat16, 1e30), (torch.float32, 1e30)],
                         ids=["fp16", "bf16", "fp32"])
def test_extreme_logits_finite(backend_device, dtype, big):
    _, device = backend_device
    x = torch.tensor([big, -big, 30.0, -30.0, 0.0] * 2, dtype=dtype, device=device)
    y = torch.tensor([1.0] * 5 + [0.0] * 5, dtype=dtype, device=device)
    for fn in (sigmoid_focal_loss, asymmetric_loss, binary_cross_entropy_with_logits):
        loss, gx, gy = _run(fn, x, y, "none", torch.tensor(1.0, device=device))
        # (the target gradient of the focal loss is about 3 |x| at |x| = 65504: beyond fp16)
        assert torch.isfinite(loss).all() and torch.isfinite(gx).all(), fn.__name__
    # the plain-torch forms are not finite there: the reference ASL's eps clamp underflows in fp16
    # (log(0) * 0 = NaN), torchvision's focal loss overflows its BCE term at |x| = 1e30 in bf16
    if dtype == torch.float16:
        assert not torch.isfinite(asl_oracle(x, y, 4.0, 1.0, 0.05, "none")).all()


# ---- modules, errors, torch.compile ---------------------------------------------------------

def test_modules_and_errors(backend_device):
    _, device = backend_device
    x, y = _data(torch.float32, device)
    m = fusedtrain.FusedSigmoidFocalLoss(alpha=0.5, gamma=1.5, reduction="sum")
    assert torch.equal(m(x, y), sigmoid_focal_loss(x, y, 0.5, 1.5, "sum"))
    m = fusedtrain.FusedAsymmetricLoss(gamma_neg=3, gamma_pos=0, clip=0.1)
    assert torch.equal(m(x, y), asymmetric_loss(x, y, 3, 0, 0.1))
    m = fusedtrain.FusedBCEWithLogits(label_smoothing=0.2, ignore_index=-1.0)
    assert torch.equal(m(x, y), binary_cross_entropy_with_logits(x, y, label_smoothing=0.2, ignore_index=-1.0))
    with pytest.raises(ValueError, match=r"sigmoid_focal_loss: gamma must be >= 0.0, got -1"):
        sigmoid_focal_loss(x, y, gamma=-1)
    with pytest.raises(TypeError, match=r"sigmoid_focal_loss: alpha must be a number"):
        sigmoid_focal_loss(x, y, alpha="a")
    with pytest.raises(ValueError, match=r"asymmetric_loss: clip must be in \[0.0, 1.0\], got 2"):
        asymmetric_loss(x, y, clip=2)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0.0, 1.0\]"):
        binary_cross_entropy_with_logits(x, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"asymmetric_loss: reduction must be one of"):
        asymmetric_loss(x, y, reduction="avg")
    with pytest.raises(ValueError, match=r"FusedSigmoidFocalLoss: reduction"):
        fusedtrain.FusedSigmoidFocalLoss(reduction="avg")
    with pytest.raises(ValueError, match=r"sigmoid_focal_loss: target size"):
        sigmoid_focal_loss(x, y[:3])


@pytest.mark.skipif(INTERPRET, reason="torch.compile: runs in the normal test process")
def test_torch_compile_fullgraph(monkeypatch):
    def fn(x, y):
        return (sigmoid_focal_loss(x, y, reduction="mean") + asymmetric_loss(x, y, reduction="sum")
                + binary_cross_entropy_with_logits(x, y, label_smoothing=0.1, ignore_index=-1.0))

    from fusedtrain.ops import bce as bce_ops

    # eager's forwards compute their unit gradients, whatever earlier tests backpropagated
    monkeypatch.setitem(bce_ops._UNIT_GRAD_USED, True, True)

    seed_for("compile-family")
    x = torch.randn(16, 33, requires_grad=True)
    y = (torch.rand(16, 33) < 0.3).float()
    y[0, :5] = -1.0
    expected = fn(x, y)
    expected.backward()
    g = x.grad.clone()
    x.grad = None
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y)
    got.backward()
    assert torch.equal(got, expected)
    # eager's CPU backward of a grad_output of 1 hands over the gradient the forward computed;
    # the compiled graph calls the backward kernel, whose FMA contraction may differ in the
    # last bits (ops/bce.py)
    assert_ulps(x.grad, g.double(), ulps=2, what="compiled grad")


@pytest.mark.skipif(INTERPRET, reason="runs in the normal test process")
def test_deterministic_sum():
    seed_for("det-family")
    x = torch.randn(300_001) * 4
    y = (torch.rand(300_001) < 0.3).float()
    old = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(asymmetric_loss(x, y, reduction="sum") + sigmoid_focal_loss(x, y, reduction="sum"))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_forward_gradient_is_dropped_once_it_goes_unused(backend_device, monkeypatch):
    """On CPU the forward also writes the input gradient for a backward of exactly 1; a loop
    that backpropagates something else (loss / k) stops computing it from its next step, and
    a plain loss.backward() brings it back. Gradients right throughout (float64 oracle)."""
    from fusedtrain.ops import bce as bce_ops

    backend, device = backend_device
    if device != "cpu":
        pytest.skip("the forward's gradient is a CPU path")
    x0 = torch.randn(64, 33, dtype=torch.float64) * 3
    y = (torch.rand(64, 33) < 0.3).to(torch.float32).to(device)
    ref_x = x0.clone().requires_grad_()
    p = torch.sigmoid(ref_x)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(ref_x, y.double(), reduction="none")
    p_t = p * y.double() + (1 - p) * (1 - y.double())
    a_t = 0.25 * y.double() + 0.75 * (1 - y.double())
    (a_t * ce * (1 - p_t) ** 2).mean().backward()
    expect = ref_x.grad
    asked = []  # the forward op's unit_grad argument, call by call
    fwd, bwd = bce_ops._OPS[backend]
    monkeypatch.setitem(bce_ops._OPS, backend, (lambda *a: asked.append(a[6]) or fwd(*a), bwd))
    monkeypatch.setitem(bce_ops._UNIT_GRAD_USED, True, True)
    for scale in (0.5, 0.5, 1.0, 1.0):
        x = x0.float().to(device).requires_grad_()
        loss = sigmoid_focal_loss(x, y, reduction="mean")
        (loss * scale).backward() if scale != 1.0 else loss.backward()
        assert_close(x.grad / scale, expect, torch.float32, what=f"grad (scale {scale})")
    # asked at first, then not after a backward of 0.5, then again after one of 1
    assert asked == [True, False, False, True], asked


try:  # a Triton kernel storing _f64 of its two words and _small_int of that
    import triton
    import triton.language as tl

    from fusedtrain.triton import bce as triton_bce

    @triton.jit
    def _spec_probe(out_ptr, int_ptr, hi, lo):
        v = triton_bce._f64(hi, lo)
        tl.store(out_ptr, v)
        tl.store(int_ptr, triton_bce._small_int(v))
except ImportError:
    _spec_probe = None


@pytest.mark.parametrize("value", [0.6, 0.25, -1.0, 1.0 / 3.0, 1e-300, -0.0, 0.0, 2.0, 4.0, 8.0, 8.5, 9.0,
                                   2.0000000000000004, 1.5, 3e38, float("inf"), -2.0],
                         ids=lambda v: repr(v))
def test_triton_gets_the_spec_doubles_bit_for_bit(backend_device, value):
    """The loss spec's scalars reach the Triton kernels as the host's doubles, every bit (an
    fp32 pair would give alpha = 0.6 to 48 bits), and an exponent counts as a small integer
    (multiplied out, as bce_math.h ft_ipow) exactly where the C++ kernels' spec_of says so."""
    backend, _ = backend_device
    if backend != "triton":
        pytest.skip("the Triton kernels' scalar arguments")
    out = torch.full((1,), float("nan"), dtype=torch.float64)
    k = torch.full((1,), 99, dtype=torch.int32)
    hi, lo = triton_bce._spec_args([0.0, 0.0, 0.0, value, 0.0, 0.0])[6:8]  # a's words
    assert all(-2**31 <= w < 2**31 for w in (hi, lo))  # int32 arguments: one compiled variant
    _spec_probe[(1,)](out, k, hi, lo)
    assert out.view(torch.int64).item() == torch.tensor([value], dtype=torch.float64).view(torch.int64).item()
    small = value >= 0 and value <= 8 and value == int(value)  # spec_of's small_int
    assert k.item() == (int(value) if small else -1)
