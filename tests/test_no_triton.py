"""The package without Triton installed (docs/design.md §2: it imports and works, the triton backend
reports itself unavailable with the reason). A child process hides triton behind a
sys.meta_path finder that raises ModuleNotFoundError, as a missing package does, before
anything imports it; TRITON_INTERPRET=1 is set too, so nothing but the missing package can
make the backend unavailable on CPU."""
import os
import subprocess
import sys

from helpers import ROOT, normal_only

pytestmark = normal_only

CHILD = r'''
import importlib.abc
import sys


class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoTriton())
assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules)

import torch
import fusedtrain
from fusedtrain import _backend, reference
from fusedtrain._compare import assert_close

try:
    import triton  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("the finder did not hide triton")

# availability: triton unavailable with the reason, on every device; the others as usual
for dev in ("cpu", "cuda"):
    ok, why = fusedtrain.backends(dev)["triton"]
    assert not ok and "not installed" in why and "triton" in why, (dev, why)
native_ok = fusedtrain.backends("cpu")["native"][0]
assert _backend.select(torch.device("cpu"), "op") == ("native" if native_ok else "reference")
# with native gone too, a CUDA tensor gets the reference backend (triton first otherwise)
_backend._ext.native_cuda = lambda: (False, "pretend")
assert _backend.select(torch.device("cuda"), "op") == "reference"
with fusedtrain.use_backend("triton"):
    try:
        _backend.select(torch.device("cpu"), "unscale_and_check_")
    except fusedtrain.BackendError as e:
        assert "not installed" in str(e), e
    else:
        raise AssertionError("an explicit triton choice did not raise")

backends = ["reference"] + (["native"] if native_ok else [])
F = torch.nn.functional
for backend in backends:
    with fusedtrain.use_backend(backend):
        # BCE, forward and backward, against torch in float64
        g = torch.Generator().manual_seed(1)
        x = (torch.randn(33, 17, generator=g) * 4).requires_grad_()
        y = torch.rand(33, 17, generator=g)
        loss = fusedtrain.functional.binary_cross_entropy_with_logits(x, y)
        loss.backward()
        x64 = x.detach().double().requires_grad_()
        ref = F.binary_cross_entropy_with_logits(x64, y.double())
        ref.backward()
        assert_close(loss, ref, rtol=1e-6, atol=0, what=f"{backend} bce loss")
        assert_close(x.grad, x64.grad, rtol=1e-5, atol=1e-9, what=f"{backend} bce grad")
        mod = fusedtrain.FusedBCEWithLogits()
        assert_close(mod(x.detach(), y), ref.detach(), rtol=1e-6, atol=0, what=f"{backend} module")

        # unscale: bit for bit torch's own
        ts = [torch.randn(n, generator=g) * 1000 for n in (5, 3000)]
        theirs = [t.clone() for t in ts]
        inv, found, found_t = torch.tensor(1 / 1024.0), torch.zeros(()), torch.zeros(())
        norm = fusedtrain.unscale_and_check_(ts, inv, found, compute_norm=True)
        torch._amp_foreach_non_finite_check_and_unscale_(theirs, found_t, inv)
        assert all(torch.equal(a, b) for a, b in zip(ts, theirs)) and found.item() == found_t.item() == 0
        assert_close(norm, torch.cat(theirs).double().norm(), rtol=1e-6, atol=0, what=f"{backend} norm")

        # Adam: one step against torch.optim.AdamW in float64
        p = torch.randn(100, generator=g).requires_grad_()
        q = p.detach().double().requires_grad_()
        p.grad = torch.randn(100, generator=g)
        q.grad = p.grad.double()
        fusedtrain.FusedAdamW([p], lr=1e-2).step()
        torch.optim.AdamW([q], lr=1e-2, foreach=False).step()
        assert_close(p, q.detach(), rtol=1e-6, atol=1e-7, what=f"{backend} adamw")

print("OK", backends)
'''


def test_package_works_without_triton():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("FUSEDTRAIN_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.startswith("OK"), out.stdout
