"""unscale_and_check_: the multi-tensor "unscale gradients and check for inf/NaN" pass.

Validation, grouping by (device, dtype) and dispatch live here, the numerics in the kernels
(csrc/include/fusedtrain/unscale_math.h) and their spec, fusedtrain/reference.py. Every
backend is a registered op with the contract in csrc/ops.cpp: fusedtrain:: (native),
fusedtrain_triton:: and fusedtrain_ref::unscale_and_check_.
"""
import contextlib

import torch

from fusedtrain import _backend, reference

OP = "unscale_and_check_"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fake(tensors, inv_scale, found_inf, compute_norm, write):
    return inv_scale.new_empty(() if compute_norm else (0,), dtype=torch.float32)


@torch.library.custom_op("fusedtrain_ref::unscale_and_check_", mutates_args=("tensors", "found_inf"))
def _reference_op(tensors: list[torch.Tensor], inv_scale: torch.Tensor, found_inf: torch.Tensor,
                  compute_norm: bool, write: bool) -> torch.Tensor:
    return reference.unscale_and_check_(tensors, inv_scale, found_inf, compute_norm, write)


_OPS = _backend.family_ops("unscale_and_check_", _fake, "unscale")
# backends whose read-only pass is an op of its own (fusedtrain/triton/unscale.py check_)
_READ_ONLY_OPS = {}
if "triton" in _OPS:
    torch.library.register_fake("fusedtrain_triton::check_")(
        lambda tensors, inv_scale, found_inf, compute_norm: _fake(tensors, inv_scale, found_inf, compute_norm, False))
    _READ_ONLY_OPS["triton"] = torch.ops.fusedtrain_triton.check_


def _check_scalar(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"unscale_and_check_: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(f"unscale_and_check_: {name} must be a one-element float32 tensor, "
                         f"got {t.dtype} with {t.numel()} elements")


def _dense(t):
    """True when t's numel elements are one span that starts at data_ptr (any dim order)."""
    if t.is_contiguous():
        return True
    expected = 1
    dims = sorted(((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _per_device(t, device, cache):
    if t.device == device:
        return t
    if device not in cache:
        cache[device] = t.to(device, non_blocking=True)
    return cache[device]


def _prepare(group, compute_norm):
    """(tensors the kernel can take, [(original, dense copy)] to copy back) for one group:
    sparse COO tensors give their values, non-dense tensors a dense copy."""
    if all(map(torch.Tensor.is_contiguous, group)):  # the common case, checked in C++ per tensor
        return group, []
    runs, copies = [], []
    for t in group:
        if t.layout == torch.sparse_coo:
            if compute_norm and not t.is_coalesced():
                raise ValueError("unscale_and_check_: an uncoalesced sparse tensor was given; the norm needs "
                                 "coalesced values (call .coalesce() first)")
            runs.append(t._values())
        elif t.layout != torch.strided:
            raise ValueError(f"unscale_and_check_: a tensor has layout {t.layout}; only strided and sparse COO "
                             "tensors are supported")
        elif _dense(t):
            runs.append(t)
        else:
            c = t.contiguous()
            runs.append(c)
            copies.append((t, c))
    return runs, copies


def unscale_sumsq_(tensors, inv_scale, found_inf, *, compute_norm=False, write=True, owner_of=None):
    """The pass itself; returns {device: fp32 0-d sum of squares on that device} (empty dict
    unless compute_norm). found_inf may live on another device than some tensors: such
    groups get a local flag that is OR-ed into found_inf with device ops (no host sync).
    owner_of: (device, dtype) -> the TableOwner (fusedtrain/_tables.py) whose tables that
    group's launch uses, or None (each call builds its own)."""
    _check_scalar("inv_scale", inv_scale)
    _check_scalar("found_inf", found_inf)
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return {}
    # grouping by (device, dtype) in C++ (torch's foreach helper): a Python loop over
    # a thousand tensors would cost more than the pass
    try:
        grouped = torch._C._group_tensors_by_device_and_dtype([tensors], False)
    except TypeError:
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"unscale_and_check_: tensors[{i}] is a {type(t).__name__}, not a tensor") from None
        raise

    sums = {}
    flag_cache, inv_cache = {}, {}
    local_flags = []
    for (device, dtype), ((group,), _) in grouped.items():
        if dtype not in KERNEL_DTYPES and dtype != torch.float64:
            raise ValueError(f"unscale_and_check_: got a tensor of dtype {dtype}; expected float32, "
                             "float16 or bfloat16 (float64 on the reference backend)")
        runs, copies = _prepare(group, compute_norm)  # (empty tensors are fine: no chunks)
        backend = _backend.select(device, OP, dtype, KERNEL_DTYPES)
        inv = _per_device(inv_scale, device, inv_cache)
        if found_inf.device == device:
            flag = found_inf
        else:
            if device not in flag_cache:
                flag_cache[device] = torch.zeros((), dtype=torch.float32, device=device)
                local_flags.append(flag_cache[device])
            flag = flag_cache[device]
        owner = owner_of(device, dtype) if owner_of is not None else None
        with owner if owner is not None else contextlib.nullcontext():
            if not write and backend in _READ_ONLY_OPS:
                s = _READ_ONLY_OPS[backend](runs, inv, flag, compute_norm)
            else:
                s = _OPS[backend](runs, inv, flag, compute_norm, write)
        if write:
            for t, c in copies:
                t.copy_(c)
        if compute_norm:
            sums[device] = sums[device] + s if device in sums else s
    for flag in local_flags:
        found_inf.copy_(torch.maximum(found_inf, flag.to(found_inf.device, non_blocking=True).reshape(found_inf.shape)))
    return sums


def unscale_and_check_(tensors, inv_scale, found_inf, *, compute_norm=False, write=True):
    """Multiply every tensor by `inv_scale` in place and set `found_inf` to 1.0 when any
    element is inf or NaN, in one pass (one kernel launch per (device, dtype) group). The
    unscaled value is the fp32 product rounded once, bit-identical to
    torch._amp_foreach_non_finite_check_and_unscale_.

    Args:
        tensors: float32 / float16 / bfloat16 tensors (None skipped; a sparse COO tensor's
            values are processed).
        inv_scale: one-element float32 tensor.
        found_inf: one-element float32 tensor; only ever set, never cleared or read on the host.
        compute_norm: also return the global L2 norm of the unscaled fp32 values (0-d float32
            on found_inf's device; deterministic; nonfinite when an element is).
        write: False makes it a read-only pass (found_inf and the norm; tensors untouched).

    Returns:
        The norm when compute_norm, else None.
    """
    sums = unscale_sumsq_(tensors, inv_scale, found_inf, compute_norm=compute_norm, write=write)
    if not compute_norm:
        return None
    return combine_norm(sums, found_inf.device)


def combine_norm(sums, device):
    """sqrt of the sum of per-device sums of squares, as a 0-d fp32 tensor on `device`."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for s in sums.values():
        total = total + s.to(device, non_blocking=True)
    return total.sqrt()


__all__ = ["unscale_and_check_", "unscale_sumsq_", "combine_norm"]
