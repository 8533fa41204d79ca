"""What fusedtrain._C is built from and with: its sources, include dirs, compiler flags, CUDA
architectures, and the record of the torch it is built against (docs/design.md §3, "Install
and loading").

Two builds read this one file, so they cannot drift apart: setup.py (by path: at build time the
package itself cannot be imported) and `fusedtrain build` (fusedtrain/_jit_compile.py, also by
path, in a process that must not import the package). It imports nothing of fusedtrain and
imports torch only inside the functions that take it.
"""
import glob
import os
import platform
import re
import shutil
import sys

# the module's name: TORCH_EXTENSION_NAME, PyInit__C, fusedtrain/_C*.so and <cache>/_C.so
MODULE_NAME = "_C"

# csrc/module.cpp keeps "<RECORD_MAGIC><record>" as one string in the .so, so that the record can
# be read from the file without loading it (loading runs the TORCH_LIBRARY registrations, which
# cannot be undone or repeated in a process)
RECORD_MAGIC = b"fusedtrain-build-record:v1:"
RECORD_HEADER = "fusedtrain_build_record.h"

# what decides whether a build loads and runs correctly under a torch: the keys a build's record
# must share with the running torch (the record also says cpu_capability and cuda_kernels)
TORCH_KEYS = ("torch", "cuda", "cxx11abi", "python")

# x86_avx512/: the AVX-512 copies of the CPU kernels (csrc/cpu/cpu_isa.h). They must be linked
# after every other object: of an inline function several objects emit, the linker keeps the
# first copy, which must be one that any CPU runs. setuptools links in sorted path order, where
# "x86_avx512/" comes after every other file; `fusedtrain build` links in this list's order.
CPU_SOURCE_GLOBS = ("*.cpp", "cpu/*.cpp")
CUDA_SOURCE_GLOBS = ("cuda/*.cu",)
AVX512_SOURCE_GLOBS = ("x86_avx512/*.cpp",)
# every file a build may read from csrc (sources and the headers they include), at any depth:
# what the wheel ships (pyproject.toml package-data of fusedtrain._csrc, the same suffixes) and
# what the cache key hashes
CSRC_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")


# ---- the sources --------------------------------------------------------------------------------

def csrc_dir(package_dir):
    """The C++/CUDA sources for the package in `package_dir`: <package>/_csrc where it was installed
    from a wheel or an sdist, <checkout>/csrc in a source checkout; None when neither exists."""
    for cand in (os.path.join(package_dir, "_csrc"), os.path.join(os.path.dirname(package_dir), "csrc")):
        if os.path.isfile(os.path.join(cand, "module.cpp")):
            return cand
    return None


def sources(csrc, cuda):
    """The files to compile, as absolute paths: the C++ ones, and the CUDA ones when `cuda`."""
    globs = CPU_SOURCE_GLOBS + (CUDA_SOURCE_GLOBS if cuda else ()) + AVX512_SOURCE_GLOBS
    return [p for g in globs for p in sorted(glob.glob(os.path.join(csrc, g)))]


def include_dirs(csrc):
    return [os.path.join(csrc, "include"), csrc]


def csrc_files(csrc):
    """Every file under `csrc` with a suffix of CSRC_SUFFIXES, relative, sorted."""
    return sorted(os.path.relpath(p, csrc) for p in glob.glob(os.path.join(csrc, "**", "*"), recursive=True)
                  if p.endswith(CSRC_SUFFIXES) and os.path.isfile(p))


def sources_digest(csrc):
    """sha256 of every file a build reads from `csrc` (names and contents): part of the cache key,
    so a cached build is never used for other sources."""
    import hashlib

    h = hashlib.sha256()
    for rel in csrc_files(csrc):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(csrc, rel), "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()


# ---- the flags ----------------------------------------------------------------------------------

def _isa_flags(machine=None):
    # at::vec picks its implementation from CPU_CAPABILITY_* macros, not from -m flags.
    # AVX2 is the floor we compile for on x86-64; fusedtrain/_ext.py refuses to load the
    # extension on a CPU without it, so the reference backend is used there instead.
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    # Elsewhere the kernels are one DEFAULT copy. The hashes and bit-pattern roundings of
    # adam_math.h rely on int32 lanes wrapping: the x86, NEON (aarch64) and VSX (ppc64le)
    # at::vec specializations do, but where at::vec has none for int32 (riscv64, s390x without
    # zvector, aarch64 with older torch) its generic lanes are C++ int32_t arithmetic, whose
    # overflow is undefined unless -fwrapv. setuptools usually passes it already (in Python's
    # CFLAGS); torch's JIT build (_jit_compile.py) does not.
    return ["-fwrapv"]


def cxx_flags(machine=None):
    """The C++ flags of the CPU kernels, for this machine or for `machine` (platform.machine()
    spelling: the tests build a non-x86 copy's flags on x86)."""
    # -fopenmp at compile time only: at::parallel_for is a header template that expands to
    # "#pragma omp parallel", and its GOMP_* calls must bind at load time to the libgomp that
    # torch already loaded (linking a second OpenMP runtime gives two thread pools).
    # -g0: setuptools puts Python's own CFLAGS first, -g among them on many Pythons (pyenv's,
    # the CI's); debug info of the vectorized templates doubled the compile (csrc/cpu/bce.cpp
    # 72.7 -> 35.5 s) and made the .so 78 MB. torch's wheels carry none either.
    return ["-O3", "-DNDEBUG", "-g0", "-fopenmp"] + _isa_flags(machine) + _torch_system_includes()


