"""Adam/AdamW step benchmark: FusedAdamW against torch.optim.AdamW (for-loop, foreach,
fused=True), DeepSpeed's DeepSpeedCPUAdam where deepspeed is installed (CPU only), and the
memory floor (CPU: stream_floor.c, the step's bytes with no math, for fp32, bf16 and 8-bit
moments).

Workloads: a 22M-parameter mix (4096x4096, 4096x1024, 1024x1024, 40x4096) and 1000 tensors
of 4096, and the host's share of a step (1000 tensors of 4). One row per (workload, dtype, baseline, ours backend). Every optimizer of a
workload steps the same param and grad tensors (each keeps its own states), and the two
sides of a row are timed in alternating rounds in the same process (median after warm-up):
a host's memory bandwidth can drift between runs, so only what is measured side by side
compares. GB/s counts the bytes one fp32 step must move: param, grad, exp_avg, exp_avg_sq
read, param and states written (28 bytes per fp32 parameter).

DeepSpeed rows run in a child process that times FusedAdamW first and imports deepspeed
after: importing deepspeed was seen to slow every other CPU Adam in the process (the README
has the measurement), so an in-process comparison would understate every other row.

    python -m fusedtrain.benchmarks.adam [--quick] [--device cpu|cuda]
"""
import importlib.util
import json
import statistics
import sys

import torch

import fusedtrain

from . import harness, stream_floor

WORKLOADS = {
    "22M mix": [(4096, 4096), (4096, 1024), (1024, 1024), (40, 4096)],
    "1000x4096": [(4096,)] * 1000,
}
QUICK_MIX = ("1.2M mix (quick)", [(1024, 1024), (40, 4096)])
HYPER = dict(lr=1e-3, weight_decay=0.01)


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


