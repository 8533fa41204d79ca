"""A pure-Python install works and says so: FUSEDTRAIN_BUILD_EXT=0, or no C++ compiler."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="runs in the normal test process")


def _copy_sources(dst):
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    for f in files:
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


@pytest.mark.parametrize("env", [{"FUSEDTRAIN_BUILD_EXT": "0"}, {"CXX": "/nonexistent/c++"}],
                         ids=["build-ext-0", "no-compiler"])
def test_pure_python_install(tmp_path, env):
    src, target = tmp_path / "src", tmp_path / "site"
    _copy_sources(src)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v",
         "--target", str(target), str(src)],
        env={**os.environ, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "installing pure Python" in out.stdout + out.stderr
    assert not list(target.glob("fusedtrain/_C*.so"))
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
    run = subprocess.run([sys.executable, "-c", code, str(target)], cwd=str(tmp_path),
                         env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
