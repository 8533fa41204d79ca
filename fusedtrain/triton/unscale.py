"""Triton body of the unscale-and-check pass (fusedtrain/ops/unscale.py dispatches here).

One launch per (device, dtype) group over any number of tensors. The host cuts every tensor
into chunks of CHUNK = BLOCK * ITERS elements and builds one int64 table (see chunk_table):
    meta[0]              a zero counter for the last-program combine
    meta[1 .. 1+C)       the address of each chunk's first element
    meta[1+C .. 1+2C)    the length of each chunk
Program c handles chunk c. The per-element math mirrors csrc/include/fusedtrain/unscale_math.h:
y = x * inv_scale in fp32, rounded once at the store; the probe x * 0 is NaN exactly for an
inf/NaN x; squares of y are summed for the norm. With NORM each program stores its partial sum
and the last program to finish (atomic counter) adds the partials in chunk order and stores
the total: deterministic, and still one launch.
"""
import os

import torch
import triton
import triton.language as tl

from fusedtrain.triton.rounding import store_rounded

BLOCK = 2048
ITERS = 8
CHUNK = BLOCK * ITERS
RBLOCK = 1024

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def unscale_chunks_kernel(meta_ptr, n_chunks, inv_scale_ptr, found_inf_ptr, partial_ptr, out_ptr,
                          DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, RBLOCK: tl.constexpr,
                          WRITE: tl.constexpr, NORM: tl.constexpr):
    c = tl.program_id(0)
    base = tl.load(meta_ptr + 1 + c).to(tl.pointer_type(DTYPE))
    n = tl.load(meta_ptr + 1 + n_chunks + c)
    inv = tl.load(inv_scale_ptr)
    offs = tl.arange(0, BLOCK)
    sq = tl.full([BLOCK], 0.0, tl.float32)
    pr = tl.full([BLOCK], 0.0, tl.float32)
    for it in tl.static_range(ITERS):
        idx = it * BLOCK + offs
        m = idx < n
        x = tl.load(base + idx, mask=m, other=0.0).to(tl.float32)
        pr = pr + x * 0.0                       # probe: NaN iff x is inf or NaN
        y = x * inv                             # the unscaled value
        if NORM:
            sq = sq + y * y
        if WRITE:
            store_rounded(base + idx, y, m)
    # found_inf = 1.0 from every lane whose probe is NaN (all store the same value; no
    # reduction needed, and almost always no lane stores)
    tl.store(found_inf_ptr + offs * 0, tl.full([BLOCK], 1.0, tl.float32), mask=pr != pr)
    if NORM:
        tl.store(partial_ptr + c, tl.sum(sq, axis=0))
        # whichever thread stored the partial, it is ordered before the (release) ticket
        tl.debug_barrier()
        ticket = tl.atomic_add(meta_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == n_chunks - 1:
            roffs = tl.arange(0, RBLOCK)
            acc = tl.full([RBLOCK], 0.0, tl.float32)
            for start in range(0, n_chunks, RBLOCK):
                acc += tl.load(partial_ptr + start + roffs, mask=start + roffs < n_chunks, other=0.0,
                               cache_modifier=".cg")
            tl.store(out_ptr, tl.sum(acc, axis=0))


def tiles(tensors):
    """(BLOCK, ITERS) of a launch. On a GPU always (BLOCK, ITERS), a chunk of CHUNK elements.
    Under the Triton interpreter, whose cost grows with the tile and not with the data, the
    tile is shrunk to the largest tensor (a power of two, one iteration), which keeps the CPU
    test run fast; the chunking is still a function of the tensor sizes only."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return BLOCK, ITERS
    largest = max(t.numel() for t in tensors)
    return min(triton.next_power_of_2(max(largest, 16)), BLOCK), 1


def chunk_table(tensors, device, chunk=CHUNK):
    """The int64 meta table of a group (see the module docstring) on `device`."""
    addrs, lens = [], []
    for t in tensors:
        n = t.numel()
        base, es = t.data_ptr(), t.element_size()
        for s in range(0, n, chunk):
            addrs.append(base + s * es)
            lens.append(min(chunk, n - s))
    host = torch.tensor([0] + addrs + lens, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True), len(addrs)
    return host, len(addrs)


def unscale_and_check_(tensors, inv_scale, found_inf, compute_norm, write):
    """One launch over `tensors` (one device, one dtype; each non-overlapping and dense)."""
    dev = inv_scale.device
    block, iters = tiles(tensors)
    meta, n_chunks = chunk_table(tensors, dev, block * iters)
    if n_chunks == 0:
        return torch.zeros((), dtype=torch.float32, device=dev) if compute_norm else \
            torch.empty((0,), dtype=torch.float32, device=dev)
    if compute_norm:
        partials = torch.empty((n_chunks,), dtype=torch.float32, device=dev)
        out = torch.empty((), dtype=torch.float32, device=dev)
    else:
        partials = out = torch.empty((0,), dtype=torch.float32, device=dev)
    unscale_chunks_kernel[(n_chunks,)](
        meta, n_chunks, inv_scale, found_inf, partials, out,
        DTYPE=_TL_DTYPE[tensors[0].dtype], BLOCK=block, ITERS=iters, RBLOCK=RBLOCK,
        WRITE=write, NORM=compute_norm, num_warps=8)
    return out


def _spec(dtype, write, norm):
    from fusedtrain.triton.aot import AotSpec

    return AotSpec(
        kernel=unscale_chunks_kernel,
        signature={"meta_ptr": "*i64", "n_chunks": "i32", "inv_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
                   "partial_ptr": "*fp32", "out_ptr": "*fp32"},
        constexprs={"DTYPE": dtype, "BLOCK": BLOCK, "ITERS": ITERS, "RBLOCK": RBLOCK, "WRITE": write, "NORM": norm},
        name=f"unscale_chunks_kernel[{dtype.name},write={int(write)},norm={int(norm)}]",
    )


AOT_SPECS = [_spec(d, w, nm) for d in (tl.float32, tl.float16, tl.bfloat16)
             for w, nm in ((True, False), (True, True), (False, True), (False, False))]
