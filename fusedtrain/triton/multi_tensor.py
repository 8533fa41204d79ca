"""One Triton launch over many tensors: the address tables its programs read.

Kernel arguments cannot carry a thousand addresses, device tables can:
    rows[t, l]        address of tensor t of list l (0 for an empty list)
    rows[t, -1]       numel of tensor t
    tile_t[k], tile_off[k]   tensor and first element of program k's tile (CHUNK elements)
A call's tables are a list of launches (rows, tile_t, tile_off, aligned). The aligned launch
tells its kernel that every address it streams is a multiple of 16 bytes, and the kernel moves
128 bits per access (Triton cannot see the alignment of an address it reads from a table). A
view that starts off a 16-byte boundary (DDP's gradient_as_bucket_view) stays in it when its
lists can be peeled: h < 16 leading elements after which every streamed list is aligned (the
same offset in every buffer). Its tiles then start at h + k * CHUNK, so tile_off % 16 = h, and
the kernel takes the head [0, h) with scalar accesses in the tensor's first tile, as the CUDA
kernels do (csrc/cuda/vec_io.cuh head). Only tensors whose lists cannot be aligned together,
and every misaligned one where the caller does not peel (8-bit states: blocks start at element
0), go to a second launch of scalar accesses.
Who owns them, as for the CUDA kernels (csrc/include/fusedtrain/multi_tensor_tables.h): a
call builds its own (tables()), or its owner keeps them from launch to launch (KeptTables, an
optimizer's plan: nothing copied to the device in a steady-state step, nothing evicted from
under a CUDA graph). While a CUDA graph is being captured, every call builds its own tables
inside the graph (upload()).
"""
import os

import torch
import triton

from fusedtrain import _ext, _tables

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile(max_numel, block, iters):
    """(BLOCK, ITERS) of a launch: the kernel's on a GPU. The interpreter runs one numpy call
    per operation and program, so there a tile is one iteration as wide as the largest tensor
    (a power of two from 16 to 2^16): few programs, and their cost grows with the tile only."""
    if not _INTERPRET:
        return block, iters
    return min(1 << 16, max(16, triton.next_power_of_2(max(int(max_numel), 1)))), 1


def tile_of(tensors, block, iters):
    """tile() of a launch over `tensors`, whose sizes are read only under the interpreter: on a
    GPU the tile is the kernel's, and a scan of a thousand sizes per call would be host work
    for nothing."""
    if not _INTERPRET:
        return block, iters
    return tile(max(t.numel() for t in tensors), block, iters)


def _capturing(device):
    """Whether the current stream of `device` (not of the current device) is capturing."""
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def upload(words, device):
    """The int64 host tensor `words` on `device`, on the current stream, as the CUDA kernels'
    tables go (csrc/cuda/multi_tensor_apply.cu): from pinned memory; while a CUDA graph is
    being captured, in kernel parameters into the graph's own memory (a copy from host memory
    would be replayed from a buffer that by then holds something else)."""
    if device.type != "cuda":
        return words.to(device)
    if _ext._C is not None and _ext._C.built_with_cuda:
        return _ext._C.upload_words(words, device)
    if _capturing(device):
        raise RuntimeError("fusedtrain: a Triton multi-tensor kernel cannot build its tables during CUDA graph "
                           "capture without the compiled extension's CUDA kernels (fusedtrain check says why they "
                           "are missing); use the native backend, or reinstall with nvcc")
    return words.pin_memory().to(device, non_blocking=True)


def _upload_tables(rows, heads, chunk, empty_tiles, device, sel=None):
    """(rows, tile_t, tile_off) on `device` from the host rows table: one upload. (Tensor ops
    on the host: no Python loop per tile, and no host read that a test of the AMP step's
    syncs would flag.) heads: per row, the elements peeled before its first tile (module
    docstring). sel: the rows that get tiles (all when None); every launch keeps the whole
    table, so a tile's row is the tensor's position in the call (Adam's stochastic rounding
    hashes it)."""
    per = (rows[:, -1] - heads + chunk - 1) // chunk  # tiles per tensor
    per = torch.maximum(per, (heads > 0).long())  # a tensor that is all head has one tile
    if empty_tiles:
        per = per.clamp(min=1)
    if sel is not None:
        per = per * sel
    tile_t = torch.repeat_interleave(torch.arange(len(per)), per)
    first = torch.cumsum(per, 0) - per  # each tensor's first tile
    tile_off = heads[tile_t] + (torch.arange(len(tile_t)) - first[tile_t]) * chunk
    dev = upload(torch.cat([rows.reshape(-1), tile_t, tile_off]), device)
    n, k = rows.numel(), len(tile_t)
    return dev[:n].view(rows.shape), dev[n:n + k], dev[n + k:]


