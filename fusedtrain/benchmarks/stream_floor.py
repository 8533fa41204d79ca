"""The memory floor of an fp32 Adam step (stream_floor.c), for the Adam benchmark's
"memory floor" rows: the time to stream the step's bytes per element (28 with fp32
moments, 20 with bf16 ones, 16 with 8-bit ones) over the same tensors with trivial math.
Built on first use with the system C compiler ($CC or cc) into ~/.cache/fusedtrain;
`available()` is False (and the rows are skipped) without one."""
import ctypes
import hashlib
import os
import shutil
import subprocess

import torch

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stream_floor.c")
_lib = None


def _build():
    global _lib
    if _lib is not None:
        return _lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _lib = False
        return _lib
    with open(_SRC, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    out_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fusedtrain")
    so = os.path.join(out_dir, f"stream_floor-{digest}.so")
    try:
        if not os.path.exists(so):
            os.makedirs(out_dir, exist_ok=True)
            tmp = f"{so}.{os.getpid()}.tmp"
            # -march=native: the floor is what this machine can do at best
            subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", "-pthread", _SRC, "-o", tmp],
                           check=True, capture_output=True)
            os.replace(tmp, so)
        lib = ctypes.CDLL(so)
    except (OSError, subprocess.CalledProcessError):
        _lib = False
        return _lib
    fp = ctypes.POINTER(ctypes.c_void_p)
    lib.stream_floor.argtypes = [fp, fp, fp, fp, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_int,
                                 ctypes.c_int]
    lib.stream_floor.restype = ctypes.c_int
    _lib = lib
    return _lib


def available() -> bool:
    """Whether the floor could be built (a C compiler was found) and loaded."""
    return bool(_build())


def make_pass(params, grads, exp_avgs, exp_avg_sqs):
    """A no-argument function running one floor pass over these CPU tensors (written in place:
    use tensors whose values do not matter, or that an optimizer overwrites anyway).

    Args:
        params, grads: lists of contiguous fp32 CPU tensors, one entry per parameter.
        exp_avgs, exp_avg_sqs: the moments, contiguous CPU tensors of the params' sizes, all
            of one element size: 4 (fp32), 2 (bf16) or 1 (8-bit codes) bytes.
    """
    lib = _build()
    if not lib:
        raise RuntimeError("stream_floor: no C compiler")
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    for lst in lists:
        for t in lst:
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError("stream_floor: contiguous CPU tensors only")
    for t in (*params, *grads):
        if t.dtype != torch.float32:
            raise ValueError(f"stream_floor: params and grads must be float32, got {t.dtype}")
    state_bytes = {t.element_size() for t in (*exp_avgs, *exp_avg_sqs)}
    if len(state_bytes) > 1 or not state_bytes <= {4, 2, 1}:
        raise ValueError(f"stream_floor: moments of one element size, 4, 2 or 1 bytes; got {sorted(state_bytes)}")
    for lst in (grads, exp_avgs, exp_avg_sqs):
        if len(lst) != len(params) or any(t.numel() != p.numel() for t, p in zip(lst, params)):
            raise ValueError("stream_floor: every list must hold one tensor of each param's size")
    k = len(params)
    arrays = [(ctypes.c_void_p * k)(*[t.data_ptr() for t in lst]) for lst in lists]
    sizes = (ctypes.c_int64 * k)(*[t.numel() for t in params])
    fp = ctypes.POINTER(ctypes.c_void_p)
    ptrs = [ctypes.cast(a, fp) for a in arrays]
    threads = torch.get_num_threads()
    nbytes = state_bytes.pop() if state_bytes else 4

    def run():
        if lib.stream_floor(*ptrs, sizes, k, threads, nbytes) != 0:
            raise RuntimeError("stream_floor: could not start its threads")

    run.keep_alive = (lists, arrays, sizes)  # the tensors must outlive the pointers
    return run
