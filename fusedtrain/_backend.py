"""Which backend runs an op: availability, the default choice, and use_backend().

Default per call (docs/design.md §2): CUDA tensors -> triton, else native, else
reference; CPU tensors -> native, else reference; dtypes without kernels -> reference. An explicit choice (use_backend() or the
FUSEDTRAIN_BACKEND environment variable) that cannot run on the given tensors raises
BackendError saying why; it never falls back silently.
"""
import contextlib
import importlib
import os
import threading

import torch

from fusedtrain import _ext

NAMES = ("triton", "native", "reference")
_local = threading.local()


class BackendError(RuntimeError):
    """An explicitly chosen backend cannot run on the given tensors."""


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_triton_import_error = None


def _triton_importable():
    global _triton_import_error
    if _triton_import_error is None:
        try:
            import triton  # noqa: F401

            _triton_import_error = ""
        except ImportError as e:
            _triton_import_error = f"triton is not installed ({e})"
    return _triton_import_error == ""


def availability(name: str, device: torch.device) -> tuple:
    """(True, "") when backend `name` can run on tensors of `device`, else (False, why)."""
    if name == "reference":
        return (True, "")
    if name == "native":
        if device.type == "cpu":
            return _ext.native_cpu()
        if device.type == "cuda":
            return _ext.native_cuda()
        return (False, f"the native backend has no kernels for {device.type} tensors")
    if name == "triton":
        if not _triton_importable():
            return (False, _triton_import_error)
        if device.type == "cuda":
            return (True, "")
        if device.type == "cpu" and _interpret():
            return (True, "")
        if device.type == "cpu":
            return (False, "triton runs CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)")
        return (False, f"triton has no kernels for {device.type} tensors")
    raise ValueError(f"unknown backend {name!r}; expected one of {NAMES}")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backends(device=None) -> dict:
    """{name: (available, why_not)} for tensors on `device` (default: cuda if present, else cpu)."""
    dev = torch.device(device) if device is not None else _default_device()
    return {name: availability(name, dev) for name in NAMES}


def _forced():
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1], "use_backend()"
    env = os.environ.get("FUSEDTRAIN_BACKEND", "").strip()
    if env:
        if env not in NAMES:
            raise BackendError(f"FUSEDTRAIN_BACKEND={env!r} is not a backend; expected one of {NAMES}")
        return env, "FUSEDTRAIN_BACKEND"
    return None, None


@contextlib.contextmanager
def use_backend(name: str):
    """Run fusedtrain ops inside the block on backend `name` ("triton", "native" or "reference")."""
    if name not in NAMES:
        raise ValueError(f"use_backend: unknown backend {name!r}; expected one of {NAMES}")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def select(device: torch.device, op: str, dtype: torch.dtype = None, kernel_dtypes=None) -> str:
    """The backend that runs `op` on tensors of `device`.

    Args:
        device: where the tensors are.
        op: the op's name, for error messages.
        dtype, kernel_dtypes: the tensors' dtype and the dtypes the triton and native kernels
            of `op` take; any other dtype runs on the reference backend (an explicit choice of
            another backend is then an error).
    """
    name, source = _forced()
    no_kernels = kernel_dtypes is not None and dtype not in kernel_dtypes
    if name is not None:
        ok, why = availability(name, device)
        if ok and no_kernels and name != "reference":
            ok, why = False, f"it has kernels for {', '.join(str(d) for d in kernel_dtypes)}, not {dtype}"
        if not ok:
            raise BackendError(f"{op}: backend {name!r} (chosen by {source}) cannot run on {device} tensors: {why}")
        return name
    if no_kernels:
        return "reference"
    order = ("triton", "native", "reference") if device.type == "cuda" else ("native", "reference")
    for cand in order:
        if availability(cand, device)[0]:
            return cand
    return "reference"


def family_ops(name: str, fake, triton_module: str) -> dict:
    """{backend: op} of an op family with one op: fusedtrain_ref::<name> (which the family
    registers itself), fusedtrain::<name> where the extension is built and
    fusedtrain_triton::<name> where triton imports, each with the fake kernel `fake`.

    Args:
        name: the op's name in the three namespaces.
        fake: its fake (meta) kernel, for torch.compile and FakeTensor.
        triton_module: the module of fusedtrain.triton that registers the Triton op.
    """
    torch.library.register_fake(f"fusedtrain_ref::{name}")(fake)
    ops = {"reference": getattr(torch.ops.fusedtrain_ref, name)}
    if _ext._C is not None:
        torch.library.register_fake(f"fusedtrain::{name}")(fake)
        ops["native"] = getattr(torch.ops.fusedtrain, name)
    try:
        importlib.import_module(f"fusedtrain.triton.{triton_module}")
    except ImportError:  # no triton: the backend reports itself unavailable
        return ops
    torch.library.register_fake(f"fusedtrain_triton::{name}")(fake)
    ops["triton"] = getattr(torch.ops.fusedtrain_triton, name)
    return ops
