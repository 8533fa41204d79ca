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
# (multi_tensor.tile); GRAD: the forward's unit gradient, asked on CPU only (ops/bce.py)
NOT_COMPARED = {"BLOCK", "ITERS", "GRAD"}


def _key(name, constexprs, options):
    ce = tuple(sorted((k, str(v)) for k, v in constexprs.items() if k not in NOT_COMPARED))
    return name, ce, options.get("num_warps", 4)


def _spec_keys():
    keys = set()
    for s in aot.all_specs():
        keys.add(_key(s.kernel.fn.__name__, s.constexprs, s.options))
    return keys


@pytest.fixture
def launches(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    seen = []
    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = self.fn.__code__.co_varnames[:self.fn.__code__.co_argcount]
        constexprs = {k: v for k, v in kwargs.items() if k in names and k.isupper()}
        seen.append(_key(self.fn.__name__, constexprs, {"num_warps": kwargs.get("num_warps", 4)}))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_common_launch_has_a_spec(launches, dtype):
    with fusedtrain.use_backend("triton"):
        _bce_uses(dtype)
        _adam_uses(dtype, master=dtype != torch.float32)
    assert launches, "no launch captured"
    missing = sorted(set(launches) - _spec_keys())
    assert not missing, "launches without an AotSpec:\n" + "\n".join(map(str, missing))
