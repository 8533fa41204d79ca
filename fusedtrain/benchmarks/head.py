"""The many-label head (linear + BCE with logits): fwd+bwd time and peak memory beyond the
gradients, fusedtrain's chunked head against torch's composition F.linear +
F.binary_cross_entropy_with_logits, eager and under torch.compile.

Cases (docs/design.md §2, "the head"):
- dense: B=1024, H=1024, L=131072, bf16 autocast, dense fp32 targets (~0.1% positives);
- sparse: B=1024, H=512, L=1,000,000, bf16 autocast, ~5 positives per row as a sparse CSR
  target. Torch's composition needs a dense B x L target and logits (4 GB each in fp32) and
  is not run; its row is ours with a dense target (the same head, the target it would need),
  and torch's figure is estimated from its peak measured in the dense case, scaled by B x L.

Peak memory beyond the gradients, measured in one child process: each method runs once for a
warm-up, then the peak RSS is reset (/proc/self/clear_refs) and it runs again; the figure is
that peak minus the RSS before the step minus the bytes of the gradients of h, weight and bias
(which every method must hold). The child's glibc returns every buffer of 64 KiB or more to the
system when it is freed (MALLOC_MMAP_THRESHOLD_), so its RSS follows the live memory instead of
hiding a step's buffers in memory the warm-up left behind. Linux only; elsewhere the column is
left empty. On CUDA: the caching allocator's peak.

    python -m fusedtrain.benchmarks.head [--quick] [--device cpu|cuda]
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

import fusedtrain

from . import harness

DENSE = dict(B=1024, H=1024, L=131072)
SPARSE = dict(B=1024, H=512, L=1_000_000, positives=5)
QUICK_DENSE = dict(B=256, H=256, L=8192)
QUICK_SPARSE = dict(B=256, H=128, L=50_000, positives=5)
AMP = torch.bfloat16


def _inputs(case, device, sparse):
    torch.manual_seed(0)
    B, H, L = case["B"], case["H"], case["L"]
    h = torch.randn(B, H, device=device, requires_grad=True)
    w = (torch.randn(L, H, device=device) / H**0.5).requires_grad_()
    b = torch.zeros(L, device=device, requires_grad=True)
    if sparse:
        k = case["positives"]
        cols = torch.sort(torch.randint(0, L, (B, k), device=device), dim=1).values.flatten()
        crow = torch.arange(0, B * k + 1, k, device=device)
        target = torch.sparse_csr_tensor(crow, cols, torch.ones(B * k, device=device), (B, L),
                                         check_invariants=False)
    else:
        target = (torch.rand(B, L, device=device) < 1e-3).float()
    return h, w, b, target


def _torch_loss(h, w, b, target):
    return F.binary_cross_entropy_with_logits(F.linear(h, w, b), target)


def _ours_loss(h, w, b, target):
    return fusedtrain.functional.linear_binary_cross_entropy_with_logits(h, w, b, target)


_COMPILED = {}


def _method(name):
    if name == "torch eager":
        return _torch_loss
    if name == "torch.compile":
        return _COMPILED.setdefault(name, torch.compile(_torch_loss))
    return _ours_loss


def _step(fn, h, w, b, target, device):
    def run():
        for t in (h, w, b):
            t.grad = None
        with torch.autocast(torch.device(device).type, dtype=AMP):
            loss = fn(h, w, b, target)
        loss.backward()
    return run


def _vm(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def peak_beyond_grads_mib(method, case, device, sparse, dense_target=False):
    """One fwd+bwd of `method` after a warm-up: the peak memory beyond the RSS before the step
    and the gradients, in MiB (CUDA: the allocator's peak)."""
    h, w, b, target = _inputs(case, device, sparse)
    if dense_target:
        target = target.to_dense()
    run = _step(_method(method), h, w, b, target, device)
    run()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (h, w, b))
    for t in (h, w, b):
        t.grad = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
        base = _vm("VmRSS:")
        run()
        peak = _vm("VmHWM:")
    return max(0, peak - base - grads) / 2**20


