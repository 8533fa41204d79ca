"""BCE with logits (fusedtrain.functional.binary_cross_entropy_with_logits, FusedBCEWithLogits)
against torch itself in float64, on every backend this process can run (the reference
backend included: it is tested here like the others, never used as the truth)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fusedtrain
from fusedtrain import _ext
from fusedtrain.functional import binary_cross_entropy_with_logits as bce
from helpers import (COMPUTE_EPS, DT_IDS, FLOAT_DTYPES, INTERPRET, REDUCTIONS, RTOL, assert_close, assert_ulps,
                     bce_grad_slack, bce_loss_tolerance, normal_only, seed_for, torch_bce_float64)

needs_native = pytest.mark.skipif(_ext._C is None, reason="extension not built")


@contextlib.contextmanager
def poisoned_outputs():
    """Every tensor allocated inside (at::empty in the C++ kernels, new_empty in the Triton and
    reference ops) starts filled with NaN: torch fills uninitialized memory under deterministic
    mode (torch.utils.deterministic.fill_uninitialized_memory), so an element a kernel never
    writes fails the comparison."""
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _check(x, y, w, pw, reduction, *, go_seed=0, target_grad=True, seed=None, unit_go=False):
    """Run fusedtrain on (x, y, w, pw), backward with a random grad_output, and compare loss,
    d/dx and d/dy with torch's float64 result on the very values x and y hold: the gradients
    within 2 ulp of their storage dtype plus the rounding error of fp32 (fp64) math."""
    xx = x.detach().clone().requires_grad_()
    yy = y.detach().clone().requires_grad_(target_grad)
    with poisoned_outputs():
        loss = bce(xx, yy, weight=w, reduction=reduction, pos_weight=pw)
    torch_loss = F.binary_cross_entropy_with_logits(x.detach(), y.detach(), w, reduction=reduction, pos_weight=pw)
    assert loss.dtype == torch_loss.dtype and loss.shape == torch_loss.shape
    g = torch.Generator().manual_seed(go_seed)
    go = ((torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5) if reduction == "none"
          else torch.tensor(1.0 if unit_go else 1.7, dtype=torch.float64))
    go = go.to(loss.dtype)  # the grad_output the kernel actually sees
    with poisoned_outputs():
        loss.backward(go.to(x.device))
    ref_loss, ref_dx, ref_dy = torch_bce_float64(x, y, w, pw, reduction, go)

    # math in fp32 (fp64 for fp64 input), rounded once to the storage dtype
    rt, at = bce_loss_tolerance(x, y, w, pw, reduction, loss.dtype)
    assert_close(loss, ref_loss, rtol=rt, atol=at, what=f"loss (seed {seed})")
    slack_x, slack_y = bce_grad_slack(x, y, w, pw, reduction, go, COMPUTE_EPS[x.dtype])
    assert xx.grad.dtype == x.dtype
    # one rounding of the fp32 (fp64) result: half an ulp plus the math's error (slack)
    assert_ulps(xx.grad, ref_dx, ulps=0.5, slack=slack_x, what="grad input", seed=seed)
    if target_grad:
        assert yy.grad.dtype == y.dtype
        assert_ulps(yy.grad, ref_dy, ulps=0.5, slack=slack_y, what="grad target", seed=seed)
    return loss


# ---- values, shapes, reductions --------------------------------------------------------

SHAPES = [(0,), (1,), (1023,), (1025,), (3, 5, 7), (4, 0, 3)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (torch.float64,), ids=lambda d: DT_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(backend_device, shape, dtype, reduction):
    _, device = backend_device
    seed = seed_for(shape, dtype, reduction)
    x = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype).to(device)
    y = torch.rand(shape, dtype=torch.float64).to(dtype).to(device)
    _check(x, y, None, None, reduction, seed=seed)
    if reduction != "none":  # loss.backward(): the gradient the CPU forward writes for grad_output 1
        _check(x, y, None, None, reduction, seed=seed, unit_go=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_noncontiguous_and_expanded(backend_device, reduction):
    _, device = backend_device
    seed = seed_for("nc", reduction)
    x = (torch.randn(33, 40, device=device) * 3).t()                    # non-contiguous
    y = torch.rand(1, 33, device=device).expand(40, 33)                  # expanded (stride 0)
    _check(x, y, None, None, reduction, target_grad=False, seed=seed)
    x2 = (torch.randn(1, 33, device=device) * 3).expand(40, 33)          # expanded logits
    y2 = torch.rand(80, 33, device=device)[::2]                          # strided rows
    _check(x2, y2, torch.rand(33, device=device), None, reduction, seed=seed)


# every broadcast form of weight and pos_weight against an input of shape (6, 5, 7)
WEIGHT_SHAPES = [(), (1,), (7,), (1, 7), (5, 1), (5, 7), (6, 1, 1), (1, 5, 7), (6, 1, 7), (6, 5, 1), (6, 5, 7)]
POS_WEIGHT_SHAPES = [(), (1,), (7,), (1, 7), (5, 7), (6, 5, 7)]


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("wshape", WEIGHT_SHAPES, ids=lambda s: "w" + "x".join(map(str, s)))
def test_weight_broadcast(backend_device, wshape, reduction):
    _, device = backend_device
    seed = seed_for("w", wshape, reduction)
    x = torch.randn(6, 5, 7, device=device) * 3
    y = torch.rand(6, 5, 7, device=device)
    w = torch.rand(wshape, device=device) + 0.25
    _check(x, y, w, None, reduction, seed=seed)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("pwshape", POS_WEIGHT_SHAPES, ids=lambda s: "pw" + "x".join(map(str, s)))
def test_pos_weight_broadcast(backend_device, pwshape, reduction):
    _, device = backend_device
    seed = seed_for("pw", pwshape, reduction)
    x = torch.randn(6, 5, 7, device=device) * 3
    y = torch.rand(6, 5, 7, device=device)
    pw = torch.rand(pwshape, device=device) * 4
    _check(x, y, None, pw, reduction, seed=seed)
    _check(x, y, torch.rand(5, 1, device=device), pw, reduction, seed=seed)  # with a row weight as well


@pytest.mark.parametrize("shape", [(300, 7), (5, 1500), (33, 1029), (2, 1024), (1030, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_broadcast_weights_over_many_tiles(backend_device, shape):
    """(C,) pos_weight and (R, 1) weight on shapes whose (R, C) layout spans several tiles in
    each direction and ends mid-tile (the Triton kernels tile such inputs in 2-D)."""
    _, device = backend_device
    seed = seed_for("tiles", shape)
    R, C = shape
    x = torch.randn(R, C, device=device) * 3
    y = torch.rand(R, C, device=device)
    for red in REDUCTIONS:
        _check(x, y, torch.rand(R, 1, device=device) + 0.25, torch.rand(C, device=device) * 4, red, seed=seed)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: DT_IDS[d])
def test_weights_low_precision_and_mixed_target(backend_device, dtype):
    _, device = backend_device
    seed = seed_for("mixed", dtype)
    x = (torch.randn(9, 130) * 5).to(dtype).to(device)
    for ydt in (dtype, torch.float32, torch.float64, torch.bfloat16):
        y = torch.rand(9, 130).to(ydt).to(device)
        w = torch.rand(130).to(dtype).to(device)
        pw = (torch.rand(130) * 3).to(torch.float64).to(device)
        for red in REDUCTIONS:
            _check(x, y, w, pw, red, seed=seed)


# ---- extreme values --------------------------------------------------------------------

def _extreme_logits(dtype):
    big = torch.finfo(dtype).max
    vals = [0.0, -0.0, 1e-30, -1e-30, 1e-4, -1e-4, 15.0, -15.0, 88.0, -88.0, 104.0, -104.0, 1e4, -1e4, big, -big,
            float("inf"), float("-inf")]
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("with_pw", [False, True], ids=["plain", "pos_weight"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: DT_IDS[d])
def test_extreme_logits(backend_device, dtype, with_pw):
    _, device = backend_device
    xs = _extreme_logits(dtype)
    ys = torch.tensor([0.0, 1.0, 0.5, 0.25], dtype=dtype)
    x = xs.repeat_interleave(len(ys)).to(device)
    y = ys.repeat(len(xs)).to(device)
    pw = torch.tensor([1.0, 3.0, 0.5, 1.0] * len(xs), dtype=dtype, device=device) if with_pw else None
    xx = x.clone().requires_grad_()
    yy = y.clone().requires_grad_()
    loss = bce(xx, yy, reduction="none", pos_weight=pw)
    loss.backward(torch.ones_like(loss))
    # torch (float64, same values) decides which elements are NaN or infinite
    tx = x.double().requires_grad_()
    ty = y.double().requires_grad_()
    tl = F.binary_cross_entropy_with_logits(tx, ty, reduction="none", pos_weight=None if pw is None else pw.double())
    tl.backward(torch.ones_like(tl))
    ref_loss, ref_dx = tl.detach(), tx.grad
    finite_x = torch.isfinite(x.double())
    # the truth rounded to the storage dtype (a loss larger than the dtype's max is inf there)
    assert_close(loss, ref_loss.to(dtype).double(), rtol=RTOL[dtype], atol=RTOL[dtype], what="loss")
    representable = torch.isfinite(ref_loss.to(dtype)).to(device)  # pos_weight * 65504 overflows fp16
    assert torch.isfinite(loss[finite_x & representable]).all(), "finite logit gave a non-finite loss"
    assert_close(xx.grad, ref_dx.to(dtype).double(), rtol=RTOL[dtype], atol=RTOL[dtype], what="grad input")
    assert torch.isfinite(xx.grad).all(), "gradient must be finite for every logit (torch gives +-1 at +-inf)"
    ty_g = ty.grad.to(dtype).double()
    assert torch.equal(torch.isnan(yy.grad.double()), torch.isnan(ty_g)), "target grad NaN pattern differs from torch"
    inf_t = torch.isinf(ty_g)
    assert torch.equal(yy.grad.double()[inf_t], ty_g[inf_t]), "target grad infinities differ from torch"


def test_fp16_max_logits_finite(backend_device):
    _, device = backend_device
    x = torch.tensor([65504.0, -65504.0, 65504.0, -65504.0], dtype=torch.float16, device=device)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float16, device=device)
    xx = x.clone().requires_grad_()
    loss = bce(xx, y, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(xx.grad).all()
    assert loss.tolist() == [0.0, 0.0, 65504.0, 65504.0]
    assert xx.grad.tolist() == [0.0, 0.0, 1.0, -1.0]


@pytest.mark.parametrize("where", ["input", "target", "weight", "pos_weight"])
def test_nan_in_nan_out(backend_device, where):
    """A NaN in any operand gives NaN in exactly the elements it reaches, in the loss and in
    both gradients, as torch gives; the reductions are NaN."""
    _, device = backend_device
    x = torch.randn(4, 9, device=device)
    y = torch.rand(4, 9, device=device)
    w = torch.rand(4, 9, device=device)
    pw = torch.rand(4, 9, device=device) * 3
    {"input": x, "target": y, "weight": w, "pos_weight": pw}[where][1, 3] = float("nan")
    xx = x.clone().requires_grad_()
    yy = y.clone().requires_grad_()
    loss = bce(xx, yy, weight=w, reduction="none", pos_weight=pw)
    loss.backward(torch.ones_like(loss))
    nan = torch.zeros(4, 9, dtype=torch.bool)
    nan[1, 3] = True
    tx, ty = x.double().requires_grad_(), y.double().requires_grad_()
    tl = F.binary_cross_entropy_with_logits(tx, ty, w.double(), reduction="none", pos_weight=pw.double())
    tl.backward(torch.ones_like(tl))
    for ours, theirs, name in ((loss, tl, "loss"), (xx.grad, tx.grad, "grad input"), (yy.grad, ty.grad, "grad target")):
        assert torch.equal(torch.isnan(ours).cpu(), torch.isnan(theirs).cpu()), f"{name}: NaN pattern differs from torch"
        if name != "grad target" or where != "target":  # a NaN target leaves d/dy finite (it does not depend on y)
            assert torch.equal(torch.isnan(ours).cpu(), nan), f"{name}: NaN must reach exactly element (1, 3)"
    for red in ("mean", "sum"):
        assert torch.isnan(bce(x, y, weight=w, pos_weight=pw, reduction=red))
    # a NaN in a broadcast pos_weight of shape (C,) reaches its whole column
    pwc = torch.rand(9, device=device)
    pwc[3] = float("nan")
    col = bce(x.nan_to_num(), y.nan_to_num(), pos_weight=pwc, reduction="none")
    assert torch.equal(torch.isnan(col).cpu(), torch.arange(9).eq(3).expand(4, 9))


# ---- dtypes, autocast ------------------------------------------------------------------

DTYPE_PAIRS = [(a, b) for a in FLOAT_DTYPES + (torch.float64,) for b in FLOAT_DTYPES + (torch.float64,)]


@pytest.mark.parametrize("xdt,ydt", DTYPE_PAIRS, ids=lambda d: DT_IDS[d])
def test_output_dtype_matches_torch(backend_device, xdt, ydt):
    _, device = backend_device
    x = torch.randn(3, 17).to(xdt).to(device)
    y = torch.rand(3, 17).to(ydt).to(device)
    w = torch.rand(17, dtype=torch.float64, device=device)
    for red in REDUCTIONS:
        ours = bce(x, y, weight=w, reduction=red)
        theirs = F.binary_cross_entropy_with_logits(x, y, weight=w, reduction=red)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (red, ours.dtype, theirs.dtype)
        truth = torch_bce_float64(x, y, w, None, red)[0]
        comp = RTOL[torch.float64 if xdt == torch.float64 else torch.float32]
        rt = max(RTOL[ours.dtype], comp) * (1 if red == "none" else 5)
        assert_close(ours, truth, rtol=rt, atol=rt, what=red)
        # torch rounds intermediates to the input dtype: agree within that
        rt = 4 * max(RTOL[ours.dtype], RTOL[xdt])
        assert_close(ours, theirs.double(), rtol=rt, atol=rt, what=red + " vs torch")


@pytest.mark.parametrize("xdt", [torch.bfloat16, torch.float32, torch.float64], ids=lambda d: DT_IDS[d])
def test_autocast(backend_device, xdt):
    _, device = backend_device
    if device != "cpu":
        pytest.skip("autocast case written for CPU bf16; CUDA covered by test_autocast_cuda")
    x = (torch.randn(8, 33) * 3).to(xdt).requires_grad_()
    y = torch.rand(8, 33).to(torch.bfloat16).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    yr = y.detach().clone().requires_grad_()
    for red in REDUCTIONS:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = bce(x, y, reduction=red)
            theirs = F.binary_cross_entropy_with_logits(xr, yr, reduction=red)
        assert ours.dtype == theirs.dtype == torch.float32
        assert_close(ours, theirs.double(), rtol=1e-5, what=red)
        ours.sum().backward()
        theirs.sum().backward()
        assert x.grad.dtype == xr.grad.dtype and y.grad.dtype == yr.grad.dtype
        # sigmoid(x) - y cancels: error of order ulp(1), divided by N for mean
        atol = 2 * RTOL[xdt] / (x.numel() if red == "mean" else 1)
        assert_close(x.grad, xr.grad.double(), rtol=2 * RTOL[xdt], atol=atol, what="dx")
        assert_close(y.grad, yr.grad.double(), rtol=2 * RTOL[torch.bfloat16], atol=1e-3, what="dy")
        x.grad = y.grad = xr.grad = yr.grad = None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=lambda d: DT_IDS[d])
def test_autocast_cuda(backend_device, amp_dtype):
    _, device = backend_device
    if device != "cuda":
        pytest.skip("CUDA autocast")
    x = (torch.randn(8, 33, device=device) * 3).to(amp_dtype)
    y = torch.rand(8, 33, device=device)
    with torch.autocast("cuda", dtype=amp_dtype):
        ours = bce(x, y)
        theirs = F.binary_cross_entropy_with_logits(x, y)
    assert ours.dtype == theirs.dtype == torch.float32
    assert_close(ours, theirs.double(), rtol=1e-5)


# ---- module ----------------------------------------------------------------------------

def test_module_matches_torch_module(backend_device):
    _, device = backend_device
    w = torch.rand(11, device=device)
    pw = torch.rand(11, device=device) * 2
    for red in REDUCTIONS:
        ours = fusedtrain.FusedBCEWithLogits(weight=w, reduction=red, pos_weight=pw)
        theirs = torch.nn.BCEWithLogitsLoss(weight=w, reduction=red, pos_weight=pw)
        assert set(dict(ours.named_buffers())) == {"weight", "pos_weight"}
        assert set(ours.state_dict()) == set(theirs.state_dict())
        x = torch.randn(5, 11, device=device)
        y = torch.rand(5, 11, device=device)
        assert_close(ours(x, y), theirs(x, y).double(), rtol=1e-5, what=red)
    assert "weight" not in dict(fusedtrain.FusedBCEWithLogits().named_buffers())
    with pytest.raises(ValueError, match="reduction"):
        fusedtrain.FusedBCEWithLogits(reduction="avg")


# ---- bad input -------------------------------------------------------------------------

def test_bad_input_names_the_argument(backend_device):
    _, device = backend_device
    x = torch.randn(4, 5, device=device)
    y = torch.rand(4, 5, device=device)
    with pytest.raises(ValueError, match=r"target size.*must be the same as input size"):
        bce(x, y[:3])
    with pytest.raises(ValueError, match=r"weight of shape \(3,\) is not broadcastable to the input shape \(4, 5\)"):
        bce(x, y, weight=torch.rand(3, device=device))
    with pytest.raises(ValueError, match=r"weight of shape \(2, 4, 5\) is not broadcastable"):
        bce(x, y, weight=torch.rand(2, 4, 5, device=device))
    with pytest.raises(ValueError, match=r"pos_weight of shape \(2,\) is not broadcastable"):
        bce(x, y, pos_weight=torch.rand(2, device=device))
    with pytest.raises(TypeError, match=r"input holds logits and must be a floating tensor.*torch.int64"):
        bce(x.long(), y)
    with pytest.raises(TypeError, match=r"input.*floating.*torch.bool"):
        bce(x > 0, y)
    with pytest.raises(TypeError, match=r"target must be a floating tensor.*torch.int64"):
        bce(x, (y > 0.5).long())
    with pytest.raises(TypeError, match=r"weight must be a floating tensor"):
        bce(x, y, weight=torch.ones(5, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match=r"target must be a torch.Tensor"):
        bce(x, [0.0] * 20)
    with pytest.raises(ValueError, match=r"reduction must be one of 'none', 'mean', 'sum'; got 'avg'"):
        bce(x, y, reduction="avg")
    with pytest.raises(RuntimeError, match=r"not differentiable with respect to weight"):
        bce(x, y, weight=torch.rand(5, device=device, requires_grad=True))
    with pytest.raises(TypeError, match=r"input dtype torch.complex64 is not supported|input holds logits"):
        bce(torch.randn(4, 5, dtype=torch.complex64, device=device), y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_different_devices():
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match=r"target is on cuda.*input is on cpu"):
        bce(x, torch.rand(4, 5, device="cuda"))
    with pytest.raises(RuntimeError, match=r"pos_weight is on cuda"):
        bce(x, torch.rand(4, 5), pos_weight=torch.rand(5, device="cuda"))


def test_different_devices_meta():
    # without a GPU, a meta tensor stands in for "another device"
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match=r"target is on meta but input is on cpu"):
        bce(x, torch.rand(4, 5, device="meta"))
    with pytest.raises(RuntimeError, match=r"weight is on meta but input is on cpu"):
        bce(x, torch.rand(4, 5), weight=torch.rand(5, device="meta"))


# ---- autograd details ------------------------------------------------------------------

@normal_only
@needs_native
@pytest.mark.parametrize("with_w", [False, True])
def test_gradcheck_float64_native(with_w):
    torch.manual_seed(0)
    x = (torch.randn(3, 6, dtype=torch.float64) * 2).requires_grad_()
    y = torch.rand(3, 6, dtype=torch.float64).requires_grad_()
    w = torch.rand(6, dtype=torch.float64) + 0.5 if with_w else None
    pw = torch.rand(3, 1, dtype=torch.float64) * 3 if with_w else None
    with fusedtrain.use_backend("native"):
        # every reduction: the backward reads only the saved inputs, so gradcheck may run it
        # repeatedly through one graph (the CPU unit-gradient path is taken once, then recomputed)
        for red in REDUCTIONS:
            assert torch.autograd.gradcheck(lambda a, b: bce(a, b, weight=w, pos_weight=pw, reduction=red), (x, y))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_pw", [False, True], ids=["no-pw", "pw"])
def test_double_backward_matches_torch(backend_device, reduction, with_pw):
    """backward(create_graph=True), as a gradient penalty on the loss's input gradient does:
    the second derivatives (through input and target) are torch's."""
    _, device = backend_device
    seed = seed_for("double", reduction, with_pw)
    x0 = torch.randn(4, 6, dtype=torch.float64) * 3
    x0[0, :3] = 0.0  # sigmoid'(0) = 1/4: a formula through |x| would give 0 here
    y0 = torch.rand(4, 6, dtype=torch.float64)
    w = (torch.rand(6, dtype=torch.float64) + 0.5).to(device)
    pw = (torch.rand(4, 1, dtype=torch.float64) * 3).to(device) if with_pw else None

    def second_derivatives(loss_fn, dtype):
        x = x0.to(device, dtype).requires_grad_()
        y = y0.to(device, dtype).requires_grad_()
        loss = loss_fn(x, y, weight=w.to(dtype), pos_weight=None if pw is None else pw.to(dtype),
                       reduction=reduction)
        gx, gy = torch.autograd.grad(loss.sum(), (x, y), create_graph=True)
        assert gx.requires_grad and gy.requires_grad, "first derivatives must carry a graph"
        penalty = gx.pow(2).sum() + (gy * gx).sum()
        return [t.double().cpu() for t in torch.autograd.grad(penalty, (x, y))]

    truth = second_derivatives(F.binary_cross_entropy_with_logits, torch.float64)
    for dtype in (torch.float64, torch.float32):
        got = second_derivatives(bce, dtype)
        for g, t, name in zip(got, truth, ("input", "target")):
            assert_close(g, t, dtype, what=f"{dtype} d/d{name} of the penalty")


