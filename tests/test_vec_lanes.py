"""adam_math.h's at::vec helpers (stochastic rounding bits, hash and rounding; the 8-bit codes)
against its scalar functions, lane by lane (tests/native/vec_lanes.cpp), built as the CPU
kernels are: the DEFAULT copy on at::vec's generic int32 lanes (C++ int32_t arithmetic, as off
x86-64 where torch has no int32 specialization), with the flags of a non-x86 build, under UBSan
(whose overflow check fails it if -fwrapv goes missing); AVX2; AVX-512 where this CPU runs it.
The kernel tests run at element indices below 2^31; here the stochastic rounding bits are also
checked at indices around 2^31, 2^32 and beyond. (The x86 kernels encode and decode exp_avg's
codes with their own intrinsics, vec_io.h: test_adam_8bit.py and test_cpu_isa.py check those.)"""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

from fusedtrain import _build_spec

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CXX = os.environ.get("CXX", "c++")

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None or not sys.platform.startswith("linux"),
                                reason="needs a C++ compiler (Linux)")

_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
           "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]


def _on_x86():
    return os.uname().machine.lower() in ("x86_64", "amd64")


def _copies():
    """(name, flags) of the copies to build here."""
    x86 = _on_x86()
    copies = [("DEFAULT", _build_spec.cxx_flags("aarch64") + ["-DCPU_CAPABILITY=DEFAULT",
                                                              "-fsanitize=signed-integer-overflow,shift",
                                                              "-fno-sanitize-recover=all"])]
    if x86:
        flags = _build_spec.cxx_flags("x86_64")
        copies.append(("AVX2", flags))
        if torch.backends.cpu.get_cpu_capability() == "AVX512":
            copies.append(("AVX512", [f for f in flags if "AVX2" not in f] + _AVX512))
    # no OpenMP here (nothing parallel): one runtime fewer for the compiler to find
    return [(name, [f for f in flags if f != "-fopenmp"]) for name, flags in copies]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("vec_lanes")
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    incs = [f"-I{d}" for d in cpp_extension.include_paths() + [os.path.join(ROOT, "csrc", "include")]]
    procs = {}
    for name, flags in _copies():  # compiled side by side: ATen's vector headers take a while
        exe = str(out / name)
        cmd = [CXX, "-std=c++17", *flags, *incs, os.path.join(HERE, "native", "vec_lanes.cpp"), "-o", exe,
               f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}"]
        procs[name] = (exe, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    built = {}
    for name, (exe, p) in procs.items():
        log = p.communicate(timeout=600)[0]
        assert p.returncode == 0, f"{name} copy did not compile:\n{log[-4000:]}"
        built[name] = exe
    return built


@pytest.mark.parametrize("copy", ["DEFAULT", "AVX2", "AVX512"])
def test_vector_helpers_equal_the_scalar_ones_in_every_lane(built, copy):
    if copy not in built:
        pytest.skip(f"the {copy} copy does not run on this machine")
    r = subprocess.run([built[copy]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), f"{copy}:\n{r.stdout}\n{r.stderr[-4000:]}"
    # DEFAULT on x86: at::vec's generic lanes (8 at its fallback width), what a non-x86 build
    # without int32 instructions compiles; on such a machine itself, whatever it has
    expected = {"DEFAULT": ["8", "generic"], "AVX2": ["8", "specialized"], "AVX512": ["16", "specialized"]}[copy]
    if copy != "DEFAULT" or _on_x86():
        assert r.stdout.split()[1:3] == expected, r.stdout
