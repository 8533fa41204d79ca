"""8-bit blockwise optimizer states (adam_math.h q8_*) in the CUDA Adam kernel
(csrc/cuda/adam.cu, AdamQ8Op), held to the CPU op (csrc/cpu/adam.cpp run_range_q8) through
the dispatcher: the same lists, copied to the GPU and kept on the CPU, one step each.

Every combination the CPU kernel runs: fp32 / fp16 / bf16 params, amsgrad on and off, fp32
master weights (fp16/bf16 params), stochastic rounding of bf16 params (sr_params); Adam with
L2, maximize, grad_mult and lr_tensor, and AdamW; found_inf set (nothing written at all,
absmax and steps included). The tensors cover an empty one, a partial block (1, 255, 257),
exactly one block, many blocks with a partial last one (5000), several chunks of the kernel
(70000, 2-D), a view that starts at element 1 of its buffer in every list (scalar accesses
throughout), one whose grad alone is such a view, fresh states (absmax 0) and a block whose
grad holds a NaN (its absmax NaN).

Per element both kernels run the same fp32 math and the same encode functions; they may
round differently only where a compiler contracts a multiply and an add into an FMA (gcc
-mfma on CPU, nvcc on GPU). So: absmax within rtol 1e-5, params and masters within a few fp32
ulps (a param of 16-bit storage rounded from them: equal, or one ulp of its dtype for a few),
and codes equal except a fraction below 0.1% that differ by one step of the code map."""
import pytest
import torch

from fusedtrain import _ext, reference
from helpers import cuda_build_missing, stable_seed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SIZES = [(0,), (1,), (255,), (256,), (257,), (5000,), (70, 1000)]
MISALIGNED = 4999  # a 1-D view at element 1 of a buffer of MISALIGNED + 1 elements, every list
GRAD_ONLY = 3001   # a contiguous tensor whose grad alone is such a view
NAN_GRAD = 257     # this size's last element of its first block gets a NaN grad
FRESH = (1, 255)   # these sizes start from fresh states (codes 0, absmax 0)


def _combos():
    out = []
    for pdt in (torch.float32, torch.float16, torch.bfloat16):
        for amsgrad in (False, True):
            for master in ((False,) if pdt == torch.float32 else (False, True)):
                for sr in ((False, True) if pdt == torch.bfloat16 and not master else (False,)):
                    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[pdt]
                    name += ("-ams" if amsgrad else "") + ("-master" if master else "") + ("-sr" if sr else "")
                    out.append(pytest.param(pdt, amsgrad, master, sr, id=name))
    return out


OPTIONS = {
    "adamw": dict(decoupled=True, wd=0.1, maximize=False, grad_mult=None, lr_tensor=None),
    "adam-l2-max-mult-lrt": dict(decoupled=False, wd=1e-2, maximize=True, grad_mult=0.5, lr_tensor=2e-3),
}


def _at(n, offset, fill):
    """A 1-D tensor of n elements at `offset` in a buffer of its own (a view when offset > 0)."""
    buf = torch.zeros(n + offset, dtype=fill.dtype)
    view = buf[offset:]
    view.copy_(fill.reshape(-1))
    return view


def _make(pdt, amsgrad, master, gen):
    """The op's lists on the CPU, and the step count of each tensor."""
    lists = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps",
                             "master_params", "exp_avg_absmax", "exp_avg_sq_absmax", "max_exp_avg_sq_absmax")}
    shapes = SIZES + [(MISALIGNED,), (GRAD_ONLY,)]
    for i, shape in enumerate(shapes):
        n = 1
        for s in shape:
            n *= s
        off = 1 if shape == (MISALIGNED,) else 0
        goff = 1 if shape in ((MISALIGNED,), (GRAD_ONLY,)) else 0
        w = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen) * 0.1
        if shape == (NAN_GRAD,):
            g[255] = float("nan")
        m = torch.randn(n, generator=gen) * 1e-2
        v = torch.rand(n, generator=gen) ** 2 * 1e-3
        if shape in [(k,) for k in FRESH]:
            m.zero_()
            v.zero_()
        mc, ma = reference.q8_encode(m, True)
        vc, va = reference.q8_encode(v, False)
        lists["params"].append(_at(n, off, w.to(pdt)).view(shape))
        lists["grads"].append(_at(n, goff, g.to(pdt)).view(shape))
        lists["exp_avgs"].append(_at(n, off, mc).view(shape))
        lists["exp_avg_sqs"].append(_at(n, off, vc).view(shape))
        lists["exp_avg_absmax"].append(ma)
        lists["exp_avg_sq_absmax"].append(va)
        if amsgrad:
            xc, xa = reference.q8_encode(v * 1.25, False)
            lists["max_exp_avg_sqs"].append(_at(n, off, xc).view(shape))
            lists["max_exp_avg_sq_absmax"].append(xa)
        if master:
            lists["master_params"].append(_at(n, off, w).view(shape))
        lists["steps"].append(torch.tensor([float(3 * i % 7)]))
    return lists


def _to(t, device):
    """t on `device` at the same offset in a buffer of its own (a misaligned view stays one)."""
    off = t.storage_offset()
    buf = torch.zeros(t.numel() + off, dtype=t.dtype, device=device)
    view = buf[off:].view(t.shape)
    view.copy_(t)
    return view


