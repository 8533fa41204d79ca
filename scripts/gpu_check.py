"""`make gpu-check`: everything a first GPU session needs, in one run with one report.

Steps, each under its own time limit (the limits add up to TOTAL_LIMIT_S, under 8 minutes,
build included): the build of the extension (`pip install --no-build-isolation -e .`, its
full log in build.log), the environment, the GPU tests (pytest -m gpu, the two-GPU ones where
there are two), `fusedtrain check`, `fusedtrain bench --device cuda --quick` (GB/s against the
measured copy bandwidth), and compute-sanitizer memcheck and racecheck over
scripts/gpu_smoke.py where the tool exists.

A step may use its own limit plus what the steps before it left unused. Every step runs in a
process group of its own (a new session); when it ends, and when it runs
past its limit, the whole group is killed, so a sanitizer's target or a distributed worker
does not keep the GPU. Every step is reported even when one fails (a failed build too: the
later steps then run against whatever fusedtrain was installed before, and the report says
so). The report (gpu-check-report.md) is rewritten after every step; exits 1 if any step
failed.

    python scripts/gpu_check.py [--report PATH] [--skip-build] [--stamp FILE]
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

# seconds per step. A step may also use what the steps before it left unused (a build with
# nothing to compile leaves most of its time to the tests), so the whole run takes at most the
# sum, plus KILL_GRACE_S per step killed: under 8 minutes (issue #13).
LIMITS = {
    "build": 140,
    "environment": 20,
    "GPU tests": 120,
    "fusedtrain check": 30,
    "fusedtrain bench --device cuda --quick": 60,
    "compute-sanitizer memcheck": 40,
    "compute-sanitizer racecheck": 40,
}
KILL_GRACE_S = 3  # between SIGTERM and SIGKILL of a step's group
TOTAL_LIMIT_S = sum(LIMITS.values())
WORST_CASE_S = TOTAL_LIMIT_S + KILL_GRACE_S * len(LIMITS)
assert WORST_CASE_S < 8 * 60, WORST_CASE_S
OUTPUT_TAIL = 6000  # characters of a step's output in the report


def _steps(build=True):
    """[(name, cmd or None (skipped: why in env["why"]), limit, env)] in order."""
    env = {"FUSEDTRAIN_REQUIRE_CUDA_KERNELS": "1"}
    steps = []
    if build:
        steps.append(("build", [PY, "-m", "pip", "install", "--no-build-isolation", "-v", "-e", ROOT],
                      LIMITS["build"], {"MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)),
                                        "_log": os.path.join(ROOT, "build.log")}))
    steps += [
        ("environment", [PY, "-c", "import torch, fusedtrain; print(torch.__version__, torch.version.cuda, "
                         "[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "
                         "'fusedtrain._C built with CUDA:', fusedtrain._ext._C.built_with_cuda); "
                         "assert torch.cuda.is_available(), 'no GPU'"], LIMITS["environment"], env),
        ("GPU tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], LIMITS["GPU tests"],
         env),
        ("fusedtrain check", [PY, "-m", "fusedtrain.cli", "check"], LIMITS["fusedtrain check"], {}),
        ("fusedtrain bench --device cuda --quick", [PY, "-m", "fusedtrain.cli", "bench", "--device", "cuda",
                                                    "--quick"], LIMITS["fusedtrain bench --device cuda --quick"], {}),
    ]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    sanitizer = shutil.which("compute-sanitizer") or shutil.which("compute-sanitizer",
                                                                  path=os.path.join(cuda_home, "bin"))
    for tool in ("memcheck", "racecheck"):
        name = f"compute-sanitizer {tool}"
        if sanitizer:
            steps.append((name, [sanitizer, "--tool", tool, "--error-exitcode", "1", PY,
                                 os.path.join(ROOT, "scripts", "gpu_smoke.py")], LIMITS[name], {}))
        else:
            steps.append((name, None, 0, {"why": "compute-sanitizer not found on PATH or in $CUDA_HOME/bin"}))
    return steps


def _kill_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def run_step(name, cmd, limit, env):
    """Run one step in a new session (its own process group) with a time limit; returns
    dict(name, status, seconds, output, cmd). On timeout the group gets SIGTERM, then SIGKILL
    after KILL_GRACE_S; after a normal exit, whatever the step left running in its group is
    killed too. env: extra variables; "_log": a file that receives the full output; "why":
    the reason of a skipped step (cmd None)."""
    env = dict(env)
    log, why = env.pop("_log", None), env.pop("why", "")
    if cmd is None:
        return dict(name=name, status="skipped", seconds=0.0, output=why, cmd="")
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return dict(name=name, status=f"FAILED (could not start: {e})", seconds=0.0, output="",
                        cmd=" ".join(cmd))
        try:
            rc = p.wait(timeout=limit)
            status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            _kill_group(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            status = f"FAILED (over its {limit:.0f} s limit; process group killed)"
        except BaseException:  # Ctrl-C of gpu-check: nothing of the step survives it
            _kill_group(p.pid, signal.SIGKILL)
            p.wait()
            raise
        finally:
            # the step's leftovers (a sanitizer's target, distributed workers, a daemon) must not
            # keep the GPU for the next step
            _kill_group(p.pid, signal.SIGKILL)
            if p.poll() is None:
                p.wait()
        seconds = time.monotonic() - t0
        out.seek(0)
        text = out.read().decode(errors="replace")
    if log:
        with open(log, "w") as f:
            f.write(text)
    return dict(name=name, status=status, seconds=seconds, output=text, cmd=" ".join(cmd))


def _failed(r):
    return r["status"].startswith("FAILED")


def write_report(path, results, pending=()):
    """The report of the steps so far (results) and those not run yet (pending names)."""
    with open(path, "w") as f:
        f.write(f"# gpu-check report\n\nTime limits add up to {TOTAL_LIMIT_S} s (a step may use what the steps "
                f"before it left unused).\n")
        build = next((r for r in results if r["name"] == "build"), None)
        if build is not None and _failed(build):
            f.write("\n**The build FAILED**: the later steps ran against the fusedtrain installed before "
                    "(see the build section and build.log).\n")
        f.write("\n| step | status | seconds | limit |\n| --- | --- | --- | --- |\n")
        for r in results:
            f.write(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r.get('limit', 0):.0f} |\n")
        for name in pending:
            f.write(f"| {name} | not run yet | | |\n")
        for r in results:
            f.write(f"\n## {r['name']}: {r['status']}\n\n`{r.get('cmd', '')}`\n\n"
                    f"```\n{r['output'][-OUTPUT_TAIL:]}\n```\n")


def main(argv=None, steps=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default=os.path.join(ROOT, "gpu-check-report.md"))
    ap.add_argument("--skip-build", action="store_true", help="use the extension as installed")
    ap.add_argument("--stamp", help="a file to touch when the build succeeds (the Makefile's install stamp)")
    args = ap.parse_args(argv)
    steps = _steps(build=not args.skip_build) if steps is None else steps
    results = []
    write_report(args.report, results, [s[0] for s in steps])
    banked = 0.0  # what the steps so far left unused of their limits
    for i, (name, cmd, limit, env) in enumerate(steps):
        if cmd is not None:
            limit += banked
        r = run_step(name, cmd, limit, env)
        r["limit"] = limit if cmd is not None else 0
        if cmd is not None:
            banked = max(0.0, limit - r["seconds"])
        results.append(r)
        if name == "build" and r["status"] == "ok" and args.stamp:
            with open(args.stamp, "a"):
                os.utime(args.stamp)
        print(f"[gpu-check] {name}: {r['status']} ({r['seconds']:.0f} s)", flush=True)
        write_report(args.report, results, [s[0] for s in steps[i + 1:]])
    print(f"[gpu-check] report: {args.report}")
    return 1 if any(_failed(r) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
