"""GPU code held to account without a GPU (docs/design.md §5, points 2 and 4).

- every Triton kernel of the package compiles ahead of time for sm_80 and sm_90, and
  ptxas reports no spill stores;
- the built extension registers a CPU body for every op, and a CUDA body when it was built
  with CUDA; its CUDA kernels use no local memory (cuobjdump: STACK:0 LOCAL:0). The build
  itself already fails on a spill (-Xptxas --warn-on-spills,--warning-as-error in setup.py).
"""
import os
import re
import shutil
import subprocess

import pytest
import torch

from fusedtrain import _ext
from fusedtrain.triton import aot
from helpers import INTERPRET, ROOT, cuda_build_missing

pytestmark = pytest.mark.skipif(INTERPRET,
                                reason="compiles for real GPUs; not under the interpreter")

SPECS = aot.all_specs()


def test_every_triton_module_lists_its_kernels():
    import importlib
    import pkgutil

    import triton

    import fusedtrain.triton as pkg

    listed = {id(s.kernel) for s in SPECS}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"fusedtrain.triton.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.JITFunction) and obj.__module__ == mod.__name__:
                # helpers called from kernels (@triton.jit without a launch) are inlined
                # into the kernels that call them and need no spec of their own
                if getattr(mod, "AOT_HELPERS", ()) and name in mod.AOT_HELPERS:
                    continue
                assert id(obj) in listed, f"{mod.__name__}.{name} has no AotSpec in AOT_SPECS"


@pytest.mark.parametrize("cc", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("spec", SPECS, ids=[s.label for s in SPECS])
def test_triton_kernel_compiles_without_spills(spec, cc):
    compiled = aot.compile_for(spec, cc)
    assert compiled.asm.get("cubin"), f"{spec.label}: no cubin for sm_{cc}"
    stores, loads, regs = aot.ptxas_spills(compiled.asm["ptx"], cc)
    assert stores == 0 and loads == 0, f"{spec.label} sm_{cc}: {stores} B spill stores, {loads} B spill loads ({regs} regs)"


def _schema_names():
    with open(os.path.join(ROOT, "csrc", "ops.cpp")) as f:
        return re.findall(r'm\.def\("([a-z_0-9]+)\(', f.read())


@pytest.mark.parametrize("key", ["CPU", "CUDA"])
def test_extension_registers_every_op(key):
    if _ext._C is None:
        cuda_build_missing("extension not built")
    if key == "CUDA" and not _ext._C.built_with_cuda:
        cuda_build_missing("extension built without CUDA")
    names = _schema_names()
    assert names, "no schemas found in csrc/ops.cpp"
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedtrain::{n}", key)]
    assert not missing, f"ops without a {key} kernel: {missing}"


def _cuobjdump():
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def test_cuda_kernels_use_no_local_memory():
    if _ext._C is None or not _ext._C.built_with_cuda:
        cuda_build_missing("extension built without CUDA")
    tool = _cuobjdump()
    if tool is None:
        cuda_build_missing("cuobjdump not found")
    out = subprocess.run([tool, "-res-usage", _ext._C.__file__], capture_output=True, text=True, check=True).stdout
    archs = set(re.findall(r"arch = (sm_\d+)", out))
    assert {"sm_80", "sm_90"} <= archs, f"SASS for {sorted(archs)} only"
    kernels = re.findall(r"Function ([^\s:]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    assert kernels, "no CUDA kernels found in the extension"
    bad = [(name, stack, local) for name, _, stack, local in kernels if int(stack) or int(local)]
    assert not bad, f"kernels with stack/local memory (spills or local arrays): {bad[:5]}"


VECTOR_SPECS = [s for s in SPECS if s.kernel.fn.__name__.startswith("_bce_") and s.aligned and ",plain," in s.label
                and ",flat" in s.label]


@pytest.mark.parametrize("spec", VECTOR_SPECS, ids=[s.label for s in VECTOR_SPECS])
def test_elementwise_bce_kernels_move_128_bits_per_access(spec):
    """Aligned tensors whose size is a multiple of 16 (how the specs compile) give 128-bit
    global loads, and 128-bit stores where the kernel writes per element."""
    ptx = aot.compile_for(spec, 90).asm["ptx"]
    assert "ld.global.v4" in ptx, f"{spec.label}: no 128-bit load"
    if "bwd" in spec.label or ",none," in spec.label:
        assert "st.global.v4" in ptx, f"{spec.label}: no 128-bit store"


MULTI_TENSOR_SPECS = [s for s in SPECS if s.kernel.fn.__name__ in ("unscale_kernel", "_adam_kernel", "_adam_q8_kernel")
                      and s.constexprs.get("ALIGNED")]


@pytest.mark.parametrize("spec", MULTI_TENSOR_SPECS, ids=[s.label for s in MULTI_TENSOR_SPECS])
def test_multi_tensor_kernels_move_128_bits_per_access(spec):
    """The unscale and Adam kernels read their addresses from tables, where Triton cannot see
    an alignment: the host tells them (ALIGNED, fusedtrain/triton/multi_tensor.py), and then
    they move 128 bits per access in fp32, fp16 and bf16 (issue #13 item 5); the 8-bit Adam
    kernel so for its params, grads and masters (its codes, 8 a thread, move 64 bits)."""
    ptx = aot.compile_for(spec, 90).asm["ptx"]
    loads, stores = len(re.findall(r"ld\.global\.v4", ptx)), len(re.findall(r"st\.global\.v4", ptx))
    assert loads, f"{spec.label}: no 128-bit load"
    if spec.constexprs.get("WRITE", True):
        assert stores, f"{spec.label}: no 128-bit store"
    if spec.kernel.fn.__name__ == "_adam_kernel":
        # one at least per streamed list: read p (or the master), g, m, v (and max_exp_avg_sq);
        # written p, m, v (and max_exp_avg_sq, the master), so no list falls back to scalar
        ams, master = int(spec.constexprs["AMSGRAD"]), int(spec.constexprs["MASTER"])
        assert loads >= 4 + ams and stores >= 3 + ams + master, f"{spec.label}: {loads} loads, {stores} stores"


def test_every_multi_tensor_dtype_has_a_vector_spec():
    dtypes = {(s.kernel.fn.__name__, str(s.constexprs.get("DTYPE", s.signature.get("p_ref"))))
              for s in MULTI_TENSOR_SPECS}
    for kernel, names in (("unscale_kernel", ("fp32", "fp16", "bf16")), ("_adam_kernel", ("fp32", "fp16", "bf16"))):
        for n in names:
            assert any(k == kernel and n in d for k, d in dtypes), f"{kernel}: no aligned {n} spec"
