"""What the install and extension-loading tests share: copies of the checkout and of the package,
Python processes that see only a given copy of fusedtrain, and fresh virtual environments that
borrow this one's torch.

This venv may hold an editable install of the checkout, whose import hook would hand out the
checkout's fusedtrain (and its fusedtrain._C) to any process: every process started here drops it
(STRIP_EDITABLE) or never sees it (fresh venvs get a folder of links to this venv's packages
without fusedtrain's, not this venv's site-packages itself)."""
import os
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

from helpers import ROOT

INSTALL_TESTS = os.environ.get("FUSEDTRAIN_TEST_INSTALL", "0") == "1"


def install_test(fn):
    """Marks a slow test that builds and installs (minutes): it runs under `make test-install`
    (FUSEDTRAIN_TEST_INSTALL=1, -m install), and `make test` skips it."""
    skip = pytest.mark.skipif(not INSTALL_TESTS, reason="builds and installs (minutes): make test-install")
    return pytest.mark.install(skip(fn))

# code for a subprocess that imported fusedtrain and torch: a BCE and an AdamW step on the
# native backend, each against torch
NATIVE_STEP = """
x, y = torch.randn(1000), torch.rand(1000)
with fusedtrain.use_backend("native"):
    loss = fusedtrain.functional.binary_cross_entropy_with_logits(x, y)
assert torch.allclose(loss, torch.nn.functional.binary_cross_entropy_with_logits(x, y))
p, q = torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(100))
q.data.copy_(p.data)
p.grad = torch.randn(100)
q.grad = p.grad.clone()
with fusedtrain.use_backend("native"):
    fusedtrain.FusedAdamW([p], lr=0.01).step()
torch.optim.AdamW([q], lr=0.01, foreach=False).step()
assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
"""

STRIP_EDITABLE = "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"


def checkout_files():
    """The checkout's files as they are in the working tree: tracked ones that still exist, and
    untracked ones git does not ignore (build outputs such as fusedtrain/_C*.so stay behind)."""
    try:  # an unpacked sdist (its tests ship too) is no checkout: git fails there
        files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        pytest.skip("not a git checkout")
    return [f for f in files if os.path.isfile(os.path.join(ROOT, f))]  # not deleted in the working tree


def copy_sources(dst, under=""):
    """Copies checkout_files() (those under `under` only, when given) to dst, keeping their paths."""
    for f in checkout_files():
        if under and not f.startswith(under + "/"):
            continue
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


def package_copy(dst):
    """The package as a wheel lays it out, without an extension: <dst>/fusedtrain with csrc/ as
    fusedtrain/_csrc. Returns the folder to put on PYTHONPATH (dst)."""
    copy_sources(dst, "fusedtrain")
    copy_sources(os.path.join(dst, "fusedtrain", "_csrc_tmp"), "csrc")
    os.rename(os.path.join(dst, "fusedtrain", "_csrc_tmp", "csrc"), os.path.join(dst, "fusedtrain", "_csrc"))
    os.rmdir(os.path.join(dst, "fusedtrain", "_csrc_tmp"))
    return str(dst)


def pip_install_target(src, target, env=None):
    """pip install (not editable, no build isolation, no deps) of the source tree `src` into the
    folder `target`; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v",
                           "--target", str(target), str(src)],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True)


def run_python(code, *args, path=None, cwd=None, env=None, timeout=600, python=sys.executable):
    """Runs `code` in a new Python process that imports fusedtrain from `path` (prepended to
    sys.path) and never through an editable install's hook. Returns the CompletedProcess."""
    full = dict(os.environ)
    for k in ("PYTHONPATH", "FUSEDTRAIN_BACKEND", "FUSEDTRAIN_JIT_BUILD"):
        full.pop(k, None)
    if path is not None:
        full["PYTHONPATH"] = str(path)
    full.update(env or {})
    return subprocess.run([python, "-c", STRIP_EDITABLE + code, *map(str, args)], cwd=str(cwd or path or ROOT),
                          env=full, capture_output=True, text=True, timeout=timeout)


def output(proc):
    return f"exit status {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def fresh_venv(where):
    """A new virtual environment at `where` that sees this venv's packages (torch, numpy,
    setuptools, pip, ...) through a folder of links, fusedtrain's own entries left out; returns
    its python. No package is downloaded."""
    site = sysconfig.get_paths()["purelib"]
    shared = os.path.join(where + "-shared")
    os.makedirs(shared)
    for name in os.listdir(site):
        low = name.lower()
        if low.startswith(("fusedtrain", "__editable__")) or low.endswith(".pth") or name == "__pycache__":
            continue
        os.symlink(os.path.join(site, name), os.path.join(shared, name))
    venv.EnvBuilder(with_pip=False).create(where)
    py = os.path.join(where, "bin", "python")
    own_site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(own_site, "borrowed-from-test-venv.pth"), "w") as f:
        f.write(shared + "\n")
    return py