@needs_native
@normal_only
def test_gradgradcheck_float64_native():
    torch.manual_seed(3)
    x = (torch.randn(3, 5, dtype=torch.float64) * 2).requires_grad_()
    y = torch.rand(3, 5, dtype=torch.float64).requires_grad_()
    w = torch.rand(5, dtype=torch.float64) + 0.5
    pw = torch.rand(3, 1, dtype=torch.float64) * 3
    with fusedtrain.use_backend("native"):
        for red in REDUCTIONS:
            assert torch.autograd.gradgradcheck(lambda a, b: bce(a, b, weight=w, pos_weight=pw, reduction=red), (x, y))


@needs_native
@normal_only
def test_native_float64_matches_reference():
    torch.manual_seed(1)
    x = torch.randn(5, 300, dtype=torch.float64) * 5
    y = torch.rand(5, 300, dtype=torch.float64)
    with fusedtrain.use_backend("native"):
        for red in REDUCTIONS:
            _check(x, y, torch.rand(300, dtype=torch.float64), torch.rand(5, 1, dtype=torch.float64) * 2, red)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_retain_graph_accumulates(backend_device, reduction):
    # the backward reads only the saved inputs: a second backward through the retained graph
    # (any grad_output) accumulates the right value
    _, device = backend_device
    x = torch.randn(4, 5, device=device, requires_grad=True)
    y = torch.rand(4, 5, device=device)
    for first, second in ((2.0, 0.5), (1.0, 1.0), (1.0, 3.0)):  # 1.0: the forward's unit gradient (CPU)
        x.grad = None
        loss = bce(x, y, reduction=reduction)
        loss.backward(torch.full_like(loss, first), retain_graph=True)
        g1 = x.grad.clone()
        _, dx, _ = torch_bce_float64(x, y, None, None, reduction)
        assert_close(g1, first * dx, what="first backward")
        loss.backward(torch.full_like(loss, second), retain_graph=True)
        assert_close(x.grad, (first + second) * dx, what="second backward")
        loss.backward(torch.full_like(loss, first))
        assert_close(x.grad, (2 * first + second) * dx, what="third backward")


