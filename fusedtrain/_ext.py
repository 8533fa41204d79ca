"""Loads the compiled extension fusedtrain._C built for the running torch, or says why there is none.

An extension runs correctly only under the torch it was compiled against: under another one it
fails to load (undefined symbol) or, worse, loads and calls into a different C++ ABI. Every
build records its torch (csrc/module.cpp, fusedtrain/_build_spec.py torch_record), and the
record is read from the file before the file is loaded: loading runs TORCH_LIBRARY
registrations, which a process can do only once. In order (docs/design.md §3, "Install and
loading"):

1. the installed fusedtrain._C, when it records the running torch;
2. else the `fusedtrain build` of this fusedtrain for the running torch in the cache
   (fusedtrain/_build_cache.py), or, with FUSEDTRAIN_JIT_BUILD=1, such a build made now;
3. else none: ops run on the reference (CPU) and Triton (CUDA) backends, and one
   NativeExtensionWarning says why and how to fix it. `fusedtrain check` prints describe().
"""
import importlib.machinery
import importlib.util
import os
import re
import sys
import warnings

import torch

from fusedtrain import _build_cache, _build_spec
from fusedtrain._version import __version__

FIX = ("run `fusedtrain build` (compiles it for this torch into the cache, a few minutes), or rebuild the "
       "install against this torch: `pip install --no-build-isolation --no-binary fusedtrain --no-cache-dir "
       "--force-reinstall --no-deps fusedtrain` (`.` for fusedtrain in a checkout; --no-binary and "
       "--no-cache-dir: a wheel, or pip's cached build of the sdist, was compiled for another torch)")


class NativeExtensionWarning(UserWarning):
    """fusedtrain._C was not loaded: the message says why, what runs instead and how to fix it."""


_C = None          # the loaded extension module
source = None      # where it came from: "installed" or "cache" (None when none is loaded)
path = None        # its file
_why_not = ""      # why none is loaded, with the fix (backends() reports it)
refused = []       # [(file or place, why not)] of every candidate passed over, in order
_stop = []         # a file whose failed load left ops registered: no other build may be loaded


def _package_dir():
    return os.path.dirname(os.path.abspath(__file__))


def _describe_torch(rec):
    cuda = rec.get("cuda", "?")
    return f"torch {rec.get('torch', '?')} ({'CPU build' if cuda == 'None' else 'CUDA ' + cuda})"


def record_mismatch(record, running):
    """Why a build with `record` must not be loaded under the torch whose record is `running`
    (both _build_spec record strings); "" when it may be."""
    if record is None:
        return "it records no torch version (built before fusedtrain recorded them, or not by setup.py)"
    built, now = _build_spec.parse_record(record), _build_spec.parse_record(running)
    differ = [k for k in _build_spec.TORCH_KEYS if built.get(k) != now.get(k)]
    if differ:
        extra = [f"{k} {built.get(k)} vs {now.get(k)}" for k in differ if k in ("cxx11abi", "python")]
        return (f"it was built for {_describe_torch(built)}, this is {_describe_torch(now)}"
                + (f" ({', '.join(extra)})" if extra else ""))
    have = torch.backends.cpu.get_cpu_capability()
    if built.get("cpu_capability", "").startswith("AVX2") and have not in ("AVX2", "AVX512"):
        # The CPU kernels were compiled with AVX2; calling them here would be SIGILL.
        return f"it was built for AVX2 CPUs and this CPU reports {have}"
    return ""


def explain_import_error(err):
    """Why loading a build that records the running torch failed, in words."""
    m = re.search(r"undefined symbol: (\S+)", str(err))
    if m:
        return (f"it does not load under torch {torch.__version__}: undefined symbol {m.group(1)} "
                "(compiled against another torch's C++ ABI than its record says)")
    return f"it failed to load: {type(err).__name__}: {err}"


