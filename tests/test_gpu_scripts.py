"""The prepared GPU session (issue #13, "One prepared GPU script") checked without a GPU:
scripts/gpu_check.py's step runner (time limits that kill a step's whole process group, a
report of every step even when one fails, the build among them) and scripts/gpu_smoke.py's
code on CPU, so that the first GPU session does not find a typo."""
import importlib.util
import os
import sys
import time

import pytest

from helpers import INTERPRET, ROOT

pytestmark = pytest.mark.skipif(INTERPRET, reason="runs in the normal test process")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check")


def _alive(pid):
    """Whether pid is a live process (a zombie left to a container's init counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pid, seconds=5.0):
    end = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return not _alive(pid)


# a step that starts a child in its process group (as compute-sanitizer starts its target, or
# torchrun its workers), writes the child's pid, and hangs; the child ignores SIGTERM
_HANGING = r"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print('child up', flush=True); time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
print("parent up", flush=True)
time.sleep(600)
"""


def test_a_step_past_its_limit_is_reported_and_its_group_killed(gpu_check, tmp_path):
    pidfile = tmp_path / "child.pid"
    t0 = time.monotonic()
    r = gpu_check.run_step("hang", [sys.executable, "-c", _HANGING, str(pidfile)], 2, {})
    took = time.monotonic() - t0
    assert r["status"].startswith("FAILED") and "limit" in r["status"], r
    assert took < 2 + gpu_check.KILL_GRACE_S + 5, f"the step took {took:.1f} s"
    assert "parent up" in r["output"]
    child = int(pidfile.read_text())
    assert _wait_dead(child), f"the step's child {child} survived its group's kill"


# a step that exits 0 and leaves a child running in its group
_LEAVES_A_CHILD = r"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
print("done", flush=True)
"""


def test_what_a_finished_step_leaves_running_is_killed(gpu_check, tmp_path):
    pidfile = tmp_path / "child.pid"
    r = gpu_check.run_step("leaves", [sys.executable, "-c", _LEAVES_A_CHILD, str(pidfile)], 20, {})
    assert r["status"] == "ok", r
    assert "done" in r["output"]
    child = int(pidfile.read_text())
    assert _wait_dead(child), f"the step's leftover {child} is still running"


def test_every_step_is_reported_and_a_failed_build_says_so(gpu_check, tmp_path):
    report = tmp_path / "report.md"
    log = tmp_path / "build.log"
    stamp = tmp_path / "stamp"
    py = sys.executable
    # (the slow step first: a step may use what the steps before it left unused)
    steps = [("slow", [py, "-c", "import time; time.sleep(60)"], 1, {}),
             ("build", [py, "-c", "import sys; print('compiling'); sys.exit(3)"], 10, {"_log": str(log)}),
             ("environment", [py, "-c", "print('env ok')"], 10, {}),
             ("compute-sanitizer memcheck", None, 0, {"why": "not found"}),
             ("last", [py, "-c", "print('still ran')"], 10, {})]
    rc = gpu_check.main(["--report", str(report), "--stamp", str(stamp)], steps=steps)
    assert rc == 1
    text = report.read_text()
    assert "The build FAILED" in text
    for name, status in (("build", "FAILED (exit 3)"), ("environment", "ok"), ("slow", "FAILED (over its 1 s limit"),
                         ("compute-sanitizer memcheck", "skipped"), ("last", "ok")):
        assert f"| {name} | {status}" in text, (name, text)
    assert "still ran" in text and "compiling" in log.read_text()
    assert not stamp.exists(), "a failed build touched the install stamp"


def test_a_good_run_exits_0_and_touches_the_stamp(gpu_check, tmp_path):
    report, stamp = tmp_path / "report.md", tmp_path / "stamp"
    steps = [("build", [sys.executable, "-c", "print('built')"], 10, {}),
             ("environment", [sys.executable, "-c", "pass"], 10, {})]
    assert gpu_check.main(["--report", str(report), "--stamp", str(stamp)], steps=steps) == 0
    assert stamp.exists() and "The build FAILED" not in report.read_text()


def test_a_step_may_use_what_the_steps_before_it_left(gpu_check, tmp_path):
    report = tmp_path / "report.md"
    steps = [("quick", [sys.executable, "-c", "pass"], 30, {}),
             ("needs more than its own limit", [sys.executable, "-c", "import time; time.sleep(2)"], 1, {})]
    assert gpu_check.main(["--report", str(report)], steps=steps) == 0, report.read_text()


def test_the_limits_add_up_to_under_8_minutes_build_included(gpu_check):
    steps = gpu_check._steps(build=True)
    assert steps[0][0] == "build"
    limits = [limit for _, _, limit, _ in steps]
    # what every step may take, and the grace of killing every one of them
    assert sum(limits) + gpu_check.KILL_GRACE_S * len(steps) <= gpu_check.WORST_CASE_S < 8 * 60
    assert all(limit > 0 for _, cmd, limit, _ in steps if cmd is not None)
    assert [s[0] for s in gpu_check._steps(build=False)] == [s[0] for s in steps[1:]]


def test_gpu_smoke_runs_on_cpu():
    """scripts/gpu_smoke.py on CPU with the native backend (the CUDA graph is left out there): every family,
    the lean Adam cases, and the report of a "not built yet" case instead of a crash."""
    smoke = _load("gpu_smoke")
    assert smoke.main(["--device", "cpu", "--backends", "native"]) == 0
    assert smoke._not_built(NotImplementedError("fusedtrain_triton::adam_: 8-bit states are not built yet"))
    assert smoke._not_built(RuntimeError("fusedtrain adam: 8-bit states on CUDA: not built yet"))
    assert not smoke._not_built(RuntimeError("illegal memory access"))