def test_none_reduction_supports_retain_graph(backend_device):
    _, device = backend_device
    x = torch.randn(4, 5, device=device, requires_grad=True)
    loss = bce(x, torch.rand(4, 5, device=device), reduction="none")
    loss.sum().backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.sum().backward()
    torch.testing.assert_close(x.grad, 2 * g1)


def test_no_grad_and_target_only_grad(backend_device):
    _, device = backend_device
    x = torch.randn(4, 5, device=device)
    y = torch.rand(4, 5, device=device, requires_grad=True)
    with torch.no_grad():
        assert not bce(x, y).requires_grad
    bce(x, y).backward()
    _, _, dy = torch_bce_float64(x, y, None, None, "mean")
    assert_close(y.grad, dy, what="target grad")


@normal_only
@needs_native
def test_deterministic_across_thread_counts():
    torch.manual_seed(2)
    x = torch.randn(300_001) * 4
    y = torch.rand(300_001)
    old = torch.get_num_threads()
    results = []
    w = torch.rand(1)
    try:
        with fusedtrain.use_backend("native"):
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results.append(bce(x, y, weight=w, reduction="sum"))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(results[0], r) for r in results[1:])


# ---- torch.library / torch.compile -----------------------------------------------------

def _opcheck_args(device):
    x = torch.randn(3, 8, device=device, requires_grad=True)
    y = torch.rand(3, 8, device=device, requires_grad=True)
    w = torch.rand(1, 8, device=device).expand(3, 8)
    return x, y, w


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(backend_device, reduction):
    backend, device = backend_device
    from fusedtrain.ops import bce as ops_bce

    fwd, bwd = ops_bce._OPS[backend]
    x, y, w = _opcheck_args(device)
    go = torch.rand(3, 8, device=device) if reduction == 0 else torch.tensor(3.0, device=device)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    bwd_tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    if INTERPRET:
        # triton_op derives its fake kernel by running its body on fake tensors, which the
        # interpreter cannot execute (it needs real CPU memory); on CUDA these checks run
        tests = ("test_schema", "test_autograd_registration")
        bwd_tests = ("test_schema",)
    plain = [0.0] * 6
    for unit_grad in (False, True):
        torch.library.opcheck(fwd, (x, y, w, None, reduction, torch.float32, unit_grad, 0, plain), test_utils=tests)
        torch.library.opcheck(fwd, (x, y, None, w, reduction, torch.float32, unit_grad, 0, plain), test_utils=tests)
    for gi, gt in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(bwd, (go, x.detach(), y.detach(), w, w, reduction, gi, gt, 0, plain),
                              test_utils=bwd_tests)
    # the multi-label family: focal, asl (with smoothing and an ignore value)
    for kind, params in ((1, [0.0, 0.0, 0.0, 0.25, 2.0, 0.0]), (2, [0.1, 1.0, -1.0, 4.0, 1.0, 0.05])):
        torch.library.opcheck(fwd, (x, y, w, None, reduction, torch.float32, False, kind, params), test_utils=tests)
        torch.library.opcheck(bwd, (go, x.detach(), y.detach(), w, None, reduction, True, True, kind, params),
                              test_utils=bwd_tests)


@normal_only
@needs_native
def test_torch_compile_fullgraph_native_cpu(monkeypatch):
    def fn(x, y, w, pw):
        return bce(x * 2, y, weight=w, pos_weight=pw) + bce(x, y, reduction="sum")

    # eager's forward computes the unit gradient (whatever earlier tests backpropagated): the
    # compiled graph's backward kernel must give its bits
    from fusedtrain.ops import bce as bce_ops

    monkeypatch.setitem(bce_ops._UNIT_GRAD_USED, False, True)

    torch.manual_seed(3)
    x = torch.randn(16, 33, requires_grad=True)
    y = torch.rand(16, 33)
    w, pw = torch.rand(33), torch.rand(16, 1) * 2
    with fusedtrain.use_backend("native"):
        expected = fn(x, y, w, pw)
        expected.backward()
        g = x.grad.clone()
        x.grad = None
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
        got = compiled(x, y, w, pw)
        got.backward()
    assert torch.equal(got, expected) and torch.equal(x.grad, g)
