"""`fusedtrain build`: compiles fusedtrain._C for the running torch into the cache
(fusedtrain/_build_cache.py), where the next `import fusedtrain` finds it (fusedtrain/_ext.py).

For an install whose extension was compiled against another torch (a build-isolated
`pip install .` or a wheel built elsewhere), or none at all. The compile runs in a child process
(fusedtrain/_jit_compile.py), with setup.py's sources and flags (fusedtrain/_build_spec.py),
and its output goes to <entry>/build.log; this process prints one line per compiled source.
The entry appears whole or not at all: the build happens in a scratch directory and the
finished _C.so is moved in.
"""
import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from fusedtrain import _build_cache, _build_spec
from fusedtrain._version import __version__

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# runs _jit_compile.py as __main__ without putting fusedtrain/ on sys.path (its triton/ would
# shadow the real triton) and without importing the fusedtrain package
_BOOT = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\] (.*)")


def _progress(line, csrc):
    """A short progress line for one line of ninja's output, or None to keep it for the log only."""
    if line.startswith("fusedtrain build:"):
        return line.rstrip()
    m = _NINJA_STEP.match(line)
    if not m:
        return None
    src = re.search(r"\s-c (\S+\.(?:cpp|cu))(?:\s|$)", m.group(3))
    what = os.path.relpath(src.group(1), csrc) if src else "linking _C.so"
    return f"  [{m.group(1)}/{m.group(2)}] {what}"


def build(out=sys.stderr, verbose=False, force=False):
    """Compiles the extension of this fusedtrain's sources for the running torch into the cache.

    Args:
        out: where progress goes.
        verbose: pass every line of the compiler's output to `out` too.
        force: build even when the entry holds a build (one made by another process while this
            one waited for the entry's lock is taken otherwise).
    Returns:
        (True, the built file) or (False, why, with where the log is).
    """
    def say(msg):
        print(f"fusedtrain build: {msg}", file=out, flush=True)

    csrc = _build_spec.csrc_dir(PACKAGE_DIR)
    if csrc is None:
        return False, (f"this fusedtrain has no C++ sources in {PACKAGE_DIR}/_csrc to build from; reinstall "
                       f"fusedtrain {__version__} from its wheel or sdist, which ship them")
    entry = _build_cache.entry(torch, csrc, __version__)
    try:
        os.makedirs(_build_cache.root(), exist_ok=True)
        lock = open(entry + ".lock", "w")
    except OSError as e:
        return False, (f"cannot write the build cache {_build_cache.root()} ({e}); "
                       "set FUSEDTRAIN_CACHE to a writable folder")
    with lock:
        # one build of an entry at a time (the ranks of a torchrun, each with FUSEDTRAIN_JIT_BUILD=1):
        # the others wait, then find it built
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(_build_cache.so_path(entry)) and not force:
            say(f"built meanwhile by another process: {_build_cache.so_path(entry)}")
            return True, _build_cache.so_path(entry)
        work = tempfile.mkdtemp(prefix=".build-", dir=_build_cache.root())
        try:
            return _compile(entry, csrc, work, say, out, verbose)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # also after an interrupt


def _compile(entry, csrc, work, say, out, verbose):
    """The compile into the scratch folder `work`, and the move of its result into `entry`."""
    log_path = os.path.join(work, "build.log")
    jobs = f"MAX_JOBS={os.environ['MAX_JOBS']}" if os.environ.get("MAX_JOBS") else "all cores, MAX_JOBS=N limits it"
    say(f"compiling fusedtrain._C for torch {torch.__version__} into {entry} (a few minutes; {jobs})")
    t0 = time.time()
    cmd = [sys.executable, "-c", _BOOT, os.path.join(PACKAGE_DIR, "_jit_compile.py"), "--csrc", csrc, "--out", work]
    # torch runs `ninja` from PATH; pip's ninja lives next to this python, which need not be on PATH
    # (a venv used without activating it)
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + os.pathsep + os.path.dirname(sys.executable)}
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True) as child:
        for line in child.stdout:
            log.write(line)
            shown = line.rstrip() if verbose else _progress(line, csrc)
            if shown is not None:
                print(shown + ("" if verbose or shown.startswith("fusedtrain") else f" ({time.time() - t0:.0f} s)"),
                      file=out, flush=True)
        rc = child.wait()
    seconds = time.time() - t0
    failed_log = entry + ".failed.log"
    if rc != 0:
        shutil.move(log_path, failed_log)
        with open(failed_log) as f:
            tail = "".join(f.readlines()[-25:])
        say(f"FAILED after {seconds:.0f} s (exit status {rc}); the end of {failed_log}:\n{tail}")
        return False, f"the compile failed, log: {failed_log}"
    os.makedirs(entry, exist_ok=True)
    built = _build_cache.so_path(entry)
    os.replace(_build_cache.so_path(work), built)  # atomic: an import never sees half a file
    shutil.move(log_path, os.path.join(entry, "build.log"))
    if os.path.exists(failed_log):  # an earlier failure of these sources no longer holds
        os.remove(failed_log)
    say(f"done in {seconds:.0f} s: {built}")
    return True, built


def _cuda_home():
    _build_spec.set_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def main(argv=None) -> int:
    """`fusedtrain build`: 0 when the running torch has a loadable extension afterwards, 1 when the
    build failed.

    Args:
        argv: the command-line arguments (sys.argv[1:] when None); --help lists them.
    """
    p = argparse.ArgumentParser(prog="fusedtrain build", description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true",
                   help="build even when an extension for this torch is already loaded (installed or cached)")
    p.add_argument("--cpu-only", action="store_true", help="the C++ CPU kernels only (FUSEDTRAIN_BUILD_CUDA=0)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the compiler's output")
    a = p.parse_args(argv)
    from fusedtrain import _ext

    if a.cpu_only:
        os.environ["FUSEDTRAIN_BUILD_CUDA"] = "0"
    # a loaded build without CUDA kernels where this build would have them is not enough
    wants_cuda = not a.cpu_only and _build_spec.cuda_decision(torch, _cuda_home())[0]
    if _ext._C is not None and not a.force and (_ext._C.built_with_cuda or not wants_cuda):
        print(f"fusedtrain build: nothing to do, this torch's extension is loaded: {_ext.describe()} "
              "(--force builds a cached one anyway)")
        return 0
    ok, what = build(out=sys.stdout, verbose=a.verbose, force=a.force or _ext._C is not None)
    if not ok:
        print(f"fusedtrain build: {what}", file=sys.stderr)
        return 1
    print("fusedtrain build: the next `import fusedtrain` loads it; `fusedtrain check` tests it")
    return 0
