"""Build fusedtrain._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build and
nvcc is found. With no compiler, no torch at build time, or FUSEDTRAIN_BUILD_EXT=0, the
package installs as pure Python (triton + reference backends) and says so.

Knobs: FUSEDTRAIN_BUILD_EXT=0 (no extension), FUSEDTRAIN_BUILD_CUDA=0 (CPU kernels only),
TORCH_CUDA_ARCH_LIST (default "8.0;9.0" when no GPU is visible), MAX_JOBS (parallel compiles).
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"fusedtrain setup: {msg}", file=sys.stderr, flush=True)


def _x86_simd_flags():
    # at::vec picks its implementation from CPU_CAPABILITY_* macros, not from -m flags.
    # AVX2 is the floor we compile for on x86-64; fusedtrain/_ext.py refuses to load the
    # extension on a CPU without it, so the reference backend is used there instead.
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def _pip_cuda_include_dirs():
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return dirs


def _set_cuda_home():
    # torch guesses CUDA_HOME as the parent of the nvcc on PATH; when that nvcc is a wrapper
    # (/usr/local/bin/nvcc) the guess has no lib64 and linking -lcudart fails. Prefer a real
    # toolkit directory.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(nvcc)) if nvcc else None
    if guess and os.path.isdir(os.path.join(guess, "lib64")):
        return
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = cand
            return


def _extensions():
    if os.environ.get("FUSEDTRAIN_BUILD_EXT", "1") == "0":
        _say("FUSEDTRAIN_BUILD_EXT=0: installing pure Python (triton + reference backends)")
        return [], {}
    _set_cuda_home()
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

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    # -fopenmp at compile time only: at::parallel_for is a header template that expands to
    # "#pragma omp parallel", and its GOMP_* calls must bind at load time to the libgomp that
    # torch already loaded (linking a second OpenMP runtime gives two thread pools).
    cxx_flags = ["-O3", "-DNDEBUG", "-fopenmp"] + _x86_simd_flags()
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    use_cuda = (
        os.environ.get("FUSEDTRAIN_BUILD_CUDA", "1") != "0"
        and torch.version.cuda is not None
        and nvcc is not None
        and os.path.exists(nvcc)
    )
    if use_cuda:
        # The pip CUDA wheels (nvidia-*-cu13) carry headers that torch's CUDA headers include
        # (cusparse.h, cublas_v2.h) and that a bare nvcc install may lack.
        include_dirs += _pip_cuda_include_dirs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(_cuda_archs())
        sources += rel("csrc/cuda/*.cu")
        ext = CUDAExtension(
            "fusedtrain._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("FUSEDTRAIN_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-DNDEBUG", "-lineinfo", "--expt-relaxed-constexpr",
                         # a spill to local memory fails the build (docs/design.md §5)
                         "-Xptxas=--warn-on-spills,--warning-as-error"],
            },
            extra_link_args=[],
        )
        _say(f"building CPU + CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    else:
        why = ("FUSEDTRAIN_BUILD_CUDA=0" if os.environ.get("FUSEDTRAIN_BUILD_CUDA") == "0"
               else "torch is a CPU build" if torch.version.cuda is None else "nvcc not found")
        ext = CppExtension("fusedtrain._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=[])
        _say(f"building CPU kernels only ({why})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


def _cuda_archs():
    """sm_80 and sm_90 always (the GPUs the kernels are written and checked for), plus what
    TORCH_CUDA_ARCH_LIST asks for and the arch of every visible GPU."""
    import torch

    archs = ["8.0", "9.0"]
    archs += [a for a in os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";").split(";") if a]
    if torch.cuda.is_available():
        archs += ["%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    return sorted(set(archs), key=lambda a: float(a.rstrip("+PTX").replace("a", "")))


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
