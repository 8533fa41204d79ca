"""Property tests (hypothesis): the loss and the optimizers against the float64 reference
over random shapes, broadcasts, dtypes, reductions, hyperparameters and tensor counts, on
the default backend for CPU tensors (native where built)."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedtrain
from helpers import FLOAT_DTYPES, assert_close, normal_only

pytestmark = normal_only
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F = fusedtrain.functional.binary_cross_entropy_with_logits


@SETTINGS
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       dtype=st.sampled_from(FLOAT_DTYPES),
       reduction=st.sampled_from(["none", "mean", "sum"]),
       weight_form=st.sampled_from(["none", "scalar", "last", "full", "leading"]),
       pw_form=st.sampled_from(["none", "scalar", "last"]),
       magnitude=st.sampled_from([1.0, 30.0, "max"]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_bce_matches_reference(shape, dtype, reduction, weight_form, pw_form, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64)
    if magnitude == "max":
        # logits up to the dtype's largest finite value; for fp32/bf16 (whose max is fp32's) up
        # to max/8: docs/design.md §4's formula in fp32 (torch's too) forms lw * softplus(-x) with
        # lw <= pos_weight <= 4, which overflows fp32 before the terms cancel beyond that
        # (and for mean/sum also / numel: fp32 sums, ours and torch's, overflow past that)
        top = torch.finfo(dtype).max if dtype == torch.float16 else torch.finfo(torch.float32).max / 8
        if reduction != "none" and dtype != torch.float16:
            top /= x64.numel()
        x64 = x64.sign() * top * torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        x64 = x64 * magnitude
    x = x64.to(dtype)
    y = torch.rand(shape, generator=g).to(dtype)
    wshape = {"none": None, "scalar": (1,), "last": shape[-1:], "full": shape,
              "leading": shape[:1] + (1,) * (len(shape) - 1)}[weight_form]
    w = None if wshape is None else torch.rand(wshape, generator=g) * 2
    pw = {"none": None, "scalar": torch.rand(1, generator=g) * 4,
          "last": torch.rand(shape[-1:], generator=g) * 4}[pw_form]
    xa = x.clone().requires_grad_()
    out = F(xa, y, weight=w, reduction=reduction, pos_weight=pw)
    out.backward(torch.ones_like(out))
    xr = x.double().requires_grad_()
    with fusedtrain.use_backend("reference"):
        ref = F(xr, y.double(), weight=None if w is None else w.double(), reduction=reduction,
                pos_weight=None if pw is None else pw.double())
    ref.backward(torch.ones_like(ref))
    assert out.dtype == dtype
    # sums over many elements carry the element's rounding at most N times
    rtol = 4 * torch.finfo(dtype).eps
    # the float64 truth rounded to the output dtype (a sum past fp16's max is inf there)
    ref = ref.detach().to(dtype).double()
    assert_close(out, ref, dtype, rtol=rtol, atol=rtol * ref.abs().max().item() if reduction != "none" else rtol,
                 what="loss")
    assert_close(xa.grad, xr.grad, dtype, rtol=rtol, atol=rtol * max(1.0, xr.grad.abs().max().item()), what="grad")


@SETTINGS
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=12),
       dtype=st.sampled_from(FLOAT_DTYPES),
       lr=st.floats(1e-4, 1e-1), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.9, 0.9999),
       eps=st.sampled_from([1e-8, 1e-6, 1e-3]), weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
       amsgrad=st.booleans(), maximize=st.booleans(), adamw=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_adam_matches_torch(sizes, dtype, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, adamw, seed):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    grads = [[torch.randn(n, generator=g).to(dtype) for n in sizes] for _ in range(3)]
    kw = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.double().requires_grad_() for p in init]
    opt = (fusedtrain.FusedAdamW if adamw else fusedtrain.FusedAdam)(ours, **kw)
    topt = (torch.optim.AdamW if adamw else torch.optim.Adam)(ref, foreach=False, **kw)
    for step_grads in grads:
        for p, r, gr in zip(ours, ref, step_grads):
            p.grad, r.grad = gr.clone(), gr.double()
        opt.step()
        topt.step()
    # each step rounds the param to its dtype once; three steps, three roundings
    rtol = 4 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
    for i, (p, r) in enumerate(zip(ours, ref)):
        assert_close(p, r, dtype, rtol=rtol, atol=rtol + 10 * lr * torch.finfo(torch.float32).eps, what=f"param {i}")
