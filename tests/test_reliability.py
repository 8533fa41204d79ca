"""Never lose a run: checkpoint/resume is bit-exact, and bad input never corrupts state."""
import os
import subprocess
import sys

import pytest
import torch

import fusedtrain
from helpers import assert_unchanged, normal_only, snapshot

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = normal_only


def _run(mode, path):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, os.path.join(HERE, "resume_worker.py"), mode, path], check=True, timeout=300,
                   env=env)
    return torch.load(path) if mode != "first-half" else None


def test_resume_in_new_process_is_bit_identical(tmp_path):
    full = _run("full", str(tmp_path / "full"))
    _run("first-half", str(tmp_path / "resumed"))
    resumed = _run("second-half", str(tmp_path / "resumed"))
    assert full["scale"] == resumed["scale"]
    for a, b in zip(full["params"], resumed["params"]):
        assert torch.equal(a, b), "resumed trajectory differs from the uninterrupted one"
    for k, st in full["state"].items():
        for name, v in st.items():
            assert torch.equal(v, resumed["state"][k][name]), f"state {k}.{name} differs"


@pytest.mark.parametrize("opt_cls", [fusedtrain.FusedAdam, fusedtrain.FusedAdamW])
@pytest.mark.parametrize("bad", ["sparse", "wrong-shape", "wrong-dtype"])
def test_exception_mid_step_leaves_everything_untouched(opt_cls, bad):
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in [(5, 3), (7,), (4, 4)]]
    opt = opt_cls(params, lr=1e-2, weight_decay=0.1, amsgrad=True)
    for _ in range(2):  # state exists before the failing step
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    # the last parameter's gradient is bad: nothing, not even the first parameters, may move
    if bad == "sparse":
        params[2].grad = torch.randn(4, 4).to_sparse()
    elif bad == "wrong-shape":
        params[2].grad.data = torch.randn(3)
    else:
        params[2].grad.data = torch.randn(4, 4, dtype=torch.float64)
    before = snapshot(opt, params)
    with pytest.raises((RuntimeError, ValueError, TypeError)) as err:
        opt.step()
    assert "grad" in str(err.value).lower()
    assert_unchanged(before, opt, params, "a failed step")
