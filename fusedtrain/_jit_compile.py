"""Compiles fusedtrain._C for the running torch into a directory, with the sources and flags of
fusedtrain/_build_spec.py (setup.py's), through torch.utils.cpp_extension.load (ninja), and loads
the result once to prove it loads.

`fusedtrain build` (fusedtrain/_jit_build.py) runs this file by path in a child process that
imports torch and _build_spec only, never the fusedtrain package: a process that already holds
an extension's TORCH_LIBRARY registrations cannot load a second build.

    python -c "<runpy bootstrap>" _jit_compile.py --csrc DIR --out DIR
"""
import argparse
import importlib.util
import os
import sys


def _load_build_spec():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_spec.py")
    spec = importlib.util.spec_from_file_location("fusedtrain_build_spec", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _say(msg):
    print(f"fusedtrain build: {msg}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csrc", required=True, help="the C++/CUDA sources (fusedtrain/_csrc or csrc)")
    p.add_argument("--out", required=True, help="the build directory; the extension is <out>/_C.so")
    a = p.parse_args(argv)
    spec = _load_build_spec()
    spec.set_cuda_home()  # before cpp_extension is imported: it reads CUDA_HOME once
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, load

    cuda, why_not = spec.cuda_decision(torch, CUDA_HOME)
    sources = spec.sources(a.csrc, cuda)
    include = spec.include_dirs(a.csrc) + [spec.write_record_header(os.path.join(a.out, "generated"), torch)]
    defines = ["-D%s=%s" % spec.CUDA_DEFINE] if cuda else []
    if cuda:
        include += spec.pip_cuda_include_dirs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(spec.cuda_archs(torch))
        what = f"CPU + CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    else:
        what = f"CPU kernels only ({why_not})"
    _say(f"compiling {len(sources)} sources against torch {torch.__version__}: {what}")
    mod = load(name=spec.MODULE_NAME, sources=sources, extra_cflags=spec.cxx_flags() + defines,
               extra_cuda_cflags=spec.nvcc_flags() + defines, extra_include_paths=include,
               build_directory=a.out, verbose=True, with_cuda=cuda)
    want = spec.torch_record(torch)
    if not mod.build_record.startswith(want + ";"):
        raise SystemExit(f"fusedtrain build: the build records {mod.build_record!r}, expected {want!r}")
    _say(f"built and loaded: {mod.build_record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
