"""BCE with logits and its family (focal loss, ASL): forward + backward against torch eager and
torch.compile, at 8192x1024 and 65536x64 (the family at 8192x1024, against the plain-torch forms
of torchvision's sigmoid_focal_loss and of the ASL paper's reference code).

Two kinds of rows:
- "fwd+bwd": loss.backward() on fp32 or bf16 logits, no autocast (the rows of earlier tables);
- "AMP fwd+bwd x65536": what an AMP loop runs, (loss * 65536).backward() under torch.autocast
  for fp16/bf16 logits, torch's composition under the same autocast.

The family rows note the minor page faults of one step of each (CPU): a step that faults in its
fresh 32 MiB fp32 gradient pays 0.5-1.1 us per 4 KiB page on the 2-core VM (4-9 ms at
8192x1024, varying from day to day) whatever computes it; fusedtrain faults them in with one
madvise per thread (csrc/cpu/prefault.h), which saves the per-touch traps but not the kernel's
zeroing. When our step faults, the note also gives the time of x + y into a fresh tensor: torch's
own elementwise op over the same bytes, faulting its output page by page, with no math. It is a
reference rather than a strict floor (a step may fault more cheaply, as our madvise does, or not
at all under a caching allocator), and baseline / that time is what a step with no math but
torch's way of faulting would reach.

On CPU, rows marked "(tcmalloc)" time the fp32/bf16 "fwd+bwd" cases again in a child process
with libtcmalloc_minimal preloaded (LD_PRELOAD), when the library is installed (Debian:
libtcmalloc-minimal4). glibc hands every buffer of 32 MiB or more out as fresh mmap'ed memory,
so each step page-faults its new fp32 8192x1024 gradient; a caching allocator keeps that
memory. That is the allocator's business, not the kernel's: the README suggests it as a tip.

Bytes moved by fusedtrain per element (bytes_moved, for GB/s): the forward reads input and
target; the backward reads them again and writes the gradient once (2 * s_in + 2 * s_tgt + s_in:
fp32 20 B, bf16/fp16 10 B). The gradient is computed in the backward, times grad_output, and
rounded once (docs/design.md); on CPU a plain loss.backward() takes the gradient the forward
wrote for a grad_output of 1 instead (12 B fp32, 6 B bf16 moved).

    python -m fusedtrain.benchmarks.bce [--quick] [--device cpu|cuda] [--json out.json]
"""
import contextlib
import glob
import json
import sys

import torch
import torch.nn.functional as F

import fusedtrain

from ..functional import binary_cross_entropy_with_logits as fused_bce
from . import harness

SHAPES = [(8192, 1024), (65536, 64)]
QUICK_SHAPES = [(1024, 1024), (8192, 64)]
PLAIN_DTYPES = [torch.float32, torch.bfloat16]
AMP_DTYPES = [torch.bfloat16, torch.float16]
LOSS_SCALE = 65536.0


