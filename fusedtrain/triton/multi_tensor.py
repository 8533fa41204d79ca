"""One Triton launch over many tensors: the address tables its programs read.

Kernel arguments cannot carry a thousand addresses, device tables can:
    rows[t, l]        address of tensor t of list l (0 for an empty list)
    rows[t, -1]       numel of tensor t
    tile_t[k], tile_off[k]   tensor and first element of program k's tile (CHUNK elements)
The tables depend only on addresses and sizes, so they are kept per device (a step over the
same tensors finds them and launches the kernel and nothing else).
"""
import collections
import os
import threading

import torch
import triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_TABLES = 64

_lock = threading.Lock()
_tables = collections.OrderedDict()  # key -> (rows, tile_t, tile_off), least recently used first


def tile(max_numel, block, iters):
    """(BLOCK, ITERS) of a launch: the kernel's on a GPU. The interpreter runs one numpy call
    per operation and program, so there a tile is one iteration as wide as the largest tensor
    (a power of two from 16 to 2^16): few programs, and their cost grows with the tile only."""
    if not _INTERPRET:
        return block, iters
    return min(1 << 16, max(16, triton.next_power_of_2(max(int(max_numel), 1)))), 1


def _to_device(t, device):
    # from pinned memory and stream-ordered: a pageable host-to-device copy would block the host
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _tile_tables(numels, chunk, empty_tiles, device):
    per = [max(1, -(-m // chunk)) if empty_tiles else -(-m // chunk) for m in numels]
    tile_t = [t for t in range(len(numels)) for _ in range(per[t])]
    tile_off = [k * chunk for t in range(len(numels)) for k in range(per[t])]
    return (_to_device(torch.tensor(tile_t, dtype=torch.int32), device),
            _to_device(torch.tensor(tile_off, dtype=torch.int64), device))


def tables(lists, chunk, empty_tiles):
    """(rows, tile_t, tile_off) on the tensors' device for `lists` (equal-length lists of
    tensors; an empty list gives a column of zeros).

    Args:
        lists: the kernel's tensor lists; list 0 gives the device and every tensor's numel.
        chunk: elements per tile.
        empty_tiles: whether an empty tensor gets one tile (Adam bumps its step) or none.
    """
    first = lists[0]
    n = len(first)
    cols = []
    for i, t in enumerate(first):
        cols += [lst[i].data_ptr() if lst else 0 for lst in lists]
        cols.append(t.numel())
    device = first[0].device
    key = (str(device), chunk, empty_tiles, tuple(cols))
    with _lock:
        hit = _tables.get(key)
        if hit is not None:
            _tables.move_to_end(key)
            return hit
    ncols = len(lists) + 1
    entry = (_to_device(torch.tensor(cols, dtype=torch.int64).reshape(n, ncols), device),
             *_tile_tables(cols[ncols - 1::ncols], chunk, empty_tiles, device))
    with _lock:
        _tables[key] = entry
        if len(_tables) > _MAX_TABLES:
            _tables.popitem(last=False)
    return entry


class KeptTables:
    """The tables of one call that an owner keeps from launch to launch (an optimizer's
    plan), instead of the shared cache: the tile tables are built once, since they depend on
    the sizes only, and the address table is uploaded again only when an address changed (a
    grad allocated elsewhere). They live as long as the owner, so a CUDA graph captured with
    them keeps valid tables while the owner lives.

    Args:
        numels: every tensor's numel.
        chunk, empty_tiles: as for tables().
        device: the tensors' device.
    """

    def __init__(self, numels, chunk, empty_tiles, device):
        self.device = device
        self.tile_t, self.tile_off = _tile_tables(list(numels), chunk, empty_tiles, device)
        self._host = None
        self.rows = None

    def update(self, rows):
        """The address table on the device for `rows` (the int64 host table of tables()),
        uploaded only when it differs from the last one."""
        if self._host is None or not torch.equal(rows, self._host):
            self.rows = _to_device(rows, self.device)
            self._host = rows
        return self.rows, self.tile_t, self.tile_off
