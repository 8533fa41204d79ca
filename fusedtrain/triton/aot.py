"""Ahead-of-time compilation of fusedtrain's Triton kernels for GPUs this machine lacks.

Every module in fusedtrain/triton/ lists its kernels in AOT_SPECS, a list of AotSpec: the
kernel, the signature Triton would infer at a real launch (pointer and scalar types), and
the constexpr values of a typical launch. compile_for() runs the whole Triton pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin) for a given compute capability with no GPU present;
ptxas_spills() re-assembles the PTX with `ptxas -v` and returns the spill-store bytes.
"""
import dataclasses
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import tempfile


@dataclasses.dataclass
class AotSpec:
    kernel: object                 # a @triton.jit function
    signature: dict                # arg name -> "*fp32", "*bf16", "i32", "fp32", "constexpr", ...
    constexprs: dict               # arg name -> value
    name: str = ""                 # label for reports (default: kernel name + dtypes)
    options: dict = dataclasses.field(default_factory=dict)  # launch options of the call site (num_warps)
    # pointer arguments 16-byte aligned, as Triton specializes a launch on tensors from torch's
    # allocator (the vectorized code that runs); False compiles the variant for offset views
    aligned: bool = True
    # int arguments a typical launch has as multiples of 16 (specialized alike: with N % 16 == 0
    # a masked elementwise kernel vectorizes its loads)
    divisible: tuple = ()

    @property
    def label(self):
        if self.name:
            return self.name
        dtypes = sorted({v.lstrip("*") for v in self.signature.values() if v.startswith("*")})
        return f"{self.kernel.fn.__name__}[{','.join(dtypes)}]"


def all_specs():
    """AotSpec of every Triton kernel in the package, module by module."""
    import fusedtrain.triton as pkg

    specs = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "aot":
            continue
        mod = importlib.import_module(f"fusedtrain.triton.{info.name}")
        specs.extend(getattr(mod, "AOT_SPECS", []))
    return specs


def compile_for(spec: AotSpec, cc: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(spec.signature)
    for k in spec.constexprs:
        sig[k] = "constexpr"
    attrs = {}
    if spec.aligned:  # what the JIT's specialization gives a 16-byte-aligned pointer ("D")
        names = spec.kernel.arg_names
        attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in spec.signature.items()
                 if v.startswith("*") or k in spec.divisible}
    src = ASTSource(fn=spec.kernel, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(spec.options))


def _ptxas():
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else shutil.which("ptxas")


def ptxas_spills(ptx: str, cc: int) -> tuple:
    """(spill store bytes, spill load bytes, registers) that ptxas -v reports for `ptx`."""
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), "-v", f"-arch={arch}", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    stores = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
    loads = [int(x) for x in re.findall(r"(\d+) bytes spill loads", text)]
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    if not (stores and loads and regs):  # an unread report must not pass as "no spills"
        raise RuntimeError(f"ptxas -v printed no register/spill report for sm_{cc}:\n{text}")
    return sum(stores), sum(loads), max(regs)
