"""Helpers shared by the tests: the comparator and oracles, seeds, the interpreter switch, and
optimizer snapshots."""
import os

import pytest
import torch

# The comparator, its tolerances and the float64 BCE oracle live in the package
# (fusedtrain/_compare.py), so that `fusedtrain check` uses the very same ones.
from fusedtrain._compare import (COMPUTE_EPS, FLOAT_DTYPES, NORM_RTOL, RTOL, assert_close,  # noqa: F401
                                 assert_ulps, bce_grad_slack, bce_loss_tolerance, poison_, stable_seed,
                                 torch_bce_float64, ulp, ulp_at_one)

# This process runs the Triton kernels under the interpreter (pytest -m triton_interp); it must
# be set before triton is imported, so it holds for the whole process.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
normal_only = pytest.mark.skipif(INTERPRET, reason="runs in the normal test process")

# the repository's root (the folder of setup.py)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REDUCTIONS = ("none", "mean", "sum")
DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}  # test ids


def seed_for(*parts) -> int:
    """A seed from a stable hash of `parts` (not Python's salted hash()), set as torch's global
    seed and returned so that failure messages can print it."""
    seed = stable_seed(*parts)
    torch.manual_seed(seed)
    return seed


# ---- optimizer snapshots: a step that must change nothing -------------------------------------

def snapshot(opt, params):
    """Copies of the params and of their optimizer state (params without state are left out)."""
    return ([p.detach().clone() for p in params],
            {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in params
             if p in opt.state})


def assert_unchanged(before, opt, params, what="a step"):
    """params and optimizer state are bit-identical (values, dtypes, keys) to `before`."""
    ps, states = before
    for a, p in zip(ps, params):
        assert torch.equal(a, p.detach()), f"a param changed during {what}"
    for p in params:
        now = opt.state.get(p, {})
        old = states.get(id(p), {})
        assert set(now) == set(old), f"state keys changed during {what}: {set(old)} -> {set(now)}"
        for k, v in old.items():
            if torch.is_tensor(v):
                assert torch.equal(v, now[k]) and v.dtype == now[k].dtype, f"state {k} changed during {what}"
            else:
                assert v == now[k], f"state {k} changed during {what}"


# ---- CI: a build without CUDA kernels is a failure, not a skip ------------------------------------
REQUIRE_CUDA_KERNELS = os.environ.get("FUSEDTRAIN_REQUIRE_CUDA_KERNELS", "0") == "1"


def cuda_build_missing(reason):
    """Skip a test that needs the CUDA kernels compiled (or a CUDA tool), or fail it where
    FUSEDTRAIN_REQUIRE_CUDA_KERNELS=1 (.ci/run sets it: nvcc is there, so the kernels must be)."""
    (pytest.fail if REQUIRE_CUDA_KERNELS else pytest.skip)(reason)


class OpCalls(list):
    """The fusedtrain op calls (any backend's namespace) made inside `with OpCalls("adam_") as calls:`,
    counted by the profiler: the Python launches and the C++ ones of an optimizer's plan alike."""

    def __init__(self, op):
        super().__init__()
        self._op = op

    def __enter__(self):
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        self.extend(e.name for e in self._prof.events()
                    if e.name.split("::")[0].startswith("fusedtrain") and e.name.split("::")[-1] == self._op)
        return False


# ---- 8-bit exp_avg codes ------------------------------------------------------------------------

def q8_signed_magnitudes():
    """exp_avg's 128 8-bit code magnitudes in code units, ascending (code c & 0x7F: e its 4 high
    bits, f its 3 low): 2^(e-1) (1 + f/8) for e > 0, f/8 for e = 0; float64."""
    import numpy as np

    e, f = np.arange(128) >> 3, np.arange(128) & 7
    return np.where(e > 0, 2.0 ** (e - 1) * (1 + f / 8), f / 8)


def q8_exp_avg_edge_values(n_random=10001, seed=0):
    """fp32 exp_avg values whose 8-bit codes (adam_math.h q8_encode_signed) leave an encoder no
    slack: in blocks whose absmax 1.875 makes the code scale 2^14 exact, every midpoint between
    adjacent magnitudes (a tie: to the even code) and its two fp32 neighbours, of both signs;
    +0, -0 and values that round to magnitude 0 (-1e-9 is code 0x80) or to the first codes; a
    block holding a NaN and one holding an inf; then n_random values over 20 binades, an odd
    count, so that a vector loop ends in its scalar tail."""
    import numpy as np

    mags = q8_signed_magnitudes()
    mids = ((mags[:-1] + mags[1:]) / 2 * 2.0 ** -14).astype(np.float32)  # 5 significant bits: exact
    blocks = []
    for m in (mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0))):
        blocks.append(np.concatenate([[1.875], m, -m, [0.0]]).astype(np.float32))  # 256
    small = np.zeros(256, np.float32)
    small[:9] = [1.875, -1e-9, 1e-9, -0.0, 2.0 ** -18, -(2.0 ** -18) * 1.0000001, 3 * 2.0 ** -18, 2.0 ** -17, -3e-38]
    rng = np.random.default_rng(seed)
    odd = (rng.standard_normal(256 * 2) * 1e-3).astype(np.float32)
    odd[5], odd[256 + 9] = np.nan, -np.inf
    rnd = (rng.standard_normal(n_random) * np.exp(rng.uniform(-7, 7, n_random))).astype(np.float32)
    return torch.from_numpy(np.concatenate(blocks + [small, odd, rnd]))
