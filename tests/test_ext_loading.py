"""Which fusedtrain._C a process loads (fusedtrain/_ext.py, docs/design.md §3 "Install and loading"):
the installed one when it records the running torch; else a `fusedtrain build` from the cache;
else none, with one warning that says why and how to fix it. A build for another torch is never
loaded, not even for a moment: its ops must not be registered.

Each case runs in its own process (what was loaded cannot be unloaded), with a copy of the package
laid out as a wheel installs it (package_copy) or the checkout, and an empty build cache of its
own. The last test compiles for real (minutes): make test-install.
"""
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

import fusedtrain
from fusedtrain import _build_cache, _build_spec, _ext, selfcheck
from helpers import ROOT, normal_only
from install_util import NATIVE_STEP, STRIP_EDITABLE, copy_sources, install_test, output, package_copy, pip_install_target, run_python

pytestmark = normal_only

WARNING = "NativeExtensionWarning:"
ALWAYS = "import warnings\nwarnings.simplefilter('always')\n"  # a second warning would show
RUNNING = _build_spec.torch_record(torch)
needs_installed = pytest.mark.skipif(_ext.source != "installed",
                                     reason=f"this process loaded no installed extension: {_ext.describe()}")


def _assert_one_warning(proc, *phrases):
    assert proc.returncode == 0, output(proc)
    assert proc.stderr.count(WARNING) == 1, output(proc)
    for phrase in phrases:
        assert phrase in proc.stderr, f"{phrase!r} not in the warning\n{output(proc)}"


# ---- the record and its comparison ------------------------------------------------------------

def test_a_record_differing_in_any_torch_key_is_refused_with_both_sides_named(monkeypatch):
    ok = RUNNING + ";cpu_capability=DEFAULT;cuda_kernels=0"
    assert _ext.record_mismatch(ok, RUNNING) == ""
    other = ok.replace(f"torch={torch.__version__}", "torch=2.3.0+cu121")
    why = _ext.record_mismatch(other, RUNNING)
    assert "built for torch 2.3.0+cu121" in why and f"this is torch {torch.__version__}" in why, why
    for key, value in (("cuda", "11.8"), ("cxx11abi", "7"), ("python", "3.99")):
        rec = _build_spec.parse_record(ok)
        rec[key] = value
        why = _ext.record_mismatch(";".join(f"{k}={v}" for k, v in rec.items()), RUNNING)
        assert why, f"a build for another {key} was accepted"
    assert "records no torch version" in _ext.record_mismatch(None, RUNNING)
    # AVX2 kernels on a CPU without AVX2 would be SIGILL
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert "AVX2" in _ext.record_mismatch(ok.replace("cpu_capability=DEFAULT", "cpu_capability=AVX2"), RUNNING)
    assert "AVX2" in _ext.record_mismatch(ok.replace("cpu_capability=DEFAULT", "cpu_capability=AVX2+AVX512"), RUNNING)


def test_the_record_is_read_from_the_file_without_loading_it(tmp_path):
    so = tmp_path / "x.so"
    so.write_bytes(b"\x7fELF junk" + _build_spec.RECORD_MAGIC + RUNNING.encode() + b";cuda_kernels=0\0more")
    assert _build_spec.read_record(str(so)) == RUNNING + ";cuda_kernels=0"
    (tmp_path / "old.so").write_bytes(b"\x7fELF no record here")
    assert _build_spec.read_record(str(tmp_path / "old.so")) is None


# ---- 1. the installed extension --------------------------------------------------------------

@needs_installed
def test_the_installed_extension_records_the_running_torch_and_check_says_so(capsys):
    assert _ext.path == _ext._C.__file__
    assert _build_spec.read_record(_ext.path) == _ext._C.build_record
    assert _ext._C.build_record.startswith(RUNNING + ";"), (_ext._C.build_record, RUNNING)
    selfcheck.main(["--op", "unscale", "--backend", "reference"])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("native extension:")]
    assert line and line[0].startswith(f"native extension: installed, {_ext.path}"), line


