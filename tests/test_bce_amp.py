"""BCE's gradient contract at training scale: under a loss scale (2^16, as GradScaler starts
with; up to 2^24) and 'mean' over millions of elements, every gradient element is the fp32
derivative times grad_output rounded once, within 1 ulp of the storage dtype of torch's float64
result. A kernel that stores d loss / d input in fp16 and scales it afterwards lands in fp16's
subnormals for 'mean' at this size and fails here (by about 100% relative error)."""
import pytest
import torch
import torch.nn.functional as F

import fusedtrain
from helpers import COMPUTE_EPS, DT_IDS, INTERPRET, assert_ulps, bce_grad_slack, seed_for, torch_bce_float64

# 'mean' at these sizes puts |d loss / d x| / N below fp16's normal range (6.1e-5); the
# interpreter executes Triton in numpy, one program of 1024 elements at a time, hence its smaller
# sizes (still thousands of subnormal gradients; 1000 * 1024 took 20-27 s a case). N_LARGE is
# the batch of a realistic loop (8192 x 1024), run through the GradScalers.
# N is not a power of two, and neither are some scales: multiplying by a power of two is exact,
# so with powers of two only, a double rounding would give the same bits and pass.
N_MEAN = 500 * 1024 if INTERPRET else 2000 * 1024
N_LARGE = 500 * 1024 if INTERPRET else 8000 * 1024
N_OTHER = 125 * 1024 if INTERPRET else 500 * 1024
SCALES = [0.3, 3.0 * 2**14] if INTERPRET else [1.0, 0.3, 3.0 * 2**14, 2.0**16, 2.0**24]


