"""Runs the benchmark suites: `fusedtrain bench` or `python -m fusedtrain.benchmarks.run`.

Prints one table (op, shape, dtype, baseline, ours, ratio, GB/s), writes results.json and
a PNG bar chart of the ratios. On a GPU it also measures the device's copy bandwidth and
reports each row's GB/s as a fraction of it.
"""
import argparse
import importlib
import json
import os
import platform

import torch

from .. import _plot
from . import harness

SUITES = ("bce", "adam", "amp", "head")


def copy_bandwidth_gbps(device: str) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), in GB/s.

    Args:
        device: the device whose memory is measured.
    """
    n = 1 << 28 if torch.device(device).type == "cuda" else 1 << 25
    src = torch.empty(n // 4, dtype=torch.float32, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = harness.time_ms(lambda: dst.copy_(src), device=device, warmup=3, reps=20)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _plot_ratios(rows, path):
    plt = _plot.pyplot()
    if plt is None:
        return None
    labels = [f"{r.suite} {r.case} {r.dtype}\nvs {r.baseline} ({r.ours})" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.2))
    ratios = [r.ratio for r in rows]
    ax.barh(range(len(rows)), ratios, color=["tab:green" if x >= 1 else "tab:red" for x in ratios])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over baseline (x, log scale; >1 is faster)")
    ax.set_title("fusedtrain bench")
    return _plot.save(fig, path, dpi=110)


def main(argv=None) -> int:
    """`fusedtrain bench`: runs the chosen suites, prints the table, writes results.json and
    ratios.png; returns the exit status.

    Args:
        argv: the command-line arguments (sys.argv[1:] when None); --help lists them.
    """
    p = argparse.ArgumentParser(prog="fusedtrain bench", description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SUITES), help="comma-separated suites: " + ",".join(SUITES))
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench-results", help="directory for results.json and ratios.png")
    a = p.parse_args(argv)
    suites = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        p.error(f"--only: unknown suite(s) {unknown}; expected a subset of {list(SUITES)}")
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    rows = []
    it = tqdm(suites, desc="bench", unit="suite") if tqdm else suites
    for name in it:
        if tqdm:
            it.set_postfix_str(name)
        rows += importlib.import_module(f".{name}", __package__).run(a.device, a.quick)
    print(harness.format_table(rows))
    meta = {"device": a.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "quick": a.quick}
    if torch.device(a.device).type == "cuda":
        bw = copy_bandwidth_gbps(a.device)
        meta["copy_gbps"] = bw
        meta["gpu"] = torch.cuda.get_device_name()
        print(f"\ndevice copy bandwidth {bw:.0f} GB/s; fraction achieved per row:")
        for r in rows:
            if r.gbps:
                print(f"  {r.suite} {r.case} {r.dtype} {r.ours}: {r.gbps:.0f} GB/s = {r.gbps / bw:.0%}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": [r.as_dict() for r in rows]}, f, indent=2)
    png = _plot_ratios(rows, os.path.join(a.out, "ratios.png"))
    print(f"\nwrote {os.path.join(a.out, 'results.json')}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
