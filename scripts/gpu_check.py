"""`make gpu-check`: everything a first GPU session needs, in one run with one report.

Runs each step under its own time limit and reports every step even when one fails: the
GPU tests (pytest -m gpu, the two-GPU ones where there are two), `fusedtrain check`,
`fusedtrain bench --device cuda --quick` (GB/s against the measured copy bandwidth), and
compute-sanitizer memcheck and racecheck over scripts/gpu_smoke.py where the tool exists.
Writes gpu-check-report.md; exits 1 if any step failed.

    python scripts/gpu_check.py [--report PATH]
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def _steps():
    env = {"FUSEDTRAIN_REQUIRE_CUDA_KERNELS": "1"}
    steps = [
        ("environment", [PY, "-c", "import torch, fusedtrain; print(torch.__version__, torch.version.cuda, "
                         "[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "
                         "'fusedtrain._C built with CUDA:', fusedtrain._ext._C.built_with_cuda); "
                         "assert torch.cuda.is_available(), 'no GPU'"], 60, env),
        ("GPU tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], 180, env),
        ("fusedtrain check", [PY, "-m", "fusedtrain.cli", "check"], 60, {}),
        ("fusedtrain bench --device cuda --quick", [PY, "-m", "fusedtrain.cli", "bench", "--device", "cuda",
                                                    "--quick"], 120, {}),
    ]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    sanitizer = shutil.which("compute-sanitizer") or shutil.which("compute-sanitizer",
                                                                  path=os.path.join(cuda_home, "bin"))
    for tool in ("memcheck", "racecheck"):
        if sanitizer:
            steps.append((f"compute-sanitizer {tool}", [sanitizer, "--tool", tool, "--error-exitcode", "1", PY,
                                                        os.path.join(ROOT, "scripts", "gpu_smoke.py")], 60, {}))
        else:
            steps.append((f"compute-sanitizer {tool}", None, 0, {}))
    return steps


def run_step(name, cmd, limit, env):
    if cmd is None:
        return dict(name=name, status="skipped", seconds=0.0, output="compute-sanitizer not found on PATH")
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=limit)
        status = "ok" if p.returncode == 0 else f"FAILED (exit {p.returncode})"
        out = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        status = f"FAILED (over its {limit} s limit)"
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    return dict(name=name, status=status, seconds=time.monotonic() - t0, output=out, cmd=" ".join(cmd))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default=os.path.join(ROOT, "gpu-check-report.md"))
    args = ap.parse_args(argv)
    results = []
    for name, cmd, limit, env in _steps():
        r = run_step(name, cmd, limit, env)
        results.append(r)
        print(f"[gpu-check] {name}: {r['status']} ({r['seconds']:.0f} s)", flush=True)
    with open(args.report, "w") as f:
        f.write("# gpu-check report\n\n| step | status | seconds |\n| --- | --- | --- |\n")
        for r in results:
            f.write(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} |\n")
        for r in results:
            f.write(f"\n## {r['name']}: {r['status']}\n\n`{r.get('cmd', '')}`\n\n```\n{r['output'][-6000:]}\n```\n")
    print(f"[gpu-check] report: {args.report}")
    return 1 if any(r["status"].startswith("FAILED") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
