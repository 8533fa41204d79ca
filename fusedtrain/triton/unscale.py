"""The unscale-and-check pass as one Triton launch per (device, dtype) group: the op
fusedtrain_triton::unscale_and_check_, with fusedtrain::unscale_and_check_'s contract
(csrc/ops.cpp).

Programs take tiles of the tables of fusedtrain/triton/multi_tensor.py. Per element, as
csrc/include/fusedtrain/unscale_math.h: y = x * inv_scale in fp32, rounded once at the
store; the probe x * 0 is NaN exactly for an inf/NaN x; the squares of y are summed for the
norm. With NORM every program stores its partial sum and the last one to finish (atomic
ticket) adds the partials in tile order: deterministic, and still one launch. ALIGNED: the
host checked that every address of the launch is 16-byte aligned after a peeled head of
tile_off % 16 elements (multi_tensor.py), and the kernel moves 128 bits per access; tensors
that are not go to a second launch, whose norm is added to the first's.
"""
import torch
import triton
import triton.language as tl

from fusedtrain.triton import device_guard, multi_tensor
from fusedtrain.triton.rounding import store_rounded

BLOCK = 2048
ITERS = 8
NUM_WARPS = 8
RBLOCK = 1024

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# n_tiles: one compiled variant for any number of tiles (Triton would compile another for 1 and
# for multiples of 16; a second, unaligned launch often has one tile)
@triton.jit(do_not_specialize=["n_tiles"])
def unscale_kernel(rows, tile_t, tile_off, n_tiles, inv_scale_ptr, found_inf_ptr, partial_ptr, out_ptr, ticket_ptr,
                   DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, RBLOCK: tl.constexpr,
                   WRITE: tl.constexpr, NORM: tl.constexpr, ALIGNED: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(tile_t + c).to(tl.int64)
    off0 = tl.load(tile_off + c)
    base = tl.load(rows + 2 * t).to(tl.pointer_type(DTYPE))
    numel = tl.load(rows + 2 * t + 1)
    inv = tl.load(inv_scale_ptr)
    hsq = 0.0
    if ALIGNED:
        # the head peeled off a misaligned view (multi_tensor.py): tiles start at h + k * CHUNK;
        # the first tile takes elements [0, h), scalar, and the aligned rest starts at base + h
        h = off0 % 16
        off0 = tl.multiple_of(off0 - h, BLOCK * ITERS)
        hidx = tl.arange(0, 16)
        hm = hidx < tl.where(off0 == 0, h, 0)  # (the interpreter cannot & a vector with this scalar)
        hx = tl.load(base + hidx, mask=hm, other=0.0).to(tl.float32)
        hy = hx * inv
        if WRITE:
            store_rounded(base + hidx, hy, hm)
        tl.store(found_inf_ptr + hidx * 0, tl.full([16], 1.0, tl.float32), mask=(hx * 0.0) != (hx * 0.0))
        hsq = tl.sum(hy * hy, axis=0)
        base = base + h
        numel = numel - h
    # the tile's own base and length: 32-bit offsets inside it (64-bit ones cost registers)
    base = base + off0
    if ALIGNED:  # (hinted here: a hint on base + h did not reach the loads, PTX had no 128-bit access)
        base = tl.multiple_of(base, 16)
    n = tl.minimum(numel - off0, BLOCK * ITERS).to(tl.int32)
    n16 = n // 16 * 16  # the loop's mask is constant over 16 elements (a vector of any dtype)
    offs = tl.arange(0, BLOCK)
    sq = tl.full([BLOCK], 0.0, tl.float32)
    pr = tl.full([BLOCK], 0.0, tl.float32)
    for it in tl.range(ITERS):
        idx = it * BLOCK + offs
        m = idx < n16
        x = tl.load(base + idx, mask=m, other=0.0).to(tl.float32)
        pr = pr + x * 0.0                       # probe: NaN iff x is inf or NaN
        y = x * inv                             # the unscaled value
        if NORM:
            sq = sq + y * y
        if WRITE:
            store_rounded(base + idx, y, m)
    # the last (fewer than 16) elements, scalar
    tidx = n16 + tl.arange(0, 16)
    tm = tidx < n
    x = tl.load(base + tidx, mask=tm, other=0.0).to(tl.float32)
    y = x * inv
    if WRITE:
        store_rounded(base + tidx, y, tm)
    # found_inf = 1.0 from every lane whose probe is NaN (all store the same value; no
    # reduction needed, and almost always no lane stores)
    tl.store(found_inf_ptr + offs * 0, tl.full([BLOCK], 1.0, tl.float32), mask=pr != pr)
    tl.store(found_inf_ptr + tidx * 0, tl.full([16], 1.0, tl.float32), mask=(x * 0.0) != (x * 0.0))
    if NORM:
        tl.store(partial_ptr + c, tl.sum(sq, axis=0) + tl.sum(y * y, axis=0) + hsq)
        # whichever thread stored the partial, it is ordered before the (release) ticket
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == n_tiles - 1:
            roffs = tl.arange(0, RBLOCK)
            acc = tl.full([RBLOCK], 0.0, tl.float32)
            for start in range(0, n_tiles, RBLOCK):
                acc += tl.load(partial_ptr + start + roffs, mask=start + roffs < n_tiles, other=0.0,
                               cache_modifier=".cg")
            tl.store(out_ptr, tl.sum(acc, axis=0))


@torch.library.custom_op("fusedtrain_triton::unscale_and_check_", mutates_args=("tensors", "found_inf"))
def unscale_and_check_(tensors: list[torch.Tensor], inv_scale: torch.Tensor, found_inf: torch.Tensor,
                       compute_norm: bool, write: bool) -> torch.Tensor:
    # an opaque custom op (not triton_op): the kernel reads addresses from a table, which
    # torch.compile could not trace
    return _launch(tensors, inv_scale, found_inf, compute_norm, write)


@torch.library.custom_op("fusedtrain_triton::check_", mutates_args=("found_inf",))
def check_(tensors: list[torch.Tensor], inv_scale: torch.Tensor, found_inf: torch.Tensor,
           compute_norm: bool) -> torch.Tensor:
    """unscale_and_check_ with write=False, as an op that mutates found_inf alone: a Python
    custom op bumps the version of every tensor it declares mutated, in Python; the read-only
    pass of every GradScaler.step of fusedtrain's optimizers took 0.2-0.3 ms less host time at
    1000 params with this op (benchmarks/amp.py host rows: one-read step 1.42 -> 1.15 ms)."""
    return _launch(tensors, inv_scale, found_inf, compute_norm, False)


def _launch(tensors, inv_scale, found_inf, compute_norm, write):
    dev = inv_scale.device
    empty = torch.zeros((), dtype=torch.float32, device=dev) if compute_norm else \
        torch.empty((0,), dtype=torch.float32, device=dev)
    if not tensors:
        return empty
    block, iters = multi_tensor.tile_of(tensors, BLOCK, ITERS)
    total = None
    # one launch (misaligned views peeled), or two where some tensors cannot be (multi_tensor.tables)
    for rows, tile_t, tile_off, aligned in multi_tensor.tables([tensors], block * iters, empty_tiles=False,
                                                               sizes=multi_tensor.element_sizes([tensors], 1)):
        n_tiles = tile_t.numel()
        if n_tiles == 0:
            continue
        if compute_norm:
            partials = torch.empty((n_tiles,), dtype=torch.float32, device=dev)
            ticket = torch.zeros((1,), dtype=torch.int32, device=dev)
            out = torch.empty((), dtype=torch.float32, device=dev)
        else:
            partials = ticket = out = empty
        with device_guard(inv_scale):
            unscale_kernel[(n_tiles,)](
                rows, tile_t, tile_off, n_tiles, inv_scale, found_inf, partials, out, ticket,
                DTYPE=_TL_DTYPE[tensors[0].dtype], BLOCK=block, ITERS=iters, RBLOCK=RBLOCK,
                WRITE=write, NORM=compute_norm, ALIGNED=aligned, num_warps=NUM_WARPS)
        total = out if total is None or not compute_norm else total + out
    return empty if total is None else total


def _spec(dtype, write, norm, aligned=True):
    from fusedtrain.triton.aot import AotSpec

    return AotSpec(
        kernel=unscale_kernel,
        signature={"rows": "*i64", "tile_t": "*i64", "tile_off": "*i64", "n_tiles": "i32", "inv_scale_ptr": "*fp32",
                   "found_inf_ptr": "*fp32", "partial_ptr": "*fp32", "out_ptr": "*fp32", "ticket_ptr": "*i32"},
        constexprs={"DTYPE": dtype, "BLOCK": BLOCK, "ITERS": ITERS, "RBLOCK": RBLOCK, "WRITE": write, "NORM": norm,
                    "ALIGNED": aligned},
        name=f"unscale_kernel[{dtype.name},write={int(write)},norm={int(norm)}{'' if aligned else ',unaligned'}]",
        options={"num_warps": NUM_WARPS},
    )


AOT_SPECS = [_spec(d, w, nm, a) for d in (tl.float32, tl.float16, tl.bfloat16)
             for w, nm in ((True, False), (True, True), (False, True), (False, False)) for a in (True, False)]