def _load_file(file):
    """Loads the extension in `file` as fusedtrain._C (whichever file it is: both builds define
    PyInit__C), so that `import fusedtrain._C` anywhere gets this very module."""
    name = f"fusedtrain.{_build_spec.MODULE_NAME}"
    loader = importlib.machinery.ExtensionFileLoader(name, file)
    spec = importlib.util.spec_from_file_location(name, file, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules[name] = mod
    setattr(sys.modules["fusedtrain"], _build_spec.MODULE_NAME, mod)  # as the import system does
    return mod


def _native_ops_registered():
    """Whether fusedtrain:: ops are registered in this process (by a build whose load then failed)."""
    return any(n.startswith("fusedtrain::") for n in torch._C._dispatch_get_all_op_names())


def _try(file, where, running):
    """Loads `file` when its record matches the running torch; else notes why not. True if loaded."""
    global _C, source, path
    try:
        why = record_mismatch(_build_spec.read_record(file), running)
    except (OSError, ValueError) as e:  # unreadable, or empty (an interrupted install): refused, not a crash
        refused.append((file, f"it cannot be read ({type(e).__name__}: {e})"))
        return False
    if not why:
        try:
            _C, source, path = _load_file(file), where, file
            return True
        except ImportError as e:
            why = explain_import_error(e)
            if _native_ops_registered():
                # it failed after its TORCH_LIBRARY registrations ran: a second build's would abort
                why += "; it registered its ops before failing, so no other build is tried in this process"
                _stop.append(file)
    refused.append((file, why))
    return False


def _installed_file():
    """The installed fusedtrain._C's file, or None (noting why there is none)."""
    spec = importlib.util.find_spec(f"fusedtrain.{_build_spec.MODULE_NAME}")
    if spec is not None and spec.origin and os.path.isfile(spec.origin):
        return spec.origin
    others = [f for f in os.listdir(_package_dir()) if f.startswith("_C.") and f.endswith((".so", ".pyd"))]
    why = ("not built: this install has no fusedtrain._C (FUSEDTRAIN_BUILD_EXT=0, or no C++ compiler or no "
           "torch at install time)")
    if others:
        why += f"; {', '.join(others)} is for another Python than {sys.version_info[0]}.{sys.version_info[1]}"
    refused.append(("installed fusedtrain._C", why))
    return None


def _cached_entry():
    """The cache entry of this fusedtrain's sources for the running torch, or None without sources."""
    csrc = _build_spec.csrc_dir(_package_dir())
    if csrc is None:
        refused.append(("the build cache", f"no C++ sources next to {_package_dir()} to key a build by"))
        return None
    return _build_cache.entry(torch, csrc, __version__)


def _jit_build_now():
    """FUSEDTRAIN_JIT_BUILD=1: `fusedtrain build` now; True when it built."""
    from fusedtrain import _jit_build

    ok, msg = _jit_build.build(out=sys.stderr)
    if not ok:
        refused.append(("FUSEDTRAIN_JIT_BUILD=1", f"the build failed: {msg}"))
    return ok


_UNSET = object()


def _has_cuda_kernels(file):
    """Whether the build in `file` records CUDA kernels (False for a missing or unreadable file)."""
    try:
        return _build_spec.parse_record(_build_spec.read_record(file) or "").get("cuda_kernels") == "1"
    except (OSError, ValueError):
        return False


def _load():
    global _why_not
    running = _build_spec.torch_record(torch)
    installed = _installed_file()
    # the cache entry hashes the sources (~5 ms): looked up only when the installed build is not
    # simply taken
    entry = _UNSET
    if installed and torch.version.cuda and not _has_cuda_kernels(installed):
        # an installed build without CUDA kernels under a CUDA torch gives way to a cached one
        # with them (`fusedtrain build` run where nvcc is)
        entry = _cached_entry()
        if entry is not None and _has_cuda_kernels(_build_cache.so_path(entry)):
            installed = None
    if installed and _try(installed, "installed", running):
        return
    if entry is _UNSET:
        entry = _cached_entry()
    if entry is not None and not _stop:
        cached = _build_cache.so_path(entry)
        if os.path.isfile(cached):
            if _try(cached, "cache", running):
                return
        else:
            refused.append(("the build cache", f"no `fusedtrain build` for this torch in {entry}"))
            # FUSEDTRAIN_JIT_BUILD=1 builds only what is missing, and not again after a failed
            # build of these sources (every import, DataLoader workers included, would retry it)
            failed = entry + ".failed.log"
            if os.environ.get("FUSEDTRAIN_JIT_BUILD", "0") == "1":
                if os.path.isfile(failed):
                    refused.append(("FUSEDTRAIN_JIT_BUILD=1", f"an earlier build failed ({failed}); "
                                    "`fusedtrain build` tries again"))
                elif _jit_build_now() and _try(cached, "cache", running):
                    return
    _why_not = f"extension not loaded ({_refusals()}); {FIX}"
    if _warn_here():
        warnings.warn(_warning_text(), NativeExtensionWarning, stacklevel=2)


def _warn_here():
    """Whether this process says so: not with FUSEDTRAIN_EXT_WARNING=0 (an install without the
    extension on purpose), and not in a multiprocessing child (DataLoader workers: the parent
    has said it); `fusedtrain check` and backends() say it anyway."""
    import multiprocessing

    return os.environ.get("FUSEDTRAIN_EXT_WARNING", "1") != "0" and multiprocessing.parent_process() is None


def _refusals():
    return "; ".join(f"{where}: {why}" for where, why in refused)


def _warning_text():
    return (f"fusedtrain native extension not loaded, so CPU ops run on the PyTorch reference backend (slow) and "
            f"CUDA ops on Triton where it is installed. Why: {_refusals()}. Fix: {FIX}. "
            "`fusedtrain check` shows which extension runs.")


def describe():
    """One line for `fusedtrain check`: which extension is loaded, from where, built for what; or
    none, and why."""
    if _C is None:
        return f"none ({_refusals()}). Fix: {FIX}"
    rec = _build_spec.parse_record(_C.build_record)
    kernels = "CPU + CUDA kernels" if _C.built_with_cuda else "CPU kernels only"
    # the copies built (AVX2+AVX512) and the one the CPU ops run here (torch's capability decides)
    if hasattr(_C, "cpu_kernels"):  # a build from before the AVX-512 copy has no cpu_kernels()
        kernels += f"; CPU copies {_C.cpu_capability}, running {_C.cpu_kernels()}"
    what = "installed" if source == "installed" else "`fusedtrain build` from the cache"
    return f"{what}, {path} (built for {_describe_torch(rec)}; {kernels})"


_load()


def native_cpu() -> tuple:
    """(available, why not) of the extension's CPU kernels."""
    return (_C is not None, _why_not)


def native_cuda() -> tuple:
    """(available, why not) of the extension's CUDA kernels."""
    if _C is None:
        return (False, _why_not)
    if not _C.built_with_cuda:
        return (False, "extension was built without CUDA kernels (CPU-only torch or no nvcc at build time)")
    return (True, "")