def _batch(n, dtype, device, cols=1024):
    x = (torch.randn(n // cols, cols, device=device) * 3).to(dtype)
    y = (torch.rand(n // cols, cols, device=device) < 0.1).to(dtype)
    return x, y


def _scaled_grads(loss_fn, x, y, scale, reduction, **kw):
    """The loop of the README under autocast: (loss * scale).backward(); returns (loss, x.grad,
    y.grad)."""
    xx = x.detach().clone().requires_grad_()
    yy = y.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=x.dtype):
        loss = loss_fn(xx, yy, reduction=reduction, **kw)
    (loss.sum() if reduction == "none" else loss).mul(scale).backward()
    return loss, xx.grad, yy.grad


def _check_one_rounding(x, y, gx, gy, scale, reduction, seed, weight=None, pos_weight=None, target=True):
    go = torch.full((), scale, dtype=torch.float64)
    if reduction == "none":
        go = go.expand(x.shape)
    _, dx, dy = torch_bce_float64(x, y, weight, pos_weight, reduction, go)
    slack_x, slack_y = bce_grad_slack(x, y, weight, pos_weight, reduction, go, COMPUTE_EPS[x.dtype], k=4)
    # one rounding of an fp32 value: half an ulp of the storage dtype, plus the fp32 math's error
    assert_ulps(gx, dx, ulps=0.5, slack=slack_x, what=f"grad input x{scale} {reduction}", seed=seed)
    if target:
        assert_ulps(gy, dy, ulps=0.5, slack=slack_y, what=f"grad target x{scale} {reduction}", seed=seed)


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"scale{s:g}")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DT_IDS[d])
def test_loss_scaled_gradient_rounds_once(backend_device, dtype, reduction, scale):
    _, device = backend_device
    seed = seed_for("amp", dtype, reduction, scale)
    x, y = _batch(N_MEAN if reduction == "mean" else N_OTHER, dtype, device)
    loss, gx, gy = _scaled_grads(fusedtrain.functional.binary_cross_entropy_with_logits, x, y, scale, reduction)
    assert loss.dtype == torch.float32
    _check_one_rounding(x, y, gx, gy, scale, reduction, seed)


@pytest.mark.parametrize("weights", ["pos_weight", "weight+pos_weight"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DT_IDS[d])
def test_loss_scaled_gradient_with_weights(backend_device, dtype, weights):
    _, device = backend_device
    seed = seed_for("amp-w", dtype, weights)
    x, y = _batch(N_MEAN, dtype, device)
    pw = (torch.rand(x.shape[1], device=device) * 8 + 0.5)
    w = (torch.rand(x.shape[1], device=device) + 0.5) if weights == "weight+pos_weight" else None
    _, gx, gy = _scaled_grads(fusedtrain.functional.binary_cross_entropy_with_logits, x, y, 3.0 * 2**14, "mean",
                              weight=w, pos_weight=pw)
    _check_one_rounding(x, y, gx, gy, 3.0 * 2**14, "mean", seed, weight=w, pos_weight=pw)


@pytest.mark.parametrize("scaler_kind", ["fusedtrain", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DT_IDS[d])
def test_through_grad_scaler(backend_device, dtype, scaler_kind):
    """scaler.scale(loss).backward() as a training loop writes it, with fusedtrain's GradScaler
    and with torch's: the scaled gradient rounds once; after unscale_ the gradient equals the
    fp32 product with 1/scale of that value (the scaler's contract, not ours)."""
    _, device = backend_device
    seed = seed_for("scaler", dtype, scaler_kind)
    x, y = _batch(N_LARGE, dtype, device)
    xx = x.clone().requires_grad_()
    scaler = (fusedtrain.GradScaler(device) if scaler_kind == "fusedtrain" else torch.amp.GradScaler(device))
    with torch.autocast(device, dtype=dtype):
        loss = fusedtrain.FusedBCEWithLogits()(xx, y)
    scaler.scale(loss).backward()
    scale = float(scaler.get_scale())
    assert scale == 2.0**16  # N (8000 x 1024) is not a power of two: 1/N rounds
    _check_one_rounding(x, y, xx.grad, None, scale, "mean", seed, target=False)


@pytest.mark.skipif(INTERPRET, reason="torch's own kernels: runs in the normal test process")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DT_IDS[d])
def test_torch_meets_the_same_bound(dtype):
    """The bound is the one torch's autocast BCE meets: the check holds a fused kernel to
    torch's accuracy, not to something stricter."""
    seed = seed_for("torch-bound", dtype)
    x, y = _batch(N_MEAN, dtype, "cpu")
    _, gx, gy = _scaled_grads(F.binary_cross_entropy_with_logits, x, y, 2.0**16, "mean")
    go = torch.full((), 2.0**16, dtype=torch.float64)
    _, dx, _ = torch_bce_float64(x, y, None, None, "mean", go)
    # torch computes sigmoid(x) - y, which cancels for y = 1 and large x: its error there is
    # bounded by eps32 * (sigmoid(x) + y), so give it that slack (ours needs none of it)
    slack = 4 * COMPUTE_EPS[dtype] * (torch.sigmoid(x.double()) + y.double()) * 2.0**16 / x.numel()
    assert_ulps(gx, dx, ulps=1, slack=slack, what="torch grad input", seed=seed)


@pytest.mark.skipif(INTERPRET, reason="2^24 elements: too slow for the interpreter (512K elements run there)")
def test_one_tensor_of_2pow24_elements(backend_device):
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("plain torch ops: nothing size-dependent to test")
    seed = seed_for("2^24")
    n = 2**24 + 3
    x = (torch.randn(n, device=device) * 3).half()
    y = (torch.rand(n, device=device) < 0.1).half()
    loss, gx, gy = _scaled_grads(fusedtrain.functional.binary_cross_entropy_with_logits, x, y, 2.0**16, "mean")
    truth_loss, _, _ = torch_bce_float64(x, y, reduction="mean")
    loss = loss.detach()
    assert abs(float(loss) - float(truth_loss)) <= 1e-5 * float(truth_loss), (float(loss), float(truth_loss), seed)
    _check_one_rounding(x, y, gx, gy, 2.0**16, "mean", seed)