def heads(rows, sizes):
    """Per row of the host table, the number h of leading elements after which the addresses
    of every streamed list (the first len(sizes) columns, of those element sizes in bytes, 0 for
    an empty list) are 16-byte aligned, at most the tensor's numel; where no h < 16 aligns them
    all (views at different offsets in their buffers), the numel of a tensor of fewer than 16
    elements (all head), else -1. (An h at the numel leaves the body's aligned accesses all
    masked off: a hint that is false for no access.)"""
    addr = rows[:, :len(sizes)]
    misaligned = (addr % 16 != 0).any(dim=1)
    h = torch.zeros(len(rows), dtype=torch.int64)
    if torch.equal(misaligned, torch.zeros_like(misaligned)):  # the usual call: no search
        return h  # (torch.equal: no Tensor.__bool__, which the AMP step's no-sync test forbids)
    addr = addr[misaligned].unsqueeze(2)  # (misaligned tensors, lists, 1)
    e = torch.arange(16)
    size = torch.tensor(sizes, dtype=torch.int64).view(1, -1, 1)
    ok = ((addr + size * e) % 16 == 0).all(dim=1)  # (tensors, 16): aligned after e elements
    numel = rows[misaligned, -1]
    found = torch.minimum(ok.to(torch.int8).argmax(dim=1), numel)  # argmax: the first True
    # no h aligns them: a tensor of fewer than 16 elements is all head (scalar, in this launch)
    h[misaligned] = torch.where(ok.any(dim=1), found, torch.where(numel < 16, numel, -1))
    return h


def _build(rows, chunk, empty_tiles, device, sizes=None):
    """The launches of a call (module docstring) from its host rows table; sizes: the
    element sizes of the lists to peel (none peeled when None)."""
    if sizes is None:
        aligned = (rows[:, :-1] % 16 == 0).all(dim=1)
        h = torch.zeros(len(rows), dtype=torch.int64)
    else:
        h = heads(rows, sizes)
        aligned = h >= 0
        h = h.clamp(min=0)
    if torch.equal(aligned, torch.ones_like(aligned)):
        return [(*_upload_tables(rows, h, chunk, empty_tiles, device), True)]
    return [(*_upload_tables(rows, h * sel, chunk, empty_tiles, device, sel), a)
            for sel, a in ((aligned, True), (~aligned, False)) if not torch.equal(sel, torch.zeros_like(sel))]


def addresses(lists):
    """The int64 host rows table of `lists` (equal-length lists of tensors; an empty list
    gives a column of zeros; list 0 gives every tensor's numel)."""
    if _ext._C is not None:
        return _ext._C.addresses(lists)  # no Python call per tensor
    first = lists[0]
    cols = []
    for i, t in enumerate(first):
        cols += [lst[i].data_ptr() if lst else 0 for lst in lists]
        cols.append(t.numel())
    return torch.tensor(cols, dtype=torch.int64).reshape(len(first), len(lists) + 1)


def element_sizes(lists, streamed):
    """The element sizes of the first `streamed` lists (an empty list: 0, its column of zeros
    is aligned after any number of elements): the sizes argument of tables()."""
    return tuple(lst[0].element_size() if lst else 0 for lst in lists[:streamed])


def tables(lists, chunk, empty_tiles, sizes=None):
    """The launches [(rows, tile_t, tile_off, aligned)] of one call on the tensors' device:
    the current owner's (fusedtrain/_tables.py), or this call's own.

    Args:
        lists: the kernel's tensor lists (addresses()).
        chunk: elements per tile (a multiple of 16).
        empty_tiles: whether an empty tensor gets one tile (Adam bumps its step) or none.
        sizes: element_sizes() of the lists the kernel streams, when it peels misaligned
            heads (module docstring); None: it does not.
    """
    device = lists[0][0].device
    owner = _tables.current()
    if owner is None:
        return _build(addresses(lists), chunk, empty_tiles, device, sizes)
    key = (chunk, empty_tiles, device, sizes)
    if key not in owner.triton:
        owner.triton[key] = KeptTables(chunk, empty_tiles, device, sizes)
    return owner.triton[key].update(addresses(lists))


class KeptTables:
    """The tables of one call that an owner keeps from launch to launch (an optimizer's
    plan): uploaded again only when an address changed (a grad allocated elsewhere), freed
    with the owner. While a CUDA graph is being captured the call gets tables of its own
    instead, built inside the graph, which then depends on nothing the owner may free.

    Args:
        chunk, empty_tiles, sizes: as for tables().
        device: the tensors' device.
    """

    def __init__(self, chunk, empty_tiles, device, sizes=None):
        self.chunk, self.empty_tiles, self.device, self.sizes = chunk, empty_tiles, device, sizes
        self._host = None
        self._kept = None
        self._stream = None  # the stream the kept tables were allocated on

    def update(self, rows):
        """The launches [(rows, tile_t, tile_off, aligned)] on the device for the host rows
        table `rows` (addresses())."""
        cuda = self.device.type == "cuda"
        if cuda and _capturing(self.device):
            return _build(rows, self.chunk, self.empty_tiles, self.device, self.sizes)
        if self._host is None or not torch.equal(rows, self._host):
            self._kept = _build(rows, self.chunk, self.empty_tiles, self.device, self.sizes)
            self._host = rows
            self._stream = torch.cuda.current_stream(self.device) if cuda else None
        elif cuda:
            stream = torch.cuda.current_stream(self.device)
            if stream != self._stream:  # read on another stream: not reused before it is done
                for launch in self._kept:
                    launch[0].record_stream(stream)
        return self._kept
