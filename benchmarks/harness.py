"""Timing and reporting shared by every benchmark suite (benchmarks/<family>.py).

A suite module defines `run(device: str, quick: bool) -> list[Row]` and, for running it
alone, `if __name__ == "__main__": harness.main(run)`. All timings of one row are taken in
the same process on the same inputs: warm-up, then the median of many runs.
"""
import argparse
import dataclasses
import json
import statistics
import time

import torch


@dataclasses.dataclass
class Row:
    suite: str             # "bce", "adam", "amp"
    case: str              # e.g. "fwd+bwd 8192x1024"
    dtype: str             # "float32", "bfloat16", ...
    baseline: str          # e.g. "torch eager", "torch.compile", "AdamW(fused=True)"
    baseline_ms: float
    ours: str              # e.g. "native", "triton"
    ours_ms: float
    bytes_moved: int = 0   # bytes our kernel(s) must read+write per call (for GB/s)
    note: str = ""

    @property
    def ratio(self) -> float:
        """How many times faster ours is than the baseline (>1 is faster)."""
        return self.baseline_ms / self.ours_ms if self.ours_ms > 0 else float("nan")

    @property
    def gbps(self) -> float:
        return self.bytes_moved / (self.ours_ms * 1e-3) / 1e9 if self.bytes_moved and self.ours_ms > 0 else 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratio"] = self.ratio
        d["gbps"] = self.gbps
        return d


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device="cpu", warmup=3, reps=15, min_time_s=0.0) -> float:
    """Median wall time of fn() in milliseconds after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start) < min_time_s:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def format_table(rows) -> str:
    head = ("suite", "case", "dtype", "baseline", "base ms", "ours", "ours ms", "ratio", "GB/s")
    body = [(r.suite, r.case, r.dtype, r.baseline, f"{r.baseline_ms:.3f}", r.ours, f"{r.ours_ms:.3f}",
             f"{r.ratio:.2f}x", f"{r.gbps:.1f}" if r.gbps else "-") for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(run):
    """Entry point for running one suite directly: python benchmarks/<family>.py [--quick]."""
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write rows to this JSON file")
    a = p.parse_args()
    rows = run(a.device, a.quick)
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=2)
