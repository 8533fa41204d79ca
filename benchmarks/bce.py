"""BCE with logits: forward + backward against torch eager and torch.compile, at 8192x1024 and
65536x64.

Two kinds of rows:
- "fwd+bwd": loss.backward() on fp32 or bf16 logits, no autocast (the rows of earlier tables);
- "AMP fwd+bwd x65536": what an AMP loop runs, (loss * 65536).backward() under torch.autocast
  for fp16/bf16 logits (fp32: no autocast), torch's composition under the same autocast.

Bytes moved by fusedtrain per element (bytes_moved, for GB/s): the forward reads input and
target; the backward reads them again and writes the gradient once (2 * s_in + 2 * s_tgt + s_in:
fp32 20 B, bf16/fp16 10 B). The gradient is computed in the backward, times grad_output, and
rounded once (docs/design.md): no input-sized buffer lives between forward and backward.

    python benchmarks/bce.py [--quick] [--device cpu|cuda] [--json out.json]
"""
import contextlib
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
PLAIN_DTYPES = [torch.float32, torch.bfloat16]
AMP_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOSS_SCALE = 65536.0


def _step(loss_fn, x, y, scale, amp_dtype):
    device_type = x.device.type
    ctx = (lambda: torch.autocast(device_type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext

    def fn():
        x.grad = None
        with ctx():
            loss = loss_fn(x, y)
        (loss * scale if scale != 1.0 else loss).backward()
    return fn


def _cases(quick):
    for R, C in (QUICK_SHAPES if quick else SHAPES):
        for dt in PLAIN_DTYPES:
            yield f"fwd+bwd {R}x{C}", R, C, dt, 1.0, None
        for dt in AMP_DTYPES:
            yield f"AMP fwd+bwd x65536 {R}x{C}", R, C, dt, LOSS_SCALE, (None if dt == torch.float32 else dt)


def run(device: str, quick: bool) -> list:
    rows = []
    reps = 5 if quick else 15
    ours = [b for b in (("triton", "native") if device.startswith("cuda") else ("native",))
            if fusedtrain.backends(device)[b][0]]
    if not ours:
        ours = ["reference"]
    torch_compiled = torch.compile(lambda a, b: F.binary_cross_entropy_with_logits(a, b))
    for case, R, C, dt, scale, amp in _cases(quick):
        torch.manual_seed(0)
        x = (torch.randn(R, C, device=device) * 3).to(dt).requires_grad_()
        y = (torch.rand(R, C, device=device) < 0.1).to(dt)
        per_elem = 3 * x.element_size() + 2 * y.element_size()
        base = {
            "torch eager": harness.time_ms(_step(F.binary_cross_entropy_with_logits, x, y, scale, amp), device,
                                           reps=reps),
            "torch.compile": harness.time_ms(_step(torch_compiled, x, y, scale, amp), device, warmup=3, reps=reps),
        }
        for backend in ours:
            with fusedtrain.use_backend(backend):
                t = harness.time_ms(_step(fused_bce, x, y, scale, amp), device, reps=reps)
            for bname, bms in base.items():
                rows.append(harness.Row("bce", case, str(dt).replace("torch.", ""), bname, bms, backend, t,
                                        bytes_moved=R * C * per_elem, note=f"{per_elem} B/elem"))
    return rows


if __name__ == "__main__":
    harness.main(run)