def _baselines():
    return [("AdamW for-loop", lambda ps: torch.optim.AdamW(ps, foreach=False, **HYPER)),
            ("AdamW foreach", lambda ps: torch.optim.AdamW(ps, foreach=True, **HYPER)),
            ("AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER))]


def _ours_backends(device):
    names = []
    for name in ("native", "triton"):
        ok, _ = fusedtrain.backends(device)[name]
        if ok and not (name == "triton" and torch.device(device).type == "cpu"):
            names.append(name)
    return names


def _interleaved(fns, device, warmup, reps, rounds):
    """Median times of step functions measured in alternating rounds, so that a machine whose
    load drifts (shared CPUs) slows them alike."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            t.append(harness.time_ms(fn, device, warmup=warmup, reps=reps))
        warmup = 1
    return [statistics.median(t) for t in times]


def _paired(ours, base, device, warmup, reps, rounds):
    """(ours, base) median times, as _interleaved."""
    return tuple(_interleaved((ours, base), device, warmup, reps, rounds))


def _timing(quick):
    """(reps, rounds, warmup) of every row."""
    return (3, 2, 2) if quick else (10, 5, 5)


def _deepspeed_child(case: str, quick: bool) -> None:
    """Child process of a DeepSpeed row: FusedAdamW timed first, then DeepSpeedCPUAdam on the
    same params; prints {"ours_ms", "ds_ms"} as JSON on its last line."""
    shapes = dict([QUICK_MIX] + list(WORKLOADS.items()))[case]
    reps, rounds, warmup = _timing(quick)
    ps = _params(shapes, "cpu", torch.float32)

    def median_ms(step):
        return statistics.median(harness.time_ms(step, "cpu", warmup=warmup, reps=reps) for _ in range(rounds))

    ours_ms = median_ms(fusedtrain.FusedAdamW(ps, **HYPER).step)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    ds_ms = median_ms(DeepSpeedCPUAdam(ps, adamw_mode=True, **HYPER).step)
    print(json.dumps({"ours_ms": ours_ms, "ds_ms": ds_ms}))


def _deepspeed_row(case, shapes, quick):
    if importlib.util.find_spec("deepspeed") is None:
        return None
    # the first run builds DeepSpeed's CPU Adam op (minutes)
    r = harness.child_json(__spec__.name, ["--deepspeed-child", case] + (["--quick"] if quick else []),
                           "DeepSpeedCPUAdam", timeout=900)
    if r is None:
        return None
    return harness.Row("adam", f"AdamW step {case}", "float32", "DeepSpeedCPUAdam (own process)", r["ds_ms"],
                       "FusedAdamW native", r["ours_ms"], _bytes(shapes, torch.float32))


def _host_rows(device, warmup, reps, rounds):
    """What a step costs besides moving bytes, at 1000 params of 4 elements: FusedAdamW.step
    against AdamW(fused=True).step, and against FusedAdamW.step with its plans dropped before
    each step (so gathered in Python and planned again: what a step costs the first time, or
    whenever a group's params, grads or states changed; docs/design.md §7)."""
    shapes = [(4,)] * 1000
    ps = _params(shapes, device, torch.float32)
    ours_opt = fusedtrain.FusedAdamW(ps, **HYPER)
    base_opt = torch.optim.AdamW(ps, fused=True, **HYPER)
    ours_ms, base_ms = _paired(ours_opt.step, base_opt.step, device, warmup, reps, rounds)

    def unplanned_step():
        ours_opt.__dict__.pop("_plans", None)
        ours_opt.step()

    unplanned_ms, planned_ms = _paired(unplanned_step, ours_opt.step, device, warmup, reps, rounds)
    return [harness.Row("adam", "host: step of 1000 params of 4", "float32", "AdamW fused", base_ms,
                        "FusedAdamW", ours_ms),
            harness.Row("adam", "host: step of 1000 params of 4, plan", "float32", "FusedAdamW, planned again",
                        unplanned_ms, "FusedAdamW", planned_ms)]


def _tensor_bytes(t):
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # a subclass (torchao's 8-bit state)
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def state_bytes_per_param(opt, ps):
    """Bytes of optimizer state per parameter (moments and their scales; not the step, not
    master weights), measured from the state tensors."""
    n = sum(p.numel() for p in ps)
    return sum(_tensor_bytes(v) for p in ps for k, v in opt.state[p].items()
               if torch.is_tensor(v) and k not in ("step", "master_param", "absmax_layout") and v.numel() > 1) / n


def _lean_rows(case, shapes, device, warmup, reps, rounds):
    """state_format="bf16" and "8bit" against torch's fused fp32 AdamW on the same params: 20
    and about 16 bytes moved per parameter instead of 28 (the ceilings of the ratio at the
    memory floor: 1.4x and 1.74x); on CPU also against the format's own memory floor
    (stream_floor.c over the same tensors: its bytes with no math)."""
    ps = _params(shapes, device, torch.float32, seed=1)
    base = torch.optim.AdamW(ps, fused=True, **HYPER)
    base.step()
    rows = []
    for fmt, nbytes in (("bf16", 20), ("8bit", 16 + 4 * 2 * 2 / 256)):
        opt = fusedtrain.FusedAdamW(ps, state_format=fmt, **HYPER)
        opt.step()
        n = sum(torch.Size(s).numel() for s in shapes)
        st = [opt.state[p] for p in ps]
        fns = [opt.step, base.step]
        floor = torch.device(device).type == "cpu" and stream_floor.available()
        if floor and len({s["exp_avg"].dtype for s in st}) > 1:  # small tensors keep fp32 moments
            print(f"skipping the {fmt} floor row of {case}: its moments mix dtypes", file=sys.stderr)
            floor = False
        if floor:
            # the same bytes with no math, over the same tensors: the format's own floor, and
            # torch's time over it the ceiling of the ratio on this machine
            fns.append(stream_floor.make_pass([p.detach() for p in ps], [p.grad for p in ps],
                                              [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st]))
        ours_ms, base_ms, *floor_ms = _interleaved(fns, device, warmup, reps, rounds)
        row = lambda bname, base_ms, note="", fmt=fmt, nbytes=nbytes: harness.Row(  # noqa: E731
            "adam", f"AdamW step {case}, {fmt} moments", "float32", bname, base_ms,
            f"FusedAdamW state_format={fmt}", ours_ms, nbytes * n, note=note)
        rows.append(row("AdamW fused (fp32 moments)", base_ms,
                        f"moments {state_bytes_per_param(opt, ps):.2f} B/param "
                        f"(torch: {state_bytes_per_param(base, ps):.2f})"))
        if floor_ms:
            rows.append(row(f"memory floor (no math, {fmt} moments)", floor_ms[0],
                            f"ceiling of the ratio to AdamW fused: {base_ms / floor_ms[0]:.2f}x"))
    return rows


def _8bit_peers():
    """The 8-bit AdamW of bitsandbytes and torchao (optional extras: `pip install
    fusedtrain[bench-peers]`), those installed."""
    peers = []
    try:
        import bitsandbytes as bnb
        peers.append(("bitsandbytes AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, **HYPER)))
    except Exception:  # noqa: BLE001 - absent, or no backend for this machine
        pass
    try:
        from torchao.optim import AdamW8bit
        peers.append(("torchao AdamW8bit", lambda ps: AdamW8bit(ps, **HYPER)))
    except Exception:  # noqa: BLE001
        pass
    return peers


def _8bit_peer_rows(case, shapes, device, quick):
    """state_format="8bit" against the 8-bit AdamW of bitsandbytes and torchao (one launch, or
    one compiled graph, per param; on CPU their slow paths): a few steps each."""
    rows = []
    n = sum(torch.Size(s).numel() for s in shapes)
    for name, make in _8bit_peers():
        ps = _params(shapes, device, torch.float32, seed=2)
        base = make(ps)
        ours = fusedtrain.FusedAdamW(ps, state_format="8bit", **HYPER)
        base.step()
        ours.step()
        ours_ms, base_ms = _paired(ours.step, base.step, device, 1, 2 if quick else 3, 1 if quick else 2)
        rows.append(harness.Row("adam", f"AdamW step {case}, 8bit moments", "float32", name, base_ms,
                                "FusedAdamW state_format=8bit", ours_ms, int((16 + 4 * 2 * 2 / 256) * n),
                                note=f"moments {state_bytes_per_param(ours, ps):.2f} B/param "
                                     f"({name.split()[0]}: {state_bytes_per_param(base, ps):.2f})"))
    return rows


def run(device: str, quick: bool) -> list:
    """The AdamW step rows (harness.Row) of this device.

    Args:
        device: "cpu" or "cuda".
        quick: smaller workloads and fewer repetitions.
    """
    rows = []
    reps, rounds, warmup = _timing(quick)
    cpu = torch.device(device).type == "cpu"
    dtypes = [torch.float32] if quick or cpu else [torch.float32, torch.bfloat16]
    for case, shapes in WORKLOADS.items():
        if quick and case == "22M mix" and cpu:
            case, shapes = QUICK_MIX
        for dtype in dtypes:
            ps = _params(shapes, device, dtype)
            dname = str(dtype).replace("torch.", "")
            for b in _ours_backends(device):
                ours_opt = fusedtrain.FusedAdamW(ps, **HYPER)

                def ours(opt=ours_opt, b=b):
                    with fusedtrain.use_backend(b):
                        opt.step()

                row = lambda bname, base_ms, ours_ms: harness.Row(  # noqa: E731
                    "adam", f"AdamW step {case}", dname, bname, base_ms, f"FusedAdamW {b}", ours_ms,
                    _bytes(shapes, dtype))
                for bname, make in _baselines():
                    try:
                        base_opt = make(ps)
                        slow = "for-loop" in bname or "foreach" in bname
                        ours_ms, base_ms = _paired(ours, base_opt.step, device, warmup, reps,
                                                   max(2, rounds // 2) if slow else rounds)
                    except Exception as e:  # a baseline that cannot run here
                        print(f"skipping {bname}: {e}", file=sys.stderr)
                        continue
                    rows.append(row(bname, base_ms, ours_ms))
                if cpu and dtype == torch.float32 and stream_floor.available():
                    ours()  # states exist: the floor streams the very tensors the step does
                    st = [ours_opt.state[p] for p in ps]
                    floor = stream_floor.make_pass([p.detach() for p in ps], [p.grad for p in ps],
                                                   [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st])
                    ours_ms, floor_ms = _paired(ours, floor, device, warmup, reps, rounds)
                    rows.append(row("memory floor (no math)", floor_ms, ours_ms))
            if dtype == torch.float32:
                rows += _lean_rows(case, shapes, device, warmup, reps, rounds)
                rows += _8bit_peer_rows(case, shapes, device, quick)
            if cpu and dtype == torch.float32:
                r = _deepspeed_row(case, shapes, quick)
                if r is not None:
                    rows.append(r)
    if "native" in _ours_backends(device):
        rows += _host_rows(device, warmup, reps, rounds)
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--deepspeed-child":
        _deepspeed_child(sys.argv[2], "--quick" in sys.argv)
    else:
        harness.main(run)
