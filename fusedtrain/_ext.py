"""Loads the compiled extension fusedtrain._C, or says why it is not there."""
import torch

_C = None
_why_not = ""


def _load():
    global _C, _why_not
    try:
        from fusedtrain import _C as mod
    except ImportError as e:
        _why_not = f"extension not built ({e}); reinstall with a C++ compiler: pip install --no-build-isolation ."
        return
    have = torch.backends.cpu.get_cpu_capability()
    if mod.cpu_capability == "AVX2" and have not in ("AVX2", "AVX512"):
        # The CPU kernels were compiled with AVX2; calling them here would be SIGILL.
        _why_not = f"extension was built for AVX2 but this CPU reports {have}"
        return
    _C = mod


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