@needs_installed
def test_an_installed_build_for_another_torch_is_refused_before_it_loads(tmp_path):
    code = ALWAYS + """
import torch
real = torch.__version__
torch.__version__ = "2.99.0+fake"  # the torch this process "runs"; the installed build is for `real`
import fusedtrain
from fusedtrain import _ext
assert _ext._C is None and _ext.source is None, _ext.describe()
assert not any(n.startswith("fusedtrain::") for n in torch._C._dispatch_get_all_op_names()), "it was loaded"
ok, why = fusedtrain.backends("cpu")["native"]
assert not ok and f"built for torch {real}" in why and "this is torch 2.99.0+fake" in why, why
x, y = torch.randn(10), torch.rand(10)
loss = fusedtrain.functional.binary_cross_entropy_with_logits(x, y)  # the reference backend
assert torch.allclose(loss, torch.nn.functional.binary_cross_entropy_with_logits(x, y))
"""
    proc = run_python(code, path=ROOT, env={"FUSEDTRAIN_CACHE": str(tmp_path / "cache")})
    _assert_one_warning(proc, f"built for torch {torch.__version__}", "this is torch 2.99.0+fake",
                        "reference backend", "fusedtrain build", "--no-build-isolation")


def test_a_missing_extension_warns_once_and_check_says_why(tmp_path):
    pkg = package_copy(tmp_path / "pkg")
    code = ALWAYS + """
import torch
import fusedtrain, fusedtrain._ext, fusedtrain.ops.bce  # again: still one warning
from fusedtrain import selfcheck
x, y = torch.randn(10), torch.rand(10)
fusedtrain.functional.binary_cross_entropy_with_logits(x, y)
p = torch.nn.Parameter(torch.randn(4))
p.grad = torch.randn(4)
fusedtrain.FusedAdamW([p]).step()
assert not fusedtrain.backends("cpu")["native"][0]
selfcheck.main(["--op", "unscale", "--backend", "reference"])
"""
    proc = run_python(code, path=pkg, env={"FUSEDTRAIN_CACHE": str(tmp_path / "cache")})
    _assert_one_warning(proc, "not built", "no `fusedtrain build` for this torch", "fusedtrain build",
                        "--no-build-isolation")
    assert "native extension: none (installed fusedtrain._C: not built" in proc.stdout, output(proc)


def _fake_extension(path, record):
    """A shared library that keeps `record` the way csrc/module.cpp does and needs a symbol no
    library has: what an extension compiled against another torch's C++ ABI looks like to dlopen."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a fake extension")
    src = str(path) + ".c"
    with open(src, "w") as f:
        f.write('__attribute__((used)) static const char record[] = "%s%s";\n'
                "extern void _ZN3c1019fusedtrain_test_abiEv(void);\n"
                "void *PyInit__C(void) { _ZN3c1019fusedtrain_test_abiEv(); return 0; }\n"
                % (_build_spec.RECORD_MAGIC.decode(), record))
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(path), src], check=True)


def test_an_undefined_symbol_is_explained_as_an_abi_mismatch(tmp_path):
    pkg = package_copy(tmp_path / "pkg")
    _fake_extension(os.path.join(pkg, "fusedtrain", "_C" + sysconfig.get_config_var("EXT_SUFFIX")),
                    RUNNING + ";cpu_capability=DEFAULT;cuda_kernels=0")
    code = ALWAYS + """
import fusedtrain
from fusedtrain import _ext
assert _ext._C is None and not fusedtrain.backends("cpu")["native"][0], _ext.describe()
"""
    proc = run_python(code, path=pkg, env={"FUSEDTRAIN_CACHE": str(tmp_path / "cache")})
    _assert_one_warning(proc, "undefined symbol _ZN3c1019fusedtrain_test_abiEv", "another torch's C++ ABI",
                        "fusedtrain build")


# ---- 2. the build cache ------------------------------------------------------------------------

@needs_installed
def test_a_cached_build_for_the_running_torch_is_loaded_when_none_is_installed(tmp_path, monkeypatch):
    pkg = package_copy(tmp_path / "pkg")
    monkeypatch.setenv("FUSEDTRAIN_CACHE", str(tmp_path / "cache"))
    entry = _build_cache.entry(torch, os.path.join(pkg, "fusedtrain", "_csrc"), fusedtrain.__version__)
    os.makedirs(entry)
    cached = _build_cache.so_path(entry)
    os.symlink(_ext.path, cached)  # this process's extension, built for this torch, stands in for a JIT build
    code = ALWAYS + """
