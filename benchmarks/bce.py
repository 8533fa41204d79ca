"""BCE with logits: forward + backward (mean reduction, input requires grad) against torch eager
and torch.compile, fp32 and bf16, at 8192x1024 and 65536x64.

Bytes moved by fusedtrain per element (reported as bytes_moved, for GB/s): the forward reads
input and target once and writes the gradient once (2*s_in + s_tgt: fp32 12 B, bf16 6 B); the
backward scales the gradient in place by grad_output (2*s_in more: fp32 20 B, bf16 10 B in all).
On CPU, loss.backward() hands a grad_output of exactly 1, which fusedtrain reads for free and
then skips the scale pass, so there the forward's bytes are all that move; on CUDA the pass
always runs (reading grad_output would synchronize).

    python benchmarks/bce.py [--quick] [--device cpu|cuda] [--json out.json]
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402

import fusedtrain  # noqa: E402
from fusedtrain.functional import binary_cross_entropy_with_logits as fused_bce  # noqa: E402

SHAPES = [(8192, 1024), (65536, 64)]
QUICK_SHAPES = [(1024, 1024), (8192, 64)]
DTYPES = [torch.float32, torch.bfloat16]


def _step(loss_fn, x, y):
    def fn():
        x.grad = None
        loss_fn(x, y).backward()
    return fn


def run(device: str, quick: bool) -> list:
    rows = []
    shapes = QUICK_SHAPES if quick else SHAPES
    reps = 5 if quick else 15
    ours = [b for b in (("triton", "native") if device.startswith("cuda") else ("native",))
            if fusedtrain.backends(device)[b][0]]
    if not ours:
        ours = ["reference"]
    torch_compiled = torch.compile(lambda a, b: F.binary_cross_entropy_with_logits(a, b))
    for R, C in shapes:
        for dt in DTYPES:
            torch.manual_seed(0)
            x = (torch.randn(R, C, device=device) * 3).to(dt).requires_grad_()
            y = torch.rand(R, C, device=device).to(dt)
            n = R * C
            per_elem = 2 * x.element_size() + y.element_size()
            if not device.startswith("cpu"):
                per_elem += 2 * x.element_size()  # the in-place scale pass of the backward
            nbytes = n * per_elem
            base = {
                "torch eager": harness.time_ms(_step(F.binary_cross_entropy_with_logits, x, y), device, reps=reps),
                "torch.compile": harness.time_ms(_step(torch_compiled, x, y), device, warmup=3, reps=reps),
            }
            for backend in ours:
                with fusedtrain.use_backend(backend):
                    t = harness.time_ms(_step(fused_bce, x, y), device, reps=reps)
                for bname, bms in base.items():
                    rows.append(harness.Row("bce", f"fwd+bwd {R}x{C}", str(dt).replace("torch.", ""), bname, bms,
                                            backend, t, bytes_moved=nbytes,
                                            note=f"{per_elem} B/elem"))
    return rows


if __name__ == "__main__":
    harness.main(run)
