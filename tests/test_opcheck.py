"""torch.library.opcheck on the registered unscale and adam ops of every backend (BCE:
tests/test_bce.py): fusedtrain:: (native, C++ schema in csrc/ops.cpp), fusedtrain_triton::
(runnable on CPU only under TRITON_INTERPRET=1) and fusedtrain_ref:: (reference). Every test
util runs, test_aot_dispatch_dynamic included: the ops mutate lists in place, which AOT
autograd functionalizes (auto_functionalized) and opcheck compares with eager.
"""
import pytest
import torch

import fusedtrain
from helpers import INTERPRET, seed_for

HAVE_C = fusedtrain._ext._C is not None
UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opcheck(op, args, what):
    results = torch.library.opcheck(op, args, test_utils=UTILS, raise_exception=False)
    bad = {k: v for k, v in results.items() if v != "SUCCESS"}
    assert not bad, f"{what}: {bad}"


def _unscale_args(dtype, compute_norm, write, seed):
    g = torch.Generator().manual_seed(seed)
    ts = [(torch.randn(s, generator=g) * 300).to(dtype) for s in [(5,), (3, 40), (0,), (1,)]]
    ts[1][1, 7] = float("inf") if seed % 2 else 1.0  # found_inf set in some cases
    return (ts, torch.full((1,), 1 / 3000.0), torch.zeros(1), compute_norm, write)


def _namespaces():
    """The op namespaces this process can run on CPU tensors."""
    if INTERPRET:
        return [pytest.param("fusedtrain_triton", id="triton", marks=pytest.mark.triton_interp)]
    return [pytest.param("fusedtrain_ref", id="reference")] + (
        [pytest.param("fusedtrain", id="native")] if HAVE_C else [])


@pytest.mark.parametrize("namespace", _namespaces())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("compute_norm,write", [(True, True), (False, True), (True, False)])
def test_opcheck_unscale(namespace, dtype, compute_norm, write):
    seed = seed_for("opcheck", namespace, dtype, compute_norm, write)
    op = getattr(torch.ops, namespace).unscale_and_check_.default
    _opcheck(op, _unscale_args(dtype, compute_norm, write, seed), f"{namespace} {dtype} seed {seed}")


@pytest.mark.skipif(not INTERPRET, reason="the Triton op runs on CPU tensors under the interpreter")
@pytest.mark.triton_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("compute_norm", [True, False])
def test_opcheck_triton_read_only_check(dtype, compute_norm):
    """fusedtrain_triton::check_, the read-only pass as an op that mutates found_inf alone (a
    schema claiming less than the op writes would fail test_schema): the tensors unchanged, the
    flag and the norm those of unscale_and_check_ with write=False."""
    seed = seed_for("opcheck check_", dtype, compute_norm)
    args = _unscale_args(dtype, compute_norm, False, seed)
    _opcheck(torch.ops.fusedtrain_triton.check_.default, args[:4], f"check_ {dtype} seed {seed}")
    ts, inv, _, _, _ = args
    before = [t.clone() for t in ts]
    flags = [torch.zeros(1), torch.zeros(1)]
    a = torch.ops.fusedtrain_triton.check_(ts, inv, flags[0], compute_norm)
    b = torch.ops.fusedtrain_triton.unscale_and_check_(ts, inv, flags[1], compute_norm, False)
    assert all(torch.equal(t, u) for t, u in zip(ts, before))
    assert torch.equal(flags[0], flags[1]) and flags[0].item() == float(seed % 2)
    assert torch.equal(a, b)


def _adam_args(dtype, *, amsgrad, master, lr_tensor, grad_mult, found_inf, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (3, 5), (1,)]
    sdtype = torch.float32 if master else dtype
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    exp_avgs = [(torch.randn(s, generator=g) * 0.1).to(sdtype) for s in shapes]
    exp_avg_sqs = [(torch.rand(s, generator=g) * 0.01).to(sdtype) for s in shapes]
    max_sqs = [v * 1.5 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.full((1,), 3.0) for _ in shapes]
    masters = [p.float() for p in params] if master else []
    return (params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, masters, [], [], [],
            1e-3, torch.full((1,), 2e-3) if lr_tensor else None, 0.9, 0.999, 1e-8, 0.01, amsgrad, False, True,
            torch.full((1,), 1 / 1024.0) if grad_mult else None, torch.zeros(1) if found_inf else None)


ADAM_CASES = {
    "fp32": dict(dtype=torch.float32, amsgrad=False, master=False, lr_tensor=False, grad_mult=False,
                 found_inf=False),
    "fp32-amsgrad-lrtensor-scaled": dict(dtype=torch.float32, amsgrad=True, master=False, lr_tensor=True,
                                         grad_mult=True, found_inf=True),
    "bf16-master": dict(dtype=torch.bfloat16, amsgrad=False, master=True, lr_tensor=False, grad_mult=True,
                        found_inf=True),
    "fp16": dict(dtype=torch.float16, amsgrad=True, master=False, lr_tensor=False, grad_mult=False,
                 found_inf=False),
}


@pytest.mark.parametrize("namespace", _namespaces())
@pytest.mark.parametrize("case", sorted(ADAM_CASES))
def test_opcheck_adam(namespace, case):
    seed = seed_for("opcheck adam", case)
    _opcheck(getattr(torch.ops, namespace).adam_.default, _adam_args(**ADAM_CASES[case], seed=seed),
             f"{namespace} adam_ {case} seed {seed}")


@pytest.mark.skipif(not HAVE_C or INTERPRET, reason="native op, normal test process")
def test_adam_found_inf_case_really_skips():
    """The found_inf inputs above are zero (a real step runs); with it set, opcheck still
    passes and nothing is written (the schema's mutation annotations hold either way)."""
    args = list(_adam_args(**ADAM_CASES["fp32-amsgrad-lrtensor-scaled"], seed=1))
    args[-1] = torch.ones(1)
    before = [t.clone() for t in args[0]]
    _opcheck(torch.ops.fusedtrain.adam_.default, tuple(args), "adam_ found_inf=1")
    torch.ops.fusedtrain.adam_.default(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[0], before))