import sys, torch
import fusedtrain
from fusedtrain import _ext
assert _ext.source == "cache" and _ext.path == sys.argv[1], _ext.describe()
import fusedtrain._C
assert fusedtrain._C is _ext._C  # loaded under its own name: no second load through the import system
x, y = torch.randn(1000), torch.rand(1000)
with fusedtrain.use_backend("native"):
    loss = fusedtrain.functional.binary_cross_entropy_with_logits(x, y)
assert torch.allclose(loss, torch.nn.functional.binary_cross_entropy_with_logits(x, y))
print(_ext.describe())
"""
    proc = run_python(code, cached, path=pkg)
    assert proc.returncode == 0 and WARNING not in proc.stderr, output(proc)
    assert proc.stdout.startswith(f"`fusedtrain build` from the cache, {cached}"), output(proc)


def test_a_failed_build_at_import_is_reported_with_its_log(tmp_path):
    pkg = package_copy(tmp_path / "pkg")
    code = ALWAYS + "import fusedtrain\nassert not fusedtrain.backends('cpu')['native'][0]\n"
    proc = run_python(code, path=pkg, env={"FUSEDTRAIN_CACHE": str(tmp_path / "cache"), "FUSEDTRAIN_JIT_BUILD": "1",
                                           "CXX": "/nonexistent/c++", "FUSEDTRAIN_BUILD_CUDA": "0"})
    _assert_one_warning(proc, "FUSEDTRAIN_JIT_BUILD=1: the build failed", ".failed.log")
    assert "fusedtrain build: FAILED" in proc.stderr, output(proc)
    assert len(list((tmp_path / "cache").glob("*.failed.log"))) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".build-")], "scratch left behind"
    # the next import (a DataLoader worker, the next run) does not compile again for minutes
    proc = run_python(code, path=pkg, env={"FUSEDTRAIN_CACHE": str(tmp_path / "cache"), "FUSEDTRAIN_JIT_BUILD": "1",
                                           "CXX": "/nonexistent/c++", "FUSEDTRAIN_BUILD_CUDA": "0"})
    _assert_one_warning(proc, "an earlier build failed", "`fusedtrain build` tries again")
    assert "fusedtrain build:" not in proc.stderr, output(proc)


def test_an_unreadable_installed_file_is_refused_not_a_crash(tmp_path):
    """An empty _C file (an interrupted install, a full disk) cannot be mapped: refused and said,
    the import goes on."""
    pkg = package_copy(tmp_path / "pkg")
    open(os.path.join(pkg, "fusedtrain", "_C" + sysconfig.get_config_var("EXT_SUFFIX")), "w").close()
    proc = run_python(ALWAYS + "import fusedtrain\nassert fusedtrain._ext._C is None\n", path=pkg,
                      env={"FUSEDTRAIN_CACHE": str(tmp_path / "cache")})
    _assert_one_warning(proc, "cannot be read")


def test_the_warning_is_said_once_per_run_not_per_worker_and_can_be_turned_off(tmp_path):
    """A multiprocessing child (a DataLoader worker, spawned) does not repeat the parent's
    warning; FUSEDTRAIN_EXT_WARNING=0 (an install without the extension on purpose) silences
    it, and backends() still says why."""
    pkg = package_copy(tmp_path / "pkg")
    code = STRIP_EDITABLE + ALWAYS + """
import multiprocessing as mp

def child(q):
    import warnings
    warnings.simplefilter('always')
    with warnings.catch_warnings(record=True) as w:
        import fusedtrain
    q.put([str(x.message)[:40] for x in w])

if __name__ == "__main__":
    import fusedtrain
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start(); got = q.get(); p.join()
    assert got == [], got