def _torch_system_includes():
    # torch's headers as system headers (GCC then ignores the -I the build also gives them): their
    # warnings (~270 per build: `#pragma unroll` unknown to GCC, and the like) are not ours
    # to fix, and they buried the ones that are
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return []
    return [f for d in cpp_extension.include_paths() for f in ("-isystem", d)]


def nvcc_flags():
    return ["-O3", "-DNDEBUG", "-lineinfo", "--expt-relaxed-constexpr",
            # a spill to local memory fails the build (docs/design.md §5)
            "-Xptxas=--warn-on-spills,--warning-as-error"]


CUDA_DEFINE = ("FUSEDTRAIN_WITH_CUDA", "1")


def _arch_order(arch):
    # numeric "X.Y[a|f][+PTX]" by version; names torch accepts ("Hopper", "native") after them
    m = re.match(r"(\d+)\.(\d+)", arch)
    return (0, int(m.group(1)), int(m.group(2)), arch) if m else (1, 0, 0, arch)


def cuda_archs(torch):
    """sm_80 and sm_90 always (the GPUs the kernels are written and checked for), plus what
    TORCH_CUDA_ARCH_LIST asks for and the arch of every visible GPU; the highest numeric one
    also as PTX, so that a GPU newer than any of them (a build made where none is visible)
    JIT-compiles the kernels instead of finding no kernel image."""
    archs = ["8.0", "9.0"]
    archs += [a for a in os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";").split(";") if a]
    if torch.cuda.is_available():
        archs += ["%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    archs = sorted(set(archs), key=_arch_order)
    plain = [a for a in archs if re.fullmatch(r"\d+\.\d+", a)]  # "a"/"f" variants' PTX runs on no newer GPU
    if plain and not any(a.endswith("+PTX") for a in archs):
        top = plain[-1]
        archs[archs.index(top)] = top + "+PTX"
    return archs


def pip_cuda_include_dirs():
    # The pip CUDA wheels (nvidia-*-cu13) carry headers that torch's CUDA headers include
    # (cusparse.h, cublas_v2.h) and that a bare nvcc install may lack.
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return dirs


def set_cuda_home():
    """Points CUDA_HOME at a real toolkit before torch.utils.cpp_extension is imported (it reads
    it once, at import)."""
    # torch guesses CUDA_HOME as the parent of the nvcc on PATH; when that nvcc is a wrapper
    # (/usr/local/bin/nvcc) the guess has no lib64 and linking -lcudart fails.
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


def cuda_decision(torch, cuda_home):
    """(build the CUDA kernels?, why not): FUSEDTRAIN_BUILD_CUDA=0, a CPU build of torch, or no nvcc."""
    if os.environ.get("FUSEDTRAIN_BUILD_CUDA", "1") == "0":
        return False, "FUSEDTRAIN_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    nvcc = shutil.which("nvcc") or (cuda_home and os.path.join(cuda_home, "bin", "nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        return False, "nvcc not found (install the CUDA toolkit of torch.version.cuda, or set CUDA_HOME)"
    return True, ""


# ---- the record of the torch a build is for -------------------------------------------------------

def torch_record(torch):
    """"torch=<torch.__version__>;cuda=<torch.version.cuda>;cxx11abi=<0|1>;python=<X.Y>" of a torch:
    what a build compiled against it records, and what the running torch must equal to load it.
    torch.__version__ whole (local tag and nightly date included): torch keeps no C++ ABI between
    versions, and a version's CPU and CUDA wheels differ in ABI too."""
    return ";".join([f"torch={torch.__version__}", f"cuda={torch.version.cuda}",
                     f"cxx11abi={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                     f"python={sys.version_info[0]}.{sys.version_info[1]}"])


def parse_record(record):
    """{key: value} of a record string ("k=v;k=v")."""
    return dict(item.split("=", 1) for item in record.split(";") if "=" in item)


def write_record_header(directory, torch):
    """Writes <directory>/fusedtrain_build_record.h (what csrc/module.cpp includes) with the record
    of `torch`, only when its content changes (a new mtime would recompile module.cpp), and
    returns `directory` for the include path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, RECORD_HEADER)
    text = ("// Generated by fusedtrain/_build_spec.py: the torch this build of fusedtrain._C compiles against.\n"
            f'#define FUSEDTRAIN_BUILD_RECORD "{torch_record(torch)}"\n')
    try:
        with open(path) as f:
            if f.read() == text:
                return directory
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)
    return directory


def read_record(so_path):
    """The record a built fusedtrain._C keeps (the string after RECORD_MAGIC), read from the file
    without loading it; None when the file holds none (built before fusedtrain recorded one)."""
    import mmap

    with open(so_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        start = m.find(RECORD_MAGIC)
        if start < 0:
            return None
        start += len(RECORD_MAGIC)
        end = m.find(b"\0", start, start + 4096)
        return m[start:end].decode("utf-8", "replace") if end >= 0 else None
