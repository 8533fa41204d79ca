"""Build fusedtrain._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build and
nvcc is found. With no compiler, no torch at build time, or FUSEDTRAIN_BUILD_EXT=0, the
package installs as pure Python (triton + reference backends) and says so.

Knobs: FUSEDTRAIN_BUILD_EXT=0 (no extension), FUSEDTRAIN_BUILD_CUDA=0 (CPU kernels only),
TORCH_CUDA_ARCH_LIST (default "8.0;9.0" when no GPU is visible), MAX_JOBS (parallel compiles).

The sources, flags and CUDA architectures are fusedtrain/_build_spec.py's, which `fusedtrain build`
(the JIT build for the running torch) uses too. The extension records the torch it is built
against and loads only under that very torch (docs/design.md §3, "Install and loading").
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_spec():
    # The one account of the sources and flags, shared with `fusedtrain build`; read by path,
    # since importing the fusedtrain package here would need torch and the extension itself.
    spec = importlib.util.spec_from_file_location("fusedtrain_build_spec",
                                                  os.path.join(ROOT, "fusedtrain", "_build_spec.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build_spec = _load_build_spec()


def _say(msg):
    print(f"fusedtrain setup: {msg}", file=sys.stderr, flush=True)


def _extensions():
    if os.environ.get("FUSEDTRAIN_BUILD_EXT", "1") == "0":
        _say("FUSEDTRAIN_BUILD_EXT=0: installing pure Python (triton + reference backends)")
        return [], {}
    build_spec.set_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable at build time (use pip install --no-build-isolation): "
             "installing pure Python (triton + reference backends)")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _say(f"no C++ compiler ({cxx!r} not found): installing pure Python (triton + reference backends)")
        return [], {}

    csrc = os.path.join(ROOT, "csrc")
    use_cuda, why_not = build_spec.cuda_decision(torch, CUDA_HOME)
    sources = [os.path.relpath(p, ROOT) for p in build_spec.sources(csrc, use_cuda)]
    # the record of the torch this build compiles against (csrc/module.cpp keeps it; at import,
    # fusedtrain/_ext.py refuses a build whose record differs from the running torch)
    generated = build_spec.write_record_header(os.path.join(ROOT, "build", "generated"), torch)
    include_dirs = build_spec.include_dirs(csrc) + [generated]
    # a new record must rebuild (setuptools' own build, without ninja, skips an extension whose
    # sources are older than it; the header is how it learns of another torch)
    depends = [os.path.relpath(os.path.join(generated, build_spec.RECORD_HEADER), ROOT)]
    _say(f"building against torch {torch.__version__} (recorded in the extension; "
         "it loads only under this torch)")
    if use_cuda:
        include_dirs += build_spec.pip_cuda_include_dirs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(build_spec.cuda_archs(torch))
        ext = CUDAExtension(
            f"fusedtrain.{build_spec.MODULE_NAME}",
            sources,
            include_dirs=include_dirs,
            define_macros=[build_spec.CUDA_DEFINE],
            depends=depends,
            extra_compile_args={"cxx": build_spec.cxx_flags(), "nvcc": build_spec.nvcc_flags()},
            extra_link_args=[],
        )
        _say(f"building CPU + CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    else:
        ext = CppExtension(f"fusedtrain.{build_spec.MODULE_NAME}", sources, include_dirs=include_dirs,
                           depends=depends,
                           extra_compile_args={"cxx": build_spec.cxx_flags()}, extra_link_args=[])
        _say(f"building CPU kernels only ({why_not})")
    # torch runs `ninja` from PATH; pip's ninja lives next to this python, which need not be on
    # PATH (the Makefile's .venv/bin/pip, a venv used without activating it)
    os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + os.path.dirname(sys.executable)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
