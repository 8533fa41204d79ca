"""`fusedtrain check` (fusedtrain/selfcheck.py): it passes on every backend this process can
run, and it FAILS when a backend is wrong. Its truth is torch (F.binary_cross_entropy_with_logits,
torch.optim.Adam/AdamW in float64, torch._amp_foreach_non_finite_check_and_unscale_), never
fusedtrain.reference, so a wrong reference backend is caught too: each planted bug below is
put into the reference backend (or the public function) and `check` must report FAIL."""
import pytest
import torch

import fusedtrain
from fusedtrain import reference, selfcheck
from fusedtrain.ops import adam as ops_adam
from fusedtrain.ops import unscale as ops_unscale
from helpers import INTERPRET, normal_only


def _rows(ops, backends, device="cpu"):
    return {(op, b): (status, detail) for op, b, status, detail in selfcheck.run(device, ops, backends)}


@pytest.mark.parametrize("op", sorted(selfcheck.CHECKS))
def test_check_passes(backend_device, op):
    backend, device = backend_device
    status, detail = _rows([op], [backend], device)[(op, backend)]
    assert status == "pass", detail


@normal_only
def test_unavailable_backend_is_reported_with_its_reason():
    status, detail = _rows(["unscale"], ["triton"])[("unscale", "triton")]
    assert status == "unavailable" and "TRITON_INTERPRET" in detail


# ---- planted bugs: each must make `check` fail ---------------------------------------------

def _fails(op, backend="reference"):
    status, detail = _rows([op], [backend])[(op, backend)]
    assert status == "FAIL", f"check did not catch the planted bug: {status} {detail}"
    return detail


@normal_only
def test_adam_that_does_nothing_fails(monkeypatch):
    monkeypatch.setattr(reference, "adam_", lambda *a, **k: None)
    _fails("adam")


@normal_only
def test_adam_with_lr_off_by_a_tenth_of_a_percent_fails(monkeypatch):
    real = reference.adam_
    monkeypatch.setattr(reference, "adam_", lambda *a, lr, **k: real(*a, lr=lr * 1.001, **k))
    assert "FusedAdam" in _fails("adam")


@normal_only
def test_adam_with_a_wrong_beta2_fails(monkeypatch):
    real = reference.adam_
    monkeypatch.setattr(reference, "adam_", lambda *a, beta2, **k: real(*a, beta2=0.99, **k))
    _fails("adam")


@pytest.mark.skipif(INTERPRET or fusedtrain._ext._C is None, reason="native backend only")
def test_native_adam_that_does_nothing_fails(monkeypatch):
    monkeypatch.setattr(ops_adam, "launch", lambda c: None)
    monkeypatch.setattr(ops_adam, "launch_plan", lambda *args: None)
    _fails("adam", "native")


def _bce_with_grad_factor(factor, loss_factor=1.0):
    real = fusedtrain.functional.binary_cross_entropy_with_logits

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g * factor

    def wrong(input, target, *args, **kwargs):
        return real(Scale.apply(input), target, *args, **kwargs) * loss_factor

    return wrong


@normal_only
@pytest.mark.parametrize("factor", [2.0, 1.001])
def test_bce_gradient_off_by_a_factor_fails(monkeypatch, factor):
    monkeypatch.setattr(fusedtrain.functional, "binary_cross_entropy_with_logits", _bce_with_grad_factor(factor))
    assert "d/dinput" in _fails("bce")


@normal_only
def test_bce_loss_off_by_a_factor_fails(monkeypatch):
    monkeypatch.setattr(fusedtrain.functional, "binary_cross_entropy_with_logits",
                        _bce_with_grad_factor(1.0, loss_factor=1.0001))
    _fails("bce")


@normal_only
def test_unscale_that_does_not_write_fails(monkeypatch):
    real = reference.unscale_and_check_
    monkeypatch.setattr(reference, "unscale_and_check_", lambda ts, inv, fi, cn, w: real(ts, inv, fi, cn, False))
    assert "differs from torch" in _fails("unscale")


@normal_only
def test_unscale_that_never_sets_found_inf_fails(monkeypatch):
    real = reference.unscale_and_check_
    monkeypatch.setattr(reference, "unscale_and_check_",
                        lambda ts, inv, fi, cn, w: real(ts, inv, torch.zeros_like(fi), cn, w))
    assert "found_inf" in _fails("unscale")


@normal_only
def test_unscale_norm_off_by_1e_4_fails(monkeypatch):
    real = reference.unscale_and_check_
    monkeypatch.setattr(reference, "unscale_and_check_", lambda *a: real(*a) * 1.0002)  # sum of squares
    assert "norm" in _fails("unscale")


@normal_only
def test_unscale_math_in_the_storage_dtype_fails(monkeypatch):
    # x * inv_scale computed in fp16/bf16 (inv_scale rounded to the dtype first), not in fp32
    real = reference.unscale_and_check_

    def low(ts, inv, fi, cn, w):
        out = real(ts, inv, fi, cn, False)
        if w:
            for t in ts:
                t.mul_(inv.to(t.dtype))
        return out

    monkeypatch.setattr(reference, "unscale_and_check_", low)
    assert "differs from torch" in _fails("unscale")


@pytest.mark.skipif(INTERPRET or fusedtrain._ext._C is None, reason="native backend only")
def test_native_unscale_norm_off_fails(monkeypatch):
    real = ops_unscale._OPS["native"]
    monkeypatch.setitem(ops_unscale._OPS, "native", lambda *a: real(*a) * 1.0002)
    _fails("unscale", "native")


@normal_only
def test_check_exits_non_zero_on_failure(monkeypatch, capsys):
    monkeypatch.setattr(reference, "adam_", lambda *a, **k: None)
    assert selfcheck.main(["--device", "cpu", "--op", "adam", "--backend", "reference"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "seed" in out and "1 failed" in out
