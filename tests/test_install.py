"""A non-editable install works without the source tree: pure Python (FUSEDTRAIN_BUILD_EXT=0, or
no C++ compiler) says so, and `fusedtrain bench` runs from the installed package."""
import os
import subprocess
import sys

import pytest

from helpers import normal_only
from install_util import copy_sources

pytestmark = normal_only


def _install(tmp_path, env):
    """pip install (not editable) of a copy of the checkout into tmp_path/site."""
    src, target = tmp_path / "src", tmp_path / "site"
    copy_sources(src)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v",
         "--target", str(target), str(src)],
        env={**os.environ, **env}, capture_output=True, text=True)
    return out, target


@pytest.mark.parametrize("env", [{"FUSEDTRAIN_BUILD_EXT": "0"}, {"CXX": "/nonexistent/c++"}],
                         ids=["build-ext-0", "no-compiler"])
def test_pure_python_install(tmp_path, env):
    out, target = _install(tmp_path, env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "installing pure Python" in out.stdout + out.stderr
    assert not list(target.glob("fusedtrain/_C*.so"))
    # the sources ship all the same: `fusedtrain build` compiles them for the torch at hand
    assert (target / "fusedtrain" / "_csrc" / "module.cpp").is_file()
    # the test venv itself may hold an editable install of this checkout, whose import hook
    # would hand out its fusedtrain._C: drop it, so only the pure-Python install is importable
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "import fusedtrain, torch\n"
            "assert fusedtrain.__file__.startswith(sys.argv[1]), fusedtrain.__file__\n"
            "ok, why = fusedtrain.backends('cpu')['native']\n"
            "assert not ok and 'not built' in why, why\n"
            "x = torch.randn(10); y = torch.rand(10)\n"
            "l = fusedtrain.functional.binary_cross_entropy_with_logits(x, y)\n"
            "r = torch.nn.functional.binary_cross_entropy_with_logits(x, y)\n"
            "assert torch.allclose(l, r), (l, r)\n")
    # an empty build cache: a `fusedtrain build` of these sources in ~/.cache would be loaded
    run = subprocess.run([sys.executable, "-c", code, str(target)], cwd=str(tmp_path),
                         env={**os.environ, "PYTHONPATH": str(target), "FUSEDTRAIN_CACHE": str(tmp_path / "cache")},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "native extension not loaded" in run.stderr and "fusedtrain build" in run.stderr, run.stderr[-3000:]


def test_installed_package_runs_the_benchmarks(tmp_path):
    """`fusedtrain bench` and `python -m fusedtrain.benchmarks.run` from a non-editable install,
    run outside the checkout: the suites and stream_floor.c ship with the package."""
    out, target = _install(tmp_path, {"FUSEDTRAIN_BUILD_EXT": "0"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (target / "fusedtrain" / "benchmarks" / "stream_floor.c").is_file()
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()

    def run(*args):
        # PYTHONPATH comes before the import hook of an editable install in the test venv
        return subprocess.run([sys.executable, *args], cwd=str(run_dir), capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(target)}, timeout=600)

    r = run("-c", "import sys, fusedtrain.benchmarks.run as m; assert m.__file__.startswith(sys.argv[1]), m.__file__",
            str(target))
    assert r.returncode == 0, r.stderr[-3000:]
    for args in (["-m", "fusedtrain.cli", "bench", "--help"], ["-m", "fusedtrain.benchmarks.run", "--help"]):
        r = run(*args)
        assert r.returncode == 0 and "--only" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    # a suite end to end (amp: no torch.compile to wait for; without the extension it has no rows)
    r = run("-m", "fusedtrain.cli", "bench", "--only", "amp", "--quick", "--device", "cpu", "--out", "res")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (run_dir / "res" / "results.json").is_file()