def torch_focal(x, y, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss's formula in plain torch, reduction='mean'.

    Args:
        x, y: logits and labels.
        alpha, gamma: as torchvision's.
    """
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * ((1 - p_t) ** gamma)
    return ((alpha * y + (1 - alpha) * (1 - y)) * loss).mean()


def torch_asl(x, y, gamma_neg=4.0, gamma_pos=1.0, clip=0.05, eps=1e-8):
    """The ASL paper's reference formula in plain torch, averaged.

    Args:
        x, y: logits and labels.
        gamma_neg, gamma_pos, clip, eps: as the reference code's.
    """
    xs_pos = torch.sigmoid(x)
    xs_neg = (1 - xs_pos + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    pt = xs_pos * y + xs_neg * (1 - y)
    return -(loss * torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))).mean()


FAMILY = {"focal": (torch_focal, lambda a, b: fusedtrain.functional.sigmoid_focal_loss(a, b, reduction="mean")),
          "asl": (torch_asl, lambda a, b: fusedtrain.functional.asymmetric_loss(a, b, reduction="mean"))}


def _step(loss_fn, x, y, scale, amp_dtype):
    device_type = x.device.type
    ctx = (lambda: torch.autocast(device_type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext

    def fn():
        x.grad = None
        with ctx():
            loss = loss_fn(x, y)
        (loss * scale if scale != 1.0 else loss).backward()
    return fn


def _fresh_output(x, y):
    """x + y into a new tensor: reads the step's inputs and writes a gradient-sized output at memory
    speed, page faults included (glibc maps it fresh as it does the step's gradient; torch's add
    faults it in page by page)."""
    xd = x.detach()
    return lambda: torch.add(xd, y)


def _cases(quick):
    for R, C in (QUICK_SHAPES if quick else SHAPES):
        for dt in PLAIN_DTYPES:
            yield f"fwd+bwd {R}x{C}", R, C, dt, 1.0, None
        for dt in AMP_DTYPES:
            yield f"AMP fwd+bwd x65536 {R}x{C}", R, C, dt, LOSS_SCALE, dt


def _family_rows(device, quick, reps):
    """Focal loss and ASL, fwd+bwd of the mean, against their plain-torch forms."""
    rows = []
    R, C = QUICK_SHAPES[0] if quick else SHAPES[0]
    for name, (theirs, ours) in FAMILY.items():
        compiled = torch.compile(theirs)
        for dt in PLAIN_DTYPES:
            torch.manual_seed(0)
            x = (torch.randn(R, C, device=device) * 3).to(dt).requires_grad_()
            y = (torch.rand(R, C, device=device) < 0.1).to(dt)
            steps = {"torch eager": _step(theirs, x, y, 1.0, None), "torch.compile": _step(compiled, x, y, 1.0, None),
                     "ours": _step(ours, x, y, 1.0, None)}
            base = {"torch eager": harness.time_ms(steps["torch eager"], device, reps=reps),
                    "torch.compile": harness.time_ms(steps["torch.compile"], device, warmup=3, reps=reps)}
            t = harness.time_ms(steps["ours"], device, reps=reps)
            # the fresh gradient's first touch, paid by both (module docstring); None off Unix
            faults = {k: harness.page_faults(f) for k, f in steps.items()} if device == "cpu" else {}
            # when the step faults: the same bytes, faulted in page by page, with no math (a reference)
            fresh_add = harness.time_ms(_fresh_output(x, y), device, reps=reps) if faults.get("ours") else None
            per_elem = 3 * x.element_size() + 2 * y.element_size()
            for bname, bms in base.items():
                note = f"{per_elem} B/elem"
                if faults.get("ours") is not None:
                    note += f"; page faults/step {faults['ours']} vs {faults[bname]}"
                if fresh_add is not None:
                    note += f"; x + y into a fresh tensor {fresh_add:.2f} ms ({bms / fresh_add:.2f}x)"
                rows.append(harness.Row("bce", f"{name} fwd+bwd {R}x{C}", str(dt).replace("torch.", ""), bname, bms,
                                        "default", t, bytes_moved=R * C * per_elem, note=note))
    return rows


def _tcmalloc():
    found = sorted(glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4*") + glob.glob("/usr/lib/libtcmalloc_minimal.so.4*"))
    return found[0] if found else None


def _tcmalloc_rows(quick):
    """The plain fwd+bwd cases timed in a child process with tcmalloc preloaded."""
    lib = _tcmalloc()
    if lib is None:
        return []
    found = harness.child_json(__spec__.name, ["--plain-child"] + (["--quick"] if quick else []),
                               "the tcmalloc rows", timeout=600, env={"LD_PRELOAD": lib})
    if found is None:
        return []
    rows = [harness.Row(**{k: v for k, v in r.items() if k not in ("ratio", "gbps")}) for r in found]
    for r in rows:
        r.case += " (tcmalloc)"
    return rows


def run(device: str, quick: bool, plain_only: bool = False) -> list:
    """The BCE and loss-family rows (harness.Row) of this device.

    Args:
        device: "cpu" or "cuda".
        quick: smaller shapes and fewer repetitions.
        plain_only: only the plain fwd+bwd cases (the tcmalloc child's rows).
    """
    rows = []
    reps = 5 if quick else 15
    ours = [b for b in (("triton", "native") if device.startswith("cuda") else ("native",))
            if fusedtrain.backends(device)[b][0]]
    if not ours:
        ours = ["reference"]
    torch_compiled = torch.compile(lambda a, b: F.binary_cross_entropy_with_logits(a, b))
    for case, R, C, dt, scale, amp in _cases(quick):
        if plain_only and amp is not None:
            continue
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
    if not plain_only:
        rows += _family_rows(device, quick, reps)
    if device == "cpu" and not plain_only:
        rows += _tcmalloc_rows(quick)
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--plain-child":
        print(json.dumps([r.as_dict() for r in run("cpu", "--quick" in sys.argv, plain_only=True)]))
    else:
        harness.main(run)
