"""Triton kernels, one module per op family.

Each module lists its kernels for ahead-of-time compilation in AOT_SPECS (see
fusedtrain/triton/aot.py), so tests compile every kernel for sm_80 and sm_90 without a GPU.
"""
import contextlib
import struct

import torch


def f64_bits(x: float) -> int:
    """The bit pattern of x as an IEEE double, as a signed int64: how a host double reaches a
    kernel exactly (Triton would pass a Python float as fp32)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def as_int32(x: int) -> int:
    """The low 32 bits of x as a signed int32: Triton types an int argument by its value (i32,
    i64), so words of a bit pattern passed this way launch one compiled variant for any value;
    a kernel gets the same bits back with .to(tl.int64) & 0xFFFFFFFF or .to(tl.uint32)."""
    return ((int(x) & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000


def device_guard(t: torch.Tensor):
    """Make t's device the current one around a launch: Triton launches on the current CUDA
    device and its current stream, so a model on cuda:1 while cuda:0 is current would run on
    the wrong GPU. Code compiled by torch.compile guards its device itself.

    Args:
        t: a tensor of the launch.
    """
    if t.device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)
