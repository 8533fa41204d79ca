"""The three commands, run as a user runs them (subprocess, quick mode), checked for content."""
import json
import os
import re
import subprocess
import sys
import sysconfig

import pytest
from helpers import ROOT, normal_only

pytestmark = normal_only


def _run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "fusedtrain", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    return out.returncode, out.stdout + out.stderr


def _console_script():
    """The installed `fusedtrain` console script (pyproject [project.scripts]), or skip when
    fusedtrain is not installed as a distribution (a bare source checkout on PYTHONPATH)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("fusedtrain")
    except metadata.PackageNotFoundError:
        pytest.skip("fusedtrain is not installed (pip install -e .): no console script to run")
    eps = [ep for ep in dist.entry_points if ep.group == "console_scripts" and ep.name == "fusedtrain"]
    assert eps, "the installed fusedtrain declares no `fusedtrain` console script"
    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        script = os.path.join(d, "fusedtrain")
        if os.access(script, os.X_OK):
            return script
    pytest.fail(f"fusedtrain is installed but its console script is not in {sysconfig.get_path('scripts')}")


def _run_script(*args, cwd, timeout=600):
    # as a user runs it: from elsewhere, no PYTHONPATH, the installed package only
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FUSEDTRAIN_BACKEND")}
    out = subprocess.run([_console_script(), *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    return out.returncode, out.stdout + out.stderr


def test_console_script_help_and_usage_errors(tmp_path):
    rc, out = _run_script("--help", cwd=tmp_path)
    assert rc == 0, out
    for cmd in ("check", "bench", "demo"):
        assert cmd in out
    rc, out = _run_script(cwd=tmp_path)
    assert rc == 2 and "usage" in out, out
    rc, out = _run_script("frobnicate", cwd=tmp_path)
    assert rc == 2 and "unknown command" in out, out
    rc, out = _run_script("check", "--help", cwd=tmp_path)
    assert rc == 0 and "--device" in out, out


def test_console_script_check(tmp_path):
    rc, out = _run_script("check", "--device", "cpu", cwd=tmp_path)
    assert rc == 0, out
    rows = re.findall(r"^(bce|adam|unscale)\s+(triton|native|reference)\s+(pass|FAIL|unavailable)", out, re.M)
    assert {(op, b) for op, b, _ in rows} == {(op, b) for op in ("bce", "adam", "unscale")
                                              for b in ("triton", "native", "reference")}, out
    assert not [r for r in rows if r[2] == "FAIL"], out
    assert all(s == "pass" for op, b, s in rows if b == "reference"), out
    assert re.search(r"^\d+ passed, 0 failed, \d+ unavailable$", out, re.M), out


def test_help_lists_the_commands():
    rc, out = _run("--help")
    assert rc == 0
    for cmd in ("check", "bench", "demo"):
        assert cmd in out


def test_check_lists_every_op_and_backend():
    rc, out = _run("check", "--device", "cpu")
    assert rc == 0, out
    rows = re.findall(r"^(bce|adam|unscale)\s+(triton|native|reference)\s+(pass|FAIL|unavailable)", out, re.M)
    assert {(op, b) for op, b, _ in rows} == {(op, b) for op in ("bce", "adam", "unscale")
                                              for b in ("triton", "native", "reference")}
    assert not [r for r in rows if r[2] == "FAIL"], out
    # reference always runs; triton on CPU is unavailable with its reason
    assert all(s == "pass" for op, b, s in rows if b == "reference")
    assert re.search(r"^bce\s+triton\s+unavailable\s+.*TRITON_INTERPRET", out, re.M), out


def test_bench_quick_writes_json_with_a_ratio_per_row(tmp_path):
    rc, out = _run("bench", "--quick", "--device", "cpu", "--out", str(tmp_path))
    assert rc == 0, out
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["rows"]
    assert {r["suite"] for r in rows} == {"bce", "adam", "amp", "head"}
    head = [r for r in rows if r["suite"] == "head"]
    assert all(r["ours_peak_mib"] > 0 for r in head), head  # the memory column is measured
    for r in rows:
        assert r["ratio"] > 0 and r["baseline_ms"] > 0 and r["ours_ms"] > 0, r
    assert (tmp_path / "ratios.png").stat().st_size > 1000
    assert "ratio" in out and "bce" in out


def test_bench_rejects_unknown_suite(tmp_path):
    rc, out = _run("bench", "--only", "nope", "--out", str(tmp_path))
    assert rc != 0 and "unknown suite" in out


def test_demo_quick_compare_reports_a_small_parameter_difference(tmp_path):
    rc, out = _run("demo", "--quick", "--compare", "--no-progress", "--out", str(tmp_path))
    assert rc == 0, out
    m = re.search(r"largest parameter difference: ([0-9.e+-]+)", out)
    assert m, out
    # bf16 autocast on both sides; the two runs differ only by the rounding of fused vs
    # unfused kernels, which bf16 matmuls amplify a little over the run
    assert float(m.group(1)) < 5e-2, out
    assert "precision" in out and "class 63" in out
    res = json.loads((tmp_path / "demo.json").read_text())
    assert len(res["fusedtrain"]["losses"]) == len(res["torch"]["losses"]) > 10
    assert res["fusedtrain"]["losses"][-1] < res["fusedtrain"]["losses"][0]
    assert (tmp_path / "demo_loss.png").stat().st_size > 1000


def test_demo_labels_trains_the_head_like_torch(tmp_path):
    rc, out = _run("demo", "--labels", "5000", "--quick", "--compare", "--out", str(tmp_path))
    assert rc == 0, out
    res = json.loads((tmp_path / "demo_labels.json").read_text())
    ours, theirs = res["fusedtrain"]["losses"], res["torch"]["losses"]
    assert ours[-1] < 0.5 * ours[0], out  # it learns
    # the same seeded run with nn.Linear + BCEWithLogitsLoss on dense targets: bf16 rounding apart
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 2e-2 * abs(b), (a, b)


def test_adam_quality_quick_runs_every_format(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "fusedtrain.benchmarks.adam_quality", "--quick", "--out",
                          str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"demo", "char-lm"} and len(rows) == 12
    assert all(r["finite"] for r in rows), rows
    assert (tmp_path / "quality.png").stat().st_size > 1000
