"""Owners of the multi-tensor kernels' address tables (the design:
csrc/include/fusedtrain/multi_tensor_tables.h).

A call made without an owner builds its tables and frees them after its launch. Calls made
inside `with owner:` use tables the owner keeps, uploaded again only when an address changed,
so a steady-state step copies nothing to the device, and freed with the owner. An AdamPlan
owns its calls' tables (csrc/adam_plan.cpp, fusedtrain/ops/adam.py); the GradScaler's passes
over an optimizer's grads run inside owners kept on that optimizer, one per (device, dtype).
"""
import threading

import torch

from fusedtrain import _ext

_local = threading.local()


class TableOwner:
    """Keeps the tables of the calls made inside `with owner:`: the CUDA kernels' (in C++,
    fusedtrain._C.TableOwner) and the Triton kernels' (multi_tensor.KeptTables, one per tile
    layout and device)."""

    def __init__(self):
        self._native = _ext._C.TableOwner() if _ext._C is not None else None
        self.triton = {}
        self._previous = []

    def __enter__(self):
        self._previous.append(getattr(_local, "owner", None))
        _local.owner = self
        if self._native is not None:
            self._native.__enter__()
        return self

    def __exit__(self, *exc):
        if self._native is not None:
            self._native.__exit__(*exc)
        _local.owner = self._previous.pop()
        return False


def current():
    """The owner of the calls this thread makes now, or None."""
    return getattr(_local, "owner", None)


def grad_owner(optimizer, device, dtype):
    """The owner of the tables of `optimizer`'s grads of one (device, dtype), kept on the
    optimizer (it lives and dies with it; not in its state_dict); None while torch.compile
    traces (the compiled ops build their own)."""
    if torch.compiler.is_compiling():
        return None
    owners = optimizer.__dict__.setdefault("_fusedtrain_grad_tables", {})
    key = (device, dtype)
    if key not in owners:
        owners[key] = TableOwner()
    return owners[key]
