"""Spawning a few gloo ranks on loopback with a time bound, and always tearing down."""
import os
import socket
import sys
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears gloo down while another is still in a collective
    finally:
        dist.destroy_process_group()
    # A rank that got here has passed: leave without the interpreter's finalization, where a
    # gloo worker thread still being torn down aborted a passed rank once in ~25 runs
    # ("terminate called without an active exception", SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world=2, args=(), timeout_s=120):
    """Run fn(rank, world, *args) in `world` processes; raise if any fails or time runs out."""
    ctx = mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__}: ranks still running after {timeout_s}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
