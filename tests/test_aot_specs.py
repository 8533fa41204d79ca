"""The ahead-of-time specs compile what runs (issue #13 item 9): every Triton launch the
package makes in common use (captured under the interpreter) has an AotSpec of the same
kernel with the same constexpr values and launch options, so tests/test_gpu_compile.py
compiles and spill-checks the variants a GPU would run."""
import pytest
import torch

import fusedtrain
from fusedtrain.triton import aot
from helpers import INTERPRET

pytestmark = [pytest.mark.triton_interp,
              pytest.mark.skipif(not INTERPRET, reason="captures launches under the Triton interpreter")]

# BLOCK/ITERS: the interpreter runs the multi-tensor kernels with other tiles
# (multi_tensor.tile); not compared for any kernel
NOT_COMPARED = {"BLOCK", "ITERS"}
# per kernel, constexprs whose interpreter value is not the GPU's: GRAD of the BCE forward (the
# unit gradient, asked on CPU only: ops/bce.py) is not compared; UPCAST of the head (bf16
# operands to an fp32 dot on CPU only: triton/head.py) is False on a GPU
GPU_VALUE = {"_bce_fwd_kernel": {"GRAD": None}, "_linear_bce_kernel": {"UPCAST": False}}
# per kernel, the pointer argument whose element type is compared too (a variant compiled for
# fp32 only is not one for bf16); the multi-tensor kernels have theirs as a constexpr (DTYPE)
DTYPE_ARG = {"_bce_fwd_kernel": "x_ptr", "_bce_bwd_kernel": "x_ptr", "_bce_sum_kernel": "out_ptr",
             "_linear_bce_kernel": "h_ptr"}
_TL_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _key(name, constexprs, options, dtype=None):
    fix = GPU_VALUE.get(name, {})
    ce = tuple(sorted((k, str(fix.get(k, v))) for k, v in constexprs.items()
                      if k not in NOT_COMPARED and not (k in fix and fix[k] is None)))
    return name, ce, options.get("num_warps", 4), dtype


def _spec_keys():
    keys = set()
    for s in aot.all_specs():
        name = s.kernel.fn.__name__
        dtype = s.signature[DTYPE_ARG[name]].lstrip("*") if name in DTYPE_ARG else None
        keys.add(_key(name, s.constexprs, s.options, dtype))
    return keys