def _step(lists, opts, amsgrad, sr, found_inf, device):
    dev = {k: [_to(t, device) for t in v] for k, v in lists.items()}
    scalar = lambda x: None if x is None else torch.tensor([x], dtype=torch.float32, device=device)  # noqa: E731
    torch.ops.fusedtrain.adam_(
        dev["params"], dev["grads"], dev["exp_avgs"], dev["exp_avg_sqs"], dev["max_exp_avg_sqs"], dev["steps"],
        dev["master_params"], dev["exp_avg_absmax"], dev["exp_avg_sq_absmax"], dev["max_exp_avg_sq_absmax"],
        1e-3, scalar(opts["lr_tensor"]), 0.9, 0.999, 1e-8, opts["wd"], amsgrad, opts["maximize"], opts["decoupled"],
        scalar(opts["grad_mult"]), scalar(1.0 if found_inf else 0.0), 0x1234ABCD if sr else 0, sr, False)
    if device != "cpu":
        torch.cuda.synchronize()
    return {k: [t.cpu() for t in v] for k, v in dev.items()}


def _code_steps(c, signed):
    """The codes as positions on their map (signed: -127..127; unsigned: 0..255)."""
    c = c.reshape(-1).to(torch.int32)
    if signed:
        return torch.where(c & 0x80 != 0, -(c & 0x7F), c & 0x7F)
    return c


def _assert_codes(got, want, signed, what):
    a, b = _code_steps(got, signed), _code_steps(want, signed)
    diff = (a - b).abs()
    assert diff.numel() == 0 or int(diff.max()) <= 1, f"{what}: a code differs by more than one step"
    assert int((diff != 0).sum()) <= max(1, a.numel() // 1000), f"{what}: {int((diff != 0).sum())} codes differ"


def _assert_float(got, want, what, atol=0.0):
    """Within rtol 1e-5 (absmax; params and masters with atol 1e-6: fp32 noise near 0), NaN alike."""
    nan = got.isnan() & want.isnan()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN in different places"
    got, want = got.double().masked_fill(nan, 0), want.double().masked_fill(nan, 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def _assert_param(got, want, what):
    """16-bit params: one rounding of nearly equal fp32 values (SR: with the same bits)."""
    if got.dtype == torch.float32:
        return _assert_float(got, want, what, atol=1e-6)
    ulp = 2.0 ** -7 if got.dtype == torch.bfloat16 else 2.0 ** -10
    g, w = got.double().reshape(-1), want.double().reshape(-1)
    both_nan = g.isnan() & w.isnan()
    assert torch.equal(g.isnan(), w.isnan()), f"{what}: NaN in different places"
    g, w = g.masked_fill(both_nan, 0), w.masked_fill(both_nan, 0)
    off = g != w
    assert bool(((g - w).abs() <= w.abs() * ulp + 1e-30)[off].all()), f"{what}: more than one ulp off"
    assert int(off.sum()) <= max(1, g.numel() // 1000), f"{what}: {int(off.sum())} elements differ"


@pytest.mark.parametrize("found_inf", [False, True], ids=["step", "found_inf"])
@pytest.mark.parametrize("opt", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("pdt,amsgrad,master,sr", _combos())
def test_8bit_cuda_matches_cpu(pdt, amsgrad, master, sr, opt, found_inf):
    ok, why = _ext.native_cuda()
    if not ok:
        cuda_build_missing(f"native CUDA kernels: {why}")
    gen = torch.Generator().manual_seed(stable_seed("adam-8bit-cuda", pdt, amsgrad, master, sr, opt))
    lists = _make(pdt, amsgrad, master, gen)
    before = {k: [t.clone() for t in v] for k, v in lists.items()}
    opts = OPTIONS[opt]
    got = _step(lists, opts, amsgrad, sr, found_inf, "cuda")
    want = _step(lists, opts, amsgrad, sr, found_inf, "cpu")

    if found_inf:  # nothing written at all, on either device
        for k, ts in before.items():
            for i, t in enumerate(ts):
                for res, dev in ((got, "cuda"), (want, "cpu")):
                    assert torch.equal(res[k][i].view(torch.uint8), t.view(torch.uint8)), \
                        f"{dev}: {k}[{i}] written under found_inf"
        return

    for i, s in enumerate(before["steps"]):
        assert float(got["steps"][i]) == float(s) + 1 == float(want["steps"][i]), f"step {i}"
    for i in range(len(before["params"])):
        what = f"tensor {i} {tuple(before['params'][i].shape)}"
        _assert_param(got["params"][i], want["params"][i], f"param of {what}")
        if master:
            _assert_float(got["master_params"][i], want["master_params"][i], f"master of {what}", atol=1e-6)
        _assert_codes(got["exp_avgs"][i], want["exp_avgs"][i], True, f"exp_avg of {what}")
        _assert_codes(got["exp_avg_sqs"][i], want["exp_avg_sqs"][i], False, f"exp_avg_sq of {what}")
        _assert_float(got["exp_avg_absmax"][i], want["exp_avg_absmax"][i], f"exp_avg_absmax of {what}")
        _assert_float(got["exp_avg_sq_absmax"][i], want["exp_avg_sq_absmax"][i], f"exp_avg_sq_absmax of {what}")
        if amsgrad:
            _assert_codes(got["max_exp_avg_sqs"][i], want["max_exp_avg_sqs"][i], False, f"max_exp_avg_sq of {what}")
            _assert_float(got["max_exp_avg_sq_absmax"][i], want["max_exp_avg_sq_absmax"][i],
                          f"max_exp_avg_sq_absmax of {what}")
        # the step did something: codes or absmax moved where there are elements
        if before["params"][i].numel():
            assert not torch.equal(got["exp_avg_absmax"][i], before["exp_avg_absmax"][i]), f"absmax of {what}"
    # the NaN grad: its block's absmax NaN on both devices, the next block finite
    k = SIZES.index((NAN_GRAD,))
    assert got["exp_avg_absmax"][k][0].isnan() and not got["exp_avg_absmax"][k][1].isnan()
