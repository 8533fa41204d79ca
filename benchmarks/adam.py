"""Adam/AdamW step benchmark: FusedAdamW against torch.optim.AdamW (for-loop, foreach,
fused=True) and DeepSpeed's DeepSpeedCPUAdam where deepspeed is importable (CPU only).

Workloads: a 22M-parameter mix (4096x4096, 4096x1024, 1024x1024, 40x4096) and 1000 tensors
of 4096. One row per (workload, dtype, baseline, ours backend); timings of one row are taken
in the same process on the same inputs (median after warm-up). GB/s counts the bytes one
fp32 step must move: param, grad, exp_avg, exp_avg_sq read, param and states written
(28 bytes per fp32 parameter).

    python benchmarks/adam.py [--quick] [--device cpu|cuda]
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import harness  # noqa: E402

import fusedtrain  # noqa: E402

WORKLOADS = {
    "22M mix": [(4096, 4096), (4096, 1024), (1024, 1024), (40, 4096)],
    "1000x4096": [(4096,)] * 1000,
}


def _params(shapes, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
    return ps


def _bytes(shapes, dtype):
    n = sum(torch.Size(s).numel() for s in shapes)
    # read p, g, m, v; write p, m, v
    return 7 * n * torch.empty((), dtype=dtype).element_size()


def _baselines(device):
    out = [("AdamW for-loop", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=False)),
           ("AdamW foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True)),
           ("AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True))]
    if torch.device(device).type == "cpu":
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            out.append(("DeepSpeedCPUAdam", lambda ps: DeepSpeedCPUAdam(ps, lr=1e-3, weight_decay=0.01,
                                                                           adamw_mode=True)))
        except Exception:  # not installed, or its op cannot build here: skip the row
            pass
    return out


def _ours_backends(device):
    names = []
    for name in ("native", "triton"):
        ok, _ = fusedtrain.backends(device)[name]
        if ok and not (name == "triton" and torch.device(device).type == "cpu"):
            names.append(name)
    return names


def _paired(ours, base, device, warmup, reps, rounds):
    """Median times of two step functions measured in alternating rounds, so that a machine
    whose load drifts (shared CPUs) slows both alike."""
    a, b = [], []
    for _ in range(rounds):
        a.append(harness.time_ms(ours, device, warmup=warmup, reps=reps))
        b.append(harness.time_ms(base, device, warmup=warmup, reps=reps))
        warmup = 1
    return statistics.median(a), statistics.median(b)


def run(device: str, quick: bool) -> list:
    rows = []
    reps, rounds = (3, 2) if quick else (10, 5)
    warmup = 2 if quick else 5
    cpu = torch.device(device).type == "cpu"
    dtypes = [torch.float32] if quick or cpu else [torch.float32, torch.bfloat16]
    for case, shapes in WORKLOADS.items():
        if quick and case == "22M mix" and cpu:
            shapes = [(1024, 1024), (40, 4096)]
            case = "1.2M mix (quick)"
        for dtype in dtypes:
            for b in _ours_backends(device):
                ours_opt = fusedtrain.FusedAdamW(_params(shapes, device, dtype), lr=1e-3, weight_decay=0.01)

                def ours(opt=ours_opt, b=b):
                    with fusedtrain.use_backend(b):
                        opt.step()

                for bname, make in _baselines(device):
                    if dtype != torch.float32 and bname == "DeepSpeedCPUAdam":
                        continue
                    try:
                        base_opt = make(_params(shapes, device, dtype))
                        slow = "for-loop" in bname or "foreach" in bname
                        ours_ms, base_ms = _paired(ours, base_opt.step, device, warmup, reps,
                                                   max(2, rounds // 2) if slow else rounds)
                    except Exception as e:  # a baseline that cannot run here
                        print(f"skipping {bname}: {e}", file=sys.stderr)
                        continue
                    rows.append(harness.Row("adam", f"AdamW step {case}", str(dtype).replace("torch.", ""), bname,
                                            base_ms, f"FusedAdamW {b}", ours_ms, _bytes(shapes, dtype)))
    return rows


if __name__ == "__main__":
    harness.main(run)