_PEAKS = [("ours", "dense", False), ("torch eager", "dense", False), ("torch.compile", "dense", False),
          ("ours", "sparse", False), ("ours", "sparse", True)]


def _peaks_in_child(device, quick):
    """{(method, case, dense_target): MiB} of every _PEAKS entry, from one child process."""
    if not (device.startswith("cuda") or os.path.exists("/proc/self/clear_refs")):
        return {}
    found = harness.child_json(__spec__.name, ["--peaks-child", device] + (["--quick"] if quick else []),
                               "the peak memory figures", timeout=900, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    return {} if found is None else {tuple(k): v for k, v in found}


def _cases(quick):
    return {"dense": (QUICK_DENSE if quick else DENSE, False), "sparse": (QUICK_SPARSE if quick else SPARSE, True)}


def _label(case, sparse):
    s = f"B{case['B']} H{case['H']} L{case['L']}"
    return f"fwd+bwd {s} sparse ({case['positives']}/row)" if sparse else f"fwd+bwd {s} dense"


def run(device: str, quick: bool) -> list:
    """The head rows (harness.Row) of this device: time against torch eager and torch.compile
    (compile not in --quick: its compile time alone exceeds the quick budget), peak memory
    beyond the gradients from a child process.

    Args:
        device: "cpu" or "cuda".
        quick: smaller sizes, fewer repetitions.
    """
    rows = []
    reps = 2 if quick else 3
    cases = _cases(quick)
    dense, _ = cases["dense"]
    sparse, _ = cases["sparse"]
    peaks = _peaks_in_child(device, quick)
    h, w, b, target = _inputs(dense, device, False)
    ours_ms = harness.time_ms(_step(_ours_loss, h, w, b, target, device), device, warmup=1, reps=reps)
    for name in ["torch eager"] + ([] if quick else ["torch.compile"]):
        ms = harness.time_ms(_step(_method(name), h, w, b, target, device), device, warmup=1, reps=reps)
        rows.append(harness.Row("head", _label(dense, False), "bf16 autocast", name, ms, "default", ours_ms,
                                baseline_peak_mib=peaks.get((name, "dense", False), 0.0),
                                ours_peak_mib=peaks.get(("ours", "dense", False), 0.0)))
    del h, w, b, target

    h, w, b, target = _inputs(sparse, device, True)
    reps = 2  # ~6 s a step here: the case stays within a minute
    ours_ms = harness.time_ms(_step(_ours_loss, h, w, b, target, device), device, warmup=1, reps=reps)
    dense_target = target.to_dense()
    dense_ms = harness.time_ms(_step(_ours_loss, h, w, b, dense_target, device), device, warmup=1, reps=reps)
    del dense_target
    est = peaks.get(("torch eager", "dense", False), 0.0) * (sparse["B"] * sparse["L"]) / (dense["B"] * dense["L"])
    rows.append(harness.Row("head", _label(sparse, True), "bf16 autocast", "ours, dense target", dense_ms, "default",
                            ours_ms, baseline_peak_mib=peaks.get(("ours", "sparse", True), 0.0),
                            ours_peak_mib=peaks.get(("ours", "sparse", False), 0.0),
                            note=f"torch's dense composition: not run; about {est / 1024:.1f} GiB beyond the gradients "
                                 f"(its dense-case peak scaled by B x L), plus a "
                                 f"{sparse['B'] * sparse['L'] * 4 / 2**30:.1f} GiB dense target"))
    for r in rows:
        if r.note:
            print(f"head {r.case}: {r.note}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peaks-child":
        device, quick = sys.argv[2], "--quick" in sys.argv
        out = []
        for method, case_name, dense_target in _PEAKS:
            if quick and method == "torch.compile":
                continue
            case, sparse = _cases(quick)[case_name]
            out.append([[method, case_name, dense_target],
                        peak_beyond_grads_mib(method, case, device, sparse, dense_target)])
        print(json.dumps(out))
    else:
        harness.main(run)