@pytest.fixture
def launches(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    seen = []
    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = self.fn.__code__.co_varnames[:self.fn.__code__.co_argcount]
        constexprs = {k: v for k, v in kwargs.items() if k in names and k.isupper()}
        dtype = None
        if self.fn.__name__ in DTYPE_ARG:
            dtype = _TL_NAMES[args[names.index(DTYPE_ARG[self.fn.__name__])].dtype]
        seen.append(_key(self.fn.__name__, constexprs, {"num_warps": kwargs.get("num_warps", 4)}, dtype))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


def _check(launches):
    assert launches, "no launch captured"
    missing = sorted(set(launches) - _spec_keys())
    assert not missing, "launches without an AotSpec:\n" + "\n".join(map(str, missing))


def _bce_uses(dtype):
    x = torch.randn(64, 48, dtype=dtype, requires_grad=True)
    y = torch.rand(64, 48).to(dtype)
    cases = [({}, "mean", x, y), ({}, "none", x.reshape(-1), y.reshape(-1)), ({}, "none", x, y),
             ({"pos_weight": torch.rand(48) + 0.5}, "mean", x, y),
             ({"weight": torch.rand(64, 48), "pos_weight": torch.rand(64, 48) + 0.5}, "mean", x, y),
             ({"weight": torch.rand(64, 48), "pos_weight": torch.rand(64, 48) + 0.5}, "none", x.reshape(-1),
              y.reshape(-1))]
    for kwargs, reduction, inp, tgt in cases:
        if "weight" in kwargs and inp.dim() == 1:
            kwargs = {k: v.reshape(-1) for k, v in kwargs.items()}
        loss = fusedtrain.FusedBCEWithLogits(reduction=reduction, **kwargs)(inp, tgt)
        (loss.sum() * 1024.0).backward()  # a scaled backward, as under AMP


def _family_uses(dtype, options):
    """Focal loss and ASL as modules with their default reductions ('none' and 'mean') and the
    other two, and BCE with the family's options. options: a subset of {"weight" (full shape),
    "ignore_index", "label_smoothing"}."""
    x = torch.randn(64, 48, dtype=dtype, requires_grad=True)
    y = (torch.rand(64, 48) > 0.7).to(dtype)
    extra = {}
    if "weight" in options:
        extra["weight"] = torch.rand(64, 48)
    if "ignore_index" in options:
        y[::7, ::5] = -1.0  # unknown labels
        extra["ignore_index"] = -1.0
    if "label_smoothing" in options:
        extra["label_smoothing"] = 0.1
    modules = [fusedtrain.FusedSigmoidFocalLoss(**extra), fusedtrain.FusedAsymmetricLoss(**extra)]
    modules += [cls(reduction=r, **extra) for cls in (fusedtrain.FusedSigmoidFocalLoss, fusedtrain.FusedAsymmetricLoss)
                for r in ("mean", "sum", "none")]
    # BCE is generic with label smoothing or ignore_index
    bce_extra = dict(extra, label_smoothing=extra.get("label_smoothing", 0.1))
    modules += [fusedtrain.FusedBCEWithLogits(reduction=r, **bce_extra) for r in ("mean", "sum", "none")]
    for m in modules:
        loss = m(x, y)
        (loss.sum() * 1024.0).backward()  # a scaled backward, as under AMP


def _head_uses(dtype, options):
    """The head, as a module and as the function, dense targets in the head's dtype and in
    fp32, with or without its options (pos_weight, label_weight, an unknown mask); a forward
    without gradients (evaluation) too."""
    B, H, L = 32, 48, 80
    kw = {}
    if options:
        kw = {"pos_weight": torch.rand(L) + 0.5, "label_weight": torch.rand(L)}
    head = fusedtrain.FusedLinearBCEWithLogits(H, L, **kw).to(dtype)
    if options:  # the module's buffers are its loss settings, fp32 whatever the params
        head.pos_weight, head.label_weight = kw["pos_weight"], kw["label_weight"]
    h = torch.randn(B, H, dtype=dtype, requires_grad=True)
    unknown = torch.rand(B, L) < 0.1 if options else None
    for y in ((torch.rand(B, L) > 0.9).to(dtype), (torch.rand(B, L) > 0.9).float()):
        (head(h, y, unknown) * 1024.0).backward()
        loss = fusedtrain.functional.linear_binary_cross_entropy_with_logits(
            h, head.weight, head.bias, y, unknown_mask=unknown, reduction="sum", **kw)
        loss.backward()
        with torch.no_grad():
            head(h, y, unknown)


def _adam_uses(dtype, master):
    ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in ((40,), (8, 8))]
    opt = fusedtrain.FusedAdamW(ps, lr=1e-3, master_weights=master)
    scaler = fusedtrain.GradScaler("cpu", init_scale=1024.0)
    for _ in range(2):
        scaler.scale(sum(p.float().square().sum() for p in ps)).backward()
        scaler.step(opt)  # the AMP step: grad_mult and found_inf in the kernel
        scaler.update()
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        opt.zero_grad()


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                                 ids=["fp32", "fp16", "bf16"])


@DTYPES
def test_every_common_launch_has_a_spec(launches, dtype):
    with fusedtrain.use_backend("triton"):
        _bce_uses(dtype)
        _adam_uses(dtype, master=dtype != torch.float32)
    _check(launches)


@DTYPES
@pytest.mark.parametrize("options", [(), ("weight",), ("ignore_index",), ("weight", "ignore_index", "label_smoothing")],
                         ids=["defaults", "weight", "ignore_index", "weight+ignore+smoothing"])
def test_every_loss_family_launch_has_a_spec(launches, dtype, options):
    with fusedtrain.use_backend("triton"):
        _family_uses(dtype, options)
    _check(launches)
    assert {k[0] for k in launches} >= {"_bce_fwd_kernel", "_bce_bwd_kernel", "_bce_sum_kernel"}


@DTYPES
@pytest.mark.parametrize("options", [False, True], ids=["plain", "pos_weight+label_weight+unknown"])
def test_every_head_launch_has_a_spec(launches, dtype, options):
    with fusedtrain.use_backend("triton"):
        _head_uses(dtype, options)
    _check(launches)
    assert any(k[0] == "_linear_bce_kernel" for k in launches), "the head launched no Triton kernel"