"""
    script = tmp_path / "spawn.py"
    script.write_text(code)
    env = {"FUSEDTRAIN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": pkg}
    proc = subprocess.run([os.sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    _assert_one_warning(proc, "not built")
    quiet = ALWAYS + "import fusedtrain\nok, why = fusedtrain.backends('cpu')['native']\nassert not ok and 'not built' in why\n"
    proc = run_python(quiet, path=pkg, env={**env, "FUSEDTRAIN_EXT_WARNING": "0"})
    assert proc.returncode == 0 and WARNING not in proc.stderr, output(proc)


@needs_installed
def test_a_cached_cuda_build_wins_over_an_installed_cpu_only_one(tmp_path, monkeypatch):
    """Under a CUDA torch, an installed build without CUDA kernels gives way to a cached build
    with them (`fusedtrain build` run where nvcc is): the installed one is not even tried."""
    if torch.version.cuda is None or not _ext._C.built_with_cuda:
        pytest.skip("needs a CUDA torch and this process's extension with CUDA kernels")
    pkg = package_copy(tmp_path / "pkg")
    _fake_extension(os.path.join(pkg, "fusedtrain", "_C" + sysconfig.get_config_var("EXT_SUFFIX")),
                    RUNNING + ";cpu_capability=DEFAULT;cuda_kernels=0")
    monkeypatch.setenv("FUSEDTRAIN_CACHE", str(tmp_path / "cache"))
    entry = _build_cache.entry(torch, os.path.join(pkg, "fusedtrain", "_csrc"), fusedtrain.__version__)
    os.makedirs(entry)
    os.symlink(_ext.path, _build_cache.so_path(entry))
    code = ALWAYS + "from fusedtrain import _ext\nassert _ext.source == 'cache' and not _ext.refused, _ext.refused\n"
    proc = run_python(code, path=pkg)
    assert proc.returncode == 0 and WARNING not in proc.stderr, output(proc)


def test_cuda_archs_take_torchs_names_and_end_in_ptx(monkeypatch):
    """TORCH_CUDA_ARCH_LIST entries torch accepts (names, "a" variants) do not break the build's
    arch list, and the highest plain arch also goes in as PTX (a newer GPU JIT-compiles it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper;8.6;native;10.0a")
    assert _build_spec.cuda_archs(torch) == ["8.0", "8.6", "9.0+PTX", "10.0a", "Hopper", "native"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9+PTX")
    assert _build_spec.cuda_archs(torch) == ["8.0", "8.9+PTX", "9.0"]


def test_the_cache_key_tells_python_abis_and_machines_apart(monkeypatch, tmp_path):
    csrc = os.path.join(ROOT, "csrc")
    base = _build_cache.key(torch, csrc, "1.0")
    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var", lambda k: ".cpython-313t-x86_64-linux-gnu.so"
                        if k == "EXT_SUFFIX" else real(k))
    assert _build_cache.key(torch, csrc, "1.0") != base
    monkeypatch.setattr(sysconfig, "get_config_var", real)
    import platform
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert _build_cache.key(torch, csrc, "1.0") != base


# ---- `fusedtrain build`, for real (minutes) ------------------------------------------------------------

@install_test
def test_fusedtrain_build_compiles_for_the_running_torch_and_the_next_import_loads_it(tmp_path):
    # a pure-Python install: no extension, the sources in fusedtrain/_csrc (as from a wheel built
    # where there was no compiler, or whose extension was built for another torch)
    copy_sources(tmp_path / "src")
    target, cache = tmp_path / "site", tmp_path / "cache"
    out = pip_install_target(tmp_path / "src", target, {"FUSEDTRAIN_BUILD_EXT": "0"})
    assert out.returncode == 0, output(out)
    env = {"FUSEDTRAIN_CACHE": str(cache), "FUSEDTRAIN_BUILD_CUDA": "0", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    build = "from fusedtrain.cli import main\nraise SystemExit(main(['build']))\n"
    proc = run_python(build, path=target, env=env, timeout=1800)
    assert proc.returncode == 0, output(proc)
    assert re.search(r"\[\d+/\d+\] cpu/adam.cpp", proc.stdout) and "done in" in proc.stdout, output(proc)
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]  # one entry, no scratch folder left behind
    assert [p.name for p in cache.iterdir() if not p.is_dir()] == [entry.name + ".lock"]
    assert (entry / "_C.so").is_file() and (entry / "build.log").is_file()
    code = ALWAYS + """
import sys, torch
import fusedtrain
from fusedtrain import _ext
assert fusedtrain.__file__.startswith(sys.argv[1]), fusedtrain.__file__
assert _ext.source == "cache" and _ext.path == sys.argv[2], _ext.describe()
assert not _ext._C.built_with_cuda  # FUSEDTRAIN_BUILD_CUDA=0
""" + NATIVE_STEP
    proc = run_python(code, target, entry / "_C.so", path=target, env=env)
    assert proc.returncode == 0 and WARNING not in proc.stderr, output(proc)
    proc = run_python(build, path=target, env=env)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, output(proc)
