"""Timing and reporting shared by every benchmark suite (fusedtrain/benchmarks/<suite>.py).

A suite module defines `run(device: str, quick: bool) -> list[Row]` and, for running it
alone, `if __name__ == "__main__": harness.main(run)`. All timings of one row are taken in
the same process on the same inputs: warm-up, then the median of many runs.
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import torch


@dataclasses.dataclass
class Row:
    """One line of the results table: our time and a baseline's on the same inputs.

    Args:
        suite: "bce", "adam" or "amp".
        case: what was timed, e.g. "fwd+bwd 8192x1024".
        dtype: the storage dtype's name, e.g. "bfloat16".
        baseline: what ours is compared with, e.g. "torch eager", "AdamW fused".
        baseline_ms: the baseline's median time in milliseconds.
        ours: fusedtrain's backend or entry point, e.g. "native".
        ours_ms: fusedtrain's median time in milliseconds.
        bytes_moved: bytes our kernel(s) must read and write per call (for GB/s; 0: none).
        note: free text for the table's reader.
        baseline_peak_mib, ours_peak_mib: peak memory beyond what every method must hold (the
            head suite: beyond the gradients), in MiB; 0 when not measured.
    """

    suite: str             # "bce", "adam", "amp"
    case: str              # e.g. "fwd+bwd 8192x1024"
    dtype: str             # "float32", "bfloat16", ...
    baseline: str          # e.g. "torch eager", "torch.compile", "AdamW(fused=True)"
    baseline_ms: float
    ours: str              # e.g. "native", "triton"
    ours_ms: float
    bytes_moved: int = 0   # bytes our kernel(s) must read+write per call (for GB/s)
    note: str = ""
    baseline_peak_mib: float = 0.0
    ours_peak_mib: float = 0.0

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
    """Median wall time of fn() in milliseconds after `warmup` calls.

    Args:
        fn: the no-argument function to time.
        device: where fn's work runs ("cuda": synchronized around every call).
        warmup: untimed calls first.
        reps: timed calls at least.
        min_time_s: keep timing until this many seconds have passed.
    """
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


def page_faults(fn):
    """The minor page faults of one call of fn() (first touches of fresh memory: on CPU, every
    new buffer of 32 MiB or more that glibc maps), or None where the resource module is missing.

    Args:
        fn: the no-argument function to run once.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def format_table(rows) -> str:
    """The rows as an aligned text table with ratio and GB/s columns.

    Args:
        rows: a list of Row.
    """
    head = ("suite", "case", "dtype", "baseline", "base ms", "ours", "ours ms", "ratio", "GB/s")
    body = [(r.suite, r.case, r.dtype, r.baseline, f"{r.baseline_ms:.3f}", r.ours, f"{r.ours_ms:.3f}",
             f"{r.ratio:.2f}x", f"{r.gbps:.1f}" if r.gbps else "-") for r in rows]
    if any(r.ours_peak_mib for r in rows):  # the head suite's memory column
        head += ("peak MiB base/ours",)
        body = [b + (f"{r.baseline_peak_mib:.0f}/{r.ours_peak_mib:.0f}" if r.ours_peak_mib else "-",)
                for b, r in zip(body, rows)]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def child_json(module, args, what, timeout, env=None):
    """Runs `python -m module *args` in a child process and returns the JSON value it prints on
    its last line, or None (with a "skipping" note on stderr) when it fails. The child imports
    the same fusedtrain as this process, installed or not.

    Args:
        module: the suite's module name, e.g. "fusedtrain.benchmarks.bce".
        args: its command-line arguments.
        what: the rows it times, for the note when it fails.
        timeout: seconds before the child is given up.
        env: extra environment variables of the child.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    try:
        out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                             check=True, env={**os.environ, **(env or {}), "PYTHONPATH": path}).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        print(f"skipping {what}: {e}", file=sys.stderr)
        return None


def main(run):
    """Entry point for running one suite directly: python -m fusedtrain.benchmarks.<suite> [--quick].

    Args:
        run: the suite's run(device, quick) -> list[Row].
    """
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
