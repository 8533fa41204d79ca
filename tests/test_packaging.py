"""The package as a user gets it: one version, the project metadata, and (make test-install, minutes)
`python -m build` making an sdist and a wheel that hold what an install needs (the C++/CUDA
sources included, no stray build outputs), each installing into a fresh virtual environment
where fusedtrain runs on its native backend.

The fresh environments borrow this venv's torch through a folder of links (install_util.fresh_venv)
instead of downloading it; the builds are CPU-only (FUSEDTRAIN_BUILD_CUDA=0) to keep them to
minutes.
"""
import email
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import tomllib
import zipfile

import pytest
import torch

import fusedtrain
from fusedtrain import _build_spec, _version, cli
from helpers import ROOT, normal_only
from install_util import NATIVE_STEP, checkout_files, copy_sources, fresh_venv, install_test, output, run_python

pytestmark = normal_only


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


# ---- metadata (fast) ------------------------------------------------------------------------------

def test_the_version_is_written_once_and_read_without_torch():
    proj = _pyproject()
    assert "version" not in proj["project"] and "version" in proj["project"]["dynamic"]
    attr = proj["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert fusedtrain.__version__ is _version.__version__
    # what setuptools does at build time, in a process where torch cannot be imported: the
    # version is read from the file's text, not by importing the package
    code = ("import sys\nsys.modules['torch'] = None\n"
            "from setuptools.config.expand import read_attr\n"
            "print(read_attr(sys.argv[1], root_dir=sys.argv[2]))\n")
    proc = run_python(code, attr, ROOT, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == fusedtrain.__version__, output(proc)
    others = [f for f in checkout_files() if f.startswith("fusedtrain/") and f.endswith(".py")
              and f != "fusedtrain/_version.py"
              and re.search(r"^__version__\s*=", open(os.path.join(ROOT, f)).read(), re.M)]
    assert not others, f"a second place that writes the version: {others}"


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flag_prints_the_version(flag, capsys):
    assert cli.main([flag]) == 0
    assert capsys.readouterr().out == f"fusedtrain {fusedtrain.__version__}\n"


def test_project_metadata():
    proj = _pyproject()["project"]
    extras = proj["optional-dependencies"]
    assert extras["integrations"] == ["transformers", "accelerate", "lightning"]
    for name in ("test", "bench", "deepspeed", "bench-peers"):
        assert extras[name], name
    assert {"Homepage", "Repository", "Issues"} <= set(proj["urls"])
    assert proj["classifiers"] and proj["keywords"] and proj["authors"]
    assert proj["scripts"]["fusedtrain"] == "fusedtrain.cli:main"


# ---- sdist and wheel (make test-install) ------------------------------------------------------------

def _csrc_files():
    """The checkout's csrc/ files, relative to csrc/."""
    return sorted(f[len("csrc/"):] for f in checkout_files() if f.startswith("csrc/"))


RUNNING = _build_spec.torch_record(torch)


STALE = ("fusedtrain/_C" + sysconfig.get_config_var("EXT_SUFFIX"), "csrc/cpu/adam.o", "csrc/module.o")


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel) that `python -m build` makes from a copy of the checkout: the sdist, then the
    wheel from the sdist (so the wheel proves the sdist complete)."""
    tmp = tmp_path_factory.mktemp("dists")
    copy_sources(tmp / "src")
    # what an in-tree build leaves behind, which must not ship (a stale _C.so or object files)
    for stale in STALE:
        (tmp / "src" / stale).write_bytes(b"stale build output")
    env = {**os.environ, "FUSEDTRAIN_BUILD_CUDA": "0", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"),
                           str(tmp / "src")], env=env, capture_output=True, text=True, timeout=1800,
                          cwd=str(tmp))  # not the checkout: its build/ folder would shadow the build package
    assert proc.returncode == 0, output(proc)
    print(f"python -m build: {time.time() - t0:.0f} s")
    (sdist,) = (tmp / "dist").glob("fusedtrain-*.tar.gz")
    (wheel,) = (tmp / "dist").glob("fusedtrain-*.whl")
    yield sdist, wheel
    shutil.rmtree(tmp, ignore_errors=True)


@install_test
def test_the_sdist_holds_what_a_build_needs_and_no_build_outputs(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for f in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "fusedtrain/_build_spec.py",
              "fusedtrain/_version.py", "fusedtrain/_jit_compile.py"):
        assert f in names, f"{f} is not in the sdist"
    missing = [f for f in _csrc_files() if f"csrc/{f}" not in names]
    assert not missing, f"sources not in the sdist: {missing}"
    # the tests ship whole: their helpers and conftest too, and the scripts they run
    missing = [f for f in checkout_files() if f.startswith(("tests/", "scripts/")) and f not in names]
    assert not missing, f"test files not in the sdist: {missing}"
    stray = [n for n in names if n.endswith((".so", ".o", ".pyc")) or n in STALE]
    assert not stray, f"build outputs in the sdist: {stray}"


@install_test
def test_the_wheel_holds_the_package_its_sources_and_an_extension_for_this_torch(dists, tmp_path):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
        (so,) = [n for n in names if re.fullmatch(r"fusedtrain/_C\..*\.so", n)]
        z.extract(so, tmp_path)
    # every module of the checkout's package (a subpackage missing from pyproject's list fails here)
    modules = [f for f in checkout_files() if f.startswith("fusedtrain/") and f.endswith(".py")]
    missing = [f for f in modules if f not in names]
    assert not missing, f"modules not in the wheel: {missing}"
    missing = [f for f in _csrc_files() if f"fusedtrain/_csrc/{f}" not in names]
    assert not missing, f"sources not in the wheel's fusedtrain/_csrc: {missing}"
    # AVX2+AVX512 with GCC (csrc/cpu/cpu_isa.h), AVX2 with another compiler, DEFAULT off x86-64
    x86 = ("AVX2+AVX512", "AVX2") if "-mavx2" in _build_spec.cxx_flags() else ("DEFAULT",)
    assert _build_spec.read_record(str(tmp_path / so)) in [RUNNING + f";cpu_capability={c};cuda_kernels=0" for c in x86]
    assert meta["Version"] == fusedtrain.__version__
    assert "integrations" in meta.get_all("Provides-Extra")
    assert any(u.startswith("Repository, https://") for u in meta.get_all("Project-URL"))


_CHECK = """
import os, sys, torch
import fusedtrain
from fusedtrain import _ext
assert fusedtrain.__file__.startswith(sys.prefix), (fusedtrain.__file__, sys.prefix)
assert _ext.source == "installed", _ext.describe()
""" + NATIVE_STEP + """print("ok", _ext.describe())
"""


def _install_into_fresh_venv(tmp_path, what, *pip_args):
    """A fresh venv with `what` pip-installed (no deps, no index); returns its python."""
    py = fresh_venv(str(tmp_path / "venv"))
    tools = tmp_path / "tools"  # ninja for a build from the sdist, and nothing else of this venv's bin
    tools.mkdir()
    ninja = shutil.which("ninja", path=os.path.dirname(sys.executable)) or shutil.which("ninja")
    if ninja:
        os.symlink(ninja, tools / "ninja")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FUSEDTRAIN_BACKEND")}
    env.update(FUSEDTRAIN_BUILD_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"),
               PATH=os.environ["PATH"] + os.pathsep + str(tools))
    proc = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", *pip_args, str(what)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, output(proc)
    return py, env


def _runs_native(py, env, tmp_path):
    env = {**env, "FUSEDTRAIN_CACHE": str(tmp_path / "empty-cache")}
    proc = subprocess.run([py, "-W", "always", "-c", _CHECK], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "NativeExtensionWarning" not in proc.stderr, output(proc)
    script = os.path.join(os.path.dirname(py), "fusedtrain")
    proc = subprocess.run([script, "--version"], cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == f"fusedtrain {fusedtrain.__version__}\n", output(proc)


@install_test
def test_the_wheel_installs_into_a_fresh_venv_and_runs_native(dists, tmp_path):
    _, wheel = dists
    py, env = _install_into_fresh_venv(tmp_path, wheel)
    _runs_native(py, env, tmp_path)


@install_test
def test_the_sdist_installs_into_a_fresh_venv_and_runs_native(dists, tmp_path):
    sdist, _ = dists
    t0 = time.time()
    py, env = _install_into_fresh_venv(tmp_path, sdist, "--no-build-isolation")
    print(f"pip install of the sdist (a CPU-only build): {time.time() - t0:.0f} s")
    _runs_native(py, env, tmp_path)
